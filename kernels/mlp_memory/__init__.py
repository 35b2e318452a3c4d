"""Op 2: the chunked update of per-head residual-MLP memories (self-modifying Titans' six
memories, Hope eqs. 88-90; Titans' deep neural memory, Titans eqs. 9-14).

* contract -- :mod:`.contract` (what is computed, which levels are covered); the token-by-token
  reference and the chunked JAX form are :func:`nlj.core.reference.run_reference` and
  :func:`nlj.core.chunked.run_chunked` of the same :class:`nlj.core.Level`;
* stage 1 -- :mod:`.prepare`: state-free per-chunk coefficients (JAX, all chunks in parallel);
* stage 2 -- :mod:`.chunk`: one chunk in dense dual form, run by the forward and (through
  ``jax.vjp``) the backward Pallas kernels of :mod:`.pallas_chunks` (Triton on GPU, Mosaic on
  TPU, ``interpret=True`` on CPU), joined by the custom VJP in :mod:`.recurrence`;
* :mod:`.runner` -- the level runner registered as kernel ``"mlp_memory"``;
* ``benchmarks/kernels_mlp_memory.py`` -- GPU check and timings against the chunked JAX form.
"""

import jax

from nlj.core.dispatch import Kernel, register_kernel, registered_kernels
from nlj_kernels.mlp_memory.contract import OpConfig, op_config, unsupported_reason
from nlj_kernels.mlp_memory.runner import NUM_WARPS, launch_options, run_level

__all__ = ["OpConfig", "op_config", "unsupported_reason", "launch_options", "run_level", "KERNEL",
           "NUM_WARPS"]


def _applies(level) -> bool:
  """Covered levels, on GPU (Triton), TPU (Mosaic) or CPU (interpret mode)."""
  return unsupported_reason(level) is None and jax.default_backend() in ("gpu", "tpu", "cpu")


# Opt-in (impl="pallas"): on an H100 (2026-11-26) it passes benchmarks/kernels_mlp_memory.py
# --check where it compiles, but one program holds a head's whole MLP: with float32 operands the
# self-modifying Titans memories of the small (backward) and 760m presets exceed the shared
# memory (bfloat16 operands fit the small ones), and in that layer it was slower than the chunked
# form (BENCHMARKS.md, twelfth session, at 4 warps a program; not re-timed at NUM_WARPS = 8).
KERNEL = Kernel("mlp_memory", _applies, run_level, auto=False)
if all(k.name != KERNEL.name for k in registered_kernels()):
  register_kernel(KERNEL)
