"""The stage-2 recurrence with its custom VJP (a backward Pallas kernel, never autodiff through
``pallas_call``). The forward runs the portable kernel of :mod:`.pallas_recurrence` or, with
``forward_kernel="mosaic_gpu"``, the Hopper kernel of :mod:`.mosaic_recurrence`; the backward
is :mod:`.pallas_recurrence`'s either way."""

from __future__ import annotations

import functools

import jax

from nlj_kernels.matrix_memory import mosaic_recurrence, pallas_recurrence as kernels

__all__ = ["chunk_recurrence", "FORWARD_KERNELS"]

FORWARD_KERNELS = ("pallas", "mosaic_gpu")


def _forward(coeffs, s0, m0, block_v, num_warps, num_stages, interpret, backend, forward_kernel,
             save_states):
  """``(y, s, m, states, mstates)`` of the chosen forward kernel."""
  if forward_kernel == "mosaic_gpu":
    y, s, states = mosaic_recurrence.forward(coeffs, s0, save_states=save_states,
                                             interpret=interpret)
    return y, s, None, states, None
  return kernels.forward(coeffs, s0, m0, block_v=block_v, num_warps=num_warps,
                         num_stages=num_stages, save_states=save_states, interpret=interpret,
                         backend=backend)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def chunk_recurrence(coeffs: tuple, s0: jax.Array, m0: jax.Array | None, block_v: int,
                     num_warps: int, num_stages: int, interpret: bool, backend: str,
                     forward_kernel: str = "pallas"):
  """``(y, s, m)`` of :func:`nlj_kernels.matrix_memory.pallas_recurrence.forward`, differentiable.

  Args:
    coeffs: chunk fields (``CHUNK_FIELDS`` + ``MOMENTUM_FIELDS`` order), ``[B, H, N, C, ·]``.
    s0, m0: ``[B, H, d_k, d_v]`` float32 (m0 None without momentum).
    block_v, num_warps, num_stages, interpret, backend: kernel launch options
      (``pallas_recurrence``).
    forward_kernel: one of :data:`FORWARD_KERNELS` (``"mosaic_gpu"``: without momentum only,
      :func:`.mosaic_recurrence.unsupported_reason`; it ignores ``block_v``, ``num_warps`` and
      ``num_stages``).
  """
  y, s, m, _, _ = _forward(coeffs, s0, m0, block_v, num_warps, num_stages, interpret, backend,
                           forward_kernel, False)
  return y, s, m


def _fwd(coeffs, s0, m0, block_v, num_warps, num_stages, interpret, backend, forward_kernel):
  y, s, m, states, mstates = _forward(coeffs, s0, m0, block_v, num_warps, num_stages, interpret,
                                      backend, forward_kernel, True)
  return (y, s, m), (coeffs, states, mstates)


def _bwd(block_v, num_warps, num_stages, interpret, backend, forward_kernel, residuals,
         cotangents):
  del forward_kernel  # the backward kernels are the same for both forwards
  coeffs, states, mstates = residuals
  dy, ds, dm = cotangents
  momentum = mstates is not None
  grads = kernels.backward(coeffs, states, mstates, dy.astype(coeffs[1].dtype), ds,
                           dm if momentum else None, block_v=block_v, num_warps=num_warps,
                           num_stages=num_stages, interpret=interpret, backend=backend)
  names = kernels.CHUNK_FIELDS + (kernels.MOMENTUM_FIELDS if momentum else ())
  dcoeffs = tuple(grads[name].astype(x.dtype) for name, x in zip(names, coeffs))
  return dcoeffs, grads["s0"], grads["m0"] if momentum else None


chunk_recurrence.defvjp(_fwd, _bwd)
