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
``Km = (B_C/B_t) ⊙ K``, ``gs = γ_C``, ``mc = m_C``, ``gm = B_C`` (strict versions for ``before``;
``boundary`` reads have ``A = 0`` and ``m = 0``).

The equations are written once, for one chunk, in two parts: :func:`chunk_parts` (the
per-token :class:`ChunkScalars`, or with momentum :class:`MomentumScalars`) and
:func:`chunk_tiles` (the tiles built from those scalars, with the triangular inverse passed in);
:func:`chunk_coefficients` joins them. :func:`prepare` maps both over ``[batch, heads,
chunks]`` in plain JAX with a triangular solve or the products-only blocked inverse
(:mod:`nlj.core.triangular`); :mod:`nlj_kernels.matrix_memory.pallas_stage1` maps
:func:`chunk_parts` the same way and builds the tiles in Pallas kernels.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from nlj.core.rules import Rule
from nlj_kernels.matrix_memory.contract import OpConfig
from nlj.core.triangular import inverse_named

__all__ = ["ChunkCoefficients", "ChunkScalars", "MomentumScalars", "ReadForm",
           "chunk_coefficients", "chunk_inputs", "chunk_parts", "chunk_tiles", "momentum_reads",
           "momentum_tiles", "prepare", "read_form", "to_chunks"]


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


def _tril(size: int, strict: bool) -> jax.Array:
  rows = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
  return rows > cols if strict else rows >= cols


def _log_cumprod(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inclusive and exclusive ``log Π`` of ``x [C]``; a factor 0 is a reset (clamped)."""
  logs = jnp.log(jnp.maximum(x, jnp.finfo(x.dtype).tiny))
  inclusive = jnp.sum(jnp.where(_tril(x.shape[0], False), logs[None, :], 0.0), axis=1)
  return inclusive, inclusive - logs


def _last(x: jax.Array) -> jax.Array:
  """``x[-1]`` of a ``[C]`` vector as a masked sum (Pallas' Triton lowering has no slices)."""
  return jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, x.shape, 0) == x.shape[0] - 1,
                           x, 0.0))


def _ratios(log_rows: jax.Array, log_cols: jax.Array, strict: bool) -> jax.Array:
  """``exp(log_rows_t - log_cols_i)`` on ``i <= t`` (``i < t`` when strict), else 0: ``[C, C]``."""
  keep = _tril(log_rows.shape[0], strict)
  diff = jnp.where(keep, log_rows[:, None] - log_cols[None, :], 0.0)
  return jnp.where(keep, jnp.exp(diff), 0.0)


def _mm(a: jax.Array, b: jax.Array, trans_b: bool = False) -> jax.Array:
  """A 2-D product at JAX's default matmul precision (``jax_default_matmul_precision``)."""
  dims = (((1,), (1,) if trans_b else (0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=a.dtype)


Inverse = Callable[[jax.Array], jax.Array]  # strictly lower N [C, C] -> (I + N)^-1


class ChunkScalars(NamedTuple):
  """Per-token ``[C]`` scalars of a chunk without momentum, from which :func:`chunk_tiles`
  builds every tile.

  With ``T = (I + N)⁻¹``, ``N_{ti} = b_t exp(log_prev_t - log_g_i) k_t·k_i`` (``i < t``)::

    Kw = T (wk ⊙ K) ;  Vu = T (s ⊙ V) ;  Ka = T (s ⊙ K)   (anchored writes only)
    Qs = read ⊙ Q ;  Kd = decay ⊙ K ;  P_{ti} = exp(log_read_t - log_g_i) q_t·k_i
                                        (i <= t; i < t for strict reads; P = 0 for anchor reads)
  """

  b: jax.Array
  wk: jax.Array
  s: jax.Array
  log_prev: jax.Array
  log_g: jax.Array
  log_read: jax.Array
  read: jax.Array
  decay: jax.Array


class MomentumScalars(NamedTuple):
  """Per-token ``[C]`` scalars of a chunk with momentum, from which :func:`momentum_tiles`
  builds every tile: the row scales ``s``, ``read``, ``km``, ``last = γ_C/γ_t`` (0 on padding),
  the logs of ``γ`` (``log_read``, ``log_g``) and of ``B`` (``log_b``), and the padding
  ``mask``. :func:`momentum_reads` turns them into ``qm``, ``decay`` and the read decay
  ``a [C, C]`` (lower triangular; strictly for strict reads; 0 for anchor reads)::

    Vu = s ⊙ V ;  Ka = s ⊙ K ;  Qs = read ⊙ Q ;  Qm = qm ⊙ Q ;  Kd = decay ⊙ K ;  Km = km ⊙ K
    P = tril(a ∘ Q Kᵀ)  (0 for anchor reads) ;  Kw = Ka for anchored writes, else 0
  """

  s: jax.Array
  read: jax.Array
  km: jax.Array
  last: jax.Array
  log_read: jax.Array
  log_g: jax.Array
  log_b: jax.Array
  mask: jax.Array


class ReadForm(NamedTuple):
  """The static shape of a chunk's tiles: ``Ka`` present (``anchored``), ``P``'s diagonal
  excluded (``strict``), or ``P = 0`` (``reads_anchor``)."""

  anchored: bool
  strict: bool
  reads_anchor: bool


def read_form(config: OpConfig) -> ReadForm:
  """:class:`ReadForm` of the op: the anchor enters the pseudo-values for the L2 objective under
  boundary semantics; ``before`` and ``boundary`` reads exclude the token's own write."""
  return ReadForm(config.semantics == "boundary" and config.objective == "l2",
                  config.read != "after", config.read == "boundary")


def chunk_parts(config: OpConfig, k: jax.Array, v: jax.Array, q: jax.Array, eta: jax.Array,
                alpha: jax.Array, beta: jax.Array, mask: jax.Array
                ) -> tuple[ChunkCoefficients, ChunkScalars | MomentumScalars]:
  """One chunk's coefficients, or its per-token scalars (see the module docstring).

  Args:
    config: the op.
    k, q: ``[C, d_k]``; v: ``[C, d_v]``; eta, alpha, beta: ``[C]``, all float32 (or float64).
    mask: ``[C]``, 1 for real tokens and 0 for padding, which leaves every state as it is
      (as :func:`nlj.core.update.masked_scalars` does).

  Returns:
    ``(coefficients, scalars)``: coefficients holding only the 0-d scalars (``gs``, and
    ``mc``, ``gm`` with momentum) and the :class:`ChunkScalars` (:class:`MomentumScalars` with
    momentum) from which :func:`chunk_tiles` builds the rest.
  """
  rule = Rule(config.step, dgd_variant=config.dgd_variant)
  c, s = jax.vmap(rule.coefficients)(eta, k)
  c, s = c * mask, s * mask
  alpha, beta = jnp.where(mask > 0, alpha, 1.0), jnp.where(mask > 0, beta, 1.0)
  log_g, log_prev = _log_cumprod(alpha)
  form = read_form(config)
  log_read = log_g if config.read == "after" else log_prev
  read = jnp.ones_like(log_read) if form.reads_anchor else jnp.exp(log_read)
  gs = jnp.exp(_last(log_g))
  if config.momentum:
    log_b, _ = _log_cumprod(beta)
    last = jnp.exp(_last(log_g) - log_g) * mask
    scalars = MomentumScalars(s, read, jnp.exp(_last(log_b) - log_b), last, log_read, log_g,
                              log_b, mask)
    return ChunkCoefficients(kw=None, vu=None, qs=None, p=None, kd=None, gs=gs, ka=None,
                             mc=jnp.sum(last * jnp.exp(log_b)),
                             gm=jnp.exp(_last(log_b))), scalars
  if config.semantics == "exact" and config.objective == "l2":
    b = c + (alpha * s if config.grad_at_retained else s)
  else:
    b = c
  wk = b * jnp.exp(log_prev) + (s if form.anchored else 0.0)
  scalars = ChunkScalars(b, wk, s, log_prev, log_g, log_read, read,
                         jnp.exp(_last(log_g) - log_g))
  return ChunkCoefficients(kw=None, vu=None, qs=None, p=None, kd=None, gs=gs, ka=None), scalars


def chunk_tiles(form: ReadForm, inverse: Inverse, k: jax.Array, v: jax.Array, q: jax.Array,
                scalars: ChunkScalars | MomentumScalars) -> dict[str, jax.Array | None]:
  """The tiles ``kw, vu, qs, p, kd, ka`` of one chunk (and ``qm, km`` with momentum) from its
  :class:`ChunkScalars` or :class:`MomentumScalars` (``k, q [C, d_k]``, ``v [C, d_v]``; ``ka``
  None unless ``form.anchored``).

  ``inverse``: ``N -> (I + N)⁻¹`` for strictly lower-triangular ``N [C, C]`` (unused with
  momentum, which solves nothing).
  """
  w = scalars
  if isinstance(w, MomentumScalars):
    return momentum_tiles(form, k, v, q, w)
  t = inverse(w.b[:, None] * _ratios(w.log_prev, w.log_g, True) * _mm(k, k, trans_b=True))
  qk = _mm(q, k, trans_b=True)
  return dict(
      kw=_mm(t, w.wk[:, None] * k), vu=_mm(t, w.s[:, None] * v), qs=w.read[:, None] * q,
      p=jnp.zeros_like(qk) if form.reads_anchor else _ratios(w.log_read, w.log_g,
                                                             form.strict) * qk,
      kd=w.decay[:, None] * k, ka=_mm(t, w.s[:, None] * k) if form.anchored else None)


def momentum_reads(form: ReadForm, w: MomentumScalars
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(qm [C], decay [C], a [C, C])`` of one chunk: with ``Γ_tj = exp(log_read_t - log_g_j)
  mask_j`` on ``j <= t`` (``j < t`` for strict reads) and ``E_ji = exp(log_b_j - log_b_i)`` on
  ``i <= j``, ``qm = Γ exp(log_b)``, ``decay = lastᵀ E`` and ``a = Γ E`` (``qm = a = 0`` for
  anchor reads)."""
  decay_all = _ratios(w.log_b, w.log_b, False)
  decay = jnp.sum(w.last[:, None] * decay_all, axis=0)
  if form.reads_anchor:
    return jnp.zeros_like(decay), decay, jnp.zeros_like(decay_all)
  gamma = _ratios(w.log_read, w.log_g, form.strict) * w.mask[None, :]
  return jnp.sum(gamma * jnp.exp(w.log_b)[None, :], axis=1), decay, _mm(gamma, decay_all)


def momentum_tiles(form: ReadForm, k: jax.Array, v: jax.Array, q: jax.Array,
                   scalars: MomentumScalars) -> dict[str, jax.Array | None]:
  """The tiles of one chunk with momentum (:class:`MomentumScalars`; shapes as
  :func:`chunk_tiles`)."""
  w = scalars
  qm, decay, a = momentum_reads(form, w)
  row = lambda x, rows: x[:, None] * rows
  ka = row(w.s, k) if form.anchored else None
  size = k.shape[0]
  p = jnp.zeros((size, size), k.dtype) if form.reads_anchor else jnp.where(
      _tril(size, False), a * _mm(q, k, trans_b=True), 0.0)
  return dict(kw=jnp.zeros_like(k) if ka is None else ka, vu=row(w.s, v), qs=row(w.read, q), p=p,
              kd=row(decay, k), ka=ka, qm=row(qm, q), km=row(w.km, k))


def chunk_coefficients(config: OpConfig, inverse: Inverse, k: jax.Array, v: jax.Array,
                       q: jax.Array, eta: jax.Array, alpha: jax.Array, beta: jax.Array,
                       mask: jax.Array) -> ChunkCoefficients:
  """Stage-1 coefficients of one chunk: :func:`chunk_parts` completed by :func:`chunk_tiles`
  (arguments as there).

  Returns:
    :class:`ChunkCoefficients` of ``[C, ·]`` tiles and 0-d scalars.
  """
  coeffs, scalars = chunk_parts(config, k, v, q, eta, alpha, beta, mask)
  return coeffs._replace(**chunk_tiles(read_form(config), inverse, k, v, q, scalars))


def to_chunks(x: jax.Array, size: int) -> jax.Array:
  """``[B, n * size, H, ...] -> [B, H, n, size, ...]``."""
  x = x.reshape((x.shape[0], x.shape[1] // size, size) + x.shape[2:])
  return jnp.moveaxis(x, 3, 1)


def chunk_inputs(*xs: jax.Array, size: int) -> tuple[jax.Array, ...]:
  """Inputs ``[B, T, H, ...]`` as float32 (float64 stays) chunks ``[B, H, N, C, ...]``."""
  f32 = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return tuple(to_chunks(f32(x), size) for x in xs)


def prepare(config: OpConfig, k: jax.Array, v: jax.Array, q: jax.Array, eta: jax.Array,
            alpha: jax.Array, beta: jax.Array, mask: jax.Array,
            inverse: str = "solve") -> ChunkCoefficients:
  """Stage-1 coefficients of every chunk in plain JAX.

  Args:
    config: the op.
    k, q: ``[B, T, H, d_k]``; v: ``[B, T, H, d_v]``; eta, alpha, beta, mask: ``[B, T, H]``
      (``T % chunk == 0``; see :func:`chunk_parts`).
    inverse: how ``T = (I + N)⁻¹`` is computed, a key of
      :data:`nlj.core.triangular.INVERSES` (``"solve"`` or ``"blocked"``).

  Returns:
    :class:`ChunkCoefficients` with leading ``[B, H, N]`` axes, in float32 (float64 stays).
  """
  args = chunk_inputs(k, v, q, eta, alpha, beta, mask, size=config.chunk)
  one = functools.partial(chunk_coefficients, config, inverse_named(inverse))
  return jax.vmap(jax.vmap(jax.vmap(one)))(*args)
