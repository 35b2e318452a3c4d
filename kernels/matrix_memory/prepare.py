"""Stage 1 of the op: everything inside a chunk that does not depend on the carried state.

For every chunk in parallel (plain JAX, differentiated by JAX), the token recurrence of
:mod:`nlj_kernels.matrix_memory.contract` is rewritten so that stage 2 (the kernel, sequential over
chunks) only does dense products with the state ``S [d_k, d_v]`` (and the momentum ``M``)::

    U       = Vu - Kw S                     pseudo-values      [C, d_v]
    y       = Qs S + Qm M + P U             read-outs          [C, d_v]
    S_next  = gs S + mc M + Kdᵀ U
    M_next  = gm M + Kmᵀ U

Without momentum (``γ_t = Π_{j<=t} α_j`` inside the chunk, WY/UT form): ``T = (I + N)⁻¹`` with
``N_{ti} = b_t (γ_{t-1}/γ_i) k_t·k_i`` for ``i < t``, ``Vu = T (s ⊙ V)``,
``Kw = T ((b γ_{t-1} + [l2, boundary] s) ⊙ K)``, ``Kd = (γ_C/γ_t) ⊙ K``, ``gs = γ_C``, and for the
``after`` read ``Qs = γ ⊙ Q``, ``P_{ti} = (γ_t/γ_i) q_t·k_i`` (``i <= t``); ``before`` uses
``γ_{t-1}`` and ``i < t``; ``boundary`` reads the anchor: ``Qs = Q``, ``P = 0``.

With momentum (GD, ``B_t = Π_{j<=t} β_j``): no solve (``b = 0``), ``Γ_{ti} = γ_t/γ_i`` and
``E_{ij} = B_i/B_j`` (lower triangular), ``A = Γ E``, ``m = Γ B`` (padding tokens, which
add no momentum to ``S``, are zero columns of ``Γ``); then ``Vu = s ⊙ V``,
``Kw = [l2] s ⊙ K``, ``Qs = γ ⊙ Q``, ``Qm = m ⊙ Q``, ``P = A ∘ (Q Kᵀ)``, ``Kd = A_{C,·} ⊙ K``,
``Km = (B_C/B_t) ⊙ K``, ``gs = γ_C``, ``mc = m_C``, ``gm = B_C`` (strict versions for ``before``).

All arrays have leading ``[batch, heads, chunks]`` axes; computation is in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nlj.core.rules import Rule
from nlj_kernels.matrix_memory.contract import OpConfig

__all__ = ["ChunkCoefficients", "prepare"]


class ChunkCoefficients(NamedTuple):
  """Stage-2 inputs per chunk (``[..., C, d]`` arrays and ``[...]`` scalars; see module doc).

  ``ka`` is the anchor's share of ``Kw`` (``U = Vu - (Kw - ka) S - ka A``) for the first chunk,
  whose anchor may differ from its starting state; None when the anchor does not enter ``U``.
  Momentum fields are None without momentum.
  """

  kw: jax.Array
  vu: jax.Array
  qs: jax.Array
  p: jax.Array
  kd: jax.Array
  gs: jax.Array
  ka: jax.Array | None
  qm: jax.Array | None = None
  km: jax.Array | None = None
  mc: jax.Array | None = None
  gm: jax.Array | None = None


def _log_cumprod(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inclusive and exclusive ``log Π`` over the last axis; a factor 0 is a reset (clamped)."""
  logs = jnp.log(jnp.maximum(x, jnp.finfo(x.dtype).tiny))
  inclusive = jnp.cumsum(logs, axis=-1)
  return inclusive, inclusive - logs


def _ratios(log_rows: jax.Array, log_cols: jax.Array, strict: bool) -> jax.Array:
  """``exp(log_rows_t - log_cols_i)`` on ``i <= t`` (``i < t`` when strict), else 0: ``[..., C, C]``."""
  size = log_rows.shape[-1]
  rows, cols = jnp.arange(size)[:, None], jnp.arange(size)[None, :]
  keep = rows > cols if strict else rows >= cols
  diff = jnp.where(keep, log_rows[..., :, None] - log_cols[..., None, :], 0.0)
  return jnp.where(keep, jnp.exp(diff), 0.0)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _keys_t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def prepare(config: OpConfig, k: jax.Array, v: jax.Array, q: jax.Array, eta: jax.Array,
            alpha: jax.Array, beta: jax.Array, mask: jax.Array) -> ChunkCoefficients:
  """Stage-1 coefficients of every chunk.

  Args:
    config: the op.
    k, q: ``[..., C, d_k]``; v: ``[..., C, d_v]``; eta, alpha, beta: ``[..., C]``.
    mask: ``[..., C]``, 1 for real tokens and 0 for padding, which leaves every state as it is
      (as :func:`nlj.core.update.masked_scalars` does).

  Returns:
    float32 :class:`ChunkCoefficients`.
  """
  f32 = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
  k, v, q, eta, alpha, beta, mask = map(f32, (k, v, q, eta, alpha, beta, mask))
  rule = Rule(config.step, dgd_variant=config.dgd_variant)
  c, s = jnp.vectorize(rule.coefficients, signature="(),(d)->(),()")(eta, k)
  c, s = c * mask, s * mask
  alpha, beta = jnp.where(mask > 0, alpha, 1.0), jnp.where(mask > 0, beta, 1.0)
  log_g, log_prev = _log_cumprod(alpha)
  anchored = config.semantics == "boundary" and config.objective == "l2"
  qk = _mm(q, _keys_t(k))
  if config.read == "after":
    log_read, strict = log_g, False
  else:
    log_read, strict = log_prev, True
  reads_anchor = config.read == "boundary"
  gs = jnp.exp(log_g[..., -1])
  if config.momentum:
    log_b, _ = _log_cumprod(beta)
    gamma = _ratios(log_read, log_g, strict) * mask[..., None, :]
    gamma_last = jnp.exp(log_g[..., -1:] - log_g) * mask
    decay_all = _ratios(log_b, log_b, False)
    mixed = _mm(gamma, decay_all)
    m = _mm(gamma, jnp.exp(log_b)[..., None])[..., 0]
    last = _mm(gamma_last[..., None, :], decay_all)[..., 0, :]
    m_last = jnp.sum(gamma_last * jnp.exp(log_b), axis=-1)
    ka = s[..., None] * k if anchored else None
    kw = ka if anchored else jnp.zeros_like(k)
    zero_read = jnp.zeros_like(q) if reads_anchor else None
    return ChunkCoefficients(
        kw=kw, vu=s[..., None] * v,
        qs=q if reads_anchor else jnp.exp(log_read)[..., None] * q,
        p=jnp.zeros_like(qk) if reads_anchor else mixed * qk,
        kd=last[..., None] * k, gs=gs, ka=ka,
        qm=zero_read if reads_anchor else m[..., None] * q,
        km=jnp.exp(log_b[..., -1:] - log_b)[..., None] * k,
        mc=m_last, gm=jnp.exp(log_b[..., -1]))
  if config.semantics == "exact" and config.objective == "l2":
    b = c + (alpha * s if config.grad_at_retained else s)
  else:
    b = c
  eye = jnp.eye(k.shape[-2], dtype=k.dtype)
  system = eye + b[..., None] * _ratios(log_prev, log_g, True) * _mm(k, _keys_t(k))
  inverse = jax.scipy.linalg.solve_triangular(  # one C-column solve, then tensor-core products
      system, jnp.broadcast_to(eye, system.shape), lower=True, unit_diagonal=True)
  solve = lambda rhs: _mm(inverse, rhs)
  ka = solve(s[..., None] * k) if anchored else None
  kw = solve((b * jnp.exp(log_prev))[..., None] * k)
  return ChunkCoefficients(
      kw=kw if ka is None else kw + ka, vu=solve(s[..., None] * v),
      qs=q if reads_anchor else jnp.exp(log_read)[..., None] * q,
      p=jnp.zeros_like(qk) if reads_anchor else _ratios(log_read, log_g, strict) * qk,
      kd=jnp.exp(log_g[..., -1:] - log_g)[..., None] * k, gs=gs, ka=ka)
