"""Stage 1's tiles with momentum as Pallas kernels, forward and backward, in row blocks.

With momentum nothing is solved: per chunk (one program each, grid ``(batch, heads, chunks)``,
keys, values and queries read straight from the ``[B, T, H, ·]`` inputs) the kernels build
:func:`~nlj_kernels.matrix_memory.prepare.momentum_tiles` from the per-token
:class:`~nlj_kernels.matrix_memory.prepare.MomentumScalars`, forming the read decays of
:func:`~nlj_kernels.matrix_memory.prepare.momentum_reads` block by block in the program (so no
``[C, C]`` matrix goes through memory)::

    Γ_tj = exp(log_read_t - log_g_j) mask_j (j <= t) ;  E_ji = exp(log_b_j - log_b_i) (i <= j)
    qm = Γ exp(log_b) ;  decay = lastᵀ E ;  a = Γ E
    Vu = s ⊙ V ;  Ka = s ⊙ K ;  Qs = read ⊙ Q ;  Qm = qm ⊙ Q ;  Kd = decay ⊙ K ;  Km = km ⊙ K
    P = tril(a ∘ Q Kᵀ)

so the tiles are written once, in the products' dtype, in the layout stage 2 reads, and XLA
transposes nothing. When differentiated the forward also saves ``a`` (in
:func:`~.pallas_tiles.saved_dtype`). The backward kernel applies the rules (``X̄`` the cotangent
of ``X``)::

    V̄ = s ⊙ V̄u ;  s̄ = rowsum(V ⊙ V̄u) + rowsum(K ⊙ K̄a) ;  r̄ead = rowsum(Q ⊙ Q̄s) ; ...
    Z = tril(P̄ ∘ a) ;  Q̄ += Z K ;  K̄ += Zᵀ Q ;  ā = tril(P̄ ∘ Q Kᵀ)

and returns ``q̄m``, ``d̄ecay`` and ``ā``, which go back through ``momentum_reads`` by the
hand-derived rules of :mod:`.pallas_momentum_reads`, a kernel of their own (their ``[C, C]``
products kept out of this kernel: inside it the two products of the eleventh session made it
three times slower on an H100, and the one product of the fourteenth 55% slower, more than the
separate kernel takes; BENCHMARKS.md);
:func:`~nlj_kernels.matrix_memory.prepare.chunk_parts` differentiates the scalars on to η, α
and β. Blocks above the diagonal are zeros and are not computed; anchor reads (``qm = a = 0``,
``P = 0``) skip ``Γ``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nlj_kernels.matrix_memory.pallas_tiles import (FORWARD, Finish, TileKernels, TileShape,
                                                    differentiable_tiles, ratio_block, row_block,
                                                    store_blocks)
from nlj_kernels.matrix_memory.pallas_momentum_reads import READ_INPUTS, momentum_reads_backward
from nlj_kernels.matrix_memory.prepare import MomentumScalars, ReadForm
from nlj_kernels.products import dot

__all__ = ["momentum_tiles_pallas", "MOMENTUM_BACKWARD"]

# The backward's default shape: 8 warps take 12% less time than 4 here on an H100, unlike the
# WY backward (fourteenth session, BENCHMARKS.md).
MOMENTUM_BACKWARD = TileShape(64, 8)

ROW_TILES = (("vu", "s", 1), ("qs", "read", 2), ("qm", "qm", 2), ("kd", "decay", 0),
             ("km", "km", 0), ("ka", "s", 0))  # (tile, row scale, input: 0 k, 1 v, 2 q)


def _row_tiles(form: ReadForm) -> tuple[tuple[str, str, int], ...]:
  """:data:`ROW_TILES` the form writes (``ka`` for anchored writes only)."""
  return ROW_TILES if form.anchored else ROW_TILES[:-1]


def _outputs(form: ReadForm) -> tuple[str, ...]:
  """The kernels' tiles in order: the row tiles, then ``p``."""
  return tuple(name for name, _, _ in _row_tiles(form)) + ("p",)


def _lower(block: int) -> jax.Array:
  rows = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
  return rows >= jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)


class _Reads:
  """One chunk's read decays in row blocks (module docstring): the blocks of ``qm`` and
  ``decay``, and with ``products`` the lower blocks ``a[i, j]`` (``j <= i``; none for anchor
  reads)."""

  def __init__(self, scalar_refs, block: int, form: ReadForm, products: bool = True):
    self.wide = jnp.promote_types(scalar_refs[0].dtype, jnp.float32)
    self.refs, self.block = dict(zip(MomentumScalars._fields, scalar_refs)), block
    nb = self.nb = scalar_refs[0].shape[0] // block
    pairs = [(i, j) for i in range(nb) for j in range(i + 1)]
    e = {(m, j): ratio_block(self.sc("log_b", m), self.sc("log_b", j), m == j, False)
         for m, j in pairs}
    self.decay = [sum(jnp.sum(self.sc("last", m)[:, None] * e[m, j], axis=0)
                      for m in range(j, nb)) for j in range(nb)]
    if form.reads_anchor:
      self.qm = [jnp.zeros((block,), self.wide)] * nb
      return
    gamma = {(i, m): ratio_block(self.sc("log_read", i), self.sc("log_g", m), i == m,
                                 form.strict) * self.sc("mask", m)[None, :] for i, m in pairs}
    exp_b = [jnp.exp(self.sc("log_b", m)) for m in range(nb)]
    self.qm = [sum(jnp.sum(gamma[i, m] * exp_b[m][None, :], axis=1) for m in range(i + 1))
               for i in range(nb)]
    if products:
      self.a = {(i, j): sum(dot(gamma[i, m], e[m, j]) for m in range(j, i + 1))
                for i, j in pairs}

  def sc(self, name: str, i: int) -> jax.Array:
    """Block ``i`` of the per-token scalar ``name`` (a :class:`MomentumScalars` field)."""
    return self.refs[name][row_block(i, self.block)].astype(self.wide)

  def scale(self, name: str, i: int) -> jax.Array:
    """Block ``i`` of a row scale of :data:`ROW_TILES` (``qm`` and ``decay`` formed here)."""
    if name in ("qm", "decay"):
      return getattr(self, name)[i]
    return self.sc(name, i)


def _forward_kernel(k_ref, v_ref, q_ref, *refs, block: int, form: ReadForm):
  n_sc, n_out = len(MomentumScalars._fields), len(_outputs(form))
  r = _Reads(refs[:n_sc], block, form)
  out, saved = dict(zip(_outputs(form), refs[n_sc:n_sc + n_out])), refs[n_sc + n_out:]
  ins, wide, at = (k_ref, v_ref, q_ref), r.wide, lambda i: row_block(i, block)
  for i in range(r.nb):
    for name, scale, src in _row_tiles(form):
      x = r.scale(scale, i)[:, None] * ins[src][at(i)].astype(wide)
      out[name][at(i)] = x.astype(out[name].dtype)
    for j in range(r.nb):
      a = r.a[i, j] if j <= i and not form.reads_anchor else jnp.zeros((block, block), wide)
      for ref in saved:  # a, for the backward
        ref[at(i), at(j)] = a.astype(ref.dtype)
      if j <= i and not form.reads_anchor:
        tile = a * dot(q_ref[at(i)], k_ref[at(j)], trans_b=True)
        tile = jnp.where(_lower(block), tile, 0.0) if i == j else tile
      else:
        tile = jnp.zeros((block, block), wide)
      out["p"][at(i), at(j)] = tile.astype(out["p"].dtype)


BACKWARD_SCALES = ("s", "read", "km", "qm", "decay")  # the backward kernel's per-token outputs


def _backward_kernel(k_ref, v_ref, q_ref, *refs, block: int, form: ReadForm):
  n_sc, n_out = len(MomentumScalars._fields), len(_outputs(form))
  r = _Reads(refs[:n_sc], block, form, products=False)  # the row scales qm and decay
  cots, a_ref = dict(zip(_outputs(form), refs[n_sc:n_sc + n_out])), refs[n_sc + n_out]
  refs = refs[n_sc + n_out + 1:]
  (dk_ref, dv_ref, dq_ref), refs = refs[:3], refs[3:]
  dscale_refs, da_ref = dict(zip(BACKWARD_SCALES, refs)), refs[len(BACKWARD_SCALES)]
  ins, cdt, wide, nb = (k_ref, v_ref, q_ref), k_ref.dtype, r.wide, r.nb
  at = lambda i: row_block(i, block)
  grads = {name: [jnp.zeros((block,), wide)] * nb for name in BACKWARD_SCALES}
  d_in = [[jnp.zeros((block, x.shape[1]), wide)] * nb for x in ins]  # k, v, q
  for i in range(nb):
    for name, scale, src in _row_tiles(form):
      cot, x = cots[name][at(i)].astype(wide), ins[src][at(i)].astype(wide)
      grads[scale][i] = grads[scale][i] + jnp.sum(x * cot, axis=1)
      d_in[src][i] = d_in[src][i] + r.scale(scale, i)[:, None] * cot
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
  for name in BACKWARD_SCALES:
    store_blocks(dscale_refs[name], grads[name])


def _read_decay_cotangents(form: ReadForm, scalars: MomentumScalars, saved, outputs,
                           interpret: bool, backend: str) -> MomentumScalars:
  """The scalars' cotangents from the backward kernel's (those of ``s, read, km, qm, decay``
  and ``a``): ``qm``, ``decay`` and ``a`` go back through
  :func:`~nlj_kernels.matrix_memory.prepare.momentum_reads` by the kernel of
  :mod:`.pallas_momentum_reads`, which also reads the forward's saved ``a``."""
  d_s, d_read, d_km, d_qm, d_decay, d_a = outputs
  w = scalars
  reads = momentum_reads_backward(form, tuple(getattr(w, n) for n in READ_INPUTS), d_qm,
                                  d_decay, d_a, saved[0], interpret=interpret, backend=backend)
  return w._replace(s=d_s, read=d_read, km=d_km, **dict(zip(READ_INPUTS, reads)))


def _tile_widths(form: ReadForm, size: int, dk: int, dv: int) -> list[int]:
  widths = {"vu": dv, "p": size}
  return [widths.get(name, dk) for name in _outputs(form)]


_tiles = differentiable_tiles(
    TileKernels(_forward_kernel, _backward_kernel, _tile_widths, "matrix_memory_momentum_tiles",
                saved=1, shapes=(FORWARD, MOMENTUM_BACKWARD),
                finish=Finish(("token",) * len(BACKWARD_SCALES) + ("chunk",),
                              _read_decay_cotangents)),
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
    scalars: :class:`~nlj_kernels.matrix_memory.prepare.MomentumScalars` of ``[B, H, N, C]``
      arrays (float32, or float64 in tests).
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
