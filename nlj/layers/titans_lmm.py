"""Titans' long-term memory (LMM) as a sequence mixer, and the pieces MAC/MAG/MAL share.

The neural memory of Titans (Behrouz et al. 2025, arXiv 2501.00663, §3 and §4.4; PAPER.md §3.7)
is a per-head residual MLP ``M`` trained in context on ``ℓ = ½||M(k_t) - v_t||²`` by gradient
descent with momentum and retention (Titans eqs. 9-14)::

    S_t = β_t S_{t-1} - η_t ∇ℓ(M_anchor; k_t, v_t)
    M_t = α_t M_{t-1} + S_t                    (α is the kept fraction: Titans' 1 - α_t)
    y_t = M_t(q_t)                             (retrieval, eq. 15, a read without update)

with gradients taken at the previous chunk boundary (mini-batch GD, :mod:`nlj.core.level`
``semantics="boundary"``), run by :meth:`nlj.core.Level.run` (``impl`` picks the reference,
chunked or kernel form). The initial state ``M_0`` is a meta-learned parameter: the outer
gradient flows through every inner update into it.

Projections (Titans §4.4): ``q, k, v = x W_{q,k,v}``, each followed by a causal depthwise conv of
width 4 and SiLU; ``q, k`` are then l2-normalised per head. The per-head, per-token scalars are
``η_t = softplus(x_t w_η + b_η) · eta_scale`` (or ``sigmoid``), ``α_t = sigmoid(x_t w_α + b_α)``
and ``β_t = sigmoid(x_t w_β + b_β)`` (PAPER.md §3.6, §8 item 8), with biases starting at
``(0, 5, 0)``: ``α ≈ 0.993``, ``β = 0.5``. Output: per-head RMSNorm gated by ``silu(x W_g)``,
then ``W_o`` (Titans §4.4).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nlj.core import Level, LevelInputs, LevelState, titans_memory
from nlj.core.dispatch import IMPLS
from nlj.layers.common import GatedRMSNorm, ShortConv, dense, l2_normalize

__all__ = ["LMMCache", "MemoryInit", "MemoryProjections", "TitansLMM", "ETA_FNS"]

ETA_FNS = {"softplus": jax.nn.softplus, "sigmoid": jax.nn.sigmoid}
_GATE_BIAS = (0.0, 5.0, 0.0)  # η, α, β pre-activation biases at initialisation


def check_heads(owner: str, d_model: int, heads: int, head_dim: int | None) -> int:
  """The per-head width; errors name ``owner``'s field."""
  if not isinstance(heads, int) or heads < 1 or (head_dim is None and d_model % heads):
    raise ValueError(f"{owner}.heads ({heads}) must be a positive int dividing d_model ({d_model})")
  return d_model // heads if head_dim is None else head_dim


class MemoryInit(nnx.Module):
  """The meta-learned initial memory state ``M_0`` of a level, one ``nnx.Param`` per weight."""

  def __init__(self, level: Level, rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
    leaves, self.treedef = jax.tree.flatten(level.init(rngs.params(), param_dtype))
    self.weights = nnx.List([nnx.Param(w) for w in leaves])

  def __call__(self) -> Any:
    """The memory parameters ``[heads, ...]`` (a pytree for :meth:`Level.init_state`)."""
    return jax.tree.unflatten(self.treedef, [w[...] for w in self.weights])


class MemoryProjections(nnx.Module):
  """Inputs of a Titans memory from a token stream ``z [batch, seq, d_model]`` (Titans §4.4).

  :meth:`queries` gives ``q``; :meth:`writes` gives ``k, v, η, α, β``. Each has its own causal
  conv, so the same projections can read several streams, each with its own conv cache (MAC
  queries both the segment input and the attention output).
  """

  def __init__(self, d_model: int, heads: int, head_dim: int, *, conv: int = 4,
               eta_fn: str = "softplus", eta_scale: float = 0.1, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if eta_fn not in ETA_FNS:
      raise ValueError(f"eta_fn must be one of {sorted(ETA_FNS)}, got {eta_fn!r}")
    if eta_scale <= 0:
      raise ValueError(f"eta_scale must be > 0, got {eta_scale}")
    inner = heads * head_dim
    self.heads, self.head_dim, self.eta_fn, self.eta_scale = heads, head_dim, eta_fn, eta_scale
    self.q = dense(d_model, inner, rngs, dtype, param_dtype)
    self.q_conv = ShortConv(inner, conv, rngs, param_dtype)
    self.kv = dense(d_model, 2 * inner, rngs, dtype, param_dtype)
    self.kv_conv = ShortConv(2 * inner, conv, rngs, param_dtype)
    bias = jnp.repeat(jnp.asarray(_GATE_BIAS), heads)
    self.gates = nnx.Linear(  # computed in >= float32 whatever the compute dtype
        d_model, 3 * heads, kernel_init=nnx.initializers.variance_scaling(1.0, "fan_in", "normal"),
        bias_init=lambda key, shape, dtype: bias.astype(dtype), param_dtype=param_dtype,
        rngs=rngs)

  def init_conv(self, batch: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Fresh ``(q_conv, kv_conv)`` caches."""
    return self.q_conv.init_cache(batch, dtype), self.kv_conv.init_cache(batch, dtype)

  def _split_heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[:2] + (self.heads, self.head_dim))

  def queries(self, z: jax.Array, conv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``z [batch, seq, d_model]`` -> ``(q [batch, seq, heads, head_dim], conv)``; unit-norm q."""
    q, new = self.q_conv(self.q(z), conv)
    return l2_normalize(self._split_heads(jax.nn.silu(q))), new.astype(conv.dtype)

  def writes(self, z: jax.Array, conv: jax.Array
             ) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """``z [batch, seq, d_model]`` -> ``((k, v, η, α, β), conv)``.

    ``k`` (unit-norm) and ``v`` are ``[batch, seq, heads, head_dim]``; the scalars
    ``[batch, seq, heads]`` are in float32.
    """
    kv, new = self.kv_conv(self.kv(z), conv)
    k, v = map(self._split_heads, jnp.split(jax.nn.silu(kv), 2, axis=-1))
    g = self.gates(z.astype(jnp.promote_types(z.dtype, jnp.float32)))
    g_eta, g_alpha, g_beta = jnp.split(g, 3, axis=-1)
    eta = ETA_FNS[self.eta_fn](g_eta) * self.eta_scale
    scalars = (eta, jax.nn.sigmoid(g_alpha), jax.nn.sigmoid(g_beta))
    return (l2_normalize(k), v) + scalars, new.astype(conv.dtype)


def memory_level(owner: str, head_dim: int, heads: int, expansion: int, layers: int, chunk: int,
                 read: str, impl: str) -> Level:
  """:func:`nlj.core.titans_memory` with errors naming ``owner``'s fields."""
  if impl not in IMPLS:
    raise ValueError(f"{owner}.impl must be one of {IMPLS}, got {impl!r}")
  if not isinstance(expansion, int) or expansion < 1:
    raise ValueError(f"{owner}.expansion must be a positive int, got {expansion!r}")
  return titans_memory(head_dim, expansion * head_dim, heads, chunk, layers, read)


class LMMCache(NamedTuple):
  """Streaming state of :class:`TitansLMM`.

  Attributes:
    q_conv: query conv tail ``[batch, 3, heads * head_dim]``.
    kv_conv: key/value conv tail ``[batch, 3, 2 * heads * head_dim]``.
    memory: the memory level's :class:`nlj.core.LevelState` (float32).
  """

  q_conv: jax.Array
  kv_conv: jax.Array
  memory: LevelState


class TitansLMM(nnx.Module):
  """Titans' neural memory alone as a token mixer (LMM; see the module docstring).

  Args:
    d_model: model width.
    heads: memory heads (independent per-head memories).
    head_dim: per-head width, default ``d_model // heads``.
    expansion: hidden width of the memory MLP is ``expansion * head_dim`` (Miras: 4).
    memory_layers: weight matrices of the memory MLP (Titans: deep memories, >= 2, work best).
    chunk: mini-batch of the memory's inner GD (gradients anchored every ``chunk`` tokens).
    read: ``"after"`` (``y_t = M_t(q_t)``), ``"before"`` or ``"boundary"`` (see Level).
    conv: width of the causal depthwise convs.
    eta_fn: ``"softplus"`` (unbounded) or ``"sigmoid"`` (``η <= eta_scale``).
    eta_scale: scale of the inner step size.
    impl: memory-update implementation for :meth:`nlj.core.Level.run`.
    dtype: compute dtype of projections and output (memory states stay float32).
    param_dtype: parameter dtype.
    rngs: parameter initialisation.
  """

  def __init__(self, d_model: int, heads: int, *, head_dim: int | None = None,
               expansion: int = 4, memory_layers: int = 2, chunk: int = 16, read: str = "after",
               conv: int = 4, eta_fn: str = "softplus", eta_scale: float = 0.1,
               impl: str = "auto", dtype: Any = None, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    head_dim = check_heads("TitansLMM", d_model, heads, head_dim)
    self.level = memory_level("TitansLMM", head_dim, heads, expansion, memory_layers, chunk,
                              read, impl)
    self.impl, self.dtype, self.param_dtype = impl, dtype, param_dtype
    self.heads, self.head_dim = heads, head_dim
    self.proj = MemoryProjections(d_model, heads, head_dim, conv=conv, eta_fn=eta_fn,
                                  eta_scale=eta_scale, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
    self.memory_init = MemoryInit(self.level, rngs, param_dtype)
    self.gate = dense(d_model, heads * head_dim, rngs, dtype, param_dtype)
    self.norm = GatedRMSNorm(head_dim, param_dtype=param_dtype)
    self.out = dense(heads * head_dim, d_model, rngs, dtype, param_dtype)

  def init_cache(self, batch: int, max_len: int | None = None) -> LMMCache:
    """A fresh sequence: zero conv tails and the meta-learned ``M_0`` (``max_len`` is unused).

    The memory state reads the current initial-state parameters, so build the cache inside
    the differentiated function (or pass ``cache=None``) for gradients to reach ``M_0``.
    """
    q_conv, kv_conv = self.proj.init_conv(batch, self.dtype or self.param_dtype)
    return LMMCache(q_conv, kv_conv, self.level.init_state(self.memory_init(), batch))

  def __call__(self, x: jax.Array, cache: LMMCache | None = None
               ) -> tuple[jax.Array, LMMCache]:
    """``x [batch, seq, d_model] -> (y [batch, seq, d_model], cache)``."""
    if cache is None:
      cache = self.init_cache(x.shape[0])
    q, q_conv = self.proj.queries(x, cache.q_conv)
    (k, v, eta, alpha, beta), kv_conv = self.proj.writes(x, cache.kv_conv)
    memory, y = self.level.run(cache.memory, LevelInputs(k, v, q, eta, alpha, beta), self.impl)
    dtype = self.dtype or x.dtype
    o = self.norm(y.astype(dtype), self.gate(x))
    return self.out(o), LMMCache(q_conv, kv_conv, memory)
