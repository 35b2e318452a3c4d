"""Stage 1's WY products as Pallas kernels, forward and backward, in 16-row blocks.

Per chunk (one program each, grid ``(batch, heads, chunks)``, keys and values read straight from
the ``[B, T, H, ·]`` inputs) the kernels compute :func:`~nlj_kernels.matrix_memory.prepare.
wy_products`::

    N = strict_lower(b_t exp(lp_t - lg_i) k_t·k_i) ;  T = (I + N)⁻¹
    Kw = T (wk ⊙ K) ;  Vu = T (s ⊙ V) ;  Ka = T (s ⊙ K)   (Ka only for anchored writes)

``T`` is built in ``16 × 16`` blocks: each diagonal block ``D_i = (I + N_ii)⁻¹`` by the exact
nilpotent series (:func:`nlj.core.triangular.blocked_inverse`), the others by block forward
substitution ``T_ij = -D_i Σ_{j<=m<i} N_im T_mj``; every product is a small matrix-unit tile, and
nothing of size ``C × C`` is live at once. The backward kernel recomputes ``T`` and applies the
hand-derived rules (``X̄`` is the cotangent of ``X``)::

    x̄ = Tᵀ Ȳ for each product Y = T x ;  T̄ = Σ Ȳ xᵀ (lower blocks) ;  N̄ = -Tᵀ T̄ Tᵀ (strict)
    N = b ⊙ E ⊙ G with E_ti = exp(lp_t - lg_i), G = K Kᵀ:
    Ḡ = N̄ ⊙ b E ;  K̄ += (Ḡ + Ḡᵀ) K ;  Z = N̄ ⊙ E ⊙ G ;  b̄ = rowsum Z ;  l̄p = b rowsum Z ;
    l̄g = -colsum(b ⊙ Z)

so no autodiff runs through the inverse. The per-token scalars ``(b, wk, s, lp, lg)`` come from
:func:`~nlj_kernels.matrix_memory.prepare.chunk_parts` in plain JAX, which differentiates them
on to η, α and the keys. Products take the inputs' dtype with a float32 (or wider) accumulator,
as the recurrence kernels do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nlj.core.triangular import blocked_inverse
from nlj_kernels.matrix_memory.pallas_recurrence import compiler_params
from nlj_kernels.matrix_memory.contract import OpConfig
from nlj_kernels.matrix_memory.prepare import (ChunkCoefficients, WYScalars, anchors_writes,
                                               chunk_inputs, chunk_parts)

__all__ = ["prepare_pallas", "wy_pallas", "BLOCK"]

BLOCK = 16


def _dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False,
         dtype=None) -> jax.Array:
  """``a @ b`` (operands optionally transposed, cast to ``dtype``) with an accumulator of at
  least float32."""
  if dtype is not None:
    a, b = a.astype(dtype), b.astype(dtype)
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  out = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
  return jax.lax.dot_general(a, b, dims, preferred_element_type=out)


def _blocks(ref, nb: int) -> list[jax.Array]:
  """The ``nb`` 16-row blocks of a ``[C, ·]`` or ``[C]`` ref."""
  return [ref[pl.ds(i * BLOCK, BLOCK)] for i in range(nb)]


def _store_blocks(ref, blocks: list[jax.Array]) -> None:
  for i, x in enumerate(blocks):
    ref[pl.ds(i * BLOCK, BLOCK)] = x.astype(ref.dtype)


class _Chunk:
  """One chunk's blocks: keys, per-token scalars, and ``N``'s factors and ``T`` (lower blocks
  ``[i][j]``, ``j <= i``)."""

  def __init__(self, k_ref, scalar_refs, nb: int):
    self.nb, self.cdt = nb, k_ref.dtype
    self.k = _blocks(k_ref, nb)
    wide = jnp.promote_types(scalar_refs[0].dtype, jnp.float32)
    self.sc = WYScalars(*([x.astype(wide) for x in _blocks(r, nb)] for r in scalar_refs))
    rows = jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1)
    strict = rows > cols
    self.e, self.gram = {}, {}  # E (zero outside N's support) and G = K Kᵀ
    for i in range(nb):
      for j in range(i + 1):
        diff = self.sc.log_prev[i][:, None] - self.sc.log_g[j][None, :]
        if i == j:
          self.e[i, j] = jnp.where(strict, jnp.exp(jnp.where(strict, diff, 0.0)), 0.0)
        else:
          self.e[i, j] = jnp.exp(diff)
        self.gram[i, j] = _dot(self.k[i], self.k[j], trans_b=True)
    self.n = {ij: self.sc.b[ij[0]][:, None] * self.e[ij] * self.gram[ij] for ij in self.e}
    self.t = {}
    for i in range(nb):
      d = blocked_inverse(self.n[i, i])
      self.t[i, i] = d
      for j in range(i):
        acc = sum(jnp.dot(self.n[i, m], self.t[m, j]) for m in range(j, i))
        self.t[i, j] = -jnp.dot(d, acc)

  def apply(self, x: list[jax.Array]) -> list[jax.Array]:
    """``T x`` for 16-row blocks ``x``."""
    return [sum(_dot(self.t[i, j], x[j], dtype=self.cdt) for j in range(i + 1))
            for i in range(self.nb)]

  def apply_t(self, y: list[jax.Array]) -> list[jax.Array]:
    """``Tᵀ y`` for 16-row blocks ``y``."""
    return [sum(_dot(self.t[i, j], y[i], trans_a=True, dtype=self.cdt)
                for i in range(j, self.nb)) for j in range(self.nb)]


def _scaled(weights: list[jax.Array], x: list[jax.Array]) -> list[jax.Array]:
  return [w[:, None] * xi.astype(w.dtype) for w, xi in zip(weights, x)]


def _forward_kernel(k_ref, v_ref, *refs, nb: int, anchored: bool):
  scalar_refs, outs = refs[:5], refs[5:]
  chunk = _Chunk(k_ref, scalar_refs, nb)
  sc, v = chunk.sc, _blocks(v_ref, nb)
  _store_blocks(outs[0], chunk.apply(_scaled(sc.wk, chunk.k)))
  _store_blocks(outs[1], chunk.apply(_scaled(sc.s, v)))
  if anchored:
    _store_blocks(outs[2], chunk.apply(_scaled(sc.s, chunk.k)))


def _backward_kernel(k_ref, v_ref, *refs, nb: int, anchored: bool):
  scalar_refs, refs = refs[:5], refs[5:]
  n_cot = 3 if anchored else 2
  cot_refs, (dk_ref, dv_ref, db_ref, dwk_ref, ds_ref, dlp_ref, dlg_ref) = refs[:n_cot], refs[n_cot:]
  c = _Chunk(k_ref, scalar_refs, nb)
  sc, k, v, cdt = c.sc, c.k, _blocks(v_ref, nb), c.cdt
  pairs = [(_blocks(cot_refs[0], nb), _scaled(sc.wk, k)), (_blocks(cot_refs[1], nb),
                                                          _scaled(sc.s, v))]
  if anchored:
    pairs.append((_blocks(cot_refs[2], nb), _scaled(sc.s, k)))
  dx = [c.apply_t(dy) for dy, _ in pairs]  # cotangents of wk ⊙ K, s ⊙ V (and s ⊙ K)
  dt = {(i, j): sum(_dot(dy[i], x[j], trans_b=True, dtype=cdt) for dy, x in pairs)
        for i in range(nb) for j in range(i + 1)}
  # X = Tᵀ T̄ on blocks (i, b), b <= i; then N̄ = -X Tᵀ on lower blocks (strict on the diagonal)
  x = {(i, b): sum(_dot(c.t[m, i], dt[m, b], trans_a=True) for m in range(i, nb))
       for i in range(nb) for b in range(i + 1)}
  rows = jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1)
  zero = lambda: jnp.zeros((BLOCK,), sc.b[0].dtype)
  db, dlp, dlg = [zero() for _ in range(nb)], [zero() for _ in range(nb)], [zero()
                                                                            for _ in range(nb)]
  dk = [jnp.zeros(kb.shape, sc.b[0].dtype) for kb in k]
  for i in range(nb):
    for j in range(i + 1):
      dn = -sum(_dot(x[i, b], c.t[j, b], trans_b=True) for b in range(j + 1))
      if i == j:
        dn = jnp.where(rows > cols, dn, 0.0)
      z = dn * c.e[i, j] * c.gram[i, j]
      row = jnp.sum(z, axis=1)
      db[i] = db[i] + row
      dlp[i] = dlp[i] + sc.b[i] * row
      dlg[j] = dlg[j] - jnp.sum(sc.b[i][:, None] * z, axis=0)
      dg = dn * sc.b[i][:, None] * c.e[i, j]
      dk[i] = dk[i] + _dot(dg, k[j], dtype=cdt)
      dk[j] = dk[j] + _dot(dg, k[i], trans_a=True, dtype=cdt)
  dxk, dxv = dx[0], dx[1]
  dwk = [jnp.sum(kb.astype(d.dtype) * d, axis=1) for kb, d in zip(k, dxk)]
  ds = [jnp.sum(vb.astype(d.dtype) * d, axis=1) for vb, d in zip(v, dxv)]
  dk = [a + w[:, None] * d for a, w, d in zip(dk, sc.wk, dxk)]
  if anchored:
    ds = [a + jnp.sum(kb.astype(d.dtype) * d, axis=1) for a, kb, d in zip(ds, k, dx[2])]
    dk = [a + s[:, None] * d for a, s, d in zip(dk, sc.s, dx[2])]
  _store_blocks(dk_ref, dk)
  _store_blocks(dv_ref, _scaled(sc.s, dxv))
  for ref, blocks in ((db_ref, db), (dwk_ref, dwk), (ds_ref, ds), (dlp_ref, dlp),
                      (dlg_ref, dlg)):
    _store_blocks(ref, blocks)


def _specs(size: int, dk: int, dv: int):
  """Inputs ``[B, T, H, d]`` and per-token scalars / chunk tiles ``[B, H, N, C(, d)]``."""
  rows = lambda d: pl.BlockSpec((None, size, None, d), lambda b, h, c: (b, c, h, 0))
  scalar = pl.BlockSpec((None, None, None, size), lambda b, h, c: (b, h, c, 0))
  tile = lambda d: pl.BlockSpec((None, None, None, size, d), lambda b, h, c: (b, h, c, 0, 0))
  return rows(dk), rows(dv), scalar, tile


def _check(k: jax.Array, size: int) -> None:
  if size % BLOCK or k.shape[1] % size:
    raise ValueError(f"the WY kernels need chunk % {BLOCK} == 0 and T % chunk == 0, got "
                     f"chunk={size}, T={k.shape[1]}")


@functools.partial(jax.jit, static_argnames=("size", "anchored", "num_warps", "interpret",
                                             "backend"))
def _forward(k, v, scalars, *, size, anchored, num_warps, interpret, backend):
  _check(k, size)
  batch, t, heads, dk = k.shape
  dv, n = v.shape[-1], t // size
  keys, vals, scalar, tile = _specs(size, dk, dv)
  widths = (dk, dv, dk) if anchored else (dk, dv)
  out_shape = [jax.ShapeDtypeStruct((batch, heads, n, size, w), k.dtype) for w in widths]
  kernel = functools.partial(_forward_kernel, nb=size // BLOCK, anchored=anchored)
  return pl.pallas_call(kernel, out_shape=out_shape, grid=(batch, heads, n),
                        in_specs=[keys, vals] + [scalar] * 5,
                        out_specs=[tile(w) for w in widths],
                        compiler_params=compiler_params(backend, num_warps),
                        interpret=interpret, name="matrix_memory_wy_fwd")(k, v, *scalars)


@functools.partial(jax.jit, static_argnames=("size", "anchored", "num_warps", "interpret",
                                             "backend"))
def _backward(k, v, scalars, cotangents, *, size, anchored, num_warps, interpret, backend):
  batch, t, heads, dk = k.shape
  dv, n = v.shape[-1], t // size
  keys, vals, scalar, tile = _specs(size, dk, dv)
  widths = (dk, dv, dk) if anchored else (dk, dv)
  wide = scalars[0].dtype
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  out_shape += [jax.ShapeDtypeStruct((batch, heads, n, size), wide)] * 5
  kernel = functools.partial(_backward_kernel, nb=size // BLOCK, anchored=anchored)
  return pl.pallas_call(kernel, out_shape=out_shape, grid=(batch, heads, n),
                        in_specs=[keys, vals] + [scalar] * 5 + [tile(w) for w in widths],
                        out_specs=[keys, vals] + [scalar] * 5,
                        compiler_params=compiler_params(backend, num_warps),
                        interpret=interpret, name="matrix_memory_wy_bwd")(
                            k, v, *scalars, *cotangents)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _wy(size, anchored, num_warps, interpret, backend, k, v, scalars):
  return tuple(_forward(k, v, scalars, size=size, anchored=anchored, num_warps=num_warps,
                        interpret=interpret, backend=backend))


def _wy_fwd(size, anchored, num_warps, interpret, backend, k, v, scalars):
  out = _wy(size, anchored, num_warps, interpret, backend, k, v, scalars)
  return out, (k, v, scalars)


def _wy_bwd(size, anchored, num_warps, interpret, backend, residuals, cotangents):
  k, v, scalars = residuals
  dk, dv, *dscalars = _backward(k, v, scalars, tuple(cotangents), size=size, anchored=anchored,
                                num_warps=num_warps, interpret=interpret, backend=backend)
  return dk, dv, WYScalars(*dscalars)


_wy.defvjp(_wy_fwd, _wy_bwd)


def wy_pallas(k: jax.Array, v: jax.Array, scalars: WYScalars, size: int, anchored: bool, *,
              num_warps: int = 4, interpret: bool = False, backend: str = "triton"
              ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """``(Kw, Vu, Ka or None)`` of every chunk (differentiable; see the module docstring).

  Args:
    k: ``[B, T, H, d_k]``; v: ``[B, T, H, d_v]`` (``T % size == 0``), in the products' dtype.
    scalars: :class:`~nlj_kernels.matrix_memory.prepare.WYScalars` of ``[B, H, N, C]`` arrays
      (float32, or float64 in tests).
    size: the chunk ``C``, a multiple of 16; anchored: also compute ``Ka``.

  Returns:
    ``[B, H, N, C, ·]`` tiles in k's dtype (``Ka`` None unless ``anchored``).
  """
  out = _wy(size, anchored, num_warps, interpret, backend, k, v, WYScalars(*scalars))
  return out[0], out[1], out[2] if anchored else None


def prepare_pallas(config: OpConfig, k: jax.Array, v: jax.Array, q: jax.Array, eta: jax.Array,
                   alpha: jax.Array, beta: jax.Array, mask: jax.Array, *, num_warps: int = 4,
                   interpret: bool = False, backend: str = "triton") -> ChunkCoefficients:
  """Stage-1 coefficients of every chunk with the WY products by the kernels (differentiable).

  Args:
    config: the op.
    k, q: ``[B, T, H, d_k]``; v: ``[B, T, H, d_v]`` (``T % chunk == 0``; pad first);
      eta, alpha, beta, mask: ``[B, T, H]``.

  Returns:
    :class:`ChunkCoefficients` with leading ``[B, H, N]`` axes: the WY products in k's dtype,
    the rest in float32 (as :func:`nlj_kernels.matrix_memory.prepare.prepare`). With momentum
    there is nothing to solve and every field comes from plain JAX.
  """
  args = chunk_inputs(k, v, q, eta, alpha, beta, mask, size=config.chunk)
  coeffs, scalars = jax.vmap(jax.vmap(jax.vmap(functools.partial(chunk_parts, config))))(*args)
  if scalars is None:
    return coeffs
  kw, vu, ka = wy_pallas(k, v, scalars, config.chunk, anchors_writes(config),
                         num_warps=num_warps, interpret=interpret, backend=backend)
  return coeffs._replace(kw=kw, vu=vu, ka=ka)
