"""The Pallas backends the kernels compile for, and their launch parameters.

``"triton"`` lowers through Triton (GPU); ``"tpu"`` through Mosaic (TPU). Either runs with
``interpret=True`` on any device (the CPU in CI).
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

__all__ = ["BACKENDS", "compiler_params", "hopper_gpu", "resolve_backend"]

BACKENDS = ("triton", "tpu")


def resolve_backend(backend: str | None, interpret: bool | None) -> tuple[str, bool]:
  """``(backend, interpret)`` with defaults for the running platform: ``"tpu"`` on a TPU, else
  ``"triton"``; interpret mode unless JAX runs on the device the backend compiles for.
  Raises ValueError naming the allowed backends."""
  platform = jax.default_backend()
  backend = backend or ("tpu" if platform == "tpu" else "triton")
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if interpret is None:
    interpret = platform != {"triton": "gpu", "tpu": "tpu"}[backend]
  return backend, interpret


def hopper_gpu() -> bool:
  """Whether JAX runs on a Hopper GPU (compute capability 9.x: H100, H200), whose ``wgmma``
  and TMA the Mosaic GPU kernels use."""
  if jax.default_backend() != "gpu":
    return False
  return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def compiler_params(backend: str, num_warps: int, grid_dims: int = 3, parallel: bool = True,
                    num_stages: int = 1):
  """Triton or Mosaic-TPU parameters; on TPU every grid axis is parallel (programs are
  independent) unless ``parallel=False``. ``num_stages``: Triton's software-pipelining depth of
  a kernel's loops (loads of later iterations in flight during this one's products)."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "tpu":
    kind = "parallel" if parallel else "arbitrary"
    return pltpu.CompilerParams(dimension_semantics=(kind,) * grid_dims)
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
