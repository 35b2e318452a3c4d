"""Token-by-token reference of a level: the oracle every faster form is tested against.

A plain ``lax.scan`` over tokens that carries ``(M, S, anchor, phase)``; each token is written
with :func:`nlj.core.update.write_token`, its gradient taken at the anchor (``boundary``) or at
``M_{t-1}`` (``exact``); after ``chunk`` tokens the anchor moves to the current state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nlj.core.level import Level, LevelInputs, LevelState
from nlj.core.update import write_token

__all__ = ["run_reference"]


def run_reference(level: Level, state: LevelState, inputs: LevelInputs, aligned: bool = False
                  ) -> tuple[LevelState, jax.Array | None]:
  """Run ``level`` one token at a time (see :meth:`nlj.core.Level.run` for shapes).

  ``aligned`` is accepted for a uniform runner signature; the reference needs no alignment.
  """
  has_q = inputs.q is not None
  q = inputs.q if has_q else inputs.k

  def head_token(memory, momentum, anchor, k, v, qt, eta, alpha, beta):
    point = anchor if level.semantics == "boundary" else memory
    new_memory, new_momentum = write_token(
        level, memory, momentum, point, (k, v, eta, alpha, beta, jnp.ones_like(eta)))
    read_params = {"after": new_memory, "before": memory, "boundary": anchor}[level.read]
    return new_memory, new_momentum, level.read_out(read_params, qt)

  batched = jax.vmap(jax.vmap(head_token))  # over batch, then heads

  def body(carry, tok):
    memory, momentum, anchor, phase = carry
    memory, momentum, y = batched(memory, momentum, anchor, *tok)
    phase = phase + 1
    at_boundary = phase == level.chunk
    anchor = jax.tree.map(lambda m, a: jnp.where(at_boundary, m, a), memory, anchor)
    phase = jnp.where(at_boundary, 0, phase)
    return (memory, momentum, anchor, phase), y

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  toks = tuple(map(time_major, (inputs.k, inputs.v, q, inputs.eta, inputs.alpha, inputs.beta)))
  (memory, momentum, anchor, phase), ys = jax.lax.scan(body, tuple(state), toks)
  return LevelState(memory, momentum, anchor, phase), (jnp.moveaxis(ys, 0, 1) if has_q else None)
