"""Internal objectives ("attentional bias") of a memory: the loss a level minimises in context.

Each objective is a per-token loss ``L(y, v)`` of the read-out ``y = M(k)`` against the target
``v``, and its output gradient ``dL/dy`` -- the local surprise signal of eq. 9. The parameter
gradient is ``dL/dy ⊗ k`` for a matrix memory (closed form, eq. 8) and a VJP through the memory
otherwise (:func:`memory_grad`).

================  ==================================  =====================================
name              loss ``L(y, v)``                     ``dL/dy``
================  ==================================  =====================================
``dot``           ``-<y, v>`` (Hebbian, eq. 17, 64)    ``-v``
``l2``            ``½ ||y - v||²`` (delta rule)        ``y - v``
``lp``            ``(1/p) Σ |y - v|^p`` (Moneta)       ``sign(e) |e|^(p-1)``
``huber``         ``Σ huber_δ(y - v)`` (Yaad)          ``clip(y - v, -δ, δ)``
================  ==================================  =====================================

The paper writes the L2 objective as ``||M(k) - v||²``; the factor 2 of its gradient is absorbed
into the step size η (PAPER.md §3.4), so ``l2`` here is the DeltaNet convention
``M <- M - η (M k - v) kᵀ``. Huber is applied element-wise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from nlj.core.memories import Memory

__all__ = ["Objective", "DotProduct", "L2", "Lp", "Huber", "get_objective", "memory_grad"]


class Objective(Protocol):
  name: str

  def loss(self, y: jax.Array, v: jax.Array) -> jax.Array:
    """Scalar loss of one token: ``y, v [d_out]``."""

  def output_grad(self, y: jax.Array, v: jax.Array) -> jax.Array:
    """``dL/dy [d_out]`` in closed form."""


@dataclasses.dataclass(frozen=True)
class DotProduct:
  """Hebbian objective ``-<M(k), v>`` (eqs. 17-18)."""

  name: str = "dot"

  def loss(self, y, v):
    return -jnp.sum(y * v)

  def output_grad(self, y, v):
    return jnp.broadcast_to(-v, y.shape).astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class L2:
  """Regression objective ``½ ||M(k) - v||²`` (delta rule, eqs. 56, 86)."""

  name: str = "l2"

  def loss(self, y, v):
    return 0.5 * jnp.sum((y - v) ** 2)

  def output_grad(self, y, v):
    return y - v


@dataclasses.dataclass(frozen=True)
class Lp:
  """Moneta's ``(1/p) ||M(k) - v||_p^p`` (Miras), ``p > 1``."""

  p: float = 3.0
  name: str = "lp"

  def __post_init__(self):
    if not self.p > 1:
      raise ValueError(f"Lp.p must be > 1, got {self.p!r}")

  def loss(self, y, v):
    return jnp.sum(jnp.abs(y - v) ** self.p) / self.p

  def output_grad(self, y, v):
    e = y - v
    return jnp.sign(e) * jnp.abs(e) ** (self.p - 1)


@dataclasses.dataclass(frozen=True)
class Huber:
  """Yaad's element-wise Huber loss with threshold ``delta > 0`` (Miras)."""

  delta: float = 1.0
  name: str = "huber"

  def __post_init__(self):
    if not self.delta > 0:
      raise ValueError(f"Huber.delta must be > 0, got {self.delta!r}")

  def loss(self, y, v):
    a = jnp.abs(y - v)
    quad = 0.5 * a**2
    lin = self.delta * (a - 0.5 * self.delta)
    return jnp.sum(jnp.where(a <= self.delta, quad, lin))

  def output_grad(self, y, v):
    return jnp.clip(y - v, -self.delta, self.delta)


_OBJECTIVES = {"dot": DotProduct, "l2": L2, "lp": Lp, "huber": Huber}


def get_objective(name: str, **kwargs: Any) -> Objective:
  """Objective by name (``dot``, ``l2``, ``lp``, ``huber``); kwargs go to its constructor."""
  if name not in _OBJECTIVES:
    raise ValueError(f"objective must be one of {sorted(_OBJECTIVES)}, got {name!r}")
  return _OBJECTIVES[name](**kwargs)


def memory_grad(memory: Memory, objective: Objective, params: Any, k: jax.Array,
                v: jax.Array) -> Any:
  """``∇_params L(M(k), v)`` for one token: closed form for linear memories, a VJP otherwise.

  Args:
    memory: the memory architecture.
    objective: the internal objective.
    params: one head's memory parameters.
    k: key ``[d_in]``.
    v: target ``[d_out]``.

  Returns:
    A pytree shaped like ``params``.
  """
  y, vjp = jax.vjp(lambda p: memory.apply(p, k), params)
  dldy = objective.output_grad(y, v)
  closed = memory.linear_grad(params, k, dldy)
  return closed if closed is not None else vjp(dldy)[0]
