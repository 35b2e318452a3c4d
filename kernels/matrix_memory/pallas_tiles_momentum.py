"""Stage 1's tiles with momentum as Pallas kernels, forward and backward, in row blocks.

With momentum nothing is solved: per chunk (one program each, grid ``(batch, heads, chunks)``,
keys, values and queries read straight from the ``[B, T, H, ·]`` inputs) the kernels build
:func:`~nlj_kernels.matrix_memory.prepare.momentum_tiles` from the per-token
:class:`~nlj_kernels.matrix_memory.prepare.MomentumScalars` and the read decay ``a [C, C]``::

    Vu = s ⊙ V ;  Ka = s ⊙ K ;  Qs = read ⊙ Q ;  Qm = qm ⊙ Q ;  Kd = decay ⊙ K ;  Km = km ⊙ K
    P = tril(a ∘ Q Kᵀ)

so the tiles are written once, in the products' dtype, in the layout stage 2 reads, and XLA
transposes nothing. The backward kernel applies the rules (``X̄`` the cotangent of ``X``)::

    V̄ = s ⊙ V̄u ;  s̄ = rowsum(V ⊙ V̄u) + rowsum(K ⊙ K̄a) ;  r̄ead = rowsum(Q ⊙ Q̄s) ; ...
    Z = tril(P̄ ∘ a) ;  Q̄ += Z K ;  K̄ += Zᵀ Q ;  ā = tril(P̄ ∘ Q Kᵀ)

and :func:`~nlj_kernels.matrix_memory.prepare.chunk_parts` (plain JAX) differentiates the scalars
and ``a`` on to η, α and β. Blocks above the diagonal of ``P`` are zeros and are not computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nlj_kernels.matrix_memory.pallas_tiles import (TileKernels, TileShape,
                                                    differentiable_tiles, row_block, store_blocks)
from nlj_kernels.matrix_memory.prepare import MomentumScalars, ReadForm
from nlj_kernels.products import dot

__all__ = ["momentum_tiles_pallas"]

PER_TOKEN = MomentumScalars._fields[:-1]  # s, read, qm, decay, km; then the matrix a
ROW_TILES = (("vu", "s", 1), ("qs", "read", 2), ("qm", "qm", 2), ("kd", "decay", 0),
             ("km", "km", 0), ("ka", "s", 0))  # (tile, scalar, input: 0 k, 1 v, 2 q)


def _row_tiles(form: ReadForm) -> tuple[tuple[str, str, int], ...]:
  """:data:`ROW_TILES` the form writes (``ka`` for anchored writes only)."""
  return ROW_TILES if form.anchored else ROW_TILES[:-1]


def _outputs(form: ReadForm) -> tuple[str, ...]:
  """The kernels' tiles in order: the row tiles, then ``p``."""
  return tuple(name for name, _, _ in _row_tiles(form)) + ("p",)


def _lower(block: int) -> jax.Array:
  rows = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
  return rows >= jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)


def _forward_kernel(k_ref, v_ref, q_ref, *refs, block: int, form: ReadForm):
  scalars, a_ref, refs = refs[:len(PER_TOKEN)], refs[len(PER_TOKEN)], refs[len(PER_TOKEN) + 1:]
  sc, ins = dict(zip(PER_TOKEN, scalars)), (k_ref, v_ref, q_ref)
  out = dict(zip(_outputs(form), refs))
  wide = jnp.promote_types(scalars[0].dtype, jnp.float32)
  nb, at = k_ref.shape[0] // block, lambda i: row_block(i, block)
  for i in range(nb):
    for name, scalar, src in _row_tiles(form):
      x = sc[scalar][at(i)].astype(wide)[:, None] * ins[src][at(i)].astype(wide)
      out[name][at(i)] = x.astype(out[name].dtype)
    for j in range(nb):
      tile = jnp.zeros((block, block), wide)
      if j <= i and not form.reads_anchor:
        tile = a_ref[at(i), at(j)].astype(wide) * dot(q_ref[at(i)], k_ref[at(j)], trans_b=True)
        tile = jnp.where(_lower(block), tile, 0.0) if i == j else tile
      out["p"][at(i), at(j)] = tile.astype(out["p"].dtype)


def _backward_kernel(k_ref, v_ref, q_ref, *refs, block: int, form: ReadForm):
  scalars, a_ref, refs = refs[:len(PER_TOKEN)], refs[len(PER_TOKEN)], refs[len(PER_TOKEN) + 1:]
  sc, ins = dict(zip(PER_TOKEN, scalars)), (k_ref, v_ref, q_ref)
  cots = dict(zip(_outputs(form), refs))
  (dk_ref, dv_ref, dq_ref), refs = refs[len(cots):len(cots) + 3], refs[len(cots) + 3:]
  dsc_refs, da_ref = dict(zip(PER_TOKEN, refs[:len(PER_TOKEN)])), refs[len(PER_TOKEN)]
  cdt = k_ref.dtype
  wide = jnp.promote_types(scalars[0].dtype, jnp.float32)
  nb, at = k_ref.shape[0] // block, lambda i: row_block(i, block)
  grads = {name: [jnp.zeros((block,), wide)] * nb for name in PER_TOKEN}
  d_in = [[jnp.zeros((block, r.shape[1]), wide)] * nb for r in ins]  # k, v, q
  for i in range(nb):
    for name, scalar, src in _row_tiles(form):
      cot, x = cots[name][at(i)].astype(wide), ins[src][at(i)].astype(wide)
      grads[scalar][i] = grads[scalar][i] + jnp.sum(x * cot, axis=1)
      d_in[src][i] = d_in[src][i] + sc[scalar][at(i)].astype(wide)[:, None] * cot
  for i in range(nb):
    for j in range(nb):
      da = jnp.zeros((block, block), wide)
      if j <= i and not form.reads_anchor:
        dp = cots["p"][at(i), at(j)].astype(wide)
        da = dp * dot(q_ref[at(i)], k_ref[at(j)], trans_b=True)
        z = dp * a_ref[at(i), at(j)].astype(wide)
        if i == j:
          da, z = jnp.where(_lower(block), da, 0.0), jnp.where(_lower(block), z, 0.0)
        z = z.astype(cdt)
        d_in[2][i] = d_in[2][i] + dot(z, k_ref[at(j)])
        d_in[0][j] = d_in[0][j] + dot(z, q_ref[at(i)], trans_a=True)
      da_ref[at(i), at(j)] = da.astype(da_ref.dtype)
  for ref, blocks in zip((dk_ref, dv_ref, dq_ref), d_in):
    store_blocks(ref, blocks)
  for name in PER_TOKEN:
    store_blocks(dsc_refs[name], grads[name])


def _tile_widths(form: ReadForm, size: int, dk: int, dv: int) -> list[int]:
  widths = {"vu": dv, "p": size}
  return [widths.get(name, dk) for name in _outputs(form)]


_tiles = differentiable_tiles(
    TileKernels(_forward_kernel, _backward_kernel, _tile_widths, "matrix_memory_momentum_tiles"),
    MomentumScalars)


def momentum_tiles_pallas(form: ReadForm, k: jax.Array, v: jax.Array, q: jax.Array,
                          scalars: MomentumScalars, size: int, *,
                          forward: TileShape | None = None, backward: TileShape | None = None,
                          interpret: bool = False, backend: str = "triton"
                          ) -> dict[str, jax.Array | None]:
  """Every chunk's tiles with momentum (:func:`~nlj_kernels.matrix_memory.prepare.momentum_tiles`;
  differentiable).

  Args:
    form: the tiles' static shape (:func:`~nlj_kernels.matrix_memory.prepare.read_form`).
    k, q: ``[B, T, H, d_k]``; v: ``[B, T, H, d_v]`` (``T % size == 0``), in the products' dtype.
    scalars: :class:`~nlj_kernels.matrix_memory.prepare.MomentumScalars`: ``[B, H, N, C]``
      per-token fields and ``a [B, H, N, C, C]`` (float32, or float64 in tests).
    size: the chunk ``C``, a multiple of 16.
    forward, backward: the kernels' :class:`~.pallas_tiles.TileShape` (None:
      :func:`~.pallas_tiles.fit_shapes`' default).

  Returns:
    ``{name: [B, H, N, C, ·]}`` for ``kw, vu, qs, p, kd, ka, qm, km`` in k's dtype (``ka`` None
    and ``kw`` zeros unless ``form.anchored``, else ``kw`` is ``ka``).
  """
  out = _tiles(form, k, v, q, scalars, size, (forward, backward), interpret, backend)
  tiles = dict(zip(_outputs(form), out))
  ka = tiles.get("ka")
  return dict(tiles, ka=ka, kw=jnp.zeros_like(tiles["kd"]) if ka is None else ka)
