"""Generalized / delta momentum (eqs. 33–37, 46–52) against NumPy and optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nlj import optim
from optim_testutil import as_np, grads, np_newton_schulz

SHAPES = {"w": (3, 4), "b": (4,)}


def run(tx, gs, params=None):
  params = params if params is not None else jax.tree.map(jnp.zeros_like, gs[0])
  state = tx.init(params)
  outs = []
  for g in gs:
    u, state = tx.update(g, state, params)
    outs.append(u)
  return outs, state


def test_dot_equals_optax_trace_and_sgd_momentum():
  gs = [grads(i, SHAPES) for i in range(5)]
  ours, _ = run(optim.scale_by_generalized_momentum(0.8), gs)
  ref, _ = run(optax.trace(decay=0.8), gs)
  for a, b in zip(ours, ref):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
  ours, _ = run(optim.generalized_momentum(0.1, alpha=0.8), gs)
  ref, _ = run(optax.sgd(0.1, momentum=0.8), gs)
  for a, b in zip(ours, ref):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_dot_hand_computed():
  g1 = {"w": np.array([[1.0, -2.0]], np.float32)}
  g2 = {"w": np.array([[0.5, 1.0]], np.float32)}
  (u1, u2), _ = run(optim.scale_by_generalized_momentum(0.5), [g1, g2])
  np.testing.assert_allclose(u1["w"], [[1.0, -2.0]])
  np.testing.assert_allclose(u2["w"], [[1.0, 0.0]])  # 0.5*[1,-2] + [0.5, 1]


@pytest.mark.parametrize("normalize", [True, False])
def test_delta_rank1_matches_numpy(normalize):
  alpha, zeta = 0.9, 0.7
  gs = [grads(i, SHAPES, scale=0.5) for i in range(4)]
  ours, _ = run(optim.scale_by_generalized_momentum(
      alpha, objective="l2", delta_strength=zeta, normalize_keys=normalize), gs)
  m = {k: np.zeros(s) for k, s in SHAPES.items()}
  for g, u in zip(map(as_np, gs), ours):
    for k in m:
      key = g[k].ravel()
      if normalize:
        key = key / np.linalg.norm(key)
      erase = zeta * np.dot(m[k].ravel(), key) * key
      m[k] = alpha * m[k] - erase.reshape(m[k].shape) + g[k]
      np.testing.assert_allclose(u[k], m[k], rtol=1e-5, atol=1e-6)


def test_delta_rank1_erases_component_along_gradient():
  # With ζ = α the stored component along the new gradient is replaced exactly.
  g1 = {"w": np.array([1.0, 0.0], np.float32)}
  g2 = {"w": np.array([3.0, 0.0], np.float32)}
  (_, u2), _ = run(optim.scale_by_generalized_momentum(0.5, objective="l2",
                                                       delta_strength=0.5), [g1, g2])
  np.testing.assert_allclose(u2["w"], [3.0, 0.0])  # standard momentum would give 3.5


@pytest.mark.parametrize("gram_axis", [0, 1])
def test_delta_gram_matches_numpy(gram_axis):
  alpha, zeta = 0.9, 0.5
  shapes = {"w": (3, 5), "b": (5,)}
  gs = [grads(10 + i, shapes) for i in range(3)]
  ours, _ = run(optim.scale_by_generalized_momentum(
      alpha, objective="l2", delta_form="gram", delta_strength=zeta, gram_axis=gram_axis), gs)
  m = {k: np.zeros(s) for k, s in shapes.items()}
  for g, u in zip(map(as_np, gs), ours):
    G = g["w"]
    if gram_axis == 0:  # rows of G (the d_in axis) are the key axis: (αI - ζ ĜĜᵀ) m
      erase = zeta * (G @ G.T) @ m["w"] / np.sum(G * G)
    else:
      erase = zeta * m["w"] @ (G.T @ G) / np.sum(G * G)
    m["w"] = alpha * m["w"] - erase + G
    kb = g["b"] / np.linalg.norm(g["b"])  # 1-D leaf falls back to rank-1
    m["b"] = alpha * m["b"] - zeta * np.dot(m["b"], kb) * kb + g["b"]
    np.testing.assert_allclose(u["w"], m["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u["b"], m["b"], rtol=1e-5, atol=1e-6)


def test_precondition_feature_map_output_fn():
  gs = [grads(20 + i, {"w": (2, 3)}) for i in range(3)]
  P = {"w": np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]], np.float32)}
  ours, _ = run(optim.scale_by_generalized_momentum(
      0.9, precondition=P, feature_map=jnp.tanh, output_fn=lambda m: 2.0 * m), gs)
  m = np.zeros((2, 3))
  for g, u in zip(gs, ours):
    m = 0.9 * m + P["w"] * np.tanh(g["w"].astype(np.float64))
    np.testing.assert_allclose(u["w"], 2.0 * m, rtol=1e-5, atol=1e-6)
  # A callable P sees the whole tree; a matrix P left-multiplies.
  A = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
  (u,), _ = run(optim.scale_by_generalized_momentum(
      0.9, precondition=lambda t: jax.tree.map(lambda x: A @ x, t)), gs[:1])
  np.testing.assert_allclose(u["w"], A @ gs[0]["w"], rtol=1e-6)


def test_output_fn_newton_schulz_is_muon_like():
  gs = [grads(30 + i, {"w": (3, 4)}) for i in range(3)]
  ours, _ = run(optim.scale_by_generalized_momentum(0.9, output_fn=optim.newton_schulz), gs)
  m = np.zeros((3, 4))
  for g, u in zip(gs, ours):
    m = 0.9 * m + g["w"]
    np.testing.assert_allclose(u["w"], np_newton_schulz(m), rtol=2e-4, atol=2e-5)


def test_alpha_schedule():
  # Step t (1-based) uses α(t - 1): steps 1-2 forget everything, step 3 keeps half.
  sched = lambda c: jnp.where(c < 2, 0.0, 0.5)
  g = {"w": np.ones((2,), np.float32)}
  (u1, u2, u3), _ = run(optim.scale_by_generalized_momentum(sched), [g, g, g])
  np.testing.assert_allclose(u2["w"], [1.0, 1.0])
  np.testing.assert_allclose(u3["w"], [1.5, 1.5])


@pytest.mark.parametrize("kw", [dict(objective="dot"), dict(objective="l2"),
                                dict(objective="l2", delta_form="gram"),
                                dict(objective="l2", normalize_keys=False)])
def test_zero_gradients_no_nan(kw):
  z = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
  outs, state = run(optim.scale_by_generalized_momentum(0.9, **kw), [z, z])
  for t in outs + [state.momentum]:
    for v in jax.tree.leaves(t):
      assert np.all(np.isfinite(v)) and np.all(np.asarray(v) == 0)


@pytest.mark.parametrize("kw,match", [
    (dict(alpha=1.5), "alpha must be in"),
    (dict(objective="huber"), "unknown objective='huber'"),
    (dict(delta_form="full"), "unknown delta_form"),
    (dict(delta_strength=-1.0), "delta_strength"),
    (dict(gram_axis=2), "gram_axis"),
    (dict(feature_map=3), "feature_map"),
])
def test_bad_hyperparameters(kw, match):
  with pytest.raises(ValueError, match=match):
    optim.scale_by_generalized_momentum(**kw)


def test_negative_learning_rate():
  with pytest.raises(ValueError, match="learning_rate must be in"):
    optim.generalized_momentum(-0.1)
  with pytest.raises(ValueError, match="learning_rate"):
    optim.delta_momentum(float("nan"))
