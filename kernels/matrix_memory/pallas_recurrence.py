"""Stage 2 of the op: the recurrence over chunks, as Pallas kernels (forward and backward).

One program per ``(batch, head, d_v block)`` carries its slice of the state ``S [d_k, BV]`` (and
the momentum ``M``) in float32 through a ``fori_loop`` over the chunks, doing only dense
products per chunk (see :mod:`nlj_kernels.matrix_memory.prepare` for the equations)::

    U = Vu - Kw S ;  y = Qs S + Qm M + P U ;  S' = gs S + mc M + Kdᵀ U ;  M' = gm M + Kmᵀ U

The backward runs in two launches. Pass 1 (sequential, the forward's grid) walks the chunks in
reverse carrying only ``dS`` and ``dM``, and saves them (the cotangents of each chunk's end
state) with ``dU``::

    dU = Pᵀ dy + Kd dS' + Km dM'
    dS = Qsᵀ dy + gs dS' - Kwᵀ dU ;  dM = Qmᵀ dy + mc dS' + gm dM'

Pass 2 (one program per chunk, all in parallel, whole ``d_v`` per program walked in
:func:`gradient_columns` columns) takes the forward's chunk-start states ``S, M`` and pass 1's
``dS', dM', dU``::

    dVu = dU ; dKw = -dU Sᵀ ; dQs = dy Sᵀ ; dQm = dy Mᵀ ; dP = dy Uᵀ ; dKd = U dS'ᵀ ;
    dKm = U dM'ᵀ ;  dgs = ⟨S, dS'⟩ ; dmc = ⟨M, dS'⟩ ; dgm = ⟨M, dM'⟩

so the sequential pass does 4 (6 with momentum) products a chunk and the parallel pass the rest,
with no partial sums over ``d_v`` blocks. The saved states, ``dS', dM'`` and ``dU`` are stored in
the chunk fields' dtype (bfloat16 for bfloat16 inputs, halving the backward's traffic): pass 2's
products round them to it anyway, so only the gate gradients' inner products ``⟨S, dS'⟩`` see the
rounding; the carries stay in the state's dtype.

The two sequential kernels take Triton's ``num_stages`` (the runner's
:func:`~nlj_kernels.matrix_memory.runner.default_num_stages`): with few programs each walks many
chunks, and pipelining the loop loads the next chunks' fields during this chunk's products.

The same kernel bodies are compiled through Triton on GPU (``backend="triton"``) or Mosaic on TPU
(``backend="tpu"``: per-chunk scalars in SMEM; pass 2 takes all of ``d_v`` at once);
``interpret=True`` runs either on any device (CPU in CI). Products follow
``jax_default_matmul_precision`` as XLA's do (tf32 for float32 operands on a GPU by default;
``jax.default_matmul_precision("highest")`` gives full float32).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from nlj_kernels.backends import compiler_params
from nlj_kernels.products import dot

__all__ = ["forward", "backward", "chunk_gradients", "gradient_columns", "CHUNK_FIELDS",
           "MOMENTUM_FIELDS"]

CHUNK_FIELDS = ("kw", "vu", "qs", "p", "kd", "gs")
GRADIENT_COLUMNS = 64  # d_v columns at a time in the backward's chunk-parallel pass (GPU)
WIDE_GRADIENT_COLUMNS = 128  # the same for 16-bit fields with d_k <= 128 (gradient_columns)
MOMENTUM_FIELDS = ("qm", "km", "mc", "gm")


def _specs(n: int, c: int, dk: int, bv: int, momentum: bool, backend: str):
  """BlockSpecs of the chunk fields (grid ``(batch, heads, d_v blocks)``); on TPU the per-chunk
  scalars live in SMEM."""
  keys = pl.BlockSpec((None, None, n, c, dk), lambda b, h, j: (b, h, 0, 0, 0))
  vals = pl.BlockSpec((None, None, n, c, bv), lambda b, h, j: (b, h, 0, 0, j))
  square = pl.BlockSpec((None, None, n, c, c), lambda b, h, j: (b, h, 0, 0, 0))
  if backend == "tpu":  # whole [B, H, N] arrays: Mosaic tiles need (8, 128)-divisible blocks
    scalar = pl.BlockSpec(memory_space=pltpu.SMEM)
  else:
    scalar = pl.BlockSpec((None, None, n), lambda b, h, j: (b, h, 0))
  fields = [keys, vals, keys, square, keys, scalar]
  if momentum:
    fields += [keys, keys, scalar, scalar]
  state = pl.BlockSpec((None, None, dk, bv), lambda b, h, j: (b, h, 0, j))
  states = pl.BlockSpec((None, None, n, dk, bv), lambda b, h, j: (b, h, 0, 0, j))
  return fields, vals, state, states


def gradient_columns(d_k: int, dtype) -> int:
  """``d_v`` columns at a time in the backward's chunk-parallel pass on a GPU:
  :data:`WIDE_GRADIENT_COLUMNS` for 16-bit fields with ``d_k <= 128``, else
  :data:`GRADIENT_COLUMNS`. On an H200 (bf16, 8×2048×16×128) 128 columns took the pass from 314 to
  278 µs for Gated DeltaNet and from 515 to 461 for Titans, and 32 to 447 (BENCHMARKS.md,
  nineteenth session). Wider fields and ``d_k`` 256 keep 64: a GPU call running them at 128
  printed nothing within its time limits."""
  if jnp.dtype(dtype).itemsize <= 2 and d_k <= 128:
    return WIDE_GRADIENT_COLUMNS
  return GRADIENT_COLUMNS


def _scalar_reader(refs: Sequence) -> Callable[[jax.Array], tuple]:
  """``at(c)``: chunk ``c``'s scalar from each ref, a ``[N]`` block or, on TPU, the whole
  ``[B, H, N]`` array at this program's (batch, head). Call at the kernel's top level (program
  ids are not available inside loop bodies in interpret mode).

  With momentum the sequential kernels load the next chunk's three scalars at the top of each
  step and carry them into it: Triton pipelines only the loads that feed products, so a scalar
  loaded in its own step waits for global memory on the recurrence's critical path. On an H100
  that cut Titans' forward by 2-13% and its whole fwd+bwd by 0.5-4.2%; Gated DeltaNet's one
  scalar gained nothing in the forward and its pass 1 lost 4-8% (BENCHMARKS.md, sixteenth
  session), so its kernels load it where it is used."""
  b, h = pl.program_id(0), pl.program_id(1)
  read = lambda ref, c: ref[b, h, c] if len(ref.shape) == 3 else ref[c]
  return lambda c: tuple(read(ref, c) for ref in refs)


def _forward_kernel(*refs, n: int, momentum: bool, save_states: bool, poison: bool):
  nf = len(CHUNK_FIELDS) + (len(MOMENTUM_FIELDS) if momentum else 0)
  fields, refs = refs[:nf], refs[nf:]
  if poison:  # the poisoned buffers aliased to y and s are inputs too; nothing reads them
    refs = refs[:1 + momentum] + refs[3 + momentum:]
  kw_ref, vu_ref, qs_ref, p_ref, kd_ref, gs_ref = fields[:6]
  qm_ref, km_ref, mc_ref, gm_ref = fields[6:] if momentum else (None,) * 4
  s0_ref, refs = refs[0], refs[1:]
  m0_ref, refs = (refs[0], refs[1:]) if momentum else (None, refs)
  y_ref, s_out_ref, refs = refs[0], refs[1], refs[2:]
  m_out_ref, refs = (refs[0], refs[1:]) if momentum else (None, refs)
  states_ref, mstates_ref = (refs[0], refs[1] if momentum else None) if save_states else (None,) * 2
  cdt = kw_ref.dtype
  scalars = _scalar_reader((gs_ref, mc_ref, gm_ref) if momentum else (gs_ref,))
  ahead = momentum  # scalars loaded a step ahead (_scalar_reader)

  def body(c, carry):
    s, m, loaded = carry  # loaded: this chunk's scalars, when loaded a step ahead
    following = scalars(jnp.minimum(c + 1, n - 1)) if ahead else ()  # before the products
    if save_states:
      states_ref[c] = s.astype(states_ref.dtype)
      if momentum:
        mstates_ref[c] = m.astype(mstates_ref.dtype)
    s_c = s.astype(cdt)
    u = vu_ref[c].astype(s.dtype) - dot(kw_ref[c], s_c)
    u_c = u.astype(cdt)
    y = dot(qs_ref[c], s_c) + dot(p_ref[c], u_c)
    gs, *mom = loaded if ahead else scalars(c)
    s_next = gs * s + dot(kd_ref[c], u_c, trans_a=True)
    if momentum:
      mc, gm = mom
      y = y + dot(qm_ref[c], m.astype(cdt))
      s_next = s_next + mc * m
      m = gm * m + dot(km_ref[c], u_c, trans_a=True)
    y_ref[c] = y.astype(y_ref.dtype)
    return s_next, m, following

  m0 = m0_ref[...] if momentum else jnp.zeros((), s0_ref.dtype)
  s, m, _ = jax.lax.fori_loop(0, n, body, (s0_ref[...], m0, scalars(0) if ahead else ()))
  s_out_ref[...] = s
  if momentum:
    m_out_ref[...] = m


def _grid(coeffs: Sequence[jax.Array], s0: jax.Array, block_v: int):
  batch, heads, n, c, dk = coeffs[0].shape
  dv = s0.shape[-1]
  if dv % block_v:
    raise ValueError(f"block_v={block_v} must divide d_v={dv}")
  return (batch, heads, n, c, dk, dv), (batch, heads, dv // block_v)


@functools.partial(jax.jit, static_argnames=("block_v", "num_warps", "num_stages", "save_states",
                                             "interpret", "poison", "backend"))
def forward(coeffs: tuple, s0: jax.Array, m0: jax.Array | None, *, block_v: int,
            num_warps: int = 4, num_stages: int = 1, save_states: bool = False,
            interpret: bool = False, poison: bool = False, backend: str = "triton"):
  """Run the recurrence over all chunks.

  Args:
    coeffs: the chunk fields in :data:`CHUNK_FIELDS` (+ :data:`MOMENTUM_FIELDS`) order,
      ``[B, H, N, C, ·]`` (scalars ``[B, H, N]``).
    s0, m0: initial state and momentum ``[B, H, d_k, d_v]`` in float32 (float64 for tests; the
      kernels accumulate in this dtype), m0 None without momentum.
    block_v: ``d_v`` columns per program.
    num_warps: Triton warps per program (ignored on TPU).
    num_stages: Triton's pipelining depth of the loop over chunks (ignored on TPU).
    backend: ``"triton"`` (GPU) or ``"tpu"`` (Mosaic TPU); either runs with ``interpret``.
    save_states: also return the state (and momentum) at each chunk start, for the backward,
      in the fields' dtype.
    poison: write ``y`` and ``s`` into NaN-filled buffers (a check that every element is
      written; the GPU check uses it).

  Returns:
    ``(y [B, H, N, C, d_v], s [B, H, d_k, d_v], m or None, states or None, mstates or None)``.
  """
  momentum = m0 is not None
  (batch, heads, n, c, dk, dv), grid = _grid(coeffs, s0, block_v)
  fields, vals, state, states = _specs(n, c, dk, block_v, momentum, backend)
  in_specs = fields + [state] + ([state] if momentum else [])
  f32 = s0.dtype
  out_shape = [jax.ShapeDtypeStruct((batch, heads, n, c, dv), coeffs[1].dtype),
               jax.ShapeDtypeStruct(s0.shape, f32)]
  out_specs = [vals, state]
  if momentum:
    out_shape.append(jax.ShapeDtypeStruct(s0.shape, f32))
    out_specs.append(state)
  if save_states:  # at the products' precision: pass 2's products round them to it anyway
    for _ in range(2 if momentum else 1):
      out_shape.append(jax.ShapeDtypeStruct((batch, heads, n, dk, dv), coeffs[0].dtype))
      out_specs.append(states)
  kernel = functools.partial(_forward_kernel, n=n, momentum=momentum, save_states=save_states,
                              poison=poison)
  args = list(coeffs) + [s0] + ([m0] if momentum else [])
  aliases = {}
  if poison:
    aliases = {len(args): 0, len(args) + 1: 1}
    args += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape[:2]]
    in_specs = in_specs + out_specs[:2]
  outs = pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
                        out_specs=out_specs,
                        compiler_params=compiler_params(backend, num_warps, num_stages=num_stages),
                        input_output_aliases=aliases, interpret=interpret,
                        name="matrix_memory_fwd")(*args)
  outs = list(outs)
  y, s = outs.pop(0), outs.pop(0)
  m = outs.pop(0) if momentum else None
  saved = outs.pop(0) if save_states else None
  msaved = outs.pop(0) if save_states and momentum else None
  return y, s, m, saved, msaved


def _cotangent_kernel(*refs, n: int, momentum: bool):
  """Backward pass 1: the state cotangents through the chunks in reverse (see module doc)."""
  nf = len(CHUNK_FIELDS) + (len(MOMENTUM_FIELDS) if momentum else 0)
  fields, refs = refs[:nf], refs[nf:]
  kw_ref, _, qs_ref, p_ref, kd_ref, gs_ref = fields[:6]
  qm_ref, km_ref, mc_ref, gm_ref = fields[6:] if momentum else (None,) * 4
  dy_ref, ds_end_ref, refs = refs[0], refs[1], refs[2:]
  dm_end_ref, refs = (refs[0], refs[1:]) if momentum else (None, refs)
  du_ref, dstates_ref, ds0_ref, refs = refs[0], refs[1], refs[2], refs[3:]
  dmstates_ref, dm0_ref = refs if momentum else (None, None)
  cdt = kw_ref.dtype
  scalars = _scalar_reader((gs_ref, mc_ref, gm_ref) if momentum else (gs_ref,))
  ahead = momentum  # scalars loaded a step ahead (_scalar_reader)

  def body(i, carry):
    c = n - 1 - i
    ds, dm, loaded = carry  # cotangents of the state after chunk c (and its scalars, ahead)
    following = scalars(jnp.maximum(c - 1, 0)) if ahead else ()
    dstates_ref[c] = ds.astype(dstates_ref.dtype)
    dy, ds_c = dy_ref[c], ds.astype(cdt)
    du = dot(p_ref[c], dy, trans_a=True) + dot(kd_ref[c], ds_c)
    ds_prev = dot(qs_ref[c], dy, trans_a=True)
    gs, *mom = loaded if ahead else scalars(c)  # after the tile, as measured (_scalar_reader)
    ds_prev = ds_prev + gs * ds
    if momentum:
      mc, gm = mom
      dmstates_ref[c] = dm.astype(dmstates_ref.dtype)
      du = du + dot(km_ref[c], dm.astype(cdt))
      dm = dot(qm_ref[c], dy, trans_a=True) + mc * ds + gm * dm
    du_ref[c] = du.astype(du_ref.dtype)
    ds_prev = ds_prev - dot(kw_ref[c], du.astype(cdt), trans_a=True)
    return ds_prev, dm, following

  dm_end = dm_end_ref[...] if momentum else jnp.zeros((), ds_end_ref.dtype)
  start = scalars(n - 1) if ahead else ()
  ds, dm, _ = jax.lax.fori_loop(0, n, body, (ds_end_ref[...], dm_end, start))
  ds0_ref[...] = ds
  if momentum:
    dm0_ref[...] = dm


def _gradient_kernel(*refs, momentum: bool, block_v: int):
  """Backward pass 2: one chunk's coefficient gradients from its saved states and cotangents,
  ``d_v`` block by block (see module doc)."""
  kw_ref, vu_ref, dy_ref, du_ref, s_ref, ds_ref, refs = refs[:6] + (refs[6:],)
  m_ref, dm_ref, refs = (refs[0], refs[1], refs[2:]) if momentum else (None, None, refs)
  dkw_ref, dqs_ref, dp_ref, dkd_ref, dgs_ref, refs = refs[:5] + (refs[5:],)
  dqm_ref, dkm_ref, dmc_ref, dgm_ref = refs if momentum else (None,) * 4
  cdt, wide = kw_ref.dtype, s_ref.dtype
  blocks = [pl.ds(j * block_v, block_v) for j in range(s_ref.shape[1] // block_v)]
  col = lambda ref, j: ref[:, blocks[j]]
  total = lambda terms: functools.reduce(lambda a, b: a + b, terms)
  js = range(len(blocks))
  s_c = [col(s_ref, j).astype(cdt) for j in js]  # each block loaded once, reused below
  dy = [col(dy_ref, j) for j in js]
  u_c = [(col(vu_ref, j).astype(wide) - dot(kw_ref[...], s_c[j])).astype(cdt) for j in js]

  def store(ref, x):
    ref[...] = x.astype(ref.dtype)

  def rows(x_ref, y_ref):  # Σ_columns x ⊙ y: the [d_k] rows of the scalar gradient ⟨x, y⟩
    return total(jnp.sum(col(x_ref, j) * col(y_ref, j), axis=1) for j in js)[None, :]

  store(dkw_ref, -total(dot(col(du_ref, j).astype(cdt), s_c[j], trans_b=True) for j in js))
  store(dqs_ref, total(dot(dy[j], s_c[j], trans_b=True) for j in js))
  store(dp_ref, total(dot(dy[j], u_c[j], trans_b=True) for j in js))
  store(dkd_ref, total(dot(u_c[j], col(ds_ref, j).astype(cdt), trans_b=True) for j in js))
  store(dgs_ref, rows(s_ref, ds_ref))
  if momentum:
    store(dqm_ref, total(dot(dy[j], col(m_ref, j).astype(cdt), trans_b=True) for j in js))
    store(dkm_ref, total(dot(u_c[j], col(dm_ref, j).astype(cdt), trans_b=True) for j in js))
    store(dmc_ref, rows(m_ref, ds_ref))
    store(dgm_ref, rows(m_ref, dm_ref))


@functools.partial(jax.jit, static_argnames=("block_v", "num_warps", "num_stages", "interpret",
                                             "backend"))
def backward(coeffs: tuple, states: jax.Array, mstates: jax.Array | None, dy: jax.Array,
             ds_end: jax.Array, dm_end: jax.Array | None, *, block_v: int, num_warps: int = 4,
             num_stages: int = 1, interpret: bool = False, backend: str = "triton"):
  """Cotangents of :func:`forward` (see the module docstring), in two launches.

  Args:
    coeffs: as for :func:`forward`.
    states, mstates: the chunk-start states from ``forward(save_states=True)``.
    dy: ``[B, H, N, C, d_v]`` (in the chunk fields' dtype); ds_end, dm_end: ``[B, H, d_k, d_v]``.
    num_stages: Triton's pipelining depth of pass 1's loop over chunks.

  Returns:
    a dict of the fields' cotangents (``vu, kw, qs, p, kd, gs`` and ``qm, km, mc, gm``; the
    scalars in the state's dtype, the tiles in the fields' dtype) and
    ``s0``/``m0`` (cotangents of the initial state and momentum).
  """
  momentum = mstates is not None
  (batch, heads, n, c, dk, dv), grid = _grid(coeffs, ds_end, block_v)
  fields, vals, state, states_spec = _specs(n, c, dk, block_v, momentum, backend)
  f32, cdt = ds_end.dtype, coeffs[0].dtype
  chunk_states = jax.ShapeDtypeStruct((batch, heads, n, dk, dv), cdt)
  out_shape = [jax.ShapeDtypeStruct((batch, heads, n, c, dv), cdt), chunk_states,
               jax.ShapeDtypeStruct(ds_end.shape, f32)]
  out_specs = [vals, states_spec, state]
  if momentum:
    out_shape += [chunk_states, jax.ShapeDtypeStruct(ds_end.shape, f32)]
    out_specs += [states_spec, state]
  args = list(coeffs) + [dy, ds_end] + ([dm_end] if momentum else [])
  in_specs = fields + [vals, state] + ([state] if momentum else [])
  outs = pl.pallas_call(functools.partial(_cotangent_kernel, n=n, momentum=momentum),
                        out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        compiler_params=compiler_params(backend, num_warps, num_stages=num_stages),
                        interpret=interpret, name="matrix_memory_bwd_states")(*args)
  du, dstates, ds0 = outs[:3]
  dmstates, dm0 = outs[3:] if momentum else (None, None)
  out = chunk_gradients(coeffs, states, mstates, dy, du, dstates, dmstates, num_warps=num_warps,
                        interpret=interpret, backend=backend)
  out["s0"] = ds0
  if momentum:
    out["m0"] = dm0
  return out


@functools.partial(jax.jit, static_argnames=("num_warps", "interpret", "backend"))
def chunk_gradients(coeffs: tuple, states: jax.Array, mstates: jax.Array | None, dy: jax.Array,
                    du: jax.Array, dstates: jax.Array, dmstates: jax.Array | None, *,
                    num_warps: int = 4, interpret: bool = False, backend: str = "triton"):
  """Backward pass 2: every chunk's field cotangents from pass 1's outputs (see the module
  docstring), one program per chunk.

  Args:
    coeffs, states, mstates, dy: as for :func:`backward`.
    du: ``[B, H, N, C, d_v]``; dstates, dmstates: ``[B, H, N, d_k, d_v]`` (the cotangents of
      each chunk's end state and momentum), all in the fields' dtype (pass 1's outputs).

  Returns:
    a dict of the fields' cotangents (``vu, kw, qs, p, kd, gs`` and ``qm, km, mc, gm``).
  """
  momentum = mstates is not None
  batch, heads, n, c, dk = coeffs[0].shape
  dv = states.shape[-1]
  f32, cdt = coeffs[CHUNK_FIELDS.index("gs")].dtype, coeffs[0].dtype
  # every chunk in parallel; whole d_v per program (walked in gradient_columns on GPU, whatever
  # block_v the sequential kernels take)
  one = lambda *tail: pl.BlockSpec((None, None, None) + tail,
                                   lambda b, h, i: (b, h, i) + (0,) * len(tail))
  ins = [coeffs[CHUNK_FIELDS.index("kw")], coeffs[CHUNK_FIELDS.index("vu")], dy, du, states,
         dstates] + ([mstates, dmstates] if momentum else [])
  in_specs = [one(c, dk)] + [one(c, dv)] * 3 + [one(dk, dv)] * (4 if momentum else 2)
  names = ["kw", "qs", "p", "kd", "gs"] + (["qm", "km", "mc", "gm"] if momentum else [])
  shapes = {"p": (c, c), "gs": (1, dk), "mc": (1, dk), "gm": (1, dk)}
  dtypes = {"gs": f32, "mc": f32, "gm": f32}  # tiles in the fields' dtype, as the caller casts
  out_shape = [jax.ShapeDtypeStruct((batch, heads, n) + shapes.get(k, (c, dk)),
                                    dtypes.get(k, cdt)) for k in names]
  out_specs = [one(*shapes.get(k, (c, dk))) for k in names]
  kernel = functools.partial(_gradient_kernel, momentum=momentum,
                             block_v=dv if backend == "tpu" else min(
                                 dv, gradient_columns(dk, cdt)))
  grads = pl.pallas_call(kernel, out_shape=out_shape, grid=(batch, heads, n), in_specs=in_specs,
                         out_specs=out_specs, compiler_params=compiler_params(backend, num_warps),
                         interpret=interpret, name="matrix_memory_bwd_chunks")(*ins)
  out = dict(zip(names, grads), vu=du)
  for name in ("gs", "mc", "gm"):
    if name in out:
      out[name] = out[name][..., 0, :].sum(-1)
  return out
