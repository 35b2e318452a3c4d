"""Titans LMM, MAC, MAG, MAL: causality, streaming, generation, gradients, impl equivalence.

Shapes are tiny; each jitted function is compiled once per module kind and reused (compilation
dominates CPU test time). ``T`` is a multiple of neither the memory chunk nor the MAC segment.
To bound compile time, gradients are checked on MAC (attention with persistent tokens, memory
projections, ``M_0``, output gate) and MAL (the whole LMM and a sliding-window attention), which
between them hold every submodule of LMM and MAG; the memory's ``impl`` is checked for
equivalence on LMM and MAC and only passed through by MAG and MAL.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlj.core import LevelInputs
from nlj.layers.titans import TitansMAC, TitansMAG, TitansMAL
from nlj.layers.titans_lmm import TitansLMM
from tests.layers.helpers import assert_close, jitted, run_pieces, zero_grad_paths

B, T, D, H, CHUNK, SEGMENT = 2, 13, 16, 2, 4, 6
MEMORY = dict(expansion=2, chunk=CHUNK, eta_scale=0.5)
KINDS = {
    "lmm": lambda impl: TitansLMM(D, H, impl=impl, rngs=nnx.Rngs(0), **MEMORY),
    "mac": lambda impl: TitansMAC(D, H, segment=SEGMENT, persistent=2, impl=impl,
                                  rngs=nnx.Rngs(0), **MEMORY),
    "mac_aligned": lambda impl: TitansMAC(D, H, segment=2 * CHUNK, persistent=2, impl=impl,
                                          rngs=nnx.Rngs(0), **MEMORY),
    "mag": lambda impl: TitansMAG(D, H, window=5, persistent=2, impl=impl, rngs=nnx.Rngs(0),
                                  **MEMORY),
    "mal": lambda impl: TitansMAL(D, H, window=5, persistent=2, impl=impl, rngs=nnx.Rngs(0),
                                  **MEMORY),
}


@functools.cache
def _case(kind: str, impl: str = "chunked"):
  """The module, its state and ``f(state, x, cache) -> (y, cache[, intermediates])``, jitted."""
  module = KINDS[kind](impl)
  method = "forward" if kind.startswith("mac") else "__call__"
  return module, nnx.state(module), jitted(module, method)


def _x(seed=0, seq=T):
  return jax.random.normal(jax.random.key(seed), (B, seq, D))


def _leaves_close(a, b, tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert_close(x, y, tol)


@pytest.mark.parametrize("kind", ["lmm", "mac", "mag", "mal"])
def test_causal_and_batch_independent(kind):
  _, state, f = _case(kind)
  x, t0 = _x(), 6  # t0 + 1 shares a memory chunk and a MAC segment with t0
  y = f(state, x, None)[0]
  y_t = f(state, x.at[:, t0 + 1].add(1.0), None)[0]
  assert_close(y_t[:, :t0 + 1], y[:, :t0 + 1], 1e-6)
  assert not np.allclose(y_t[:, t0 + 1], y[:, t0 + 1])
  y_b = f(state, x.at[1].add(1.0), None)[0]
  assert_close(y_b[0], y[0], 1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_streaming_pieces_and_generation(kind):
  module, state, f = _case(kind)
  x = _x()
  y = f(state, x, None)[0]
  cache = module.init_cache(B, T)
  assert_close(run_pieces(f, state, x, cache, [6, 1, 6]), y, 1e-5)
  assert_close(run_pieces(f, state, x, cache, [1] * T), y, 1e-5)


@pytest.mark.parametrize("kind", ["mac", "mal"])
def test_gradients_reach_every_parameter(kind):
  module, _, _ = _case(kind, "reference")  # the reference impl compiles fastest
  graphdef, params = nnx.split(module)
  x, w = _x(), _x(1)
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x)[0] * w)
  grads = jax.jit(jax.grad(loss))(params)
  assert zero_grad_paths(grads) == []
  assert any("memory_init" in jax.tree_util.keystr(path)
             for path, _ in jax.tree_util.tree_flatten_with_path(grads)[0])


@pytest.mark.parametrize("kind", ["lmm", "mac"])
def test_reference_equals_chunked(kind):
  _, state, f_chunked = _case(kind, "chunked")
  _, _, f_reference = _case(kind, "reference")
  x = _x()
  out_r, cache_r = f_reference(state, x, None)[:2]
  out_c, cache_c = f_chunked(state, x, None)[:2]
  assert_close(out_r, out_c, 1e-5)
  _leaves_close(cache_r, cache_c, 1e-5)


@pytest.mark.parametrize("cls", [TitansMAG, TitansMAL])
def test_hybrids_pass_impl_to_the_memory(cls):
  assert cls(D, H, impl="reference", rngs=nnx.Rngs(0), **MEMORY).memory.impl == "reference"


def test_mac_writes_the_attention_output():
  """The memory after a segment is the memory level run on the writes of the attention output."""
  mac, state, forward = _case("mac")
  x = _x(seq=SEGMENT)
  _, cache, inter = forward(state, x, None)

  @jax.jit
  def write(y):
    fresh = mac.init_cache(B)
    (k, v, eta, alpha, beta), _ = mac.proj.writes(y, fresh.conv[1])
    return mac.level.run(fresh.memory, LevelInputs(k, v, None, eta, alpha, beta), "chunked")[0]

  _leaves_close(cache.memory.memory, write(inter.attended).memory, 1e-5)
  # Changing only the attention's output projection changes what is written.
  bumped = KINDS["mac"]("chunked")
  bumped.attn.o.kernel[...] = bumped.attn.o.kernel[...] * 1.5
  _, cache_bumped, _ = forward(nnx.state(bumped), x, None)
  assert not np.allclose(jax.tree.leaves(cache_bumped.memory.memory)[0],
                         jax.tree.leaves(cache.memory.memory)[0])


def test_mac_retrieves_with_the_segment_start_memory():
  mac, state, forward = _case("mac")
  x = _x()
  _, cache, inter = forward(state, x[:, :SEGMENT], None)  # one full segment: memory committed
  _, _, inter_full = forward(state, x, None)
  q, _ = mac.proj.queries(x[:, SEGMENT:2 * SEGMENT], cache.conv[0])
  expected = mac.level.apply(cache.memory.memory, q)
  assert_close(inter_full.retrieved[:, SEGMENT:2 * SEGMENT], expected, 1e-5)
  # Token j of a segment retrieves with the pre-segment memory: an earlier token of the same
  # segment outside j's conv window changes j's output (through attention), not its retrieval.
  j = 2 * SEGMENT - 1
  o, _, inter = forward(state, x, None)
  o_p, _, inter_p = forward(state, x.at[:, SEGMENT].add(1.0), None)
  assert_close(inter_p.retrieved[:, j], inter.retrieved[:, j], 1e-6)
  assert not np.allclose(o_p[:, j], o[:, j])


def test_mac_bfloat16_keeps_cache_dtypes():
  mac = TitansMAC(D, H, segment=SEGMENT, persistent=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
                  **MEMORY)
  cache = mac.init_cache(B)
  y, new = jitted(mac)(nnx.state(mac), _x(seq=5).astype(jnp.bfloat16), cache)
  assert y.dtype == jnp.bfloat16
  dtypes = lambda c: jax.tree.map(lambda a: a.dtype, c)
  assert dtypes(new) == dtypes(cache)


def test_errors_name_the_field():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match="TitansLMM.heads"):
    TitansLMM(D, 3, rngs=rngs)
  with pytest.raises(ValueError, match="TitansMAC.segment"):
    TitansMAC(D, H, segment=0, rngs=rngs)
  with pytest.raises(ValueError, match="TitansMAG.impl"):
    TitansMAG(D, H, impl="fast", rngs=rngs)
  with pytest.raises(ValueError, match="Attention.window"):
    TitansMAL(D, H, window=0, rngs=rngs)
  with pytest.raises(ValueError, match="eta_fn"):
    TitansLMM(D, H, eta_fn="exp", rngs=rngs)
