"""Stage 2's sequential passes as Hopper kernels (Pallas Mosaic GPU).

The forward recurrence and the backward's first pass of
:mod:`nlj_kernels.matrix_memory.pallas_recurrence`, without momentum (Gated DeltaNet, DeltaNet,
linear attention, DGD matrix memories) and with it (Titans' linear memory)::

    forward:         U = Vu - Kw S ;  y = Qs S + Qm M + P U ;
                     S' = gs S + mc M + Kdᵀ U ;  M' = gm M + Kmᵀ U
    backward pass 1: dU = Pᵀ dy + Kd dS' + Km dM' ;  dS = Qsᵀ dy + gs dS' - Kwᵀ dU ;
                     dM = Qmᵀ dy + mc dS' + gm dM'   (chunks in reverse; no M terms without
                     momentum)

One program (one warpgroup) per ``(batch, head, d_v block)`` keeps ``S`` (and ``M``; or their
cotangents) ``[d_k, block]`` in float32 registers (WGMMA accumulators) and walks the chunks. The
bulk-copy engine (TMA) loads the next chunk's tiles (five without momentum, seven with) into the
second of two shared-memory slots while this chunk's products run, and stores the per-chunk
outputs (``y`` and the saved chunk-start states; ``dU`` and the saved state cotangents) from
shared memory while the next chunk's products run. Each product is a Hopper ``wgmma`` on
bf16/f16 operands in shared memory with float32 accumulation; the carried states and ``U``
(``dU``) are rounded to the fields' dtype where they enter a product, as the Triton kernels
round them. The block is one of :data:`BLOCKS`; by default (:func:`block_columns`)
:data:`BLOCK_V` columns without momentum and :data:`MOMENTUM_BLOCK_V` with it, so that both slots
of seven tiles fit in shared memory at ``d_k`` 128.

Covered (:func:`unsupported_reason`): 16-bit fields, ``C`` and ``d_k`` multiples of 64, ``d_v`` a
multiple of the block, and the double-buffered tiles within :data:`SHARED_BYTES`.
``interpret=True`` runs the kernels in Pallas' GPU interpret mode on any device (the CPU in CI).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nlj_kernels.matrix_memory.pallas_recurrence import CHUNK_FIELDS, MOMENTUM_FIELDS

__all__ = ["forward", "backward_states", "unsupported_reason", "shared_bytes", "block_columns",
           "BLOCKS", "BLOCK_V", "MOMENTUM_BLOCK_V", "SHARED_BYTES"]

BLOCKS = (16, 32, 64)  # d_v columns a program can take: 16-bit rows of 32, 64, 128 bytes swizzle
BLOCK_V = 64  # d_v columns per program without momentum: the accumulators' N
MOMENTUM_BLOCK_V = 32  # with momentum: two slots of seven tiles fit at d_k 128 (224 KB)
SHARED_BYTES = 227 * 1024  # an H100's shared memory per block
_SLOTS = 2  # chunks of tiles in flight: the one in use and the next


def block_columns(momentum: bool) -> int:
  """``d_v`` columns per program: :data:`MOMENTUM_BLOCK_V` with momentum, else
  :data:`BLOCK_V`."""
  return MOMENTUM_BLOCK_V if momentum else BLOCK_V


def shared_bytes(chunk: int, d_k: int, itemsize: int, momentum: bool = False,
                 block: int | None = None) -> int:
  """Shared memory the forward asks for (the backward's first pass asks for less): two slots of
  the ``[C, d_k]`` tiles (``kw, qs, kd``, with momentum also ``qm, km``), ``vu [C, block]`` and
  ``p [C, C]``; the rounded states ``[d_k, block]``, ``U`` and ``y [C, block]``; and a float32
  ``[d_k, block]`` staging buffer for the initial and final states (``block`` None:
  :func:`block_columns`)."""
  block = block or block_columns(momentum)
  wide, states = 5 if momentum else 3, 2 if momentum else 1
  tiles = _SLOTS * chunk * (wide * d_k + block + chunk)
  return itemsize * (tiles + states * d_k * block + 2 * chunk * block) + 4 * d_k * block


def unsupported_reason(chunk: int, d_k: int, d_v: int, dtype, momentum: bool,
                       block: int | None = None) -> str | None:
  """Why these kernels cannot run the recurrence of these fields in blocks of ``block`` columns
  (None: :func:`block_columns`), or None when they can."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"the chunk fields must be bfloat16 or float16 (wgmma operands), got {dtype}"
  if chunk % 64 or d_k % 64:
    return f"chunk and d_k must be multiples of 64 (wgmma rows), got chunk={chunk}, d_k={d_k}"
  block = block or block_columns(momentum)
  if block not in BLOCKS:
    return f"the d_v block must be one of {BLOCKS}, got {block}"
  if d_v % block:
    return f"d_v must be a multiple of the block {block}, got d_v={d_v}"
  need = shared_bytes(chunk, d_k, jnp.dtype(dtype).itemsize, momentum, block)
  if need > SHARED_BYTES:
    return (f"chunk={chunk}, d_k={d_k}{' with momentum' if momentum else ''} need {need} bytes "
            f"of shared memory, more than {SHARED_BYTES}")
  return None


def _swizzled(shape: tuple[int, ...], dtype, block: int) -> plgpu.SMEM:
  """A shared-memory buffer in the tiled, swizzled layout wgmma reads, swizzled as rows of
  ``block`` elements are (the widest swizzle they allow): a wgmma's two operands take the same
  swizzle, and every buffer here meets a ``[·, block]`` one in some product."""
  swizzle = plgpu.find_swizzle(block * jnp.dtype(dtype).itemsize * 8)
  tiling = plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize))
  return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


def _product(a, b, shape: tuple[int, int]) -> jax.Array:
  """``Σ a_i @ b_i`` over the ``(a, b)`` pairs in ``a``/``b`` (shared-memory refs, or for ``a``
  a register array), accumulated in float32 ``[shape]`` and waited for."""
  def run(acc):
    for x, y in zip(a, b):
      plgpu.wgmma(acc, x, y)
    return acc[...]
  return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _walk(tiles: list, n: int, reverse: bool, states_in: tuple, states_out: tuple, f32_s,
          loaded, staged, step: Callable) -> None:
  """The loop both kernels share: this program's float32 states from ``states_in`` through
  ``n`` chunks (in reverse when ``reverse``) to ``states_out``, while the bulk-copy engine
  brings the next chunk's ``tiles`` into the other shared-memory slot.

  ``tiles``: ``(gmem ref [B, H, N, rows, cols], smem ref [slots, rows, width], by_columns)``,
  ``by_columns`` taking this program's block of columns (``f32_s``'s width, the staging buffer
  the states pass through one at a time); ``step(c, slot, states) -> states`` runs chunk ``c``
  from the tiles in ``slot``, after the stores the last step issued have read their buffers."""
  b, h, j = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("j")
  block = f32_s.shape[-1]
  cols = pl.ds(j * block, block)
  chunk = (lambda i: n - 1 - i) if reverse else (lambda i: i)

  def load(c, slot):
    for src, dst, by_columns in tiles:
      src = src.at[b, h, c, :, cols] if by_columns else src.at[b, h, c]
      plgpu.copy_gmem_to_smem(src, dst.at[slot], loaded.at[slot])

  load(chunk(0), 0)
  initial = []
  for ref in states_in:
    plgpu.copy_gmem_to_smem(ref.at[b, h, :, cols], f32_s, staged.at[0])
    plgpu.barrier_wait(staged.at[0])
    initial.append(plgpu.load(f32_s, layout=plgpu.Layout.WGMMA))
    plgpu.commit_smem()  # read before the next state's copy overwrites the buffer

  def body(i, states):
    slot = lax.rem(i, _SLOTS)

    @pl.when(i + 1 < n)
    def _():
      load(chunk(i + 1), 1 - slot)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    plgpu.barrier_wait(loaded.at[slot])
    return step(chunk(i), slot, states)

  states = lax.fori_loop(0, n, body, tuple(initial))
  for state, ref in zip(states, states_out):
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    f32_s[...] = state
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(f32_s, ref.at[b, h, :, cols])
  plgpu.wait_smem_to_gmem(0)


def _store(value: jax.Array, buffer, out_ref, c) -> None:
  """``value`` into shared ``buffer [rows, block]`` (in its dtype), then by TMA to this
  program's columns of chunk ``c`` of ``out_ref [B, H, N, rows, d_v]``."""
  b, h, j = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("j")
  block = buffer.shape[-1]
  buffer[...] = value.astype(buffer.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(buffer, out_ref.at[b, h, c, :, pl.ds(j * block, block)])


def _scalar(ref, c) -> jax.Array:
  """Chunk ``c``'s scalar of this program's (batch, head) from ``ref [B, H, N]``."""
  return plgpu.load(ref.at[lax.axis_index("b"), lax.axis_index("h"), c], layout=None)


_FORWARD_TILES = ("kw", "vu", "qs", "p", "kd")  # the tiles each kernel loads a chunk, in the
_STATES_TILES = ("kw", "qs", "p", "kd", "dy")  # order of their shared-memory slots
_MOMENTUM_TILES = ("qm", "km")


def _names(momentum: bool) -> tuple[str, ...]:
  """The chunk fields' names, in the order the kernels take them."""
  return CHUNK_FIELDS + (MOMENTUM_FIELDS if momentum else ())


def _tile_names(tiles: tuple[str, ...], momentum: bool) -> tuple[str, ...]:
  return tiles + (_MOMENTUM_TILES if momentum else ())


def _tile_shapes(names: tuple[str, ...], chunk: int, d_k: int, block: int) -> list:
  """Each tile's shape in shared memory: this program's ``[C, block]`` of values (``vu``, ``dy``),
  ``p [C, C]``, the rest ``[C, d_k]``."""
  special = {"vu": (chunk, block), "dy": (chunk, block), "p": (chunk, chunk)}
  return [special.get(name, (chunk, d_k)) for name in names]


def _split(refs: tuple, *counts: int) -> list[tuple]:
  """``refs`` cut into consecutive groups of ``counts`` (the rest last)."""
  out = []
  for count in counts:
    out.append(refs[:count])
    refs = refs[count:]
  return out + [refs]


def _forward_kernel(*refs, n: int, momentum: bool, save_states: bool):
  """The forward recurrence (module docstring). Refs: the chunk fields, the initial states;
  ``y``, the end states, the saved chunk-start states (with ``save_states``); shared memory
  (:func:`_scratch`) and the barriers (:func:`_launch`)."""
  names, k = _names(momentum), 1 + momentum  # k: carried states (S, and M with momentum)
  fields, initial, (y_ref,), ends, saved, refs = _split(refs, len(names), k, 1, k,
                                                        k * save_states)
  f = dict(zip(names, fields))
  tile_names = _tile_names(_FORWARD_TILES, momentum)
  smem, rest = _split(refs, len(tile_names))
  t = dict(zip(tile_names, smem))
  state_s, (u_s, y_s, f32_s, loaded, staged) = _split(rest, k)
  chunk, d_k = f["kw"].shape[-2:]
  block = f32_s.shape[-1]

  def step(c, slot, states):
    tile = lambda name: t[name].at[slot]
    for x, buffer, out in zip(states, state_s, saved or (None,) * k):
      if save_states:
        _store(x, buffer, out, c)
      else:
        buffer[...] = x.astype(buffer.dtype)
    if not save_states:
      plgpu.commit_smem()
    u = tile("vu")[...].astype(jnp.float32) - _product([tile("kw")], [state_s[0]],
                                                        (chunk, block))
    u_s[...] = u.astype(u_s.dtype)
    plgpu.commit_smem()
    reads = [tile("qs"), tile("p")] + ([tile("qm")] if momentum else [])
    y = _product(reads, [state_s[0], u_s] + list(state_s[1:]), (chunk, block))
    _store(y, y_s, y_ref, c)
    s = _scalar(f["gs"], c) * states[0] + _product([tile("kd").T], [u_s], (d_k, block))
    if not momentum:
      return (s,)
    m = states[1]
    s = s + _scalar(f["mc"], c) * m
    return s, _scalar(f["gm"], c) * m + _product([tile("km").T], [u_s], (d_k, block))

  tiles = [(f[name], t[name], name == "vu") for name in tile_names]
  _walk(tiles, n, False, initial, ends, f32_s, loaded, staged, step)


def _states_kernel(*refs, n: int, momentum: bool):
  """Backward pass 1 (module docstring). Refs: the chunk fields, ``dy``, the end states'
  cotangents; ``dU``, the saved cotangents of each chunk's end states, the initial states'
  cotangents; shared memory (:func:`_scratch`) and the barriers (:func:`_launch`)."""
  names, k = _names(momentum), 1 + momentum
  fields, (dy_ref,), ends, (du_ref,), dstates, starts, refs = _split(refs, len(names), 1, k, 1,
                                                                     k, k)
  f = dict(zip(names, fields))
  tile_names = _tile_names(_STATES_TILES, momentum)
  smem, rest = _split(refs, len(tile_names))
  t = dict(zip(tile_names, smem))
  state_s, (du_s, f32_s, loaded, staged) = _split(rest, k)
  chunk, d_k = f["kw"].shape[-2:]
  block = f32_s.shape[-1]

  def step(c, slot, states):  # the cotangents of the states after chunk c
    tile = lambda name: t[name].at[slot]
    for x, buffer, out in zip(states, state_s, dstates):
      _store(x, buffer, out, c)
    writes = [tile("p").T, tile("kd")] + ([tile("km")] if momentum else [])
    du = _product(writes, [tile("dy")] + list(state_s), (chunk, block))
    _store(du, du_s, du_ref, c)
    reads = _product([tile("qs").T], [tile("dy")], (d_k, block))
    ds = _scalar(f["gs"], c) * states[0] + reads - _product([tile("kw").T], [du_s],
                                                            (d_k, block))
    if not momentum:
      return (ds,)
    return ds, (_product([tile("qm").T], [tile("dy")], (d_k, block))
                + _scalar(f["mc"], c) * states[0] + _scalar(f["gm"], c) * states[1])

  tiles = [(dy_ref if name == "dy" else f[name], t[name], name == "dy") for name in tile_names]
  _walk(tiles, n, True, ends, starts, f32_s, loaded, staged, step)


def _check(coeffs: tuple, states: tuple, block: int | None, name: str) -> tuple[bool, int]:
  """Whether ``coeffs`` carry momentum, and the block, after checking that these kernels run
  them."""
  momentum = len(coeffs) == len(_names(True))
  if momentum != (states[1] is not None):
    raise ValueError(f"mosaic_recurrence.{name}: the momentum fields and the momentum state "
                     f"come together ({len(coeffs)} fields, momentum state "
                     f"{'given' if states[1] is not None else 'None'})")
  kw, vu = coeffs[0], coeffs[1]
  chunk, d_k = kw.shape[-2:]
  reason = unsupported_reason(chunk, d_k, vu.shape[-1], kw.dtype, momentum, block)
  if reason is not None:
    raise ValueError(f"mosaic_recurrence.{name}: {reason}")
  for state in states:
    if state is not None and state.dtype != jnp.float32:
      raise ValueError(f"mosaic_recurrence.{name} needs float32 states, got {state.dtype}")
  return momentum, block or block_columns(momentum)


def _launch(kernel: Callable, args: tuple, out_type: list, scratch: list, tiles: int,
            block: int, name: str, interpret: bool):
  """``kernel`` on the ``(batch, heads, d_v / block)`` grid of ``args[0] [B, H, N, C, d_k]``'s
  and ``out_type[0] [B, H, N, C, d_v]``'s shapes, with the barriers of two slots of ``tiles``
  tiles and of the states' staging added."""
  batch, heads = args[0].shape[:2]
  scratch = scratch + [plgpu.Barrier(num_barriers=_SLOTS, num_arrivals=tiles),
                       plgpu.Barrier(num_barriers=1)]
  grid = (batch, heads, out_type[0].shape[-1] // block)
  return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=grid,
                      grid_names=("b", "h", "j"),
                      interpret=plgpu.InterpretGPUParams() if interpret else False,
                      kernel_name=name)(*args)


def _scratch(tiles: list[tuple[int, int]], states: int, outputs: int, chunk: int, d_k: int,
             block: int, dtype) -> list:
  """Shared memory: two slots of each tile shape in ``tiles``, ``states`` rounded states
  ``[d_k, block]``, ``outputs`` per-chunk output buffers ``[C, block]`` and the float32
  staging buffer."""
  return ([_swizzled((_SLOTS,) + shape, dtype, block) for shape in tiles]
          + [_swizzled((d_k, block), dtype, block)] * states
          + [_swizzled((chunk, block), dtype, block)] * outputs
          + [plgpu.SMEM((d_k, block), jnp.float32)])


def _settled(outs, interpret: bool):
  """``outs``, waited for when computed eagerly in interpret mode: Pallas' GPU interpreter runs
  JAX operations inside its callbacks, and an operation dispatched while an interpreted kernel is
  still in flight can deadlock the CPU client against them (seen in a test worker, JAX 0.11.2).
  Under tracing (``jit``, ``grad``) the outputs are tracers and nothing waits."""
  if interpret and not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(outs)):
    jax.block_until_ready(outs)
  return outs


def _pair(states: list) -> tuple:
  """``(S-like, M-like)`` from one or two state outputs (None for a missing momentum)."""
  return (tuple(states) + (None, None))[:2]


def forward(coeffs: tuple, s0: jax.Array, m0: jax.Array | None = None, *,
            block: int | None = None, save_states: bool = False, interpret: bool = False):
  """Run the recurrence over all chunks (as :func:`.pallas_recurrence.forward`).

  Args:
    coeffs: the chunk fields (:data:`~.pallas_recurrence.CHUNK_FIELDS`, with momentum
      + :data:`~.pallas_recurrence.MOMENTUM_FIELDS`), tiles ``[B, H, N, C, ·]`` in bfloat16 or
      float16, scalars ``[B, H, N]`` float32.
    s0, m0: initial state and momentum ``[B, H, d_k, d_v]`` float32 (m0 None without momentum).
    block: ``d_v`` columns per program, one of :data:`BLOCKS` (None: :func:`block_columns`).
    save_states: also return the state (and momentum) at each chunk start, in the fields' dtype.
    interpret: run in Pallas' GPU interpret mode (any device).

  Returns:
    ``(y [B, H, N, C, d_v] in the fields' dtype, s, m [B, H, d_k, d_v] float32 (m None without
    momentum), states, mstates [B, H, N, d_k, d_v] or None)``.
  """
  momentum, block = _check(coeffs, (s0, m0), block, "forward")
  y, *rest = _forward(coeffs, (s0, m0) if momentum else (s0,), block=block,
                      save_states=save_states, interpret=interpret)
  k = 1 + momentum
  return _settled((y, *_pair(rest[:k]), *_pair(rest[k:])), interpret)


@functools.partial(jax.jit, static_argnames=("block", "save_states", "interpret"))
def _forward(coeffs: tuple, initial: tuple, *, block: int, save_states: bool, interpret: bool):
  momentum, k = len(initial) == 2, len(initial)
  kw, vu = coeffs[0], coeffs[1]
  batch, heads, n, chunk, d_k = kw.shape
  cdt, d_v = kw.dtype, vu.shape[-1]
  out_type = [jax.ShapeDtypeStruct(vu.shape, cdt)] + [
      jax.ShapeDtypeStruct(initial[0].shape, jnp.float32)] * k
  if save_states:
    out_type += [jax.ShapeDtypeStruct((batch, heads, n, d_k, d_v), cdt)] * k
  tiles = _tile_shapes(_tile_names(_FORWARD_TILES, momentum), chunk, d_k, block)
  kernel = functools.partial(_forward_kernel, n=n, momentum=momentum, save_states=save_states)
  return _launch(kernel, tuple(coeffs) + tuple(initial), out_type,
                 _scratch(tiles, k, 2, chunk, d_k, block, cdt), len(tiles), block,
                 "matrix_memory_fwd", interpret)


def backward_states(coeffs: tuple, dy: jax.Array, ds_end: jax.Array,
                    dm_end: jax.Array | None = None, *, block: int | None = None,
                    interpret: bool = False):
  """Backward pass 1 (as in :func:`.pallas_recurrence.backward`): the chunks in reverse,
  carrying the state cotangent ``dS`` (and ``dM``) in float32 registers (module docstring).

  Args:
    coeffs: as for :func:`forward`.
    dy: ``[B, H, N, C, d_v]`` in the fields' dtype; ds_end, dm_end: ``[B, H, d_k, d_v]``
      float32 (dm_end None without momentum).
    block: as for :func:`forward`.
    interpret: run in Pallas' GPU interpret mode (any device).

  Returns:
    ``(du, dstates, ds0, dmstates, dm0)``: ``du [B, H, N, C, d_v]`` and ``dstates, dmstates
    [B, H, N, d_k, d_v]`` (the cotangents of each chunk's end state and momentum) in the fields'
    dtype; ``ds0, dm0 [B, H, d_k, d_v]`` float32; dmstates and dm0 None without momentum.
  """
  momentum, block = _check(coeffs, (ds_end, dm_end), block, "backward_states")
  ends = (ds_end, dm_end) if momentum else (ds_end,)
  du, *rest = _backward_states(coeffs, dy, ends, block=block, interpret=interpret)
  (dstates, dmstates), (ds0, dm0) = _pair(rest[:len(ends)]), _pair(rest[len(ends):])
  return _settled((du, dstates, ds0, dmstates, dm0), interpret)


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def _backward_states(coeffs: tuple, dy: jax.Array, ends: tuple, *, block: int,
                     interpret: bool):
  momentum, k = len(ends) == 2, len(ends)
  kw = coeffs[0]
  batch, heads, n, chunk, d_k = kw.shape
  cdt, d_v = kw.dtype, dy.shape[-1]
  out_type = ([jax.ShapeDtypeStruct(dy.shape, cdt)]
              + [jax.ShapeDtypeStruct((batch, heads, n, d_k, d_v), cdt)] * k
              + [jax.ShapeDtypeStruct(ends[0].shape, jnp.float32)] * k)
  tiles = _tile_shapes(_tile_names(_STATES_TILES, momentum), chunk, d_k, block)
  kernel = functools.partial(_states_kernel, n=n, momentum=momentum)
  return _launch(kernel, tuple(coeffs) + (dy.astype(cdt),) + tuple(ends), out_type,
                 _scratch(tiles, k, 1, chunk, d_k, block, cdt), len(tiles), block,
                 "matrix_memory_bwd_states", interpret)
