"""DGD as an outer optimizer (eq. 57) against hand-computed NumPy updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nlj import optim


def setup(seed=0, d_in=4, d_out=3, b=1):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((d_in, d_out)).astype(np.float32)
  x = rng.standard_normal((b, d_in)).astype(np.float32)
  delta = rng.standard_normal((b, d_out)).astype(np.float32)
  grad = (x.T @ delta / b).astype(np.float32)  # mean-loss gradient of y = x W
  return w, x, grad


def test_eq57_single_input_hand_computed():
  w, x, grad = setup()
  eta = 0.3
  x1 = x[0].astype(np.float64)
  eta_p = eta / (1 + eta * x1 @ x1)
  expect = (np.eye(4) - eta_p * np.outer(x1, x1)) @ w - eta_p * grad  # eq. 57, Flax layout
  tx = optim.dgd(eta)
  params = {"kernel": w, "bias": np.ones(3, np.float32)}
  grads = {"kernel": grad, "bias": np.full(3, 2.0, np.float32)}
  u, _ = tx.update(grads, tx.init(params), params, layer_inputs={"kernel": x[0], "bias": None})
  np.testing.assert_allclose(w + u["kernel"], expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(u["bias"], -eta * 2.0 * np.ones(3), rtol=1e-6)  # plain GD


@pytest.mark.parametrize("b", [3, 6])  # Woodbury (B < d_in) and direct solve (B >= d_in)
def test_batch_is_exact_proximal_step(b):
  w, x, grad = setup(1, b=b)
  eta = 0.5
  # argmin_W 1/(2B) Σ||x_b W - u_b||² + 1/(2η)||W - W_t||², with ∇ = -XᵀU/B:
  # normal equations (XᵀX/B + I/η) W = W_t/η - ∇.
  a = x.T.astype(np.float64) @ x / b + np.eye(4) / eta
  expect = np.linalg.solve(a, w / eta - grad)
  new = optim.dgd_step(jnp.asarray(w), jnp.asarray(grad), jnp.asarray(x), eta)
  np.testing.assert_allclose(new, expect, rtol=1e-4, atol=1e-5)


def test_neurips_variant():
  w, x, grad = setup(2)
  eta, c = 0.1, 0.5
  x1 = x[0].astype(np.float64)
  expect = (np.eye(4) - c * np.outer(x1, x1)) @ w - eta * grad
  tx = optim.dgd(eta, variant="neurips", neurips_decay=c)
  u, _ = tx.update({"k": grad}, tx.init({"k": w}), {"k": w}, layer_inputs={"k": x[0]})
  np.testing.assert_allclose(w + u["k"], expect, rtol=1e-5, atol=1e-6)


def test_input_axis_one_and_higher_rank_kernels():
  w, x, grad = setup(3)
  eta = 0.2
  tx = optim.dgd(eta, input_axis=1)  # [d_out, d_in] layout: W(I - η' x xᵀ) - η'∇ (paper form)
  u, _ = tx.update({"k": grad.T}, tx.init({"k": w.T}), {"k": w.T}, layer_inputs={"k": x})
  x1 = x[0].astype(np.float64)
  eta_p = eta / (1 + eta * x1 @ x1)
  expect = w.T @ (np.eye(4) - eta_p * np.outer(x1, x1)) - eta_p * grad.T
  np.testing.assert_allclose(w.T + u["k"], expect, rtol=1e-5, atol=1e-6)
  # A [d_in, heads, d_head] kernel is the [d_in, heads*d_head] matrix.
  w3, g3 = w.reshape(4, 3, 1), grad.reshape(4, 3, 1)
  tx = optim.dgd(eta)
  u3, _ = tx.update({"k": g3}, tx.init({"k": w3}), {"k": w3}, layer_inputs={"k": x})
  u2, _ = tx.update({"k": grad}, tx.init({"k": w}), {"k": w}, layer_inputs={"k": x})
  np.testing.assert_allclose(u3["k"].reshape(4, 3), u2["k"], rtol=1e-6)


def test_no_inputs_is_plain_gd_and_schedule():
  sched = optax.linear_schedule(1.0, 0.0, 4)
  tx = optim.dgd(sched)
  g = {"k": jnp.ones((2, 2))}
  state = tx.init(g)
  u1, state = tx.update(g, state, g)
  u2, state = tx.update(g, state, g)
  np.testing.assert_allclose(u1["k"], -1.0 * np.ones((2, 2)))
  np.testing.assert_allclose(u2["k"], -0.75 * np.ones((2, 2)))


def test_chain_and_jit_pass_layer_inputs():
  w, x, grad = setup(4)
  tx = optax.chain(optax.clip_by_global_norm(1e6), optim.dgd(0.3))
  params = {"k": w}
  step = jax.jit(lambda g, s, p, xi: tx.update(g, s, p, layer_inputs={"k": xi}))
  u, _ = step({"k": grad}, tx.init(params), params, x[0])
  ref, _ = optim.dgd(0.3).update({"k": grad}, optim.dgd(0.3).init(params), params,
                                 layer_inputs={"k": x[0]})
  np.testing.assert_allclose(u["k"], ref["k"], rtol=1e-6)
  assert not np.allclose(u["k"], -0.3 * grad)  # the decay term is really there


def test_zero_gradients_and_inputs_no_nan():
  z = {"k": jnp.zeros((3, 2))}
  tx = optim.dgd(0.1)
  u, _ = tx.update(z, tx.init(z), z, layer_inputs={"k": jnp.zeros((5, 3))})
  assert np.all(np.asarray(u["k"]) == 0)


def test_dgd_errors():
  with pytest.raises(ValueError, match="learning_rate must be in"):
    optim.dgd(-1.0)
  with pytest.raises(ValueError, match="unknown variant='icml'"):
    optim.dgd(0.1, variant="icml")
  with pytest.raises(ValueError, match="input_axis"):
    optim.dgd(0.1, input_axis=2)
  tx = optim.dgd(0.1)
  p = {"k": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match="needs params"):
    tx.update(p, tx.init(p), None, layer_inputs={"k": jnp.zeros(3), "b": None})
  with pytest.raises(ValueError, match="does not match the kernel's input axis"):
    tx.update(p, tx.init(p), p, layer_inputs={"k": jnp.zeros(2), "b": None})
  with pytest.raises(ValueError, match="pass None for biases"):
    tx.update(p, tx.init(p), p, layer_inputs={"k": None, "b": jnp.zeros(2)})
