"""Stage 1's tiles as Pallas kernels, forward and backward, in row blocks of 16 or more.

Per chunk without momentum (one program each, grid ``(batch, heads, chunks)``, keys, values and
queries read straight from the ``[B, T, H, ·]`` inputs) the kernels compute
:func:`~nlj_kernels.matrix_memory.prepare.chunk_tiles` from the per-token
:class:`~nlj_kernels.matrix_memory.prepare.ChunkScalars`::

    N = strict_lower(b_t exp(lp_t - lg_i) k_t·k_i) ;  T = (I + N)⁻¹
    Kw = T (wk ⊙ K) ;  Vu = T (s ⊙ V) ;  Ka = T (s ⊙ K)            (Ka for anchored writes)
    Qs = read ⊙ Q ;  Kd = decay ⊙ K ;  P = Γ ⊙ Q Kᵀ, Γ_ti = exp(lr_t - lg_i) on i <= t (i < t)

``T`` is built in ``b × b`` blocks (``b`` = :attr:`TileShape.block`, a multiple of 16 dividing
``C``): each diagonal block ``D_i = (I + N_ii)⁻¹`` by the exact nilpotent series
(:func:`nlj.core.triangular.blocked_inverse`), the others by block forward substitution
``T_ij = -D_i Σ_{j<=m<i} N_im T_mj``; every product is a small matrix-unit tile and nothing of
size ``C × C`` is live at once. The forward and backward kernels take their own block and warp
counts (by default :data:`FORWARD`, :data:`BACKWARD`, or a :class:`TileKernels`' own
``shapes``: the fastest measured on an H100 at chunk 64, head dim 128; BENCHMARKS.md). When
differentiated, the forward also saves each chunk's ``T`` and ``E ⊙ G`` (``[C, C]``: in the
products' dtype when narrower than float32, as the forward's products round ``T`` to it and
``E ⊙ G`` only feeds the gradients of the gates and steps; else in the scalars' dtype, the
values it computed), so the backward kernel loads them instead of redoing the inverse and the
Gram products, and applies hand-derived rules (``X̄`` is the cotangent of ``X``)::

    x̄ = Tᵀ Ȳ for each Y = T x ;  T̄ = Σ Ȳ xᵀ (lower blocks) ;  N̄ = -Tᵀ T̄ Tᵀ (strictly lower)
    N = b ⊙ E ⊙ G (E_ti = exp(lp_t - lg_i), G = K Kᵀ):  Ḡ = N̄ ⊙ b E ;  K̄ += Ḡ K + Ḡᵀ K ;
        Z = N̄ ⊙ E ⊙ G ;  b̄ = rowsum Z ;  l̄p = b ⊙ rowsum Z ;  l̄g -= colsum(b ⊙ Z)
    P:  Q̄ += (P̄ ⊙ Γ) K ;  K̄ += (P̄ ⊙ Γ)ᵀ Q ;  l̄r = rowsum(P̄ ⊙ P) ;  l̄g -= colsum(P̄ ⊙ P)
    Qs:  Q̄ += read ⊙ Q̄s ;  r̄ead = rowsum(Q ⊙ Q̄s)
    Kd:  K̄ += decay ⊙ K̄d ;  d̄ecay = rowsum(K ⊙ K̄d)

so no autodiff runs through the inverse. The scalars come from
:func:`~nlj_kernels.matrix_memory.prepare.chunk_parts` in plain JAX, which differentiates them on
to η, α and the keys. Products take the inputs' dtype with a float32 (or wider) accumulator, as
the recurrence kernels do.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nlj.core.triangular import blocked_inverse
from nlj_kernels.backends import compiler_params
from nlj_kernels.matrix_memory.prepare import ChunkScalars, ReadForm
from nlj_kernels.products import dot

__all__ = ["tiles_pallas", "differentiable_tiles", "TileKernels", "Finish", "fit_shapes",
           "saved_dtype", "ratio_block", "row_block", "store_blocks", "TileShape", "FORWARD",
           "BACKWARD", "TILES", "WY"]

TILES = ("kw", "vu", "qs", "p", "kd", "ka")  # outputs in this order (ka for anchored writes)


class TileShape(NamedTuple):
  """How one tiles kernel runs: rows per block (a multiple of 16) and Triton warps."""

  block: int
  num_warps: int


FORWARD = TileShape(64, 4)
BACKWARD = TileShape(64, 4)  # 10% less device time than 8 warps on an H100 (fourteenth session)


def ratio_block(log_rows: jax.Array, log_cols: jax.Array, diagonal: bool, strict: bool
                ) -> jax.Array:
  """``exp(log_rows_t - log_cols_u)`` for a block of rows ``[b]`` against an earlier (or the
  same, ``diagonal``) block of columns ``[b]``: on a diagonal block only ``u <= t`` (``u < t``
  when ``strict``), else 0, without evaluating the exponential above the diagonal."""
  diff = log_rows[:, None] - log_cols[None, :]
  if not diagonal:
    return jnp.exp(diff)
  rows = jax.lax.broadcasted_iota(jnp.int32, diff.shape, 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, diff.shape, 1)
  keep = rows > cols if strict else rows >= cols
  return jnp.where(keep, jnp.exp(jnp.where(keep, diff, 0.0)), 0.0)


def row_block(i: int, block: int) -> pl.Slice:
  return pl.ds(i * block, block)


def store_blocks(ref, blocks: list[jax.Array]) -> None:
  block = ref.shape[0] // len(blocks)
  for i, x in enumerate(blocks):
    ref[row_block(i, block)] = x.astype(ref.dtype)


def _tile_count(form: ReadForm) -> int:
  """How many of :data:`TILES` the form writes (``ka`` for anchored writes only)."""
  return len(TILES) if form.anchored else len(TILES) - 1


class _Chunk:
  """One chunk of one program: block loads of its inputs (read from the refs where used, so
  that little stays live in registers) and lower blocks ``[i, j]`` (``j <= i``) of ``T`` and of
  ``E ⊙ G`` (``N = b ⊙ E ⊙ G``): computed, or loaded from the forward's ``saved`` ``[C, C]``
  refs ``(T, E ⊙ G)``.
  """

  def __init__(self, k_ref, v_ref, q_ref, scalar_refs, block: int, form: ReadForm,
               saved: Sequence = ()):
    self.refs, self.cdt, self.form = (k_ref, v_ref, q_ref), k_ref.dtype, form
    self.block, self.nb = block, k_ref.shape[0] // block
    nb = self.nb
    self.scalar_refs = dict(zip(ChunkScalars._fields, scalar_refs))
    self.wide = jnp.promote_types(scalar_refs[0].dtype, jnp.float32)
    rows = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
    self.strict_lower = rows > cols  # of a diagonal block
    self.lower_pairs = [(i, j) for i in range(nb) for j in range(i + 1)]
    if saved:
      load = lambda ref: lambda i, j: ref[self.rows(i), self.rows(j)].astype(self.wide)
      self.t, self.eg = load(saved[0]), load(saved[1])
      return
    eg = {ij: self.e(ij) * self.gram(ij) for ij in self.lower_pairs}
    n = lambda i, j: self.sc("b", i)[:, None] * eg[i, j]
    t = {}
    for i in range(nb):
      d = blocked_inverse(n(i, i))
      t[i, i] = d
      for j in range(i):
        t[i, j] = -jnp.dot(d, sum(jnp.dot(n(i, m), t[m, j]) for m in range(j, i)))
    self.t, self.eg = lambda i, j: t[i, j], lambda i, j: eg[i, j]

  def rows(self, i: int) -> pl.Slice:
    return row_block(i, self.block)

  def k(self, i: int) -> jax.Array:
    return self.refs[0][self.rows(i)]

  def v(self, i: int) -> jax.Array:
    return self.refs[1][self.rows(i)]

  def q(self, i: int) -> jax.Array:
    return self.refs[2][self.rows(i)]

  def sc(self, name: str, i: int) -> jax.Array:
    """Block ``i`` of the per-token scalar ``name`` (a :class:`ChunkScalars` field)."""
    return self.scalar_refs[name][self.rows(i)].astype(self.wide)

  def ratios(self, log_rows: str, ij: tuple[int, int], strict: bool) -> jax.Array:
    """Block ``[i, j]`` (``j <= i``) of ``exp(log_rows_t - log_g_u)`` on ``u <= t`` (``u < t``),
    else 0."""
    i, j = ij
    return ratio_block(self.sc(log_rows, i), self.sc("log_g", j), i == j, strict)

  def e(self, ij: tuple[int, int]) -> jax.Array:
    """Block ``[i, j]`` of ``N``'s decay ``E``."""
    return self.ratios("log_prev", ij, True)

  def gram(self, ij: tuple[int, int]) -> jax.Array:
    return dot(self.k(ij[0]), self.k(ij[1]), trans_b=True)

  def gamma(self, ij: tuple[int, int]) -> jax.Array:
    """Block ``[i, j]`` of the read decay ``Γ`` of ``P``."""
    return self.ratios("log_read", ij, self.form.strict)

  def products(self) -> list[tuple[str, str, Callable[[int], jax.Array]]]:
    """The WY products ``T x``, ``x = weight ⊙ rows``: (tile, weight, rows loader) for
    ``Kw = T (wk ⊙ K)``, ``Vu = T (s ⊙ V)`` and, for anchored writes, ``Ka = T (s ⊙ K)``."""
    out = [("kw", "wk", self.k), ("vu", "s", self.v)]
    return out + [("ka", "s", self.k)] if self.form.anchored else out

  def scaled(self, weight: str, rows: Callable[[int], jax.Array], i: int) -> jax.Array:
    """Block ``i`` of ``weight ⊙ rows`` in the products' dtype."""
    return (self.sc(weight, i)[:, None] * rows(i).astype(self.wide)).astype(self.cdt)

  def apply(self, x: Callable[[int], jax.Array]) -> list[jax.Array]:
    """``T x`` for a loader ``x`` of row blocks."""
    return [sum(dot(self.t(i, j), x(j), dtype=self.cdt) for j in range(i + 1))
            for i in range(self.nb)]

  def apply_t(self, y: Callable[[int], jax.Array]) -> list[jax.Array]:
    """``Tᵀ y`` for a loader ``y`` of row blocks."""
    return [sum(dot(self.t(i, j), y(i), trans_a=True, dtype=self.cdt)
                for i in range(j, self.nb)) for j in range(self.nb)]


def _forward_kernel(k_ref, v_ref, q_ref, *refs, block: int, form: ReadForm):
  n_sc, n_tiles = len(ChunkScalars._fields), _tile_count(form)
  scalar_refs, out = refs[:n_sc], dict(zip(TILES, refs[n_sc:n_sc + n_tiles]))
  c = _Chunk(k_ref, v_ref, q_ref, scalar_refs, block, form)
  nb, at = c.nb, c.rows
  for ref, get in zip(refs[n_sc + n_tiles:], (c.t, c.eg)):  # saved for the backward
    for i in range(nb):
      for j in range(nb):
        ref[at(i), at(j)] = (get(i, j) if j <= i else jnp.zeros((block, block), c.wide)
                             ).astype(ref.dtype)
  for i in range(nb):  # the reads first: queries are not needed after them
    out["qs"][at(i)] = (c.sc("read", i)[:, None] * c.q(i).astype(c.wide)).astype(
        out["qs"].dtype)
    out["kd"][at(i)] = c.scaled("decay", c.k, i).astype(out["kd"].dtype)
    for j in range(nb):
      if j > i or form.reads_anchor:
        tile = jnp.zeros((block, block), c.wide)
      else:
        tile = c.gamma((i, j)) * dot(c.q(i), c.k(j), trans_b=True)
      out["p"][at(i), at(j)] = tile.astype(out["p"].dtype)
  for name, weight, rows in c.products():
    store_blocks(out[name], c.apply(lambda j, w=weight, r=rows: c.scaled(w, r, j)))


def _backward_kernel(k_ref, v_ref, q_ref, *refs, block: int, form: ReadForm):
  n_sc = len(ChunkScalars._fields)
  scalar_refs, refs = refs[:n_sc], refs[n_sc:]
  n_cot = _tile_count(form)
  cots, saved, refs = dict(zip(TILES, refs[:n_cot])), refs[n_cot:n_cot + 2], refs[n_cot + 2:]
  (dk_ref, dv_ref, dq_ref), dsc_refs = refs[:3], refs[3:]
  c = _Chunk(k_ref, v_ref, q_ref, scalar_refs, block, form, saved)
  cdt, wide, nb, at = c.cdt, c.wide, c.nb, c.rows
  cot = lambda name: lambda i: cots[name][at(i)]
  rowdot = lambda a, b: jnp.sum(a.astype(wide) * b.astype(wide), axis=1)
  grads = {name: [jnp.zeros((block,), wide)] * nb for name in ChunkScalars._fields}

  def add(name: str, i: int, x: jax.Array) -> None:
    grads[name][i] = grads[name][i] + x

  # Qs = read ⊙ Q, Kd = decay ⊙ K, P = Γ ⊙ Q Kᵀ (queries are done after this part)
  dq = [c.sc("read", i)[:, None] * cots["qs"][at(i)].astype(wide) for i in range(nb)]
  dk = [c.sc("decay", i)[:, None] * cots["kd"][at(i)].astype(wide) for i in range(nb)]
  for i in range(nb):
    add("read", i, rowdot(c.q(i), cots["qs"][at(i)]))
    add("decay", i, rowdot(c.k(i), cots["kd"][at(i)]))
  if not form.reads_anchor:
    for i, j in c.lower_pairs:
      dpg = cots["p"][at(i), at(j)].astype(wide) * c.gamma((i, j))
      z = dpg * dot(c.q(i), c.k(j), trans_b=True)
      add("log_read", i, jnp.sum(z, axis=1))
      add("log_g", j, -jnp.sum(z, axis=0))
      dq[i] = dq[i] + dot(dpg, c.k(j), dtype=cdt)
      dk[j] = dk[j] + dot(dpg, c.q(i), trans_a=True, dtype=cdt)
  store_blocks(dq_ref, dq)

  # WY products: x̄ = Tᵀ Ȳ, T̄ = Σ Ȳ xᵀ, N̄ = -Tᵀ T̄ Tᵀ
  products = c.products()
  dt = {(i, j): sum(dot(cots[name][at(i)], c.scaled(w, rows, j), trans_b=True, dtype=cdt)
                    for name, w, rows in products) for i, j in c.lower_pairs}
  tdt = {(i, b): sum(dot(c.t(m, i), dt[m, b], trans_a=True) for m in range(i, nb))
         for i, b in c.lower_pairs}  # Tᵀ T̄ on the blocks N̄ needs
  for i, j in c.lower_pairs:
    dn = -sum(dot(tdt[i, b], c.t(j, b), trans_b=True) for b in range(j + 1))
    if i == j:
      dn = jnp.where(c.strict_lower, dn, 0.0)
    z = dn * c.eg(i, j)
    row, b_i = jnp.sum(z, axis=1), c.sc("b", i)
    add("b", i, row)
    add("log_prev", i, b_i * row)
    add("log_g", j, -jnp.sum(b_i[:, None] * z, axis=0))
    dg = dn * b_i[:, None] * c.e((i, j))
    dk[i] = dk[i] + dot(dg, c.k(j), dtype=cdt)
    dk[j] = dk[j] + dot(dg, c.k(i), trans_a=True, dtype=cdt)
  for name, weight, rows in products:
    dx = c.apply_t(cot(name))
    for i in range(nb):
      add(weight, i, rowdot(rows(i), dx[i]))
      if name != "vu":
        dk[i] = dk[i] + c.sc(weight, i)[:, None] * dx[i]
    if name == "vu":
      store_blocks(dv_ref, [c.sc("s", i)[:, None] * dx[i] for i in range(nb)])
  store_blocks(dk_ref, dk)
  for ref, name in zip(dsc_refs, ChunkScalars._fields):
    store_blocks(ref, grads[name])


def block_specs(size: int, dk: int, dv: int):
  """Inputs ``[B, T, H, d]``, per-token scalars ``[B, H, N, C]``, tiles ``[B, H, N, C, w]``."""
  rows = lambda d: pl.BlockSpec((None, size, None, d), lambda b, h, c: (b, c, h, 0))
  scalar = pl.BlockSpec((None, None, None, size), lambda b, h, c: (b, h, c, 0))
  tile = lambda w: pl.BlockSpec((None, None, None, size, w), lambda b, h, c: (b, h, c, 0, 0))
  return rows(dk), rows(dv), scalar, tile


def _widths(form: ReadForm, size: int, dk: int, dv: int) -> tuple[int, ...]:
  return (dk, dv, dk, size, dk) + ((dk,) if form.anchored else ())


class Finish(NamedTuple):
  """The last step of a backward after its kernel: the backward kernel's scalar outputs
  (``"token"`` ``[B, H, N, C]`` or ``"chunk"`` ``[B, H, N, C, C]``, in the scalars' dtype) and
  ``cotangents(form, scalars, saved, outputs, interpret, backend) -> the scalars'
  cotangents`` (``saved``: the forward's saved ``[C, C]`` matrices)."""

  outputs: tuple[str, ...]
  cotangents: Callable


class TileKernels(NamedTuple):
  """A forward and a backward tiles kernel (bodies ``(k_ref, v_ref, q_ref, *refs, block,
  form)``), the widths of the tiles they write (``widths(form, size, d_k, d_v)``), the name
  their launches take (``_fwd``/``_bwd`` appended), how many ``[C, C]`` matrices (in
  :func:`saved_dtype`) the forward saves for the backward when differentiated, and the default
  (forward, backward) :class:`TileShape` (:func:`fit_shapes` fits their blocks to the chunk).

  The forward's refs are the scalars, the tiles, then the saved matrices (none when not
  differentiated); the backward's are the scalars, the tiles' cotangents, the saved matrices,
  then the cotangents of ``k, v, q`` and its scalar outputs: the scalars' cotangents, or with
  ``finish`` the arrays of ``finish.outputs`` that ``finish.cotangents`` turns into them.
  """

  forward: Callable
  backward: Callable
  widths: Callable[[ReadForm, int, int, int], Sequence[int]]
  name: str
  saved: int = 0
  shapes: tuple[TileShape, TileShape] = (FORWARD, BACKWARD)
  finish: Finish | None = None


_STATIC = ("kernels", "size", "form", "shape", "interpret", "backend")


def saved_dtype(products, scalars) -> jnp.dtype:
  """The dtype of the saved ``[C, C]`` matrices: the products' when narrower than float32
  (the backward's products round them to it anyway), else the scalars' (float32 or wider)."""
  wide = jnp.promote_types(scalars[0].dtype, jnp.float32)
  return jnp.dtype(products) if jnp.dtype(products).itemsize < 4 else wide


@functools.partial(jax.jit, static_argnames=_STATIC + ("save",))
def _forward(k, v, q, scalars, *, kernels, size, form, shape, interpret, backend, save):
  batch, t, heads, dk = k.shape
  dv, n = v.shape[-1], t // size
  keys, vals, scalar, tile = block_specs(size, dk, dv)
  widths = kernels.widths(form, size, dk, dv)
  out_shape = [jax.ShapeDtypeStruct((batch, heads, n, size, w), k.dtype) for w in widths]
  saved = kernels.saved if save else 0
  out_shape += [jax.ShapeDtypeStruct((batch, heads, n, size, size), saved_dtype(k.dtype,
                                                                              scalars))] * saved
  kernel = functools.partial(kernels.forward, block=shape.block, form=form)
  return pl.pallas_call(kernel, out_shape=out_shape, grid=(batch, heads, n),
                        in_specs=[keys, vals, keys] + [scalar] * len(scalars),
                        out_specs=[tile(w) for w in widths] + [tile(size)] * saved,
                        compiler_params=compiler_params(backend, shape.num_warps),
                        interpret=interpret, name=f"{kernels.name}_fwd")(k, v, q, *scalars)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _backward(k, v, q, scalars, saved, cotangents, *, kernels, size, form, shape, interpret,
              backend):
  batch, t, heads, dk = k.shape
  dv, n = v.shape[-1], t // size
  keys, vals, scalar, tile = block_specs(size, dk, dv)
  specs = [scalar] * len(scalars)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k, v, q, *scalars)]
  out_specs = [keys, vals, keys] + specs
  if kernels.finish is not None:
    shapes = {"token": (scalars[0].shape, scalar),
              "chunk": (scalars[0].shape + (size,), tile(size))}
    outputs = [shapes[kind] for kind in kernels.finish.outputs]
    out_shape = out_shape[:3] + [jax.ShapeDtypeStruct(shape, scalars[0].dtype)
                                 for shape, _ in outputs]
    out_specs = out_specs[:3] + [spec for _, spec in outputs]
  kernel = functools.partial(kernels.backward, block=shape.block, form=form)
  tiles = [tile(w) for w in kernels.widths(form, size, dk, dv)]
  return pl.pallas_call(kernel, out_shape=out_shape, grid=(batch, heads, n),
                        in_specs=[keys, vals, keys] + specs + tiles + [tile(size)] * len(saved),
                        out_specs=out_specs,
                        compiler_params=compiler_params(backend, shape.num_warps),
                        interpret=interpret, name=f"{kernels.name}_bwd")(
                            k, v, q, *scalars, *cotangents, *saved)


def fit_shapes(size: int, forward: TileShape | None = None, backward: TileShape | None = None,
               defaults: tuple[TileShape, TileShape] = (FORWARD, BACKWARD)
               ) -> tuple[TileShape, TileShape]:
  """The tiles kernels' shapes for chunk ``size``: a given shape is checked (its block a power
  of two of at least 16 dividing ``size``, as Triton's blocks must be; warps a power of two), a
  default (``defaults``: forward, backward) takes the largest such block up to its own."""
  if size % 16:
    raise ValueError(f"the stage-1 kernels need chunk % 16 == 0, got chunk={size}")
  power_of_two = lambda x: x >= 1 and not x & (x - 1)
  out = []
  for name, given, default in zip(("forward", "backward"), (forward, backward), defaults):
    if given is None:
      block = max(b for b in range(16, min(default.block, size) + 1, 16)
                  if size % b == 0 and power_of_two(b))
      out.append(default._replace(block=block))
      continue
    given = TileShape(*given)
    if given.block < 16 or size % given.block or not power_of_two(given.block):
      raise ValueError(f"tiles {name} block={given.block} must be a power of two, at least 16, "
                       f"dividing the chunk {size}")
    if not power_of_two(given.num_warps):
      raise ValueError(f"tiles {name} num_warps={given.num_warps} must be a power of two")
    out.append(given)
  return out[0], out[1]


def differentiable_tiles(kernels: TileKernels, scalars_type: type) -> Callable:
  """``run(form, k, v, q, scalars, size, shapes, interpret, backend) -> tuple of tiles`` with a
  custom VJP through ``kernels``' backward kernel, whose outputs are the cotangents of
  ``(k, v, q, *scalars)``; ``shapes`` (forward, backward) as :func:`fit_shapes` takes them."""
  forward = functools.partial(_forward, kernels=kernels)
  backward = functools.partial(_backward, kernels=kernels)

  def launch(size, form, shapes, interpret, backend, k, v, q, scalars, save):
    return tuple(forward(k, v, q, scalars, size=size, form=form, shape=shapes[0],
                         interpret=interpret, backend=backend, save=save))

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
  def tiles(size, form, shapes, interpret, backend, k, v, q, scalars):
    return launch(size, form, shapes, interpret, backend, k, v, q, scalars, False)

  def tiles_fwd(size, form, shapes, interpret, backend, k, v, q, scalars):
    out = launch(size, form, shapes, interpret, backend, k, v, q, scalars, True)
    split = len(out) - kernels.saved
    return out[:split], (k, v, q, scalars, out[split:])

  def tiles_bwd(size, form, shapes, interpret, backend, residuals, cotangents):
    k, v, q, scalars, saved = residuals
    dk, dv, dq, *outputs = backward(k, v, q, scalars, saved, tuple(cotangents), size=size,
                                    form=form, shape=shapes[1], interpret=interpret,
                                    backend=backend)
    if kernels.finish is not None:
      return dk, dv, dq, kernels.finish.cotangents(form, scalars, saved, outputs, interpret,
                                                   backend)
    return dk, dv, dq, scalars_type(*outputs)

  tiles.defvjp(tiles_fwd, tiles_bwd)

  def run(form, k, v, q, scalars, size, shapes, interpret, backend):
    if k.shape[1] % size:
      raise ValueError(f"the stage-1 kernels need T % chunk == 0, got chunk={size}, "
                       f"T={k.shape[1]}")
    return tiles(size, form, fit_shapes(size, *shapes, defaults=kernels.shapes), interpret,
                 backend, k, v.astype(k.dtype), q.astype(k.dtype), scalars_type(*scalars))
  return run


WY = TileKernels(_forward_kernel, _backward_kernel, _widths, "matrix_memory_tiles", saved=2)
_tiles = differentiable_tiles(WY, ChunkScalars)


def tiles_pallas(form: ReadForm, k: jax.Array, v: jax.Array, q: jax.Array,
                 scalars: ChunkScalars, size: int, *, forward: TileShape | None = None,
                 backward: TileShape | None = None, interpret: bool = False,
                 backend: str = "triton") -> dict[str, jax.Array | None]:
  """Every chunk's tiles (:func:`~nlj_kernels.matrix_memory.prepare.chunk_tiles`;
  differentiable).

  Args:
    form: the tiles' static shape (:func:`~nlj_kernels.matrix_memory.prepare.read_form`).
    k, q: ``[B, T, H, d_k]``; v: ``[B, T, H, d_v]`` (``T % size == 0``), in the products' dtype.
    scalars: :class:`~nlj_kernels.matrix_memory.prepare.ChunkScalars` of ``[B, H, N, C]``
      arrays (float32, or float64 in tests).
    size: the chunk ``C``, a multiple of 16.
    forward, backward: the kernels' :class:`TileShape` (None: :func:`fit_shapes`' default).

  Returns:
    ``{name: [B, H, N, C, ·]}`` for :data:`TILES` in k's dtype (``ka`` None unless
    ``form.anchored``).
  """
  out = _tiles(form, k, v, q, scalars, size, (forward, backward), interpret, backend)
  return dict(zip(TILES, out + (None,) * (len(TILES) - len(out))))
