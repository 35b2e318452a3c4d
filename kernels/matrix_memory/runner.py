"""The matrix-memory op as a :class:`nlj.core.Level` runner (``impl="pallas"``).

Stage 1 (the plain-JAX :mod:`nlj_kernels.matrix_memory.prepare`, or its per-token scalars
with the tiles built by the Pallas kernels of :mod:`nlj_kernels.matrix_memory.pallas_tiles`)
computes every chunk's state-free coefficients in parallel; stage 2
(:mod:`nlj_kernels.matrix_memory.recurrence`, Pallas) carries the state across chunks. The
runner adds what a level's state needs on top: the sequence is shifted by the state's ``phase``
and padded to whole chunks with masked no-op tokens, the first chunk
takes its gradients at the carried anchor, and the anchor after the call is the state at the
last complete chunk boundary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nlj.core.chunked import chunk_layout
from nlj.core.level import Level, LevelInputs, LevelState
from nlj_kernels.backends import hopper_gpu, resolve_backend
from nlj_kernels.matrix_memory import mosaic_recurrence, pallas_recurrence
from nlj_kernels.matrix_memory.contract import OpConfig, op_config
from nlj.core.triangular import inverse_named
from nlj_kernels.matrix_memory.pallas_stage1 import prepare_pallas
from nlj_kernels.matrix_memory.pallas_tiles import TileShape
from nlj_kernels.matrix_memory.prepare import ChunkCoefficients, prepare
from nlj_kernels.matrix_memory.recurrence import STAGE2_KERNELS, chunk_recurrence

__all__ = ["run_level", "matrix_memory", "Launch", "launch_options", "default_block_v",
           "default_stage2", "default_num_stages", "kernel_fields", "STAGE1"]


class Launch(NamedTuple):
  """Kernel launch options (see :func:`launch_options`)."""

  block_v: int | None
  num_warps: int
  num_stages: int | None
  interpret: bool
  backend: str
  stage1: str
  inverse: str
  tiles_forward: TileShape | None
  tiles_backward: TileShape | None
  stage2: str | None


STAGE1 = ("pallas", "jax")


def launch_options(block_v: int | None = None, num_warps: int = 4, num_stages: int | None = None,
                   interpret: bool | None = None, backend: str | None = None,
                   stage1: str | None = None, inverse: str = "solve",
                   tiles_forward: tuple[int, int] | None = None,
                   tiles_backward: tuple[int, int] | None = None,
                   stage2: str | None = None) -> Launch:
  """Launch options with defaults for the running platform.

  Args:
    block_v: ``d_v`` columns per program of the sequential kernels (the forward and the
      backward's first pass); default :func:`default_block_v` for the portable kernels,
      :func:`.mosaic_recurrence.block_columns` for the Hopper ones (which take one of
      :data:`.mosaic_recurrence.BLOCKS`).
    num_warps: Triton warps per program of the recurrence kernels.
    num_stages: Triton's software-pipelining depth of the sequential kernels' loop over chunks
      (the next chunks' fields load while this chunk's products run); default
      :func:`default_num_stages`.
    interpret: run the kernels in interpret mode; default: unless JAX runs on the device the
      backend compiles for.
    backend: ``"triton"`` or ``"tpu"``; default ``"tpu"`` on a TPU, else ``"triton"``.
    stage1: ``"pallas"`` (the tiles by the kernels of :mod:`.pallas_tiles`, Triton only; the
      default for compiled Triton kernels, measured faster on an H100 in both directions) or
      ``"jax"`` (:mod:`.prepare`; the default in interpret mode and on TPU).
    inverse: the plain-JAX stage 1's triangular inverse, ``"solve"`` or ``"blocked"``
      (:mod:`nlj.core.triangular`; the Pallas kernels invert 16-row blocks themselves).
    tiles_forward, tiles_backward: ``(block, num_warps)`` of the Pallas stage 1's forward and
      backward kernels (:class:`.pallas_tiles.TileShape`; None: the measured defaults fitted to
      the chunk, :func:`.pallas_tiles.fit_shapes`).
    stage2: the kernels of stage 2's sequential passes (the forward and the backward's first
      pass), ``"pallas"`` (:mod:`.pallas_recurrence`, every backend) or ``"mosaic_gpu"`` (the
      Hopper kernels of :mod:`.mosaic_recurrence`, Triton backend only; in interpret mode they
      run in Pallas' GPU interpreter); default :func:`default_stage2`.
  """
  backend, interpret = resolve_backend(backend, interpret)
  stage1 = stage1 or ("pallas" if backend == "triton" and not interpret else "jax")
  if stage1 not in STAGE1 or (stage1 == "pallas" and backend != "triton"):
    raise ValueError(f"stage1 must be one of {STAGE1} ('pallas' with backend='triton' only), "
                     f"got stage1={stage1!r} with backend={backend!r}")
  inverse_named(inverse)  # a bad name fails here, before any tracing
  tiles = [None if x is None else TileShape(*x) for x in (tiles_forward, tiles_backward)]
  if num_stages is not None and (not isinstance(num_stages, int) or num_stages < 1):
    raise ValueError(f"num_stages must be None or a positive int, got {num_stages!r}")
  if stage2 is not None and (stage2 not in STAGE2_KERNELS or (
      stage2 == "mosaic_gpu" and backend != "triton")):
    raise ValueError(f"stage2 must be None or one of {STAGE2_KERNELS} ('mosaic_gpu' "
                     f"with backend='triton' only), got stage2={stage2!r} with "
                     f"backend={backend!r}")
  return Launch(block_v, num_warps, num_stages, interpret, backend, stage1, inverse, *tiles,
                stage2)


SEQUENTIAL_PROGRAMS = 128  # about one per streaming multiprocessor of an H100 (132)


def default_block_v(batch: int, heads: int, d_v: int) -> int:
  """``min(d_v, 64)``, or 32 where the sequential kernels would run fewer than
  :data:`SEQUENTIAL_PROGRAMS` programs (``batch · heads · d_v / block_v``): at batch 1 and 2 of
  16 heads, d_v 128, block 32 was faster on an H100 for Gated DeltaNet and Titans' momentum
  (BENCHMARKS.md, tenth session)."""
  block = min(d_v, 64)
  return block if block <= 32 or _fills_card(batch, heads, d_v) else 32


def _fills_card(batch: int, heads: int, d_v: int) -> bool:
  """Whether the sequential kernels run at least :data:`SEQUENTIAL_PROGRAMS` programs at
  ``d_v`` blocks of ``min(d_v, 64)``."""
  return batch * heads * (d_v // min(d_v, 64)) >= SEQUENTIAL_PROGRAMS


STAGE_BYTES = 192 * 1024  # shared memory the pipelined chunk fields may take (H100: 227 KB)


def default_num_stages(batch: int, heads: int, d_k: int, d_v: int, chunk: int, block_v: int,
                       itemsize: int, momentum: bool) -> int:
  """The sequential kernels' pipelining depth: 1 while they run at least
  :data:`SEQUENTIAL_PROGRAMS` programs at ``d_v`` blocks of 64 (enough to fill the card), else
  the deepest of 3, 2 whose buffered chunk fields fit :data:`STAGE_BYTES` (a chunk's
  ``kw, qs, kd`` (+ ``qm, km``) ``[C, d_k]``, values ``[C, block_v]`` and ``p [C, C]`` per
  stage). Few programs each walk many chunks, and each chunk waits on its loads unless they are
  in flight: on an H100 at 1×16384×16×128 (bf16) 3 stages took Gated DeltaNet from 3.79 to
  2.59 ms forward+backward and 2 took Titans' momentum from 5.63 to 3.67 ms, while at 8×2048
  they gained nothing (BENCHMARKS.md, twelfth session); Titans at 3 stages asked for 299 KB."""
  if _fills_card(batch, heads, d_v):
    return 1
  per_stage = itemsize * chunk * ((5 if momentum else 3) * d_k + block_v + chunk)
  return next((s for s in (3, 2) if s * per_stage <= STAGE_BYTES), 1)


def default_stage2(chunk: int, d_k: int, d_v: int, dtype, momentum: bool, launch: Launch) -> str:
  """``"mosaic_gpu"`` for compiled Triton launches on a Hopper GPU that :mod:`.mosaic_recurrence`
  covers (with the launch's ``block_v``, when given), else ``"pallas"``. On an H100 (bf16, B×T×H×D ×16×128, fwd+bwd device µs) the Hopper
  kernels took Gated DeltaNet from 1,847 to 1,719 (8×2048), 2,043 to 1,706 (4×4096), 1,798 to
  1,757 (2×8192) and 2,064 to 1,979 (1×16384) (BENCHMARKS.md, eighteenth session); on an H200
  they took Titans' momentum from 2,313 to 2,097, 2,646 to 2,074, 2,209 to 2,068 and 2,750 to
  2,546 (nineteenth session)."""
  if launch.backend != "triton" or launch.interpret or not hopper_gpu():
    return "pallas"
  covered = mosaic_recurrence.unsupported_reason(chunk, d_k, d_v, dtype, momentum,
                                                 launch.block_v) is None
  return "mosaic_gpu" if covered else "pallas"


def _stage2(fields: tuple, s0: jax.Array, momentum: bool, launch: Launch) -> str:
  """Stage 2's sequential kernels for these fields: given (and checked), or the default."""
  chunk, d_k = fields[0].shape[-2:]
  d_v, dtype = s0.shape[-1], fields[0].dtype
  if launch.stage2 != "mosaic_gpu":
    return launch.stage2 or default_stage2(chunk, d_k, d_v, dtype, momentum, launch)
  reason = mosaic_recurrence.unsupported_reason(chunk, d_k, d_v, dtype, momentum,
                                                launch.block_v)
  if reason is None and not launch.interpret and jax.default_backend() == "gpu" and (
      not hopper_gpu()):
    reason = f"it needs a Hopper GPU (compute capability 9.x), this is {jax.devices()[0]}"
  if reason is not None:
    raise ValueError(f"stage2='mosaic_gpu' cannot run this op: {reason}")
  return "mosaic_gpu"


def _block_v(s0: jax.Array, block_v: int | None) -> int:
  """The sequential kernels' block for state ``s0 [B, H, d_k, d_v]``: given, or the default."""
  batch, heads, _, d_v = s0.shape
  block = block_v or default_block_v(batch, heads, d_v)
  if d_v % block:
    raise ValueError(f"block_v={block} must divide d_v={d_v}")
  return block


def kernel_fields(coeffs: ChunkCoefficients, dtype) -> tuple:
  """Stage-2 operands in :mod:`.pallas_recurrence`'s field order (with momentum when
  ``coeffs.qm`` is set): matrices in ``dtype``, scalars as they are (float32 or float64)."""
  names = pallas_recurrence.CHUNK_FIELDS
  if coeffs.qm is not None:
    names = names + pallas_recurrence.MOMENTUM_FIELDS
  arrays = [getattr(coeffs, name) for name in names]
  return tuple(x if x.ndim == 3 else x.astype(dtype) for x in arrays)


def _recur(coeffs: ChunkCoefficients, s0, m0, dtype, launch: Launch):
  fields = kernel_fields(coeffs, dtype)
  stage2 = _stage2(fields, s0, m0 is not None, launch)
  if stage2 == "mosaic_gpu":
    block = launch.block_v or mosaic_recurrence.block_columns(m0 is not None)
  else:
    block = _block_v(s0, launch.block_v)
  batch, heads, _, chunk, d_k = fields[0].shape
  stages = launch.num_stages or default_num_stages(
      batch, heads, d_k, s0.shape[-1], chunk, block, jnp.dtype(dtype).itemsize, m0 is not None)
  return chunk_recurrence(fields, s0, m0, block, launch.num_warps, stages, launch.interpret,
                          launch.backend, stage2)


def _chunk_slice(coeffs: ChunkCoefficients, start: int, stop: int) -> ChunkCoefficients:
  return jax.tree.map(lambda x: x[:, :, start:stop], coeffs)


def _pad(x: jax.Array, n: int, size: int, phase, fill: float) -> jax.Array:
  """``[B, T, H, ...] -> [B, n * size, H, ...]``, shifted right by ``phase``, padded with
  ``fill``."""
  if x.shape[1] == n * size and isinstance(phase, int) and phase == 0:
    return x
  padded = jnp.full((x.shape[0], n * size) + x.shape[2:], fill, x.dtype)
  return jax.lax.dynamic_update_slice_in_dim(padded, x, phase, axis=1)


def _from_chunks(y: jax.Array, phase, t: int) -> jax.Array:
  """``[B, H, n, size, d] -> [B, T, H, d]`` (undoing :func:`~.prepare.to_chunks`)."""
  b, h, n, size, d = y.shape
  y = jnp.moveaxis(y, 1, 3).reshape(b, n * size, h, d)
  return jax.lax.dynamic_slice_in_dim(y, phase, t, axis=1)


def _run_unaligned(recur, coeffs: ChunkCoefficients, s0, anchor0, m0, phase, t: int, size: int):
  """The recurrence over ``n`` chunks when the last complete chunk boundary is not static.

  With ``n = ceil((t + C - 1) / C)`` chunks for any phase, the last chunk holding a real token is
  ``n - 1`` or ``n - 2``; its starting state is the anchor unless the sequence ends on a
  boundary. So the chunks run as up to three launches, keeping the states at the starts of the
  last two chunks.
  """
  n = coeffs.gs.shape[2]
  bounds = sorted({0, max(n - 2, 0), n - 1, n})
  starts, ys, s, m = {}, [], s0, m0
  for start, stop in zip(bounds[:-1], bounds[1:]):
    starts[start] = s
    y, s, m = recur(_chunk_slice(coeffs, start, stop), s, m)
    ys.append(y)
  start_anchor = lambda j: anchor0 if j == 0 else starts[j]
  last = (phase + t + size - 1) // size - 1  # the last chunk with a real token
  partial = start_anchor(n - 1) if n == 1 else jnp.where(
      last == n - 1, start_anchor(n - 1), start_anchor(n - 2))
  anchor = jnp.where((phase + t) % size == 0, s, partial)
  return jnp.concatenate(ys, axis=2), s, m, anchor


def _run(config: OpConfig, k, v, q, eta, alpha, beta, s0, anchor0, m0, phase, aligned: bool,
         launch: Launch):
  """Shared body of :func:`matrix_memory` and :func:`run_level` (shapes as there)."""
  size = config.chunk
  t = k.shape[1]
  n, phase = chunk_layout(size, t, phase, aligned)
  pad = lambda x, fill=0.0: _pad(x, n, size, phase, fill)
  q_in = q if q is not None else jnp.zeros_like(k)
  padded = (pad(k), pad(v), pad(q_in), pad(eta), pad(alpha, 1.0), pad(beta, 1.0),
            pad(jnp.ones(k.shape[:3], eta.dtype)))
  if launch.stage1 == "pallas":
    coeffs = prepare_pallas(config, *padded, forward=launch.tiles_forward,
                            backward=launch.tiles_backward, interpret=launch.interpret,
                            backend=launch.backend)
  else:
    coeffs = prepare(config, *padded, inverse=launch.inverse)
  f32 = jnp.promote_types(s0.dtype, jnp.float32)
  s0, anchor0 = s0.astype(f32), anchor0.astype(f32)
  m0 = None if m0 is None else m0.astype(f32)
  offset = s0 - anchor0  # nonzero only inside a chunk begun by an earlier call
  if coeffs.ka is not None and not aligned:
    first = coeffs.vu[:, :, 0] + jnp.matmul(coeffs.ka[:, :, 0], offset)
    coeffs = coeffs._replace(vu=coeffs.vu.at[:, :, 0].set(first))
  dtype = k.dtype
  recur = lambda cf, s, m: _recur(cf, s, m, dtype, launch)
  if aligned:
    y, s, m = recur(coeffs, s0, m0)
    anchor = s
  else:
    y, s, m, anchor = _run_unaligned(recur, coeffs, s0, anchor0, m0, phase, t, size)
  if config.read == "boundary" and not aligned:
    correction = -jnp.matmul(coeffs.qs[:, :, 0], offset)
    y = y.at[:, :, 0].add(correction.astype(y.dtype))
  return _from_chunks(y, phase, t), s, m, anchor


def matrix_memory(config: OpConfig, k: jax.Array, v: jax.Array, q: jax.Array | None,
                  eta: jax.Array, alpha: jax.Array, beta: jax.Array, s0: jax.Array,
                  m0: jax.Array | None = None, **launch):
  """The op on whole chunks from a chunk boundary (``T % chunk == 0``), in any input dtype.

  Args:
    config: the op (:class:`nlj_kernels.matrix_memory.OpConfig`).
    k, q: ``[B, T, H, d_k]``; v: ``[B, T, H, d_v]`` (float32 or bfloat16); q may be None.
    eta, alpha, beta: ``[B, T, H]``.
    s0: initial state ``S = Wᵀ [B, H, d_k, d_v]``; m0: momentum (with ``config.momentum``).
    **launch: :func:`launch_options` (``block_v``, ``num_warps``, ``num_stages``,
      ``interpret``, ``backend``, ``stage1``, ``inverse``, ``tiles_forward``,
      ``tiles_backward``, ``stage2``).

  Returns:
    ``(y [B, T, H, d_v] in v's dtype or None, s [B, H, d_k, d_v] float32, m or None)``.
  """
  if k.shape[1] % config.chunk:
    raise ValueError(f"matrix_memory needs T % chunk == 0, got T={k.shape[1]}, "
                     f"chunk={config.chunk}; Level.run handles any length")
  if (m0 is None) == config.momentum:
    raise ValueError("m0 must be given exactly when config.momentum is True")
  y, s, m, _ = _run(config, k, v, q, eta, alpha, beta, s0, s0, m0, 0, True,
                    launch_options(**launch))
  return (y if q is not None else None), s, m


def run_level(level: Level, state: LevelState, inputs: LevelInputs, aligned: bool = False,
              **launch) -> tuple[LevelState, jax.Array | None]:
  """A :data:`nlj.core.dispatch.Runner` for levels the op covers (same results as
  :func:`nlj.core.chunked.run_chunked`); ``**launch`` as :func:`launch_options`."""
  config, options = op_config(level), launch_options(**launch)
  transpose = lambda w: jnp.swapaxes(w, -1, -2)
  s0, anchor0 = transpose(state.memory["w"]), transpose(state.anchor["w"])
  m0 = transpose(state.momentum["w"]) if config.momentum else None
  y, s, m, anchor = _run(config, inputs.k, inputs.v, inputs.q, inputs.eta, inputs.alpha,
                         inputs.beta, s0, anchor0, m0, state.phase, aligned, options)
  dtype = state.memory["w"].dtype
  back = lambda x: {"w": transpose(x).astype(dtype)}
  t = inputs.k.shape[1]
  new_state = LevelState(back(s), back(m) if config.momentum else None, back(anchor),
                         jnp.asarray((state.phase + t) % level.chunk, jnp.int32))
  return new_state, (y.astype(dtype) if inputs.q is not None else None)
