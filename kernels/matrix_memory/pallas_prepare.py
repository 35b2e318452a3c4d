"""Stage 1 as Pallas kernels: every chunk's coefficients in one program each, forward and
backward, from the single-chunk equations of :func:`~nlj_kernels.matrix_memory.prepare.
chunk_coefficients`.

The forward kernel (grid ``(batch, heads, chunks)``) reads a chunk's keys, values, queries and
gates straight from the ``[B, T, H, ·]`` inputs, computes ``T = (I + N)⁻¹`` in registers
(:func:`blocked_inverse`) and writes the stage-2 operands plus ``T``. The backward kernel
recomputes the chunk from the saved ``T`` and differentiates the same function with ``jax.vjp``
traced into the kernel, with ``dN = -Tᵀ dT Tᵀ`` as the inverse's rule; so the forward and
backward cannot drift from the plain-JAX stage 1 they are tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nlj_kernels.matrix_memory.contract import OpConfig
from nlj.core.triangular import blocked_inverse, given_inverse
from nlj_kernels.matrix_memory.pallas_recurrence import compiler_params
from nlj_kernels.matrix_memory.prepare import ChunkCoefficients, chunk_coefficients

__all__ = ["prepare_pallas"]

_TILE_FIELDS = ("kw", "vu", "qs", "p", "kd", "qm", "km")
_SCALAR_FIELDS = ("gs", "mc", "gm")


def _fields(config: OpConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
  tiles = _TILE_FIELDS if config.momentum else _TILE_FIELDS[:5]
  scalars = _SCALAR_FIELDS if config.momentum else _SCALAR_FIELDS[:1]
  if config.semantics == "boundary" and config.objective == "l2":
    tiles = tiles + ("ka",)
  return tiles, scalars


def _flat(config: OpConfig, coeffs: ChunkCoefficients, size: int) -> tuple:
  """Tiles, then scalars broadcast to ``[C]`` (Pallas stores whole vectors)."""
  tiles, scalars = _fields(config)
  return tuple(getattr(coeffs, f) for f in tiles) + tuple(
      jnp.broadcast_to(getattr(coeffs, f), (size,)) for f in scalars)


def _input_specs(size: int, dk: int, dv: int):
  keys = pl.BlockSpec((None, size, None, dk), lambda b, h, c: (b, c, h, 0))
  vals = pl.BlockSpec((None, size, None, dv), lambda b, h, c: (b, c, h, 0))
  gate = pl.BlockSpec((None, size, None), lambda b, h, c: (b, c, h))
  return [keys, vals, keys, gate, gate, gate, gate]


def _output_specs(config: OpConfig, size: int, dk: int, dv: int):
  width = {"vu": dv, "p": size}
  tiles, scalars = _fields(config)
  spec = lambda w: pl.BlockSpec((None, None, None, size, w), lambda b, h, c: (b, h, c, 0, 0))
  vec = pl.BlockSpec((None, None, None, size), lambda b, h, c: (b, h, c, 0))
  return [spec(width.get(f, dk)) for f in tiles] + [vec] * len(scalars), tiles, scalars


def _load(refs):
  """Load tiles in float32 (float64 stays, for tests)."""
  return tuple(r[...].astype(jnp.promote_types(r.dtype, jnp.float32)) for r in refs)


def _forward_kernel(*refs, config: OpConfig):
  ins, outs = refs[:7], refs[7:]
  k, v, q, eta, alpha, beta, mask = _load(ins)
  captured = {}

  def inverse(n):
    captured["t"] = blocked_inverse(n)
    return captured["t"]

  coeffs = chunk_coefficients(config, inverse, k, v, q, eta, alpha, beta, mask)
  values = _flat(config, coeffs, k.shape[0])
  for ref, value in zip(outs, values):
    ref[...] = value.astype(ref.dtype)
  if not config.momentum:
    outs[-1][...] = captured["t"]


def _backward_kernel(*refs, config: OpConfig, n_out: int):
  ins, refs = refs[:7], refs[7:]
  t_ref, refs = (refs[0], refs[1:]) if not config.momentum else (None, refs)
  cots, grads = refs[:n_out], refs[n_out:]
  k, v, q, eta, alpha, beta, mask = _load(ins)
  t = None if t_ref is None else t_ref[...]
  inverse = lambda n: given_inverse(n, t)

  def f(k, v, q, eta, alpha, beta):
    coeffs = chunk_coefficients(config, inverse, k, v, q, eta, alpha, beta, mask)
    return _flat(config, coeffs, k.shape[0])

  _, vjp = jax.vjp(f, k, v, q, eta, alpha, beta)
  tiles, scalars = _fields(config)
  size = k.shape[0]
  first = jax.lax.broadcasted_iota(jnp.int32, (size,), 0) == 0
  cot = [r[...].astype(k.dtype) for r in cots]
  for i in range(len(tiles), len(cot)):  # a scalar's cotangent enters once, not C times
    cot[i] = jnp.where(first, cot[i], 0.0)
  for ref, g in zip(grads, vjp(tuple(cot))):
    ref[...] = g.astype(ref.dtype)


def _launch(config: OpConfig, k, v, eta, backend: str, num_warps: int):
  batch, t, heads, dk = k.shape
  size = config.chunk
  if t % size:
    raise ValueError(f"stage 1 needs T % chunk == 0 (pad first), got T={t}, chunk={size}")
  grid = (batch, heads, t // size)
  return grid, size, dk, v.shape[-1], compiler_params(backend, num_warps, len(grid))


@functools.partial(jax.jit, static_argnames=("config", "num_warps", "interpret", "backend"))
def _forward(config, k, v, q, eta, alpha, beta, mask, *, num_warps, interpret, backend):
  grid, size, dk, dv, params = _launch(config, k, v, eta, backend, num_warps)
  b, t, h = eta.shape
  n = t // size
  out_specs, tiles, scalars = _output_specs(config, size, dk, dv)
  width = {"vu": dv, "p": size}
  out_shape = [jax.ShapeDtypeStruct((b, h, n, size, width.get(f, dk)), k.dtype) for f in tiles]
  out_shape += [jax.ShapeDtypeStruct((b, h, n, size), eta.dtype)] * len(scalars)
  if not config.momentum:
    out_shape.append(jax.ShapeDtypeStruct((b, h, n, size, size), eta.dtype))
    out_specs = out_specs + [pl.BlockSpec((None, None, None, size, size),
                                          lambda bb, hh, c: (bb, hh, c, 0, 0))]
  kernel = functools.partial(_forward_kernel, config=config)
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid,
                        in_specs=_input_specs(size, dk, dv), out_specs=out_specs,
                        compiler_params=params, interpret=interpret,
                        name="matrix_memory_prepare_fwd")(k, v, q, eta, alpha, beta, mask)


@functools.partial(jax.jit, static_argnames=("config", "num_warps", "interpret", "backend"))
def _backward(config, inputs, t_inv, cotangents, *, num_warps, interpret, backend):
  k, v, q, eta, alpha, beta, mask = inputs
  grid, size, dk, dv, params = _launch(config, k, v, eta, backend, num_warps)
  out_specs, _, _ = _output_specs(config, size, dk, dv)
  in_specs = _input_specs(size, dk, dv)
  extra = []
  if not config.momentum:
    extra = [pl.BlockSpec((None, None, None, size, size), lambda bb, hh, c: (bb, hh, c, 0, 0))]
  grad_specs = in_specs[:6]
  grad_shapes = [jax.ShapeDtypeStruct(x.shape, eta.dtype) for x in inputs[:6]]
  kernel = functools.partial(_backward_kernel, config=config, n_out=len(cotangents))
  args = list(inputs) + ([t_inv] if not config.momentum else []) + list(cotangents)
  return pl.pallas_call(kernel, out_shape=grad_shapes, grid=grid,
                        in_specs=in_specs + extra + out_specs, out_specs=grad_specs,
                        compiler_params=params, interpret=interpret,
                        name="matrix_memory_prepare_bwd")(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 8, 9, 10))
def _prepare(config, k, v, q, eta, alpha, beta, mask, num_warps, interpret, backend):
  outs = _forward(config, k, v, q, eta, alpha, beta, mask, num_warps=num_warps,
                  interpret=interpret, backend=backend)
  return tuple(outs[:-1]) if not config.momentum else tuple(outs)


def _prepare_fwd(config, k, v, q, eta, alpha, beta, mask, num_warps, interpret, backend):
  outs = _forward(config, k, v, q, eta, alpha, beta, mask, num_warps=num_warps,
                  interpret=interpret, backend=backend)
  t_inv = outs[-1] if not config.momentum else None
  flat = tuple(outs[:-1]) if not config.momentum else tuple(outs)
  return flat, ((k, v, q, eta, alpha, beta, mask), t_inv)


def _prepare_bwd(config, num_warps, interpret, backend, residuals, cotangents):
  inputs, t_inv = residuals
  grads = _backward(config, inputs, t_inv, tuple(cotangents), num_warps=num_warps,
                    interpret=interpret, backend=backend)
  typed = tuple(g.astype(x.dtype) for g, x in zip(grads, inputs))
  return typed + (jnp.zeros_like(inputs[6]),)


_prepare.defvjp(_prepare_fwd, _prepare_bwd)


def prepare_pallas(config: OpConfig, k, v, q, eta, alpha, beta, mask, *, num_warps: int = 4,
                   interpret: bool = False, backend: str = "triton") -> ChunkCoefficients:
  """Stage-1 coefficients of every chunk by the Pallas kernels (differentiable).

  Args:
    config: the op.
    k, q: ``[B, T, H, d_k]``; v: ``[B, T, H, d_v]`` (``T % chunk == 0``; pad first);
      eta, alpha, beta, mask: ``[B, T, H]``.

  Returns:
    :class:`ChunkCoefficients` with leading ``[B, H, N]`` axes: tiles in k's dtype, scalars in
    float32 (as :func:`nlj_kernels.matrix_memory.prepare.prepare` computes them).
  """
  wide = jnp.promote_types(k.dtype, jnp.float32)  # gates, scalars and T (float64 for tests)
  gates = tuple(x.astype(wide) for x in (eta, alpha, beta, mask))
  flat = _prepare(config, k, v, q, *gates, num_warps, interpret, backend)
  tiles, scalars = _fields(config)
  values = dict(zip(tiles, flat[:len(tiles)]))
  values.update({f: x[..., 0] for f, x in zip(scalars, flat[len(tiles):])})
  return ChunkCoefficients(**{f: values.get(f) for f in ChunkCoefficients._fields})
