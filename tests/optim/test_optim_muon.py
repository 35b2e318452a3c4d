"""Newton–Schulz and Muon (eqs. 42–44, 52) against NumPy and optax.contrib.muon."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import _muon  # the reference implementation optax.contrib.muon uses

from nlj import optim
from optim_testutil import grads, np_newton_schulz


@pytest.mark.parametrize("shape", [(3, 5), (6, 2), (4, 4)])
def test_newton_schulz_matches_numpy_and_optax(shape):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  ours = optim.newton_schulz(jnp.asarray(x))
  np.testing.assert_allclose(ours, np_newton_schulz(x), rtol=2e-4, atol=2e-5)
  ref = _muon.orthogonalize_via_newton_schulz(
      jnp.asarray(x), jnp.asarray(optim.NS_COEFFS), 5)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
  # Approximately semi-orthogonal: singular values in Muon's band around 1.
  s = np.linalg.svd(np.asarray(ours), compute_uv=False)
  assert np.all(s > 0.6) and np.all(s < 1.3), s


def test_newton_schulz_zero_and_errors():
  np.testing.assert_array_equal(optim.newton_schulz(jnp.zeros((2, 3))), np.zeros((2, 3)))
  with pytest.raises(ValueError, match="2-D matrix"):
    optim.newton_schulz(jnp.zeros((2, 3, 4)))


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_equals_optax_contrib_muon(nesterov):
  shapes = {"w1": (4, 3), "w2": (3, 6), "b": (3,), "s": ()}
  params = grads(99, shapes)
  gs = [grads(i, shapes) for i in range(4)]
  ours_tx = optim.muon(0.02, beta=0.9, nesterov=nesterov, weight_decay=0.01)
  ref_tx = optax.contrib.muon(0.02, beta=0.9, nesterov=nesterov, weight_decay=0.01)
  ps, pr = params, params
  ss, sr = ours_tx.init(ps), ref_tx.init(pr)
  for g in gs:
    us, ss = ours_tx.update(g, ss, ps)
    ur, sr = ref_tx.update(g, sr, pr)
    ps, pr = optax.apply_updates(ps, us), optax.apply_updates(pr, ur)
    for k in shapes:
      np.testing.assert_allclose(us[k], ur[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_scale_by_muon_hand_computed():
  beta = 0.5
  g1 = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]], np.float32)
  g2 = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]], np.float32)
  tx = optim.scale_by_muon(beta, nesterov=False)
  state = tx.init({"w": g1})
  _, state = tx.update({"w": g1}, state)
  u, _ = tx.update({"w": g2}, state)
  m = (beta * (1 - beta) * g1 + (1 - beta) * g2) / (1 - beta**2)
  expect = np_newton_schulz(m) * np.sqrt(max(1.0, 3 / 2))
  np.testing.assert_allclose(u["w"], expect, rtol=2e-4, atol=2e-5)


def test_scale_by_muon_rejects_non_matrix_and_bad_args():
  with pytest.raises(ValueError, match="every leaf must be 2-D"):
    optim.scale_by_muon().init({"b": jnp.zeros(3)})
  with pytest.raises(ValueError, match="beta must be in"):
    optim.scale_by_muon(beta=1.0)
  with pytest.raises(ValueError, match="ns_steps must be an integer >= 1"):
    optim.scale_by_muon(ns_steps=0)
  with pytest.raises(ValueError, match="learning_rate"):
    optim.muon(-1.0)


def test_muon_zero_gradients_no_nan():
  z = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  tx = optim.muon(0.1)
  state = tx.init(z)
  for _ in range(2):
    u, state = tx.update(z, state, z)
  assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(u))
