"""Stage 1 of the op with its tiles built by Pallas kernels: the per-token scalars in plain JAX
(:func:`~nlj_kernels.matrix_memory.prepare.chunk_parts`), the tiles by
:mod:`~nlj_kernels.matrix_memory.pallas_tiles` (the WY products, without momentum) or
:mod:`~nlj_kernels.matrix_memory.pallas_tiles_momentum` (with momentum)."""

from __future__ import annotations

import functools

import jax

from nlj_kernels.matrix_memory.contract import OpConfig
from nlj_kernels.matrix_memory.pallas_tiles import TileShape, tiles_pallas
from nlj_kernels.matrix_memory.pallas_tiles_momentum import momentum_tiles_pallas
from nlj_kernels.matrix_memory.prepare import (ChunkCoefficients, chunk_inputs, chunk_parts,
                                               read_form)

__all__ = ["prepare_pallas"]


def prepare_pallas(config: OpConfig, k: jax.Array, v: jax.Array, q: jax.Array, eta: jax.Array,
                   alpha: jax.Array, beta: jax.Array, mask: jax.Array, *,
                   forward: TileShape | None = None, backward: TileShape | None = None,
                   interpret: bool = False, backend: str = "triton") -> ChunkCoefficients:
  """Stage-1 coefficients of every chunk with the tiles by the kernels (differentiable).

  Args:
    config: the op.
    k, q: ``[B, T, H, d_k]``; v: ``[B, T, H, d_v]`` (``T % chunk == 0``; pad first);
      eta, alpha, beta, mask: ``[B, T, H]``.
    forward, backward: the tiles kernels' :class:`~.pallas_tiles.TileShape` (None:
      :func:`~.pallas_tiles.fit_shapes`').

  Returns:
    :class:`ChunkCoefficients` with leading ``[B, H, N]`` axes: tiles in k's dtype, scalars in
    float32 (float64 stays).
  """
  args = chunk_inputs(k, v, q, eta, alpha, beta, mask, size=config.chunk)
  coeffs, scalars = jax.vmap(jax.vmap(jax.vmap(functools.partial(chunk_parts, config))))(*args)
  build = momentum_tiles_pallas if config.momentum else tiles_pallas
  tiles = build(read_form(config), k, v, q, scalars, config.chunk, forward=forward,
                backward=backward, interpret=interpret, backend=backend)
  return coeffs._replace(**tiles)
