"""Stage 2's forward recurrence without momentum as a Hopper kernel (Pallas Mosaic GPU).

The same recurrence as :func:`nlj_kernels.matrix_memory.pallas_recurrence.forward` (Gated
DeltaNet, DeltaNet, linear attention and the other levels without momentum)::

    U = Vu - Kw S ;  y = Qs S + P U ;  S' = gs S + Kdᵀ U

One program (one warpgroup) per ``(batch, head, d_v block of 64)`` keeps ``S [d_k, 64]`` in
float32 registers (a WGMMA accumulator) and walks the chunks. The bulk-copy engine (TMA) loads
chunk ``c + 1``'s five tiles into the second of two shared-memory slots while chunk ``c``'s
products run, and stores ``y`` (and, for the backward, the chunk-start states) from shared
memory while the next chunk's products run. Each product is a Hopper ``wgmma`` on bf16/f16
operands in shared memory with float32 accumulation; ``S`` and ``U`` are rounded to the fields'
dtype where they enter a product, as the Triton kernel rounds them.

Covered (:func:`unsupported_reason`): no momentum, 16-bit fields, ``C`` and ``d_k`` multiples of
64, ``d_v`` a multiple of :data:`BLOCK_V`, and the double-buffered tiles within
:data:`SHARED_BYTES`. ``interpret=True`` runs the kernel in Pallas' GPU interpret mode on any
device (the CPU in CI).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = ["forward", "unsupported_reason", "shared_bytes", "BLOCK_V", "SHARED_BYTES"]

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


def _kernel(kw_ref, vu_ref, qs_ref, p_ref, kd_ref, gs_ref, s0_ref, *refs, n: int,
            save_states: bool):
  y_ref, s_ref, refs = refs[0], refs[1], refs[2:]
  states_ref, refs = (refs[0], refs[1:]) if save_states else (None, refs)
  kw_s, vu_s, qs_s, p_s, kd_s, s_s, u_s, y_s, f32_s, loaded, staged = refs
  b, h, j = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("j")
  cols = pl.ds(j * BLOCK_V, BLOCK_V)
  chunk, d_k = kw_ref.shape[-2:]
  cdt = kw_ref.dtype

  def load(c, slot):
    for src, dst in ((kw_ref, kw_s), (qs_ref, qs_s), (kd_ref, kd_s), (p_ref, p_s)):
      plgpu.copy_gmem_to_smem(src.at[b, h, c], dst.at[slot], loaded.at[slot])
    plgpu.copy_gmem_to_smem(vu_ref.at[b, h, c, :, cols], vu_s.at[slot], loaded.at[slot])

  load(0, 0)
  plgpu.copy_gmem_to_smem(s0_ref.at[b, h, :, cols], f32_s, staged.at[0])
  plgpu.barrier_wait(staged.at[0])
  s0 = plgpu.load(f32_s, layout=plgpu.Layout.WGMMA)

  def step(c, s):
    slot = lax.rem(c, _SLOTS)

    @pl.when(c + 1 < n)
    def _():
      load(c + 1, 1 - slot)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last step's stores have read s_s, y_s
    s_s[...] = s.astype(cdt)
    plgpu.commit_smem()
    if save_states:
      plgpu.copy_smem_to_gmem(s_s, states_ref.at[b, h, c, :, cols])
    plgpu.barrier_wait(loaded.at[slot])
    u = vu_s[slot].astype(jnp.float32) - _product([kw_s.at[slot]], [s_s], (chunk, BLOCK_V))
    u_s[...] = u.astype(cdt)
    plgpu.commit_smem()
    y = _product([qs_s.at[slot], p_s.at[slot]], [s_s, u_s], (chunk, BLOCK_V))
    y_s[...] = y.astype(y_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_s, y_ref.at[b, h, c, :, cols])
    gs = plgpu.load(gs_ref.at[b, h, c], layout=None)
    return gs * s + _product([kd_s.at[slot].T], [u_s], (d_k, BLOCK_V))

  s = lax.fori_loop(0, n, step, s0)
  f32_s[...] = s
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(f32_s, s_ref.at[b, h, :, cols])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("save_states", "interpret"))
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
  kw, vu, qs, p, kd, gs = coeffs
  batch, heads, n, chunk, d_k = kw.shape
  d_v = vu.shape[-1]
  reason = unsupported_reason(chunk, d_k, d_v, kw.dtype, False)
  if reason is not None:
    raise ValueError(f"mosaic_recurrence.forward: {reason}")
  if s0.dtype != jnp.float32:
    raise ValueError(f"mosaic_recurrence.forward needs a float32 state, got {s0.dtype}")
  cdt = kw.dtype
  out_type = [jax.ShapeDtypeStruct(vu.shape, cdt), jax.ShapeDtypeStruct(s0.shape, jnp.float32)]
  if save_states:
    out_type.append(jax.ShapeDtypeStruct((batch, heads, n, d_k, d_v), cdt))
  tile = lambda *shape: _swizzled((_SLOTS,) + shape, cdt)
  scratch = [tile(chunk, d_k), tile(chunk, BLOCK_V), tile(chunk, d_k), tile(chunk, chunk),
             tile(chunk, d_k), _swizzled((d_k, BLOCK_V), cdt), _swizzled((chunk, BLOCK_V), cdt),
             _swizzled((chunk, BLOCK_V), cdt), plgpu.SMEM((d_k, BLOCK_V), jnp.float32),
             plgpu.Barrier(num_barriers=_SLOTS, num_arrivals=5), plgpu.Barrier(num_barriers=1)]
  kernel = functools.partial(_kernel, n=n, save_states=save_states)
  outs = plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch,
                      grid=(batch, heads, d_v // BLOCK_V), grid_names=("b", "h", "j"),
                      interpret=plgpu.InterpretGPUParams() if interpret else False,
                      kernel_name="matrix_memory_fwd")(kw, vu, qs, p, kd, gs, s0)
  return outs[0], outs[1], (outs[2] if save_states else None)
