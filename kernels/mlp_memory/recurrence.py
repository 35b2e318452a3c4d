"""The stage-2 recurrence with its custom VJP (the backward Pallas kernel, never autodiff through
``pallas_call``)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nlj_kernels.mlp_memory import pallas_chunks as kernels
from nlj_kernels.mlp_memory.contract import OpConfig

__all__ = ["Launch", "chunk_recurrence"]


class Launch(NamedTuple):
  """Kernel launch options.

  Attributes:
    num_warps: Triton warps per program (ignored on TPU).
    interpret: run the kernels in interpret mode (any backend).
    precision: of the kernels' products: a ``jax.lax.Precision``, a ``DotAlgorithmPreset`` or None
      (``jax_default_matmul_precision``).
    backend: ``"triton"`` (GPU) or ``"tpu"`` (Mosaic), :data:`nlj_kernels.backends.BACKENDS`.
  """

  num_warps: int
  interpret: bool
  precision: Any
  backend: str = "triton"


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def chunk_recurrence(fields: dict, memory: tuple, momentum: tuple | None, anchor: tuple,
                     last: jax.Array, config: OpConfig, launch: Launch):
  """``(y, memory, momentum, anchor)`` of :func:`nlj_kernels.mlp_memory.pallas_chunks.forward`,
  differentiable in every array argument (``last`` gets a zero cotangent)."""
  y, memory, momentum, anchor, _, _ = kernels.forward(
      fields, memory, momentum, anchor, last, config=config, precision=launch.precision,
      num_warps=launch.num_warps, interpret=launch.interpret, backend=launch.backend)
  return y, memory, momentum, anchor


def _fwd(fields, memory, momentum, anchor, last, config, launch):
  y, new_memory, new_momentum, new_anchor, saved, msaved = kernels.forward(
      fields, memory, momentum, anchor, last, config=config, precision=launch.precision,
      num_warps=launch.num_warps, save=True, interpret=launch.interpret, backend=launch.backend)
  return (y, new_memory, new_momentum, new_anchor), (fields, saved, msaved, anchor, last)


def _bwd(config, launch, residuals, cotangents):
  fields, saved, msaved, anchor, last = residuals
  dy, dmemory, dmomentum, danchor_end = cotangents
  dfields, dmemory, dmomentum, danchor = kernels.backward(
      fields, saved, msaved, anchor, last, dy, dmemory, dmomentum, danchor_end, config=config,
      precision=launch.precision, num_warps=launch.num_warps, interpret=launch.interpret,
      backend=launch.backend)
  unchanged = 1 - jnp.sum(last)  # no chunk completed: the output anchor is the input anchor
  danchor = tuple(d + unchanged.astype(d.dtype) * e for d, e in zip(danchor, danchor_end))
  return dfields, dmemory, dmomentum, danchor, jnp.zeros_like(last)


chunk_recurrence.defvjp(_fwd, _bwd)
