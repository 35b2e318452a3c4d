"""Transformer++ attention: causal softmax attention with RoPE, GQA, sliding window, KV cache.

For queries at absolute positions ``i`` and keys at positions ``j`` (Vaswani et al. 2017; Llama's
"Transformer++" recipe: RoPE, no biases)::

    o_i = Σ_j softmax_j(q_i·k_j / sqrt(d_h) | mask_ij) v_j,
    mask_ij = (j <= i) and (i - j < window)               (window=None: global causal)

with ``q, k`` rotated by RoPE at their absolute positions (Su et al. 2021). Grouped-query
attention shares each key/value head between ``heads // kv_heads`` query heads (query head ``n``
reads key/value head ``n // (heads // kv_heads)``, as ``jax.nn.dot_product_attention``).

Persistent memory (Titans §3.3, eq. 19) is ``N_p`` learnable tokens ``p [N_p, d_model]``
projected by the same key/value maps and visible to every query regardless of the window (the
``SW-Attn*`` of Titans Fig. 3): they carry no position (no rotation) and are not cached.

Streaming (the contract of :mod:`nlj.layers`): :meth:`Attention.init_cache` returns a
:class:`KVCache`. Global attention writes keys/values at ``pos`` into ``max_len`` slots; a
sliding window keeps only the last ``window`` keys/values (a rolling buffer, so generation length
is unbounded and ``max_len`` is not needed). One call equals pieces of any lengths equals
token-by-token generation. ``cache=None`` runs a fresh sequence and returns a cache holding it
(full for global attention: continue a sequence from :meth:`init_cache` instead).

Two computations, chosen explicitly by ``impl``: ``jax.nn.dot_product_attention`` (``"auto"``,
``"xla"``, ``"cudnn"``) for a full-sequence call without cache or persistent tokens, whose mask it
expresses with ``is_causal``/``local_window_size``; the explicit masked softmax otherwise, and
always with ``impl="explicit"``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nlj.layers.common import dense
from nlj.models.registry import register_family

__all__ = ["Attention", "KVCache", "IMPLS", "attend", "causal_mask", "rope"]

IMPLS = ("auto", "xla", "cudnn", "explicit")


class KVCache(NamedTuple):
  """Streaming state of :class:`Attention`.

  Attributes:
    k: rotated keys ``[batch, slots, kv_heads, head_dim]``; ``slots = max_len`` (global) or
      ``window`` (sliding window: the keys of positions ``pos - window .. pos - 1``).
    v: values, shaped like ``k``.
    pos: int32 scalar, the number of tokens seen.

  Writing past ``max_len`` raises when ``pos`` is concrete; under ``jit`` (a traced ``pos``) the
  write is clamped by ``dynamic_update_slice``, so size ``max_len`` for the whole sequence.
  """

  k: jax.Array
  v: jax.Array
  pos: jax.Array


def rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0) -> jax.Array:
  """Rotary position embedding (rotate-half form).

  Args:
    x: ``[batch, seq, heads, head_dim]`` with an even ``head_dim``.
    positions: ``[seq]`` absolute positions (int or float).
    theta: base of the frequencies ``theta^(-2i / head_dim)``.

  Returns:
    ``x`` rotated, same shape and dtype.
  """
  half = x.shape[-1] // 2
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  freq = theta ** (-jnp.arange(half, dtype=dtype) / half)
  angle = positions.astype(dtype)[:, None] * freq  # [seq, half]
  cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
  x1, x2 = x[..., :half].astype(dtype), x[..., half:].astype(dtype)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def causal_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None = None) -> jax.Array:
  """``[tq, tk]`` bool: key ``j`` visible to query ``i`` iff ``0 <= j <= i`` and ``i - j < window``.

  Negative key positions mark empty cache slots.
  """
  mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= 0)
  if window is not None:
    mask &= q_pos[:, None] - k_pos[None, :] < window
  return mask


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           scale: float | None = None) -> jax.Array:
  """Explicit masked softmax attention with grouped key/value heads.

  Args:
    q: ``[batch, tq, heads, head_dim]``.
    k, v: ``[batch, tk, kv_heads, head_dim]`` with ``kv_heads`` dividing ``heads``.
    mask: bool, broadcastable to ``[batch, tq, tk]``; every query needs a visible key.
    scale: logit scale, default ``1 / sqrt(head_dim)``.

  Returns:
    ``[batch, tq, heads, head_dim]`` in ``v``'s dtype; logits and softmax in >= float32.
  """
  b, tq, h, d = q.shape
  kvh = k.shape[2]
  scale = d**-0.5 if scale is None else scale
  acc = jnp.promote_types(q.dtype, jnp.float32)
  qg = q.reshape(b, tq, kvh, h // kvh, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=acc) * scale
  mask = jnp.broadcast_to(mask, (b, tq, k.shape[1]))[:, None, None]
  logits = jnp.where(mask, logits, jnp.finfo(acc).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, tq, h, d)


class Attention(nnx.Module):
  """Causal multi-head softmax attention (see the module docstring).

  Args:
    d_model: model width.
    heads: query heads.
    kv_heads: key/value heads (GQA), dividing ``heads``; default ``heads``.
    head_dim: per-head width (even, for RoPE); default ``d_model // heads``.
    window: sliding-window length (each token sees itself and ``window - 1`` predecessors),
      or None for global causal attention.
    persistent: number of persistent-memory tokens ``N_p`` (Titans eq. 19).
    rope_theta: RoPE base.
    impl: ``"auto"``, ``"xla"``, ``"cudnn"`` or ``"explicit"`` (module docstring).
    dtype: compute dtype (None: the inputs' and parameters' promoted dtype).
    param_dtype: parameter dtype.
    rngs: parameter initialisation.
  """

  def __init__(self, d_model: int, heads: int, *, kv_heads: int | None = None,
               head_dim: int | None = None, window: int | None = None, persistent: int = 0,
               rope_theta: float = 10_000.0, impl: str = "auto", dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    kv_heads = heads if kv_heads is None else kv_heads
    if heads < 1 or (head_dim is None and d_model % heads):
      raise ValueError(f"Attention.heads ({heads}) must be positive and divide d_model ({d_model})")
    if kv_heads < 1 or heads % kv_heads:
      raise ValueError(
          f"Attention.kv_heads ({kv_heads}) must be positive and divide heads ({heads})")
    head_dim = d_model // heads if head_dim is None else head_dim
    if head_dim % 2:
      raise ValueError(f"Attention.head_dim must be even for RoPE, got {head_dim}")
    if window is not None and (not isinstance(window, int) or window < 1):
      raise ValueError(f"Attention.window must be None or an int >= 1, got {window!r}")
    if persistent < 0:
      raise ValueError(f"Attention.persistent must be >= 0, got {persistent}")
    if impl not in IMPLS:
      raise ValueError(f"Attention.impl must be one of {IMPLS}, got {impl!r}")
    self.d_model, self.heads, self.kv_heads, self.head_dim = d_model, heads, kv_heads, head_dim
    self.window, self.persistent, self.rope_theta, self.impl = window, persistent, rope_theta, impl
    self.dtype, self.param_dtype = dtype, param_dtype
    self.q = dense(d_model, heads * head_dim, rngs, dtype, param_dtype)
    self.k = dense(d_model, kv_heads * head_dim, rngs, dtype, param_dtype)
    self.v = dense(d_model, kv_heads * head_dim, rngs, dtype, param_dtype)
    self.o = dense(heads * head_dim, d_model, rngs, dtype, param_dtype)
    if persistent:
      self.persistent_tokens = nnx.Param(
          jax.random.normal(rngs.params(), (persistent, d_model), param_dtype))

  # ------------------------------------------------------------------------ projections

  def queries(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotated queries ``[batch, seq, heads, head_dim]`` of ``x [batch, seq, d_model]``."""
    q = self.q(x).reshape(x.shape[:2] + (self.heads, self.head_dim))
    return rope(q, positions, self.rope_theta)

  def keys_values(self, x: jax.Array, positions: jax.Array | None
                  ) -> tuple[jax.Array, jax.Array]:
    """``x [batch, seq, d_model]`` -> ``k, v [batch, seq, kv_heads, head_dim]``; ``k`` rotated
    unless ``positions`` is None."""
    shape = x.shape[:2] + (self.kv_heads, self.head_dim)
    k, v = self.k(x).reshape(shape), self.v(x).reshape(shape)
    return (k if positions is None else rope(k, positions, self.rope_theta)), v

  def persistent_kv(self, batch: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Keys and values of the persistent tokens ``[batch, N_p, kv_heads, head_dim]`` (unrotated)."""
    k, v = self.keys_values(self.persistent_tokens[...][None].astype(dtype), None)
    shape = (batch,) + k.shape[1:]
    return jnp.broadcast_to(k, shape), jnp.broadcast_to(v, shape)

  def output(self, o: jax.Array) -> jax.Array:
    """``o [batch, seq, heads, head_dim] -> [batch, seq, d_model]``."""
    return self.o(o.reshape(o.shape[:2] + (self.heads * self.head_dim,)))

  # -------------------------------------------------------------------------- streaming

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    """An empty :class:`KVCache`: ``max_len`` slots, or ``window`` slots with a sliding window."""
    if self.window is None and (not isinstance(max_len, int) or max_len < 1):
      raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    slots = max_len if self.window is None else self.window
    dtype = self.dtype or self.param_dtype
    zeros = jnp.zeros((batch, slots, self.kv_heads, self.head_dim), dtype)
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array, cache: KVCache | None = None
               ) -> tuple[jax.Array, KVCache]:
    """``x [batch, seq, d_model] -> (y [batch, seq, d_model], cache)``."""
    b, t, _ = x.shape
    start = 0 if cache is None else cache.pos
    positions = start + jnp.arange(t)
    q = self.queries(x, positions)
    k, v = self.keys_values(x, positions)
    if cache is None:
      o = self._attend_fresh(q, k, v)
      cache = self._fresh_cache(k, v, t)
    else:
      o, cache = self._attend_cached(q, k, v, cache)
    return self.output(o), cache

  def _attend_fresh(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Attention over one fresh sequence (positions ``0 .. seq-1``)."""
    if self.impl != "explicit" and not self.persistent:
      window = None if self.window is None else (self.window - 1, 0)
      return jax.nn.dot_product_attention(
          q, k, v, is_causal=True, local_window_size=window,
          implementation=None if self.impl == "auto" else self.impl)
    pos = jnp.arange(q.shape[1])
    return self.attend_keys(q, k, v, causal_mask(pos, pos, self.window))

  def attend_keys(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """:func:`attend` over ``k, v`` with the persistent tokens prepended, visible to every query.

    ``q [batch, tq, heads, head_dim]``, ``k, v [batch, tk, kv_heads, head_dim]``, ``mask`` bool
    ``[tq, tk]`` or ``[batch, tq, tk]`` over ``k``; returns ``[batch, tq, heads, head_dim]``.
    """
    if self.persistent:
      kp, vp = self.persistent_kv(q.shape[0], k.dtype)
      k, v = jnp.concatenate([kp, k], 1), jnp.concatenate([vp, v], 1)
      mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (self.persistent,), bool), mask], -1)
    return attend(q, k, v, mask)

  def _fresh_cache(self, k: jax.Array, v: jax.Array, t: int) -> KVCache:
    pos = jnp.asarray(t, jnp.int32)
    if self.window is None:
      return KVCache(k, v, pos)
    pad = lambda a: jnp.concatenate(
        [jnp.zeros((a.shape[0], self.window) + a.shape[2:], a.dtype), a], 1)[:, t:]
    return KVCache(pad(k), pad(v), pos)

  def _attend_cached(self, q, k, v, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Append ``k, v`` to the cache and attend over it (positions from ``cache.pos``)."""
    t, slots, pos = q.shape[1], cache.k.shape[1], cache.pos
    k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
    q_pos = pos + jnp.arange(t)
    if self.window is None:
      if not isinstance(pos, jax.core.Tracer) and int(pos) + t > slots:
        raise ValueError(f"KV cache overflow: pos {int(pos)} + seq {t} > max_len {slots}; "
                         f"make the cache with a larger max_len")
      keys = jax.lax.dynamic_update_slice_in_dim(cache.k, k, pos, axis=1)
      values = jax.lax.dynamic_update_slice_in_dim(cache.v, v, pos, axis=1)
      k_pos = jnp.arange(slots)
      new = KVCache(keys, values, pos + t)
    else:
      keys, values = jnp.concatenate([cache.k, k], 1), jnp.concatenate([cache.v, v], 1)
      k_pos = pos - slots + jnp.arange(slots + t)
      new = KVCache(keys[:, t:], values[:, t:], pos + t)
    o = self.attend_keys(q.astype(keys.dtype), keys, values,
                         causal_mask(q_pos, k_pos, self.window))
    return o, new


def _make_transformer(config, layer: int, rngs: nnx.Rngs) -> Attention:
  """Transformer++ mixer: global causal RoPE attention (``make_mixer`` for the registry)."""
  return Attention(config.d_model, config.heads, dtype=jnp.dtype(config.dtype),
                   param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)


register_family("transformer", _make_transformer)
