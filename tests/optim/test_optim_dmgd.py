"""DMGD (eq. 50): the MLP momentum memory against a NumPy transcription."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nlj import optim
from optim_testutil import grads

SHAPES = {"w": (3, 4), "b": (4,)}


def run(tx, gs):
  state = tx.init(jax.tree.map(jnp.zeros_like, gs[0]))
  outs = []
  for g in gs:
    u, state = tx.update(g, state)
    outs.append(u)
  return outs, state


def np_dmgd(gs, alpha, objective, hidden, lr, mlp_alpha):
  """One leaf; analytic gradients of the shared odd MLP f(x) = Σ w2 tanh(w1 x)."""
  mu = np.zeros_like(gs[0], np.float64)
  w1, w2 = np.linspace(0.5, 2.0, hidden), np.zeros(hidden)
  outs = []
  for g in gs:
    u = g.astype(np.float64)
    s = np.sqrt(np.mean(u * u))
    x = (u / s)[..., None]  # [..., 1] against [hidden]
    th = np.tanh(x * w1)
    f = th @ w2
    if objective == "dot":
      mu = alpha * mu + u
      d2 = np.mean((th * x).reshape(-1, hidden), 0)
      d1 = np.mean((w2 * (1 - th**2) * x * x).reshape(-1, hidden), 0)
      w1, w2 = mlp_alpha * w1 + lr * d1, mlp_alpha * w2 + lr * d2
    else:
      r = (mu / s + f - x[..., 0])[..., None]
      mu = mu - (1 - alpha) * (mu + s * f - u)
      d2 = np.mean((r * th).reshape(-1, hidden), 0)
      d1 = np.mean((r * w2 * (1 - th**2) * x).reshape(-1, hidden), 0)
      w1, w2 = mlp_alpha * w1 - lr * d1, mlp_alpha * w2 - lr * d2
    outs.append(mu + s * (np.tanh((u / s)[..., None] * w1) @ w2))
  return outs


@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_dmgd_matches_numpy(objective):
  gs = [grads(i, SHAPES) for i in range(4)]
  tx = optim.scale_by_dmgd(0.8, objective=objective, hidden=3, mlp_lr=0.5, mlp_alpha=0.9)
  ours, state = run(tx, gs)
  for k in SHAPES:
    expect = np_dmgd([g[k] for g in gs], 0.8, objective, 3, 0.5, 0.9)
    for u, e in zip(ours, expect):
      np.testing.assert_allclose(u[k], e, rtol=1e-4, atol=1e-5)
  # The MLP really learned something (and lives in the optimizer state).
  assert state.w2["w"].shape == (3,) and np.any(np.asarray(state.w2["w"]) != 0)
  assert state.mu["w"].shape == (3, 4)


def test_frozen_mlp_reduces_to_momentum_and_ema():
  gs = [grads(10 + i, SHAPES) for i in range(4)]
  ours, _ = run(optim.scale_by_dmgd(0.7, mlp_lr=0.0), gs)
  ref, _ = run(optax.trace(decay=0.7), gs)
  for a, b in zip(ours, ref):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
  ours, _ = run(optim.scale_by_dmgd(0.7, objective="l2", mlp_lr=0.0), gs)
  ref, _ = run(optax.ema(0.7, debias=False), gs)
  for a, b in zip(ours, ref):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_dmgd_is_not_momentum_when_learning():
  gs = [grads(20 + i, SHAPES) for i in range(3)]
  ours, _ = run(optim.scale_by_dmgd(0.7, mlp_lr=0.5), gs)
  ref, _ = run(optax.trace(decay=0.7), gs)
  assert not np.allclose(ours[-1]["w"], ref[-1]["w"], rtol=1e-3)


@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_dmgd_zero_gradients_no_nan(objective):
  z = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
  outs, state = run(optim.scale_by_dmgd(objective=objective, mlp_lr=1.0), [z, z])
  for leaf in jax.tree.leaves((outs, state)):
    assert np.all(np.isfinite(leaf))
  assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(outs))


@pytest.mark.parametrize("kw,match", [
    (dict(alpha=-0.5), "alpha must be in"),
    (dict(objective="cosine"), "unknown objective='cosine'"),
    (dict(hidden=0), "hidden must be an integer >= 1"),
    (dict(mlp_lr=-1.0), "mlp_lr must be in"),
    (dict(mlp_alpha=2.0), "mlp_alpha must be in"),
    (dict(alpha=optax.constant_schedule(0.9)), "mlp_alpha must be given"),
])
def test_dmgd_bad_hyperparameters(kw, match):
  with pytest.raises(ValueError, match=match):
    optim.scale_by_dmgd(**kw)
  with pytest.raises(ValueError, match="learning_rate"):
    optim.dmgd(-3.0)
