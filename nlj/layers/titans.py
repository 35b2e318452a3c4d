"""Titans hybrids: memory as a context (MAC), as a gate (MAG) and as a layer (MAL).

Titans (Behrouz et al. 2025, arXiv 2501.00663, §4; PAPER.md §3.7) combines softmax attention
(short-term memory), the neural memory of :class:`nlj.layers.titans_lmm.TitansLMM` (long-term)
and ``N_p`` persistent tokens ``p`` (task knowledge, Titans §3.3). Persistent tokens are keys/values
every query sees, whatever the window (the masks of Titans Fig. 3); they enter the attention,
not the memory, whose meta-learned ``M_0`` is its own data-independent prefix.

**MAC** (Titans §4.1), segments ``S`` of ``segment`` tokens::

    h   = M*_{t-1}(q_S)                retrieval with the memory of the segment start (read-only)
    y   = Attn([p ‖ h ‖ S])           outputs at the segment's positions
    M_t = M_{t-1} updated with y       the write stream is the attention output
    o   = y ⊗ M*_t(y)                  gated by the updated memory's read

Causality: ``h_i`` depends on the pre-segment memory and on token ``i`` (its query), so segment
token ``j`` sees ``p`` (all), ``h_i`` and ``S_i`` for ``i <= j`` only; RoPE positions are the
offsets inside the segment (``h_i`` and ``S_i`` share position ``i``, ``p`` is unrotated). The
memory is written with ``y`` token by token (mini-batch GD over ``chunk``-token chunks inside the
segment, one :meth:`nlj.core.Level.run` per segment), and ``M*_t(y_j)`` reads the state after
writing ``y_0 .. y_j`` -- the causal reading of ``M*_t(y)``. Segments are a ``lax.scan``.

MAC streaming: the cache holds the memory and conv states *at the start of the current segment*
and the segment's inputs seen so far. A call re-runs the current segment from its start over
``segment`` slots (later slots are padding that, by causality, cannot reach earlier outputs) and
commits the memory only at segment ends. So one call equals pieces of any lengths equals
token-by-token generation, with static shapes under ``jit``; a generated token costs one segment
of work.

**MAG** (Titans §4.2): ``o = y ⊗ m`` with ``y = SW-Attn*(x)`` (sliding window, persistent tokens)
and ``m = LMM(x)``. **MAL** (Titans §4.3): ``o = SW-Attn*(RMSNorm(LMM(x)))``.

The gate ``⊗`` (MAC and MAG; Titans §4.2: "normalize the outputs y and M(x̃) using learnable
vector-valued weights, followed by a non-linearity"): ``o = W_o (RMSNorm_y(y) ⊙ σ(RMSNorm_m(m)))``
with learnable RMSNorm scales and a sigmoid ``σ``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nlj.core import LevelInputs, LevelState
from nlj.core.dispatch import IMPLS
from nlj.layers.attention import Attention, KVCache, causal_mask
from nlj.layers.common import RMSNorm, dense
from nlj.models.registry import register_family
from nlj.layers.titans_lmm import (LMMCache, MemoryInit, MemoryProjections, TitansLMM,
                                   check_heads, memory_level)

__all__ = ["MACCache", "MACIntermediates", "MAGCache", "MALCache", "OutputGate", "TitansMAC",
           "TitansMAG", "TitansMAL"]


class OutputGate(nnx.Module):
  """``o = W_o (RMSNorm_y(y) ⊙ sigmoid(RMSNorm_m(m)))``: ``y, m [batch, seq, d_model]``."""

  def __init__(self, d_model: int, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    self.norm_y = RMSNorm(d_model, param_dtype=param_dtype)
    self.norm_m = RMSNorm(d_model, param_dtype=param_dtype)
    self.out = dense(d_model, d_model, rngs, dtype, param_dtype)

  def __call__(self, y: jax.Array, m: jax.Array) -> jax.Array:
    return self.out(self.norm_y(y) * jax.nn.sigmoid(self.norm_m(m)))


# ---------------------------------------------------------------------------------------- MAC


class MACCache(NamedTuple):
  """Streaming state of :class:`TitansMAC`, taken at the start of the current segment.

  Attributes:
    memory: the memory level's state at the segment start.
    conv: conv tails ``(input queries, writes, output queries)`` at the segment start.
    tokens: ``[batch, segment, d_model]``: the segment's inputs so far (slots ``< offset``).
    offset: int32 scalar, tokens of the current segment seen (``0 <= offset < segment``).
  """

  memory: LevelState
  conv: tuple[jax.Array, jax.Array, jax.Array]
  tokens: jax.Array
  offset: jax.Array


class MACIntermediates(NamedTuple):
  """Per-token intermediates of :meth:`TitansMAC.forward`.

  Attributes:
    retrieved: ``M*_{t-1}(q)``, the read of the segment-start memory,
      ``[batch, seq, heads, head_dim]``.
    attended: the attention output ``y`` that is written into the memory, ``[batch, seq, d_model]``.
  """

  retrieved: jax.Array
  attended: jax.Array


class TitansMAC(nnx.Module):
  """Memory as a context (see the module docstring).

  Args:
    d_model: model width.
    heads: attention and memory heads.
    segment: segment length ``C``.
    persistent: number of persistent tokens ``N_p``.
    kv_heads: attention key/value heads (GQA), default ``heads``.
    head_dim: per-head width, default ``d_model // heads``.
    expansion, memory_layers, chunk, conv, eta_fn, eta_scale: as :class:`TitansLMM`.
    rope_theta: RoPE base of the in-segment attention.
    impl: memory-update implementation for :meth:`nlj.core.Level.run`.
    remat: ``jax.checkpoint`` each segment.
    dtype: compute dtype (memory states stay float32).
    param_dtype: parameter dtype.
    rngs: parameter initialisation.
  """

  def __init__(self, d_model: int, heads: int, *, segment: int = 128, persistent: int = 4,
               kv_heads: int | None = None, head_dim: int | None = None, expansion: int = 4,
               memory_layers: int = 2, chunk: int = 16, conv: int = 4,
               eta_fn: str = "softplus", eta_scale: float = 0.1, rope_theta: float = 10_000.0,
               impl: str = "auto", remat: bool = True, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    head_dim = check_heads("TitansMAC", d_model, heads, head_dim)
    if not isinstance(segment, int) or segment < 1:
      raise ValueError(f"TitansMAC.segment must be a positive int, got {segment!r}")
    self.level = memory_level("TitansMAC", head_dim, heads, expansion, memory_layers, chunk,
                              "after", impl)
    self.d_model, self.segment, self.impl, self.remat = d_model, segment, impl, remat
    self.dtype, self.param_dtype = dtype, param_dtype
    self.attn = Attention(d_model, heads, kv_heads=kv_heads, head_dim=head_dim,
                          persistent=persistent, rope_theta=rope_theta, impl="explicit",
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = MemoryProjections(d_model, heads, head_dim, conv=conv, eta_fn=eta_fn,
                                  eta_scale=eta_scale, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
    self.memory_init = MemoryInit(self.level, rngs, param_dtype)
    self.retrieve_norm = RMSNorm(head_dim, param_dtype=param_dtype)
    self.retrieve_out = dense(heads * head_dim, d_model, rngs, dtype, param_dtype)
    self.read_out = dense(heads * head_dim, d_model, rngs, dtype, param_dtype)
    self.gate = OutputGate(d_model, rngs, dtype, param_dtype)

  def init_cache(self, batch: int, max_len: int | None = None) -> MACCache:
    """A fresh sequence (``max_len`` is unused); reads the meta-learned ``M_0`` (see LMM)."""
    dtype = self.dtype or self.param_dtype
    q_conv, kv_conv = self.proj.init_conv(batch, dtype)
    memory = self.level.init_state(self.memory_init(), batch)
    tokens = jnp.zeros((batch, self.segment, self.d_model), dtype)
    return MACCache(memory, (q_conv, kv_conv, q_conv), tokens, jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array, cache: MACCache | None = None
               ) -> tuple[jax.Array, MACCache]:
    """``x [batch, seq, d_model] -> (y [batch, seq, d_model], cache)``."""
    y, cache, _ = self.forward(x, cache)
    return y, cache

  def forward(self, x: jax.Array, cache: MACCache | None = None
              ) -> tuple[jax.Array, MACCache, MACIntermediates]:
    """:meth:`__call__` that also returns the per-token :class:`MACIntermediates`."""
    b, t, d = x.shape
    size = self.segment
    if cache is None:
      cache = self.init_cache(b)
    off = cache.offset
    if isinstance(off, jax.core.Tracer):
      n = -(-(t + size - 1) // size)  # enough segments for any offset
    else:
      n = -(-(int(off) + t) // size)
    slots = jnp.zeros((b, (n + 1) * size, d), cache.tokens.dtype).at[:, :size].set(cache.tokens)
    slots = jax.lax.dynamic_update_slice_in_dim(slots, x.astype(slots.dtype), off, axis=1)
    segments = jnp.swapaxes(slots[:, :n * size].reshape(b, n, size, d), 0, 1)
    complete = jnp.arange(1, n + 1) * size <= off + t
    graphdef, params = nnx.split(self)

    def body(carry, xs):
      x_s, done = xs
      new, outs = nnx.merge(graphdef, params).segment_step(carry, x_s)
      return jax.tree.map(lambda a, c: jnp.where(done, a, c), new, carry), outs

    if self.remat:
      body = jax.checkpoint(body)
    (memory, conv), outs = jax.lax.scan(body, (cache.memory, cache.conv), (segments, complete))

    def unsegment(y):  # [n, b, size, ...] -> [b, t, ...]
      y = jnp.swapaxes(y, 0, 1).reshape((b, n * size) + y.shape[3:])
      return jax.lax.dynamic_slice_in_dim(y, off, t, axis=1)

    o, retrieved, attended = map(unsegment, outs)
    end = off + t
    tokens = jax.lax.dynamic_slice_in_dim(slots, (end // size) * size, size, axis=1)
    offset = (end % size).astype(jnp.int32)
    tokens = jnp.where((jnp.arange(size) < offset)[None, :, None], tokens, 0)
    return o, MACCache(memory, conv, tokens, offset), MACIntermediates(retrieved, attended)

  def segment_step(self, carry: tuple[LevelState, tuple], x: jax.Array
                   ) -> tuple[tuple[LevelState, tuple], tuple[jax.Array, ...]]:
    """One segment from its start state.

    Args:
      carry: ``(memory state, conv tails)`` at the segment start.
      x: the segment's inputs ``[batch, segment, d_model]``.

    Returns:
      ``((memory state, conv tails) after the segment, (o, retrieved, attended))`` with
      ``o, attended [batch, segment, d_model]`` and ``retrieved [batch, segment, heads, head_dim]``.
    """
    memory, (c_in, c_write, c_out) = carry
    b, size, _ = x.shape
    dtype = self.dtype or x.dtype
    q, c_in = self.proj.queries(x, c_in)
    retrieved = self.level.apply(memory.memory, q)  # M*_{t-1}(q), the segment-start memory
    h = self.retrieve_out(self.retrieve_norm(retrieved.astype(dtype)).reshape(b, size, -1))
    y = self._attend(x, h)
    (k, v, eta, alpha, beta), c_write = self.proj.writes(y, c_write)
    q_y, c_out = self.proj.queries(y, c_out)
    memory, read = self.level.run(memory, LevelInputs(k, v, q_y, eta, alpha, beta), self.impl,
                                  aligned=size % self.level.chunk == 0)
    o = self.gate(y, self.read_out(read.astype(dtype).reshape(b, size, -1)))
    return (memory, (c_in, c_write, c_out)), (o, retrieved, y)

  def _attend(self, x: jax.Array, h: jax.Array) -> jax.Array:
    """``y = Attn([p ‖ h ‖ x])`` at ``x``'s positions: ``x, h [batch, segment, d_model]``."""
    pos = jnp.arange(x.shape[1])
    q = self.attn.queries(x, pos)
    k_x, v_x = self.attn.keys_values(x, pos)
    k_h, v_h = self.attn.keys_values(h, pos)
    tril = causal_mask(pos, pos)
    o = self.attn.attend_keys(q, jnp.concatenate([k_h, k_x], 1), jnp.concatenate([v_h, v_x], 1),
                              jnp.concatenate([tril, tril], -1))
    return self.attn.output(o)


# ---------------------------------------------------------------------------------- MAG, MAL


class MAGCache(NamedTuple):
  """Streaming state of :class:`TitansMAG`: the attention's and the memory's caches."""

  attention: KVCache
  memory: LMMCache


class MALCache(NamedTuple):
  """Streaming state of :class:`TitansMAL`: the memory's and the attention's caches."""

  memory: LMMCache
  attention: KVCache


def _hybrid_parts(owner: str, d_model: int, heads: int, head_dim: int | None,
                  attn_kwargs: dict, memory_kwargs: dict, dtype: Any, param_dtype: Any,
                  rngs: nnx.Rngs) -> tuple[Attention, TitansLMM]:
  """The sliding-window attention and the LMM of MAG/MAL."""
  head_dim = check_heads(owner, d_model, heads, head_dim)
  if memory_kwargs["impl"] not in IMPLS:
    raise ValueError(f"{owner}.impl must be one of {IMPLS}, got {memory_kwargs['impl']!r}")
  attn = Attention(d_model, heads, head_dim=head_dim, dtype=dtype, param_dtype=param_dtype,
                   rngs=rngs, **attn_kwargs)
  memory = TitansLMM(d_model, heads, head_dim=head_dim, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs, **memory_kwargs)
  return attn, memory


class TitansMAG(nnx.Module):
  """Memory as a gate: ``o = SW-Attn*(x) ⊗ LMM(x)`` (see the module docstring).

  Args:
    d_model: model width.
    heads: attention and memory heads.
    window: attention window (None: global causal attention).
    persistent: number of persistent tokens ``N_p``.
    kv_heads, head_dim, rope_theta: attention options (:class:`Attention`).
    attn_impl: :class:`Attention` ``impl``.
    expansion, memory_layers, chunk, conv, eta_fn, eta_scale: as :class:`TitansLMM`.
    impl: memory-update implementation for :meth:`nlj.core.Level.run`.
    dtype, param_dtype, rngs: as :class:`TitansLMM`.
  """

  def __init__(self, d_model: int, heads: int, *, window: int | None = 512, persistent: int = 4,
               kv_heads: int | None = None, head_dim: int | None = None,
               rope_theta: float = 10_000.0, attn_impl: str = "auto", expansion: int = 4,
               memory_layers: int = 2, chunk: int = 16, conv: int = 4,
               eta_fn: str = "softplus", eta_scale: float = 0.1, impl: str = "auto",
               dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.attn, self.memory = _hybrid_parts(
        "TitansMAG", d_model, heads, head_dim,
        dict(kv_heads=kv_heads, window=window, persistent=persistent, rope_theta=rope_theta,
             impl=attn_impl),
        dict(expansion=expansion, memory_layers=memory_layers, chunk=chunk, conv=conv,
             eta_fn=eta_fn, eta_scale=eta_scale, impl=impl), dtype, param_dtype, rngs)
    self.gate = OutputGate(d_model, rngs, dtype, param_dtype)

  def init_cache(self, batch: int, max_len: int) -> MAGCache:
    return MAGCache(self.attn.init_cache(batch, max_len), self.memory.init_cache(batch))

  def __call__(self, x: jax.Array, cache: MAGCache | None = None
               ) -> tuple[jax.Array, MAGCache]:
    """``x [batch, seq, d_model] -> (y [batch, seq, d_model], cache)``."""
    y, attn_cache = self.attn(x, None if cache is None else cache.attention)
    m, memory_cache = self.memory(x, None if cache is None else cache.memory)
    return self.gate(y, m), MAGCache(attn_cache, memory_cache)


class TitansMAL(nnx.Module):
  """Memory as a layer: ``o = SW-Attn*(RMSNorm(LMM(x)))`` (see the module docstring).

  Arguments as :class:`TitansMAG`.
  """

  def __init__(self, d_model: int, heads: int, *, window: int | None = 512, persistent: int = 4,
               kv_heads: int | None = None, head_dim: int | None = None,
               rope_theta: float = 10_000.0, attn_impl: str = "auto", expansion: int = 4,
               memory_layers: int = 2, chunk: int = 16, conv: int = 4,
               eta_fn: str = "softplus", eta_scale: float = 0.1, impl: str = "auto",
               dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.attn, self.memory = _hybrid_parts(
        "TitansMAL", d_model, heads, head_dim,
        dict(kv_heads=kv_heads, window=window, persistent=persistent, rope_theta=rope_theta,
             impl=attn_impl),
        dict(expansion=expansion, memory_layers=memory_layers, chunk=chunk, conv=conv,
             eta_fn=eta_fn, eta_scale=eta_scale, impl=impl), dtype, param_dtype, rngs)
    self.norm = RMSNorm(d_model, param_dtype=param_dtype)

  def init_cache(self, batch: int, max_len: int) -> MALCache:
    return MALCache(self.memory.init_cache(batch), self.attn.init_cache(batch, max_len))

  def __call__(self, x: jax.Array, cache: MALCache | None = None
               ) -> tuple[jax.Array, MALCache]:
    """``x [batch, seq, d_model] -> (y [batch, seq, d_model], cache)``."""
    m, memory_cache = self.memory(x, None if cache is None else cache.memory)
    y, attn_cache = self.attn(self.norm(m), None if cache is None else cache.attention)
    return y, MALCache(memory_cache, attn_cache)


def _titans_factory(cls, keys: tuple[str, ...]):
  """``make_mixer(config, layer, rngs)`` reading ``keys`` from ``ModelConfig.options``."""

  def make_mixer(config, layer: int, rngs: nnx.Rngs):
    options = dict(config.options)
    extra = {k: options[k] for k in keys if k in options}
    return cls(config.d_model, config.heads, chunk=config.chunk, conv=config.conv_width,
               impl=config.impl, dtype=jnp.dtype(config.dtype),
               param_dtype=jnp.dtype(config.param_dtype), rngs=rngs, **extra)

  return make_mixer


for _name, _cls, _keys in (("titans_lmm", TitansLMM, ("eta_scale", "expansion")),
                           ("titans_mac", TitansMAC, ("segment", "persistent", "eta_scale",
                                                      "expansion")),
                           ("titans_mag", TitansMAG, ("window", "persistent", "eta_scale",
                                                      "expansion")),
                           ("titans_mal", TitansMAL, ("window", "persistent", "eta_scale",
                                                      "expansion"))):
  register_family(_name, _titans_factory(_cls, _keys), options=_keys)
