"""Stage 1 of the op: the state-free coefficients of every chunk (plain JAX, all chunks at once).

Inside a chunk (tokens ``t = 1..C``, masked scalars as :func:`nlj.core.update.masked_scalars`)
let ``γ_t = Π_{j<=t} α_j`` and ``B_t = Π_{j<=t} β_j``, and the lower-triangular ratios
``G_{ti} = γ_t/γ_i`` (``i <= t``), ``G⁻_{ti} = γ_{t-1}/γ_i`` (``i < t``), ``E_{ti} = B_t/B_i``.
Every weight of the MLP then follows (``W_0``, ``S_0``: the weight and its momentum at the chunk
start; ``u_i = -s_i δ_i``, ``a_i`` its input; see :mod:`nlj_kernels.mlp_memory.contract`)::

    W_t = γ_t W_0 + m_t S_0 + Σ_{i<=t} P_{ti} u_i a_iᵀ + Σ_{i<=t} G_{ti} z_i k_iᵀ
    S_t = B_t S_0 + Σ_{i<=t} E_{ti} u_i a_iᵀ

with ``P = G E``, ``m = G B`` under momentum (``P = G``, ``m = 0`` without; padding tokens,
which add no momentum to ``W``, are zero columns of ``G`` and ``G⁻`` in these products), and the
DGD pseudo-errors ``z_t = -c_t W_{t-1} k_t`` of the key-input weights (zero for GD and the other
weights). Since ``W_{t-1} k_t`` is the same sum with ``G⁻``, ``P⁻ = G⁻ E`` and ``m⁻ = G⁻ B``, the
``z`` of a chunk solve one unit-lower-triangular system ``(I + diag(c) (G⁻ ∘ K Kᵀ)) Z = …`` whose
inverse ``T`` is state-free::

    Z = -(Kw W_0ᵀ + Km S_0ᵀ + Mz U),   Kw = T ((c γ⁻) ⊙ K),  Km = T ((c m⁻) ⊙ K),
                                       Mz = T diag(c) (P⁻ ∘ K Kᵀ)

Fields (``[..., C]`` vectors, ``[..., C, C]`` squares, ``[...]`` scalars per chunk):

=========  ============================  ==============================================
name       value                         used for
=========  ============================  ==============================================
k, v, q    keys, targets, queries        the anchor's forward and backward; reads
s          masked steps ``s``            ``u = -s ⊙ δ``
gam_end    ``γ_C``                       ``W_C``
u_last     ``P_{C,·}``                   ``W_C`` from the ``u`` terms
r_gam      ``γ`` (after) or ``γ⁻``       reads ``W_t q_t`` (before: ``W_{t-1} q_t``)
r_u        ``P`` (after) or ``P⁻``       read coefficients of the ``u`` terms
r_m        ``m`` (after) or ``m⁻``       reads of the momentum term
r_z        ``G`` (after) or ``G⁻``       read coefficients of the ``z`` terms
m_end      ``m_C``                       ``W_C`` (momentum)
b_end      ``B_C``                       ``S_C`` (momentum)
b_last     ``E_{C,·}``                   ``S_C`` (momentum)
kw, mz     as above                      ``Z`` (DGD)
km         as above                      ``Z`` (DGD + momentum)
z_last     ``G_{C,·}``                   ``W_C`` from the ``z`` terms (DGD + momentum)
=========  ============================  ==============================================

Without momentum ``P = G``, so the ``u`` and ``z`` terms share coefficients and the kernel adds
``z`` into ``u``. ``boundary`` reads need no coefficients (they read the anchor).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nlj.core.rules import Rule
from nlj_kernels.mlp_memory.contract import OpConfig

__all__ = ["field_names", "prepare"]

def field_names(config: OpConfig, reads: bool) -> tuple[str, ...]:
  """The fields the kernels take for ``config`` (``reads``: the level is read, q is given)."""
  names = ["k", "v", "s", "gam_end", "u_last"]
  if reads:
    names.append("q")
    if config.read != "boundary":
      names += ["r_gam", "r_u"] + (["r_m"] if config.momentum else [])
      names += ["r_z"] if config.dgd and config.momentum else []
  if config.momentum:
    names += ["m_end", "b_end", "b_last"]
  if config.dgd:
    names += ["kw", "mz"] + (["km", "z_last"] if config.momentum else [])
  return tuple(names)


def _log_cumprod(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inclusive and exclusive ``log Π`` over the last axis; a factor 0 is a reset (clamped)."""
  logs = jnp.log(jnp.maximum(x, jnp.finfo(x.dtype).tiny))
  inclusive = jnp.cumsum(logs, axis=-1)
  return inclusive, inclusive - logs


def _ratios(log_rows: jax.Array, log_cols: jax.Array, strict: bool) -> jax.Array:
  """``exp(log_rows_t - log_cols_i)`` on ``i <= t`` (``i < t`` when strict), else 0."""
  size = log_rows.shape[-1]
  rows, cols = jnp.arange(size)[:, None], jnp.arange(size)[None, :]
  keep = rows > cols if strict else rows >= cols
  diff = jnp.where(keep, log_rows[..., :, None] - log_cols[..., None, :], 0.0)
  return jnp.where(keep, jnp.exp(diff), 0.0)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """A product at JAX's default matmul precision (``jax_default_matmul_precision``)."""
  return jnp.matmul(a, b)


def prepare(config: OpConfig, k: jax.Array, v: jax.Array, q: jax.Array | None, eta: jax.Array,
            alpha: jax.Array, beta: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """The fields of every chunk, in :func:`field_names` order.

  Args:
    config: the op.
    k: ``[..., C, d_in]``; v: ``[..., C, d_out]``; q: ``[..., C, d_in]`` or None (unread).
    eta, alpha, beta: ``[..., C]``.
    mask: ``[..., C]``: 1 for real tokens, 0 for padding (a no-op token).

  Returns:
    name -> array, in the dtype of ``k`` (float32 or wider).
  """
  rule = Rule(config.step, dgd_variant=config.dgd_variant)
  c, s = jnp.vectorize(rule.coefficients, signature="(),(d)->(),()")(eta, k)
  c, s = c * mask, s * mask
  alpha, beta = jnp.where(mask > 0, alpha, 1.0), jnp.where(mask > 0, beta, 1.0)
  log_g, log_prev = _log_cumprod(alpha)
  g, g_prev = _ratios(log_g, log_g, False), _ratios(log_prev, log_g, True)
  out = {"k": k, "v": v, "s": s, "gam_end": jnp.exp(log_g[..., -1])}
  if config.momentum:
    log_b, _ = _log_cumprod(beta)
    e, b = _ratios(log_b, log_b, False), jnp.exp(log_b)[..., None]
    writes = lambda x: x * mask[..., None, :]  # padding tokens add no momentum to W
    p, p_prev = _mm(writes(g), e), _mm(writes(g_prev), e)
    m, m_prev = _mm(writes(g), b)[..., 0], _mm(writes(g_prev), b)[..., 0]
    out.update(m_end=m[..., -1], b_end=b[..., -1, 0], b_last=e[..., -1, :])
  else:
    p, p_prev = g, g_prev
  out["u_last"] = p[..., -1, :]
  if q is not None:
    out["q"] = q
    after = config.read == "after"
    out.update(r_gam=jnp.exp(log_g if after else log_prev), r_u=p if after else p_prev)
    if config.momentum:
      out.update(r_m=m if after else m_prev, r_z=g if after else g_prev)
  if config.dgd:
    gram = _mm(k, jnp.swapaxes(k, -1, -2))
    eye = jnp.eye(k.shape[-2], dtype=k.dtype)
    system = eye + c[..., :, None] * g_prev * gram
    inverse = jax.scipy.linalg.solve_triangular(
        system, jnp.broadcast_to(eye, system.shape), lower=True, unit_diagonal=True)
    out.update(kw=_mm(inverse, (c * jnp.exp(log_prev))[..., None] * k),
               mz=_mm(inverse, c[..., :, None] * p_prev * gram))
    if config.momentum:
      out.update(km=_mm(inverse, (c * m_prev)[..., None] * k), z_last=g[..., -1, :])
  names = field_names(config, q is not None)
  return {name: out[name] for name in names}
