"""Attention: naive reference, fast path, GQA, window, persistent tokens, streaming."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlj.layers.attention import Attention
from tests.layers.helpers import assert_close, jitted, run_pieces, zero_grad_paths

B, T, D, H = 2, 13, 16, 2
CONFIGS = {
    "global": dict(),
    "gqa_window": dict(kv_heads=1, window=4),
    "window_persistent": dict(window=5, persistent=3),
}


@functools.cache
def _case(name: str, impl: str = "auto"):
  attn = Attention(D, H, impl=impl, rngs=nnx.Rngs(0), **CONFIGS[name])
  return attn, nnx.state(attn), jitted(attn)


def _x(seed=0, seq=T, batch=B):
  return jax.random.normal(jax.random.key(seed), (batch, seq, D))


def _naive(attn: Attention, x: np.ndarray) -> np.ndarray:
  """Loop-over-queries float64 reference with its own RoPE, window and persistent tokens."""
  x = np.asarray(x, np.float64)
  dh, g = attn.head_dim, attn.heads // attn.kv_heads
  w = {n: np.asarray(getattr(attn, n).kernel[...], np.float64) for n in "qkvo"}
  half = dh // 2
  freq = 10_000.0 ** (-np.arange(half) / half)

  def rot(v, p):  # v [..., dh] at position p
    c, s = np.cos(p * freq), np.sin(p * freq)
    a, b = v[..., :half], v[..., half:]
    return np.concatenate([a * c - b * s, b * c + a * s], -1)

  out = np.zeros((x.shape[0], x.shape[1], attn.heads * dh))
  p = np.asarray(attn.persistent_tokens[...], np.float64) if attn.persistent else np.zeros((0, D))
  for b in range(x.shape[0]):
    q = (x[b] @ w["q"]).reshape(-1, attn.heads, dh)
    k = (x[b] @ w["k"]).reshape(-1, attn.kv_heads, dh)
    v = (x[b] @ w["v"]).reshape(-1, attn.kv_heads, dh)
    kp = (p @ w["k"]).reshape(-1, attn.kv_heads, dh)
    vp = (p @ w["v"]).reshape(-1, attn.kv_heads, dh)
    for i in range(x.shape[1]):
      lo = 0 if attn.window is None else max(0, i - attn.window + 1)
      for h in range(attn.heads):
        kh = h // g
        keys = [kp[j, kh] for j in range(len(p))] + [rot(k[j, kh], j) for j in range(lo, i + 1)]
        vals = [vp[j, kh] for j in range(len(p))] + [v[j, kh] for j in range(lo, i + 1)]
        s = np.array([rot(q[i, h], i) @ kk for kk in keys]) / np.sqrt(dh)
        a = np.exp(s - s.max())
        out[b, i, h * dh:(h + 1) * dh] = (a / a.sum()) @ np.array(vals)
  return out @ w["o"]


@pytest.mark.parametrize("impl", ["auto", "explicit"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_naive_reference(name, impl):
  attn, state, f = _case(name, impl)
  x = _x()
  y, _ = f(state, x, None)
  assert_close(y, _naive(attn, x), 1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streaming_pieces_and_generation(name):
  attn, state, f = _case(name)
  x = _x()
  y, _ = f(state, x, None)
  cache = attn.init_cache(B, T)
  assert_close(run_pieces(f, state, x, cache, [6, 1, 6]), y, 1e-6)
  assert_close(run_pieces(f, state, x, cache, [1] * T), y, 1e-6)


def test_continue_from_fresh_call_with_window():
  _, state, f = _case("window_persistent")
  x = _x()
  y, _ = f(state, x, None)
  y1, cache = f(state, x[:, :6], None)
  assert cache.k.shape[1] == 5  # a rolling buffer of the window
  y2 = run_pieces(f, state, x[:, 6:], cache, [1, 6])
  assert_close(jnp.concatenate([y1, y2], 1), y, 1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causal_and_batch_independent(name):
  _, state, f = _case(name)
  x, t0 = _x(), 7
  y, _ = f(state, x, None)
  y_t, _ = f(state, x.at[:, t0 + 1].add(1.0), None)
  np.testing.assert_array_equal(np.asarray(y_t[:, :t0 + 1]), np.asarray(y[:, :t0 + 1]))
  assert not np.allclose(y_t[:, t0 + 1], y[:, t0 + 1])
  y_b, _ = f(state, x.at[1].add(1.0), None)
  np.testing.assert_array_equal(np.asarray(y_b[0]), np.asarray(y[0]))


def test_gradients_reach_every_parameter():
  attn = Attention(D, H, kv_heads=1, window=4, persistent=2, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(attn)
  x, w = _x(), _x(1)
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x)[0] * w)
  assert zero_grad_paths(jax.jit(jax.grad(loss))(params)) == []


def test_bfloat16_compute():
  attn = Attention(D, H, window=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  y, cache = jitted(attn)(nnx.state(attn), _x(seq=5).astype(jnp.bfloat16), None)
  assert y.dtype == jnp.bfloat16 and cache.k.dtype == jnp.bfloat16


def test_errors_name_the_field():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match="heads"):
    Attention(D, 3, rngs=rngs)
  with pytest.raises(ValueError, match="kv_heads"):
    Attention(D, 4, kv_heads=3, rngs=rngs)
  with pytest.raises(ValueError, match="window"):
    Attention(D, H, window=0, rngs=rngs)
  with pytest.raises(ValueError, match="head_dim"):
    Attention(D, H, head_dim=7, rngs=rngs)
  with pytest.raises(ValueError, match="impl"):
    Attention(D, H, impl="flash", rngs=rngs)
  attn = Attention(D, H, rngs=rngs)
  with pytest.raises(ValueError, match="max_len"):
    attn(_x(seq=5), attn.init_cache(B, 4))
