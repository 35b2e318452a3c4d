"""M3 (Algorithm 1) against a NumPy transcription of the box."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nlj import optim
from optim_testutil import grads, np_newton_schulz


def np_m3(gs, f, mode, b1, b2, b3, alpha, eps=1e-8):
  """Algorithm 1, written out in NumPy; returns the directions and the M2 history."""
  m1 = v = m2 = o2 = gsum = 0.0
  outs, m2s = [], []
  for t, g in enumerate(gs, start=1):
    g = g.astype(np.float64)
    if mode == "literal":
      m1, v = m1 + b1 * g, v + b2 * g * g
      vh = v
    else:
      m1, v = b1 * m1 + (1 - b1) * g, b2 * v + (1 - b2) * g * g
      vh = v / (1 - b2**t)
    gsum = gsum + g
    outs.append((np_newton_schulz(m1) + alpha * o2) / (np.sqrt(vh) + eps))
    if t % f == 0:
      m2 = m2 + b3 * gsum if mode == "literal" else b3 * m2 + (1 - b3) * gsum / f
      o2, gsum = np_newton_schulz(m2), 0.0
    m2s.append(np.zeros_like(g) + m2)
  return outs, m2s


@pytest.mark.parametrize("mode", ["literal", "ema"])
def test_m3_matches_algorithm_box(mode):
  f, b1, b2, b3, alpha = 2, 0.9, 0.5, 0.7, 0.6
  gs = [grads(i, {"w": (3, 4)})["w"] for i in range(5)]
  tx = optim.scale_by_m3(f, mode=mode, beta1=b1, beta2=b2, beta3=b3, alpha=alpha)
  state = tx.init({"w": jnp.zeros((3, 4))})
  expect, m2s = np_m3(gs, f, mode, b1, b2, b3, alpha)
  for g, e, m2 in zip(gs, expect, m2s):
    u, state = tx.update({"w": g}, state)
    np.testing.assert_allclose(u["w"], e, rtol=5e-4, atol=5e-5)
    np.testing.assert_allclose(state.m2["w"], m2, rtol=1e-5, atol=1e-6)


def test_slow_momentum_changes_exactly_every_f_steps():
  f = 3
  tx = jax.jit(optim.scale_by_m3(f, mode="literal").update)
  state = optim.scale_by_m3(f).init({"w": jnp.zeros((2, 3))})
  changed = []
  prev = np.asarray(state.m2["w"])
  for t in range(1, 10):
    _, state = tx({"w": jnp.full((2, 3), float(t)) + jnp.eye(2, 3)}, state)
    cur = np.asarray(state.m2["w"])
    changed.append(not np.array_equal(cur, prev))
    prev = cur
  assert changed == [False, False, True] * 3
  # The cached O2 is NS of the slow memory, which holds the sum of the last f gradients.
  np.testing.assert_allclose(state.o2["w"], np_newton_schulz(state.m2["w"]), rtol=2e-4,
                             atol=2e-5)
  np.testing.assert_allclose(state.gsum["w"], 0.0)


def test_m3_routes_non_matrix_leaves_to_adamw():
  shapes = {"w": (3, 4), "b": (4,)}
  gs = [grads(i, shapes) for i in range(3)]
  params = grads(7, shapes)
  tx = optim.m3(0.01, frequency=2, adam_learning_rate=0.003)
  ref = optax.adamw(0.003, weight_decay=0.0)
  state, rstate = tx.init(params), ref.init({"b": params["b"]})
  for g in gs:
    u, state = tx.update(g, state, params)
    ur, rstate = ref.update({"b": g["b"]}, rstate, {"b": params["b"]})
    np.testing.assert_allclose(u["b"], ur["b"], rtol=1e-5, atol=1e-8)
  assert u["w"].shape == (3, 4) and np.all(np.isfinite(u["w"]))


@pytest.mark.parametrize("mode", ["literal", "ema"])
def test_m3_zero_gradients_no_nan(mode):
  z = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  tx = optim.m3(0.1, frequency=1, mode=mode)
  state = tx.init(z)
  for _ in range(3):
    u, state = tx.update(z, state, z)
  for leaf in jax.tree.leaves((u, state)):
    assert np.all(np.isfinite(leaf))
  assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(u))


def test_m3_rms_normalize():
  g = grads(3, {"w": (4, 5)})
  tx = optim.scale_by_m3(2, rms_normalize=True)
  u, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(np.sqrt(np.mean(np.square(u["w"]))), 1.0, rtol=1e-5)


@pytest.mark.parametrize("kw,match", [
    (dict(frequency=0), "frequency must be an integer >= 1"),
    (dict(frequency=2.5), "frequency must be an integer"),
    (dict(mode="adam"), "unknown mode='adam'; allowed: 'literal', 'ema'"),
    (dict(beta1=1.0), "beta1 must be in"),
    (dict(beta2=0.0), "beta2 must be in"),
    (dict(alpha=-0.1), "alpha must be in"),
    (dict(eps=0.0), "eps must be in"),
    (dict(ns_steps=0), "ns_steps"),
])
def test_m3_bad_hyperparameters(kw, match):
  with pytest.raises(ValueError, match=match):
    optim.scale_by_m3(**kw)


def test_m3_errors_on_non_matrix_and_negative_lr():
  with pytest.raises(ValueError, match="every leaf must be 2-D"):
    optim.scale_by_m3().init({"b": jnp.zeros(3)})
  with pytest.raises(ValueError, match="learning_rate must be in"):
    optim.m3(-0.1)
