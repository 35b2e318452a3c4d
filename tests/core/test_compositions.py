"""The named compositions against hand-written recurrences from their papers (numpy loops)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlj.core import (Level, MatrixMemory, L2, Rule, deltanet, dgd_memory,
                      gated_deltanet, linear_attention, titans_memory)
from tests.core.helpers import random_inputs

B, T, H, DK, DV = 2, 13, 2, 4, 3
IMPLS = ("reference", "chunked")


def _run(level, inputs, impl, init=None):
  params = level.init(jax.random.PRNGKey(7), jnp.float64) if init is None else init
  return level.run(level.init_state(params, B), inputs, impl=impl)


def _loop(inputs, update, w0=None):
  """Apply ``update(W, t-indexed numpy scalars) -> W`` token by token; read W_t q_t."""
  k, v, q, eta, alpha, beta = (np.asarray(x) for x in inputs)
  ys = np.zeros(v.shape)
  for b in range(B):
    for h in range(H):
      w = np.zeros((DV, DK)) if w0 is None else np.array(w0[h])
      for t in range(T):
        w = update(w, k[b, t, h], v[b, t, h], eta[b, t, h], alpha[b, t, h], beta[b, t, h], t)
        ys[b, t, h] = w @ q[b, t, h]
  return ys


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_linear_attention_is_eq_15_for_any_chunk(impl, chunk):
  with jax.enable_x64(True):
    level = linear_attention(DK, DV, heads=H, chunk=chunk)
    inputs = random_inputs(level, B, T, seed=1)._replace(eta=None, alpha=None, beta=None)
    _, y = _run(level, inputs, impl)
    full = random_inputs(level, B, T, seed=1)
    want = _loop(full._replace(eta=jnp.ones((B, T, H)), alpha=jnp.ones((B, T, H))),
                 lambda w, k, v, *_: w + np.outer(v, k))
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_deltanet(impl):
  with jax.enable_x64(True):
    level = deltanet(DK, DV, heads=H, chunk=4)
    inputs = random_inputs(level, B, T, seed=2)._replace(alpha=None)  # DeltaNet has no gate
    _, y = _run(level, inputs, impl)
    want = _loop(inputs._replace(alpha=jnp.ones((B, T, H))), lambda w, k, v, eta, *_: w - eta * np.outer(w @ k - v, k))
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_gated_deltanet(impl):
  with jax.enable_x64(True):
    level = gated_deltanet(DK, DV, heads=H, chunk=4)
    inputs = random_inputs(level, B, T, seed=3)
    _, y = _run(level, inputs, impl)
    want = _loop(inputs, lambda w, k, v, eta, alpha, *_:
                 alpha * w @ (np.eye(DK) - eta * np.outer(k, k)) + eta * np.outer(v, k))
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["normalized", "plain", "neurips"])
def test_dgd_matrix_memory_eq_57_and_93(impl, variant):
  with jax.enable_x64(True):
    chunk = 3
    level = dgd_memory(DK, DV, heads=H, chunk=chunk, variant=variant)
    inputs = random_inputs(level, B, T, seed=4)
    w0 = np.asarray(0.3 * jax.random.normal(jax.random.PRNGKey(5), (H, DV, DK), jnp.float64))
    _, y = _run(level, inputs, impl, init={"w": jnp.asarray(w0)})
    anchor = {}

    def update(w, k, v, eta, alpha, beta, t):
      if t % chunk == 0:
        anchor["w"] = w  # the state at the previous chunk boundary (eq. 90, causal reading)
      if variant == "normalized":
        c = s = eta / (1 + eta * k @ k)
      elif variant == "plain":
        c = s = eta
      else:
        c, s = 1.0, eta
      return w @ (alpha * np.eye(DK) - c * np.outer(k, k)) - s * np.outer(anchor["w"] @ k - v, k)

    np.testing.assert_allclose(y, _loop(inputs, update, w0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_titans_linear_memory_momentum_and_retention(impl):
  """Titans eqs. 9-14 with a linear memory: S = β S - η ∇ℓ(M_anchor), M = α M + S."""
  with jax.enable_x64(True):
    chunk = 4
    level = Level(MatrixMemory(DK, DV), L2(), Rule("gd", momentum=True), chunk, "boundary",
                  heads=H)
    inputs = random_inputs(level, B, T, seed=6)
    w0 = np.asarray(0.3 * jax.random.normal(jax.random.PRNGKey(5), (H, DV, DK), jnp.float64))
    _, y = _run(level, inputs, impl, init={"w": jnp.asarray(w0)})
    st = {}

    def update(w, k, v, eta, alpha, beta, t):
      if t == 0:
        st["s"] = np.zeros_like(w)
      if t % chunk == 0:
        st["anchor"] = w
      st["s"] = beta * st["s"] - eta * np.outer(st["anchor"] @ k - v, k)
      return alpha * w + st["s"]

    np.testing.assert_allclose(y, _loop(inputs, update, w0), rtol=1e-10, atol=1e-10)


def test_titans_mlp_memory_reference_equals_chunked():
  with jax.enable_x64(True):
    level = titans_memory(DK, hidden=6, heads=H, chunk=4)
    inputs = random_inputs(level, B, T, seed=8)
    s1, y1 = _run(level, inputs, "reference")
    s2, y2 = _run(level, inputs, "chunked")
    np.testing.assert_allclose(y1, y2, rtol=1e-10, atol=1e-10)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
