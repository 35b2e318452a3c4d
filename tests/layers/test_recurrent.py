"""Recurrent mixers: causality, batch independence, streaming, impl equivalence, gates.

Shapes are tiny and every jitted function is compiled once per mixer class and reused, with
XLA's cheaper CPU optimisation level (compilation dominates CPU test time; results are compared
with tolerances). Gradients and token-by-token generation are checked on
the LM that stacks all three mixers (``tests/models/test_lm.py``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlj.layers import DeltaNet, GatedDeltaNet, LinearAttention

B, T, D, H, CHUNK = 2, 13, 16, 2, 4  # T is not a multiple of CHUNK
MIXERS = (LinearAttention, DeltaNet, GatedDeltaNet)
TOL = dict(rtol=1e-5, atol=1e-5)


@functools.cache
def _apply(cls, impl="chunked"):
  """``f(x, cache) -> (y, cache)`` of a fixed-seed mixer, jitted once; and the mixer."""
  mixer = cls(D, H, nnx.Rngs(0), chunk=CHUNK, impl=impl)
  graphdef, state = nnx.split(mixer)
  fn = jax.jit(lambda state, x, cache: nnx.merge(graphdef, state)(x, cache))
  return (lambda x, cache=None: fn(state, x, mixer.init_cache(x.shape[0]) if cache is None
                                   else cache)), mixer


def _x(seed=0, seq=T):
  return jax.random.normal(jax.random.key(seed), (B, seq, D))


@pytest.mark.parametrize("cls", MIXERS)
def test_causal_and_batch_independent(cls):
  f, _ = _apply(cls)
  x, t0 = _x(), 7
  y, _ = f(x)
  assert y.shape == (B, T, D) and y.dtype == jnp.float32
  y2, _ = f(x.at[0, t0].add(1.0))
  np.testing.assert_allclose(y2[0, :t0], y[0, :t0], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(y2[1], y[1])  # the other sequence of the batch is untouched
  assert float(jnp.min(jnp.max(jnp.abs(y2[0, t0:] - y[0, t0:]), axis=-1))) > 1e-4


@pytest.mark.parametrize("cls", MIXERS)
def test_streaming_pieces_equal_one_call(cls):
  """Two calls of 13 tokens (phases 0 -> 1 -> 2 of chunk 4) equal one call of 26."""
  f, _ = _apply(cls)
  x = _x(1, 2 * T)
  y, cache = f(x)
  y1, c1 = f(x[:, :T])
  y2, c2 = f(x[:, T:], c1)
  np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), y, **TOL)
  for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(c2)):
    np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("cls", MIXERS)
def test_reference_equals_chunked(cls):
  (chunked, _), (reference, _) = _apply(cls), _apply(cls, "reference")
  x = _x(2)
  y, cache = chunked(x)
  y_ref, cache_ref = reference(x)
  np.testing.assert_allclose(y, y_ref, **TOL)
  np.testing.assert_allclose(cache["memory"].memory["w"], cache_ref["memory"].memory["w"], **TOL)
  assert int(cache["memory"].phase) == int(cache_ref["memory"].phase) == T % CHUNK


def test_gates_in_unit_interval():
  _, mixer = _apply(GatedDeltaNet)
  x = _x(3)
  beta, alpha = mixer.scalars(x)
  assert alpha.shape == beta.shape == (B, T, H)
  assert bool(jnp.all((alpha > 0) & (alpha < 1))) and bool(jnp.all((beta > 0) & (beta < 1)))
  for gate in mixer.scalars(100.0 * x):  # float32 saturates to the closed interval, never past it
    assert bool(jnp.all((gate >= 0) & (gate <= 1)))
  a0 = mixer.decay(jnp.zeros((1, 1, D)))[0, 0]  # initial decays: exp(-A softplus(dt_bias))
  assert bool(jnp.all((a0 > jnp.exp(-16 * 0.1) - 1e-6) & (a0 < jnp.exp(-1e-3))))
  assert _apply(LinearAttention)[1].scalars(x) == (None, None)
  eta, alpha = _apply(DeltaNet)[1].scalars(x)
  assert alpha is None and eta.shape == (B, T, H)


def test_bad_arguments_name_the_field():
  with pytest.raises(ValueError, match="DeltaNet.heads"):
    DeltaNet(D, 3, nnx.Rngs(0))
  with pytest.raises(ValueError, match="GatedDeltaNet.impl"):
    GatedDeltaNet(D, H, nnx.Rngs(0), impl="fast")
  with pytest.raises(ValueError, match="Level.chunk"):
    LinearAttention(D, H, nnx.Rngs(0), chunk=0)
