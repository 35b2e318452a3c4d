"""Op 1: the chunked update of per-head matrix memories (linear attention, DeltaNet, Gated
DeltaNet, Titans' linear memory with momentum, DGD matrix memories).

* contract -- :mod:`.contract` (what is computed, which levels are covered); the token-by-token
  reference and the chunked JAX form are :func:`nlj.core.reference.run_reference` and
  :func:`nlj.core.chunked.run_chunked` of the same :class:`nlj.core.Level`;
* stage 1 -- :mod:`.prepare`: state-free per-chunk coefficients (JAX, all chunks in parallel);
  :mod:`.pallas_stage1` builds the tiles from :mod:`.prepare`'s per-token scalars in Pallas
  kernels instead (forward and backward; the default for compiled Triton kernels): the WY
  products of :mod:`.pallas_tiles` without momentum, :mod:`.pallas_tiles_momentum` with it
  (whose read decays go back to their scalars by the kernel of :mod:`.pallas_momentum_reads`);
* stage 2 -- :mod:`.pallas_recurrence`: the recurrence over chunks, a forward Pallas kernel and
  a backward in two (a sequential pass for the state cotangents, a chunk-parallel pass for the
  gradients; Triton on GPU, Mosaic on TPU, ``interpret=True`` on CPU), joined by the custom VJP
  in :mod:`.recurrence`; the two sequential passes also run as the Hopper kernels of
  :mod:`.mosaic_recurrence`, with and without momentum (Pallas Mosaic GPU; launch option
  ``stage2``, the default on a Hopper GPU where they are covered);
* :mod:`.runner` -- the level runner registered as kernel ``"matrix_memory"``, and
  :func:`matrix_memory`, the op on raw arrays (bfloat16 inputs allowed);
* ``benchmarks/kernels_matrix_memory.py`` -- timings against the chunked JAX form and the peers.
"""

import jax

from nlj.core.dispatch import Kernel, register_kernel, registered_kernels
from nlj_kernels.matrix_memory.contract import OpConfig, op_config, unsupported_reason
from nlj_kernels.matrix_memory.runner import launch_options, matrix_memory, run_level

__all__ = ["OpConfig", "op_config", "unsupported_reason", "matrix_memory", "run_level",
           "launch_options", "KERNEL"]


def _applies(level) -> bool:
  """Covered levels, on GPU (Triton), TPU (Mosaic) or CPU (interpret mode)."""
  return unsupported_reason(level) is None and jax.default_backend() in ("gpu", "tpu", "cpu")


KERNEL = Kernel("matrix_memory", _applies, run_level)
if all(k.name != KERNEL.name for k in registered_kernels()):
  register_kernel(KERNEL)
