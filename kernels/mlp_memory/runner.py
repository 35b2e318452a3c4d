"""The MLP-memory op as a :class:`nlj.core.Level` runner (``impl="pallas"``).

Stage 1 (:mod:`nlj_kernels.mlp_memory.prepare`, JAX) computes every chunk's state-free
coefficients in parallel; stage 2 (:mod:`nlj_kernels.mlp_memory.recurrence`, Pallas) carries the
weights across chunks. The runner adds what a level's state needs on top, exactly as
:func:`nlj.core.chunked.run_chunked`: the sequence is shifted by the state's ``phase`` and cut
into chunks with masked no-op tokens, the first chunk takes its gradients at the carried anchor,
and the anchor after the call is the state at the last complete chunk boundary. Every dimension
is zero-padded to the kernels' tile sides and each chunk to ``tile(chunk)`` tokens
(:mod:`nlj_kernels.mlp_memory.contract`); padded units and tokens are exact no-ops.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nlj.core.chunked import chunk_layout
from nlj.core.level import Level, LevelInputs, LevelState
from nlj_kernels.backends import resolve_backend
from nlj_kernels.mlp_memory.contract import op_config, tile
from nlj_kernels.mlp_memory.prepare import prepare
from nlj_kernels.mlp_memory.recurrence import Launch, chunk_recurrence

__all__ = ["run_level", "launch_options", "NUM_WARPS"]

# Each program carries a head's whole MLP (weights and momenta) through its loop: at 8 warps an
# H100 ran a hidden-128 memory's forward kernel 1.95x and its fwd+bwd 1.34x faster than at 4
# (16 warps: slower than 4), a hidden-256 one 1.34x and 1.32x (BENCHMARKS.md, seventeenth session).
NUM_WARPS = 8


def launch_options(num_warps: int = NUM_WARPS, interpret: bool | None = None,
                   precision: Any = None, backend: str | None = None) -> Launch:
  """Launch options with defaults for the running platform
  (:func:`nlj_kernels.backends.resolve_backend`: ``"tpu"`` on a TPU, else ``"triton"``;
  interpret mode unless JAX runs on the device the backend compiles for) and
  :data:`NUM_WARPS` Triton warps a program.

  ``precision`` None follows ``jax_default_matmul_precision`` as XLA's products do (tf32 for
  float32 on a GPU by default, exact under ``jax.default_matmul_precision("highest")``);
  ``jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3`` gives nearly float32 accuracy on tensor cores.
  """
  backend, interpret = resolve_backend(backend, interpret)
  return Launch(num_warps, interpret, precision, backend)


def _weights(params: Any) -> list[jax.Array]:
  """An MLPMemory's params ``[B, H, ...]`` as the kernels' weight list (layers, then skip)."""
  return list(params["layers"]) + ([params["skip"]] if "skip" in params else [])


def _params(weights: list[jax.Array], like: Any) -> Any:
  """The inverse of :func:`_weights`, cropped to the shapes of ``like``."""
  crop = lambda w, ref: w[..., :ref.shape[-2], :ref.shape[-1]].astype(ref.dtype)
  out = {"layers": tuple(crop(w, r) for w, r in zip(weights, like["layers"]))}
  if "skip" in like:
    out["skip"] = crop(weights[-1], like["skip"])
  return out


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _pad_weight(w: jax.Array, dtype) -> jax.Array:
  w = _pad_to(w.astype(dtype), -2, tile(w.shape[-2]))
  return _pad_to(w, -1, tile(w.shape[-1]))


def _to_chunks(x: jax.Array, n: int, size: int, phase) -> jax.Array:
  """``[B, T, H, ...] -> [B, H, n, tile(size), ...]`` shifted right by ``phase``, zero-padded
  (features to their tile side too)."""
  b = x.shape[0]
  padded = jnp.zeros((b, n * size) + x.shape[2:], x.dtype)
  padded = jax.lax.dynamic_update_slice_in_dim(padded, x, phase, axis=1)
  padded = jnp.moveaxis(padded.reshape((b, n, size) + x.shape[2:]), 3, 1)
  padded = _pad_to(padded, 3, tile(size))
  return _pad_to(padded, 4, tile(x.shape[3])) if x.ndim == 4 else padded


def run_level(level: Level, state: LevelState, inputs: LevelInputs, aligned: bool = False,
              **launch) -> tuple[LevelState, jax.Array | None]:
  """A :data:`nlj.core.dispatch.Runner` for levels the op covers (same results as
  :func:`nlj.core.chunked.run_chunked`); ``**launch`` as :func:`launch_options`."""
  config, options = op_config(level), launch_options(**launch)
  size = level.chunk
  b, t, h, _ = inputs.k.shape
  n, phase = chunk_layout(size, t, state.phase, aligned)
  new_phase = jnp.asarray((phase + t) % size, jnp.int32)
  dtype = jnp.promote_types(jax.tree.leaves(state.memory)[0].dtype, jnp.float32)
  if n == 0:
    y = None if inputs.q is None else jnp.zeros(inputs.v.shape, dtype)
    return state._replace(phase=new_phase), y
  chunk = lambda x: _to_chunks(x.astype(dtype), n, size, phase)
  q = None if inputs.q is None else chunk(inputs.q)
  fields = prepare(config, chunk(inputs.k), chunk(inputs.v), q, chunk(inputs.eta),
                   chunk(inputs.alpha), chunk(inputs.beta), chunk(jnp.ones((b, t, h), dtype)))
  last = (jnp.arange(n) == (phase + t) // size - 1).astype(dtype)
  pad = lambda params: None if params is None else tuple(
      _pad_weight(w, dtype) for w in _weights(params))
  y, memory, momentum, anchor = chunk_recurrence(
      fields, pad(state.memory), pad(state.momentum), pad(state.anchor), last, config, options)
  new_state = LevelState(_params(memory, state.memory),
                         None if momentum is None else _params(momentum, state.momentum),
                         _params(anchor, state.anchor), new_phase)
  if y is None:
    return new_state, None
  y = jnp.moveaxis(y[:, :, :, :size, :inputs.v.shape[-1]], 1, 3).reshape(b, n * size, h, -1)
  return new_state, jax.lax.dynamic_slice_in_dim(y, phase, t, axis=1)
