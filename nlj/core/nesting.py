"""Nested levels: slow levels are outer ``lax.scan``s, faster levels scan inside their chunks.

Levels nest by frequency (Definition 3): a slow level's memory is frozen for the whole of its
chunk, the faster computation inside that chunk reads it (knowledge transfer by conditioning,
eqs. 24-25), and at the end of the chunk the slow level takes its own update on what the chunk
produced for it. Outer gradients flow through every inner and outer update, so initial states
are meta-learned (eq. 28); each outer chunk is ``jax.checkpoint``-ed when ``outer.remat``.

``inner`` is any function of the frozen outer memory, its own state and one outer chunk of the
input -- typically a faster :meth:`nlj.core.Level.run` (a nested scan), or another
:func:`run_nested` for three or more levels.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from nlj.core.level import Level, LevelInputs, LevelState

__all__ = ["InnerFn", "run_nested"]

InnerFn = Callable[[Any, Any, Any], tuple[Any, Any, LevelInputs]]
"""``inner(outer_memory, inner_state, x_chunk) -> (inner_state, y_chunk, outer_inputs)``.

``outer_memory`` has leaves ``[batch, heads, ...]`` (read it with ``outer.apply``); ``x_chunk``
and ``y_chunk`` are pytrees of ``[batch, outer.chunk, ...]`` arrays; ``outer_inputs`` is the
outer level's :class:`LevelInputs` for the chunk (``[batch, outer.chunk, heads, ...]``).
"""


def run_nested(outer: Level, outer_state: LevelState, inner: InnerFn, inner_state: Any, xs: Any,
               impl: str = "auto") -> tuple[tuple[LevelState, Any], Any]:
  """Run a slow level around a faster computation (nested scans, outer = slowest).

  Args:
    outer: the slow level; ``seq`` must be a multiple of ``outer.chunk``.
    outer_state: at a chunk boundary (from ``init_state``, ``step`` or this function).
    inner: see :data:`InnerFn`.
    inner_state: the faster computation's carried state.
    xs: pytree of ``[batch, seq, ...]`` inputs.
    impl: implementation of the outer level's updates (see :meth:`nlj.core.Level.run`).

  Returns:
    ``((outer_state, inner_state), ys)`` with ``ys`` the pytree of ``[batch, seq, ...]`` inner
    outputs; when ``inner`` sets ``outer_inputs.q``, ``ys`` is ``(inner outputs, outer
    read-outs [batch, seq, heads, d_out])`` with the outer level's own ``read`` mode.
  """
  leaves = jax.tree.leaves(xs)
  if not leaves:
    raise ValueError("run_nested needs at least one input array in xs")
  batch, seq = leaves[0].shape[:2]
  size = outer.chunk
  if seq % size:
    raise ValueError(f"run_nested needs seq % outer.chunk == 0, got seq={seq}, "
                     f"outer.chunk={size}; carry the remainder to the next call")
  for leaf in leaves:
    if leaf.shape[:2] != (batch, seq):
      raise ValueError(f"every xs leaf must be [batch={batch}, seq={seq}, ...], got {leaf.shape}")
  n = seq // size

  def split(x):  # [batch, seq, ...] -> [n, batch, size, ...]
    return jnp.swapaxes(x.reshape((batch, n, size) + x.shape[2:]), 0, 1)

  def merge(y):  # [n, batch, size, ...] -> [batch, seq, ...]
    return jnp.swapaxes(y, 0, 1).reshape((batch, seq) + y.shape[3:])

  def body(carry, x_chunk):
    state, inner_carry = carry
    inner_carry, y, outer_inputs = inner(state.memory, inner_carry, x_chunk)
    state, outer_y = outer.step(state, outer_inputs, impl)
    return (state, inner_carry), (y if outer_y is None else (y, outer_y))

  if outer.remat:
    body = jax.checkpoint(body)
  carry, ys = jax.lax.scan(body, (outer_state, inner_state), jax.tree.map(split, xs))
  return carry, jax.tree.map(merge, ys)
