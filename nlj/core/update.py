"""One token's write into one head's memory -- the update both forms are built from.

``write_token`` implements, for a single ``(k, v, η, α, β)`` (see :mod:`nlj.core.rules`)::

    g      = ∇L(M_point; k, v)                       at the anchor, M_{t-1} or α M_{t-1}
    c, s   = rule.coefficients(η, k)                 DGD key decay and step (c = 0 for GD)
    D      = -s g              (or -g when orthogonalising)
    S      = β S + D ;  D = S  (momentum only)
    M      = M (α I - c k kᵀ) + write(D)             key decay only on key-input weights

``mask = 0`` makes the token a no-op (padding for partial chunks).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nlj.core.objectives import memory_grad
from nlj.core.rules import decay

__all__ = ["TokenInputs", "masked_scalars", "write_token"]

TokenInputs = tuple  # (k [d_in], v [d_out], eta, alpha, beta, mask)


def masked_scalars(level, k, eta, alpha, beta, mask):
  """``(c, s, α, β)`` of one token with padding (``mask = 0``) turned into a no-op."""
  c, s = level.rule.coefficients(eta, k)
  return c * mask, s * mask, jnp.where(mask > 0, alpha, 1.0), jnp.where(mask > 0, beta, 1.0)


def write_token(level, memory: Any, momentum: Any, point: Any, tok: TokenInputs
                ) -> tuple[Any, Any]:
  """One token's update of one head.

  Args:
    level: the :class:`nlj.core.Level` (memory, objective, rule).
    memory: ``M_{t-1}`` (one head's parameters).
    momentum: ``S_{t-1}`` or None.
    point: the parameters the gradient is taken at (the anchor, or ``memory``).
    tok: ``(k [d_in], v [d_out], η, α, β, mask)``.

  Returns:
    ``(M_t, S_t)``.
  """
  k, v, eta, alpha, beta, mask = tok
  rule = level.rule
  c, s, alpha, beta = masked_scalars(level, k, eta, alpha, beta, mask)
  if rule.grad_at_retained:
    point = jax.tree.map(lambda x: alpha * x, point)
  g = memory_grad(level.memory, level.objective, point, k, v)
  direction = rule.direction(jax.tree.map(lambda x: mask * x, g), s)
  if rule.momentum:
    momentum = jax.tree.map(lambda m, d: beta * m + d, momentum, direction)
    direction = momentum
  key_inputs = level.memory.key_inputs()
  increment = jax.tree.map(lambda x: mask * x, rule.write(direction, s))
  memory = jax.tree.map(jnp.add, decay(memory, key_inputs, alpha, c, k), increment)
  return memory, momentum
