"""Shared checks for mixers that follow the streaming contract of :mod:`nlj.layers`."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def jitted(module: nnx.Module, method: str = "__call__") -> Callable:
  """``f(state, x, cache) -> module.method(x, cache)``, jitted once (state is an argument, so
  perturbed parameters reuse the compilation)."""
  graphdef, _ = nnx.split(module)
  return jax.jit(lambda state, x, cache: getattr(nnx.merge(graphdef, state), method)(x, cache))


def run_pieces(f: Callable, state, x: jax.Array, cache, lengths: Sequence[int]) -> jax.Array:
  """Run ``x [batch, seq, d]`` through ``f`` in consecutive pieces, carrying the cache."""
  if sum(lengths) != x.shape[1]:
    raise ValueError(f"lengths {lengths} must sum to seq {x.shape[1]}")
  ys, start = [], 0
  for n in lengths:
    y, cache = f(state, x[:, start:start + n], cache)[:2]
    ys.append(y)
    start += n
  return jnp.concatenate(ys, axis=1)


def zero_grad_paths(grads) -> list[str]:
  """Paths of parameter leaves whose gradient is identically zero."""
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  return [jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g))]


def assert_close(a, b, tol: float = 1e-5) -> None:
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)
