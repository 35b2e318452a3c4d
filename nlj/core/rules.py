"""Inner optimizers ("rules") of a level: how a memory moves after seeing a token.

One token's update of a memory ``M`` with gradient ``g = ∇L(M_anchor; k, v)`` (the anchor is the
state the gradient is taken at; see :mod:`nlj.core.level`) and data-dependent, per-token scalars
``η`` (step), ``α`` (retention), ``β`` (momentum):

* ``step="gd"`` -- gradient descent with retention (Titans eqs. 13-14, Miras):
  ``M <- α M - η g``.
* ``step="dgd"`` -- delta gradient descent (eq. 57; Hope eq. 88):
  ``M <- M (α I - c k kᵀ) - s g`` on every weight whose input is the key, ``α M - s g`` on the
  others. The coefficients ``(c, s)`` follow ``dgd_variant``:

  - ``"normalized"`` (eq. 57, default): ``c = s = η' = η / (1 + η ||k||²)``;
  - ``"plain"`` (eqs. 88, 96 as printed): ``c = s = η``;
  - ``"neurips"`` (NeurIPS text): ``c = 1``, ``s = η``.
* ``momentum=True`` -- Titans momentum on the step (eqs. 9-10, PAPER.md §8 item 7):
  ``S <- β S - s g``, ``M <- decay(M) + S``.
* ``grad_at_retained=True`` -- take the gradient at the retained state ``α M`` instead of ``M``
  (Gated DeltaNet: ``M <- α M (I - η k kᵀ) + η v kᵀ``); ``exact`` levels only.
* ``orthogonalize=True`` -- Newton-Schulz outputs (eq. 52, Atlas): the direction is
  ``D = β S - g`` (momentum) or ``-g`` and the write is ``s · NS(D)`` per weight matrix.

The same :class:`Rule` drives the token-by-token reference and the chunked forms, so they
cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from nlj.optim.newton_schulz import NS_COEFFS, newton_schulz  # shared with Muon and M3

__all__ = ["Rule", "newton_schulz", "NS_COEFFS"]

_STEPS = ("gd", "dgd")
_DGD_VARIANTS = ("normalized", "plain", "neurips")


@dataclasses.dataclass(frozen=True)
class Rule:
  """A level's inner optimizer (see the module docstring for the update equations).

  Attributes:
    step: ``"gd"`` or ``"dgd"``.
    momentum: keep a Titans momentum state ``S`` shaped like the memory.
    orthogonalize: write Newton-Schulz-orthogonalised directions.
    dgd_variant: ``"normalized"``, ``"plain"`` or ``"neurips"`` (only used by ``"dgd"``).
    ns_steps: Newton-Schulz iterations.
    grad_at_retained: gradient at ``α M`` (Gated DeltaNet); only for ``exact`` levels.
    stop_grad_writes: the outer gradient does not flow through what is written (the
      increment); it still flows through reads and the decay of the state.
  """

  step: str = "gd"
  momentum: bool = False
  orthogonalize: bool = False
  dgd_variant: str = "normalized"
  ns_steps: int = 5
  grad_at_retained: bool = False
  stop_grad_writes: bool = False

  def __post_init__(self):
    if self.step not in _STEPS:
      raise ValueError(f"Rule.step must be one of {_STEPS}, got {self.step!r}")
    if self.dgd_variant not in _DGD_VARIANTS:
      raise ValueError(f"Rule.dgd_variant must be one of {_DGD_VARIANTS}, got {self.dgd_variant!r}")
    if not isinstance(self.ns_steps, int) or self.ns_steps < 1:
      raise ValueError(f"Rule.ns_steps must be a positive int, got {self.ns_steps!r}")

  def coefficients(self, eta: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(c, s)``: the key-decay coefficient and the gradient step for one token.

    Args:
      eta: scalar step ``η``.
      k: key ``[d_in]``.
    """
    if self.step == "gd":
      return jnp.zeros_like(eta), eta
    if self.dgd_variant == "normalized":
      eta_p = eta / (1.0 + eta * jnp.sum(k * k))
      return eta_p, eta_p
    if self.dgd_variant == "plain":
      return eta, eta
    return jnp.ones_like(eta), eta

  def direction(self, grads: Any, s: jax.Array) -> Any:
    """The momentum input ``-g`` (orthogonalised rule) or ``-s g`` for one token."""
    scale = -1.0 if self.orthogonalize else -s
    return jax.tree.map(lambda g: scale * g, grads)

  def write(self, direction: Any, s: jax.Array) -> Any:
    """The increment added to the (decayed) memory, from the (momentum) direction."""
    if self.orthogonalize:
      inc = jax.tree.map(lambda d: s * newton_schulz(d, self.ns_steps), direction)
    else:
      inc = direction
    return jax.lax.stop_gradient(inc) if self.stop_grad_writes else inc


def decay(params: Any, key_inputs: Any, alpha: jax.Array, c: jax.Array, k: jax.Array) -> Any:
  """``M (α I - c k kᵀ)`` on key-input weights, ``α M`` on the others (one token)."""

  def one(w, is_key_input):
    if is_key_input:
      return alpha * w - c * jnp.outer(w @ k, k)
    return alpha * w

  return jax.tree.map(one, params, key_inputs)
