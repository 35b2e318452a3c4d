"""Adam / AdaGrad from the associative-memory form (App. B) equal optax's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nlj import optim
from optim_testutil import grads

SHAPES = {"w": (3, 4), "b": (4,)}


def trajectories(tx_a, tx_b, gs):
  params = grads(123, SHAPES)
  pa, pb = params, params
  sa, sb = tx_a.init(pa), tx_b.init(pb)
  for g in gs:
    ua, sa = tx_a.update(g, sa, pa)
    ub, sb = tx_b.update(g, sb, pb)
    for k in g:
      np.testing.assert_allclose(ua[k], ub[k], rtol=2e-5, atol=1e-8, err_msg=k)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)


def gradient_stream(n=6):
  gs = [grads(i, SHAPES) for i in range(n)]
  gs[2]["b"] = np.zeros(4, np.float32)  # a zero gradient mid-stream
  return gs


@pytest.mark.parametrize("b1,b2,eps,eps_root", [(0.9, 0.999, 1e-8, 0.0), (0.5, 0.9, 1e-3, 1e-6)])
def test_adam_memory_equals_optax_adam(b1, b2, eps, eps_root):
  trajectories(optim.adam_memory(0.01, b1, b2, eps, eps_root),
               optax.adam(0.01, b1, b2, eps, eps_root), gradient_stream())


def test_adam_memory_with_schedule_equals_optax():
  sched = optax.cosine_decay_schedule(0.1, 5)
  trajectories(optim.adam_memory(sched), optax.adam(sched), gradient_stream(4))


@pytest.mark.parametrize("init,eps", [(0.1, 1e-7), (0.0, 1e-7)])
def test_adagrad_memory_equals_optax_adagrad(init, eps):
  trajectories(optim.adagrad_memory(0.1, init, eps), optax.adagrad(0.1, init, eps),
               gradient_stream())


def test_sum_mode_is_eq105_literally():
  b1, b2, eps = 0.9, 0.25, 1e-8
  gs = [grads(i, {"w": (2, 3)})["w"].astype(np.float64) for i in range(3)]
  tx = optim.adam_memory(1.0, b1, b2, eps, mode="sum")
  state = tx.init({"w": jnp.zeros((2, 3))})
  m = h = 0.0
  for g in gs:
    u, state = tx.update({"w": g.astype(np.float32)}, state)
    m, h = m + b1 * g, h + b2 * g * g
    np.testing.assert_allclose(-u["w"], m / (np.sqrt(b2) * (np.sqrt(h) + eps)), rtol=1e-5)


def test_identity_value_is_momentum_and_ridge_damps():
  g = {"w": np.array([1.0, 0.1, 0.0], np.float32)}
  tx = optim.scale_by_memory_preconditioner(m_forget=0.5, m_write=1.0, h_forget=1.0,
                                            h_write=1.0, normalize=False, value="identity")
  u, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(u["w"], g["w"])  # P = H, λ = 0: plain momentum (eq. 104)
  tx = optim.scale_by_memory_preconditioner(m_forget=0.5, m_write=1.0, h_forget=1.0,
                                            h_write=1.0, normalize=False, value="identity",
                                            ridge=0.01)
  u, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(u["w"], [1.0 / 1.01, 0.1 * 0.01 / 0.02, 0.0], rtol=1e-6)


def test_adam_memory_zero_gradients_no_nan():
  z = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
  for tx in (optim.adam_memory(0.1), optim.adagrad_memory(0.1, 0.0),
             optim.adam_memory(0.1, mode="sum")):
    state = tx.init(z)
    for _ in range(2):
      u, state = tx.update(z, state)
    assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(u))


def test_adam_memory_errors():
  with pytest.raises(ValueError, match="b1 must be in"):
    optim.adam_memory(0.1, b1=1.0)
  with pytest.raises(ValueError, match="b2 must be in"):
    optim.adam_memory(0.1, b2=0.0)
  with pytest.raises(ValueError, match="unknown mode='adamw'"):
    optim.adam_memory(0.1, mode="adamw")
  with pytest.raises(ValueError, match="learning_rate must be in"):
    optim.adagrad_memory(-0.1)
  with pytest.raises(ValueError, match="initial_h must be in"):
    optim.adagrad_memory(0.1, initial_accumulator_value=-1.0)
  with pytest.raises(ValueError, match="unknown value="):
    optim.scale_by_memory_preconditioner(m_forget=0.9, m_write=0.1, h_forget=0.9,
                                         h_write=0.1, normalize=True, value="cube")
