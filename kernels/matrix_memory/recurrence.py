"""The stage-2 recurrence with its custom VJP (a backward Pallas kernel, never autodiff through
``pallas_call``)."""

from __future__ import annotations

import functools

import jax

from nlj_kernels.matrix_memory import pallas_recurrence as kernels

__all__ = ["chunk_recurrence"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def chunk_recurrence(coeffs: tuple, s0: jax.Array, m0: jax.Array | None, block_v: int,
                     num_warps: int, num_stages: int, interpret: bool, backend: str):
  """``(y, s, m)`` of :func:`nlj_kernels.matrix_memory.pallas_recurrence.forward`, differentiable.

  Args:
    coeffs: chunk fields (``CHUNK_FIELDS`` + ``MOMENTUM_FIELDS`` order), ``[B, H, N, C, ·]``.
    s0, m0: ``[B, H, d_k, d_v]`` float32 (m0 None without momentum).
    block_v, num_warps, num_stages, interpret, backend: kernel launch options
      (``pallas_recurrence``).
  """
  y, s, m, _, _ = kernels.forward(coeffs, s0, m0, block_v=block_v, num_warps=num_warps,
                                  num_stages=num_stages, interpret=interpret, backend=backend)
  return y, s, m


def _fwd(coeffs, s0, m0, block_v, num_warps, num_stages, interpret, backend):
  y, s, m, states, mstates = kernels.forward(coeffs, s0, m0, block_v=block_v,
                                             num_warps=num_warps, num_stages=num_stages,
                                             save_states=True, interpret=interpret,
                                             backend=backend)
  return (y, s, m), (coeffs, states, mstates)


def _bwd(block_v, num_warps, num_stages, interpret, backend, residuals, cotangents):
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
