"""The stage-2 recurrence with its custom VJP (backward Pallas kernels, never autodiff through
``pallas_call``).

The two sequential passes, the forward and the backward's first pass (the state cotangents
through the chunks in reverse), run the portable kernels of :mod:`.pallas_recurrence` or, with
``stage2="mosaic_gpu"``, the Hopper kernels of :mod:`.mosaic_recurrence`; the backward's
chunk-parallel second pass is :func:`.pallas_recurrence.chunk_gradients` either way."""

from __future__ import annotations

import functools

import jax

from nlj_kernels.matrix_memory import mosaic_recurrence, pallas_recurrence as kernels

__all__ = ["chunk_recurrence", "STAGE2_KERNELS"]

STAGE2_KERNELS = ("pallas", "mosaic_gpu")


def _forward(coeffs, s0, m0, block_v, num_warps, num_stages, interpret, backend, stage2,
             save_states):
  """``(y, s, m, states, mstates)`` of the chosen forward kernel."""
  if stage2 == "mosaic_gpu":
    return mosaic_recurrence.forward(coeffs, s0, m0, block=block_v, save_states=save_states,
                                     interpret=interpret)
  return kernels.forward(coeffs, s0, m0, block_v=block_v, num_warps=num_warps,
                         num_stages=num_stages, save_states=save_states, interpret=interpret,
                         backend=backend)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def chunk_recurrence(coeffs: tuple, s0: jax.Array, m0: jax.Array | None, block_v: int,
                     num_warps: int, num_stages: int, interpret: bool, backend: str,
                     stage2: str = "pallas"):
  """``(y, s, m)`` of :func:`nlj_kernels.matrix_memory.pallas_recurrence.forward`, differentiable.

  Args:
    coeffs: chunk fields (``CHUNK_FIELDS`` + ``MOMENTUM_FIELDS`` order), ``[B, H, N, C, ·]``.
    s0, m0: ``[B, H, d_k, d_v]`` float32 (m0 None without momentum).
    block_v, num_warps, num_stages, interpret, backend: kernel launch options
      (``pallas_recurrence``).
    stage2: one of :data:`STAGE2_KERNELS`, the kernels of the two sequential passes
      (``"mosaic_gpu"``: where :func:`.mosaic_recurrence.unsupported_reason` allows, with
      ``block_v`` one of :data:`.mosaic_recurrence.BLOCKS`; they ignore ``num_warps`` and
      ``num_stages``).
  """
  y, s, m, _, _ = _forward(coeffs, s0, m0, block_v, num_warps, num_stages, interpret, backend,
                           stage2, False)
  return y, s, m


def _fwd(coeffs, s0, m0, block_v, num_warps, num_stages, interpret, backend, stage2):
  y, s, m, states, mstates = _forward(coeffs, s0, m0, block_v, num_warps, num_stages, interpret,
                                      backend, stage2, True)
  return (y, s, m), (coeffs, states, mstates)


def _bwd(block_v, num_warps, num_stages, interpret, backend, stage2, residuals, cotangents):
  coeffs, states, mstates = residuals
  dy, ds, dm = cotangents
  momentum = mstates is not None
  dy = dy.astype(coeffs[1].dtype)
  if stage2 == "mosaic_gpu":
    du, dstates, ds0, dmstates, dm0 = mosaic_recurrence.backward_states(
        coeffs, dy, ds, dm if momentum else None, block=block_v, interpret=interpret)
    grads = kernels.chunk_gradients(coeffs, states, mstates, dy, du, dstates, dmstates,
                                    num_warps=num_warps, interpret=interpret, backend=backend)
    grads.update(s0=ds0, m0=dm0)
  else:
    grads = kernels.backward(coeffs, states, mstates, dy, ds, dm if momentum else None,
                             block_v=block_v, num_warps=num_warps, num_stages=num_stages,
                             interpret=interpret, backend=backend)
  names = kernels.CHUNK_FIELDS + (kernels.MOMENTUM_FIELDS if momentum else ())
  dcoeffs = tuple(grads[name].astype(x.dtype) for name, x in zip(names, coeffs))
  return dcoeffs, grads["s0"], grads["m0"] if momentum else None


chunk_recurrence.defvjp(_fwd, _bwd)
