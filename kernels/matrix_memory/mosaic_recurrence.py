"""Stage 2's sequential passes without momentum as Hopper kernels (Pallas Mosaic GPU).

The forward recurrence and the backward's first pass of
:mod:`nlj_kernels.matrix_memory.pallas_recurrence` (Gated DeltaNet, DeltaNet, linear attention
and the other levels without momentum)::

    forward:         U = Vu - Kw S ;  y = Qs S + P U ;  S' = gs S + Kdᵀ U
    backward pass 1: dU = Pᵀ dy + Kd dS' ;  dS = Qsᵀ dy + gs dS' - Kwᵀ dU   (chunks in reverse)

One program (one warpgroup) per ``(batch, head, d_v block of 64)`` keeps ``S`` (or ``dS``)
``[d_k, 64]`` in float32 registers (a WGMMA accumulator) and walks the chunks. The bulk-copy
engine (TMA) loads the next chunk's five tiles into the second of two shared-memory slots while
this chunk's products run, and stores the per-chunk outputs (``y`` and the saved chunk-start
states; ``dU`` and the saved state cotangents) from shared memory while the next chunk's
products run. Each product is a Hopper ``wgmma`` on bf16/f16 operands in shared memory with
float32 accumulation; the carried state and ``U`` (``dU``) are rounded to the fields' dtype
where they enter a product, as the Triton kernels round them.

Covered (:func:`unsupported_reason`): no momentum, 16-bit fields, ``C`` and ``d_k`` multiples of
64, ``d_v`` a multiple of :data:`BLOCK_V`, and the double-buffered tiles within
:data:`SHARED_BYTES`. ``interpret=True`` runs the kernels in Pallas' GPU interpret mode on any
device (the CPU in CI).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = ["forward", "backward_states", "unsupported_reason", "shared_bytes", "BLOCK_V",
           "SHARED_BYTES"]

BLOCK_V = 64  # d_v columns per program: the accumulators' N
SHARED_BYTES = 227 * 1024  # an H100's shared memory per block
_SLOTS = 2  # chunks of tiles in flight: the one in use and the next


def shared_bytes(chunk: int, d_k: int, itemsize: int) -> int:
  """Shared memory the forward asks for: two slots of ``kw, qs, kd [C, d_k]``, ``vu [C, 64]``
  and ``p [C, C]``, the rounded ``S [d_k, 64]``, ``U`` and ``y [C, 64]``, and a float32
  ``[d_k, 64]`` staging buffer for the initial and final state."""
  tiles = _SLOTS * chunk * (3 * d_k + BLOCK_V + chunk)
  return itemsize * (tiles + d_k * BLOCK_V + 2 * chunk * BLOCK_V) + 4 * d_k * BLOCK_V


def unsupported_reason(chunk: int, d_k: int, d_v: int, dtype, momentum: bool) -> str | None:
  """Why this kernel cannot run the recurrence of these fields, or None when it can."""
  if momentum:
    return "momentum is not covered (the Triton kernels run it)"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"the chunk fields must be bfloat16 or float16 (wgmma operands), got {dtype}"
  if chunk % 64 or d_k % 64:
    return f"chunk and d_k must be multiples of 64 (wgmma rows), got chunk={chunk}, d_k={d_k}"
  if d_v % BLOCK_V:
    return f"d_v must be a multiple of {BLOCK_V}, got d_v={d_v}"
  need = shared_bytes(chunk, d_k, jnp.dtype(dtype).itemsize)
  if need > SHARED_BYTES:
    return (f"chunk={chunk}, d_k={d_k} need {need} bytes of shared memory, more than "
            f"{SHARED_BYTES}")
  return None


def _swizzled(shape: tuple[int, ...], dtype) -> plgpu.SMEM:
  """A shared-memory buffer in the tiled, swizzled layout wgmma reads."""
  swizzle = plgpu.find_swizzle(shape[-1] * jnp.dtype(dtype).itemsize * 8)
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


def _walk(tiles: list, n: int, reverse: bool, state_in, state_out, f32_s, loaded, staged,
          step: Callable) -> None:
  """The loop both kernels share: this program's float32 state from ``state_in`` through ``n``
  chunks (in reverse when ``reverse``) to ``state_out``, while the bulk-copy engine brings the
  next chunk's ``tiles`` into the other shared-memory slot.

  ``tiles``: ``(gmem ref [B, H, N, rows, cols], smem ref [slots, rows, width], by_columns)``,
  ``by_columns`` taking this program's :data:`BLOCK_V` columns; ``step(c, slot, s) -> s`` runs
  chunk ``c`` from the tiles in ``slot``, after the stores the last step issued have read their
  buffers."""
  b, h, j = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("j")
  cols = pl.ds(j * BLOCK_V, BLOCK_V)
  chunk = (lambda i: n - 1 - i) if reverse else (lambda i: i)

  def load(c, slot):
    for src, dst, by_columns in tiles:
      src = src.at[b, h, c, :, cols] if by_columns else src.at[b, h, c]
      plgpu.copy_gmem_to_smem(src, dst.at[slot], loaded.at[slot])

  load(chunk(0), 0)
  plgpu.copy_gmem_to_smem(state_in.at[b, h, :, cols], f32_s, staged.at[0])
  plgpu.barrier_wait(staged.at[0])

  def body(i, s):
    slot = lax.rem(i, _SLOTS)

    @pl.when(i + 1 < n)
    def _():
      load(chunk(i + 1), 1 - slot)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    plgpu.barrier_wait(loaded.at[slot])
    return step(chunk(i), slot, s)

  s = lax.fori_loop(0, n, body, plgpu.load(f32_s, layout=plgpu.Layout.WGMMA))
  f32_s[...] = s
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(f32_s, state_out.at[b, h, :, cols])
  plgpu.wait_smem_to_gmem(0)


def _store(value: jax.Array, buffer, out_ref, c) -> None:
  """``value`` into shared ``buffer`` (in its dtype), then by TMA to this program's columns of
  chunk ``c`` of ``out_ref [B, H, N, rows, d_v]``."""
  b, h, j = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("j")
  buffer[...] = value.astype(buffer.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(buffer, out_ref.at[b, h, c, :, pl.ds(j * BLOCK_V, BLOCK_V)])


def _scalar(ref, c) -> jax.Array:
  """Chunk ``c``'s scalar of this program's (batch, head) from ``ref [B, H, N]``."""
  return plgpu.load(ref.at[lax.axis_index("b"), lax.axis_index("h"), c], layout=None)


def _forward_kernel(kw_ref, vu_ref, qs_ref, p_ref, kd_ref, gs_ref, s0_ref, *refs, n: int,
                    save_states: bool):
  y_ref, s_ref, refs = refs[0], refs[1], refs[2:]
  states_ref, refs = (refs[0], refs[1:]) if save_states else (None, refs)
  kw_s, vu_s, qs_s, p_s, kd_s, s_s, u_s, y_s, f32_s, loaded, staged = refs
  chunk, d_k = kw_ref.shape[-2:]

  def step(c, slot, s):
    if save_states:
      _store(s, s_s, states_ref, c)
    else:
      s_s[...] = s.astype(s_s.dtype)
      plgpu.commit_smem()
    u = vu_s[slot].astype(jnp.float32) - _product([kw_s.at[slot]], [s_s], (chunk, BLOCK_V))
    u_s[...] = u.astype(u_s.dtype)
    plgpu.commit_smem()
    y = _product([qs_s.at[slot], p_s.at[slot]], [s_s, u_s], (chunk, BLOCK_V))
    _store(y, y_s, y_ref, c)
    return _scalar(gs_ref, c) * s + _product([kd_s.at[slot].T], [u_s], (d_k, BLOCK_V))

  tiles = [(kw_ref, kw_s, False), (qs_ref, qs_s, False), (kd_ref, kd_s, False),
           (p_ref, p_s, False), (vu_ref, vu_s, True)]
  _walk(tiles, n, False, s0_ref, s_ref, f32_s, loaded, staged, step)


def _states_kernel(kw_ref, qs_ref, p_ref, kd_ref, gs_ref, dy_ref, ds_end_ref, du_ref,
                   dstates_ref, ds0_ref, kw_s, qs_s, p_s, kd_s, dy_s, ds_s, du_s, f32_s, loaded,
                   staged, *, n: int):
  chunk, d_k = kw_ref.shape[-2:]

  def step(c, slot, ds):  # ds: the cotangent of the state after chunk c
    _store(ds, ds_s, dstates_ref, c)
    du = _product([p_s.at[slot].T, kd_s.at[slot]], [dy_s.at[slot], ds_s], (chunk, BLOCK_V))
    _store(du, du_s, du_ref, c)
    reads = _product([qs_s.at[slot].T], [dy_s.at[slot]], (d_k, BLOCK_V))
    writes = _product([kw_s.at[slot].T], [du_s], (d_k, BLOCK_V))
    return _scalar(gs_ref, c) * ds + reads - writes

  tiles = [(kw_ref, kw_s, False), (qs_ref, qs_s, False), (kd_ref, kd_s, False),
           (p_ref, p_s, False), (dy_ref, dy_s, True)]
  _walk(tiles, n, True, ds_end_ref, ds0_ref, f32_s, loaded, staged, step)


def _check(coeffs: tuple, state: jax.Array, name: str) -> None:
  kw, vu = coeffs[0], coeffs[1]
  chunk, d_k = kw.shape[-2:]
  reason = unsupported_reason(chunk, d_k, vu.shape[-1], kw.dtype, False)
  if reason is not None:
    raise ValueError(f"mosaic_recurrence.{name}: {reason}")
  if state.dtype != jnp.float32:
    raise ValueError(f"mosaic_recurrence.{name} needs a float32 state, got {state.dtype}")


def _launch(kernel: Callable, args: tuple, out_type: list, scratch: list, name: str,
            interpret: bool):
  """``kernel`` on the ``(batch, heads, d_v / 64)`` grid of ``args[0] [B, H, N, C, d_k]``'s
  and ``out_type[0] [B, H, N, C, d_v]``'s shapes, with two tile slots' barriers added."""
  batch, heads = args[0].shape[:2]
  scratch = scratch + [plgpu.Barrier(num_barriers=_SLOTS, num_arrivals=5),
                       plgpu.Barrier(num_barriers=1)]
  return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch,
                      grid=(batch, heads, out_type[0].shape[-1] // BLOCK_V),
                      grid_names=("b", "h", "j"),
                      interpret=plgpu.InterpretGPUParams() if interpret else False,
                      kernel_name=name)(*args)


def _settled(outs, interpret: bool):
  """``outs``, waited for when computed eagerly in interpret mode: Pallas' GPU interpreter runs
  JAX operations inside its callbacks, and an operation dispatched while an interpreted kernel is
  still in flight can deadlock the CPU client against them (seen in a test worker, JAX 0.11.2).
  Under tracing (``jit``, ``grad``) the outputs are tracers and nothing waits."""
  if interpret and not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(outs)):
    jax.block_until_ready(outs)
  return outs


def forward(coeffs: tuple, s0: jax.Array, *, save_states: bool = False, interpret: bool = False):
  """Run the recurrence over all chunks (as ``pallas_recurrence.forward`` without momentum).

  Args:
    coeffs: ``(kw, vu, qs, p, kd, gs)`` (:data:`~.pallas_recurrence.CHUNK_FIELDS`), tiles
      ``[B, H, N, C, ·]`` in bfloat16 or float16, ``gs [B, H, N]`` float32.
    s0: initial state ``[B, H, d_k, d_v]`` float32.
    save_states: also return the state at each chunk start, in the fields' dtype.
    interpret: run in Pallas' GPU interpret mode (any device).

  Returns:
    ``(y [B, H, N, C, d_v] in the fields' dtype, s [B, H, d_k, d_v] float32, states or None)``.
  """
  _check(coeffs, s0, "forward")
  return _settled(_forward(coeffs, s0, save_states=save_states, interpret=interpret), interpret)


@functools.partial(jax.jit, static_argnames=("save_states", "interpret"))
def _forward(coeffs: tuple, s0: jax.Array, *, save_states: bool, interpret: bool):
  kw, vu, qs, p, kd, gs = coeffs
  batch, heads, n, chunk, d_k = kw.shape
  cdt, d_v = kw.dtype, vu.shape[-1]
  out_type = [jax.ShapeDtypeStruct(vu.shape, cdt), jax.ShapeDtypeStruct(s0.shape, jnp.float32)]
  if save_states:
    out_type.append(jax.ShapeDtypeStruct((batch, heads, n, d_k, d_v), cdt))
  tile = lambda *shape: _swizzled((_SLOTS,) + shape, cdt)
  scratch = [tile(chunk, d_k), tile(chunk, BLOCK_V), tile(chunk, d_k), tile(chunk, chunk),
             tile(chunk, d_k), _swizzled((d_k, BLOCK_V), cdt), _swizzled((chunk, BLOCK_V), cdt),
             _swizzled((chunk, BLOCK_V), cdt), plgpu.SMEM((d_k, BLOCK_V), jnp.float32)]
  kernel = functools.partial(_forward_kernel, n=n, save_states=save_states)
  outs = _launch(kernel, (kw, vu, qs, p, kd, gs, s0), out_type, scratch, "matrix_memory_fwd",
                 interpret)
  return outs[0], outs[1], (outs[2] if save_states else None)


def backward_states(coeffs: tuple, dy: jax.Array, ds_end: jax.Array, *,
                    interpret: bool = False):
  """Backward pass 1 without momentum (as in ``pallas_recurrence.backward``): the chunks in
  reverse, carrying the state cotangent ``dS`` in float32 registers::

      dU = Pᵀ dy + Kd dS' ;  dS = Qsᵀ dy + gs dS' - Kwᵀ dU

  Args:
    coeffs: as for :func:`forward`.
    dy: ``[B, H, N, C, d_v]`` in the fields' dtype; ds_end: ``[B, H, d_k, d_v]`` float32.
    interpret: run in Pallas' GPU interpret mode (any device).

  Returns:
    ``(du [B, H, N, C, d_v], dstates [B, H, N, d_k, d_v])`` in the fields' dtype (``dstates``:
    the cotangent of each chunk's end state) and ``ds0 [B, H, d_k, d_v]`` float32.
  """
  _check(coeffs, ds_end, "backward_states")
  return _settled(_backward_states(coeffs, dy, ds_end, interpret=interpret), interpret)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _backward_states(coeffs: tuple, dy: jax.Array, ds_end: jax.Array, *, interpret: bool):
  kw, _, qs, p, kd, gs = coeffs
  batch, heads, n, chunk, d_k = kw.shape
  cdt, d_v = kw.dtype, dy.shape[-1]
  out_type = [jax.ShapeDtypeStruct(dy.shape, cdt),
              jax.ShapeDtypeStruct((batch, heads, n, d_k, d_v), cdt),
              jax.ShapeDtypeStruct(ds_end.shape, jnp.float32)]
  tile = lambda *shape: _swizzled((_SLOTS,) + shape, cdt)
  scratch = [tile(chunk, d_k), tile(chunk, d_k), tile(chunk, chunk), tile(chunk, d_k),
             tile(chunk, BLOCK_V), _swizzled((d_k, BLOCK_V), cdt), _swizzled((chunk, BLOCK_V), cdt),
             plgpu.SMEM((d_k, BLOCK_V), jnp.float32)]
  kernel = functools.partial(_states_kernel, n=n)
  return tuple(_launch(kernel, (kw, qs, p, kd, gs, dy.astype(cdt), ds_end), out_type, scratch,
                       "matrix_memory_bwd_states", interpret))
