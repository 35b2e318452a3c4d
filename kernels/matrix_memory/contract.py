"""What the matrix-memory op computes, and which levels it covers.

The op runs a :class:`nlj.core.Level` whose memory is a :class:`nlj.core.MatrixMemory`
``y = W k`` (``W [d_out, d_in]``) with a ``dot`` or ``l2`` objective, per head and per sample,
one chunk of ``C = level.chunk`` tokens at a time. In the row convention used by the kernels the
state is ``S = Wᵀ [d_k, d_v]`` and a token's update (``nlj.core.update.write_token``) is::

    S_t = α_t S_{t-1} - b_t k_t (k_tᵀ S_{t-1}) + k_t ⊗ u_t                     (no momentum)
    M_t = β_t M_{t-1} + k_t ⊗ u_t ;  S_t = α_t S_{t-1} + M_t                   (momentum, GD)

with ``(c_t, s_t)`` from :meth:`nlj.core.Rule.coefficients` and

==========  ======  ====================================  ===========================
semantics   obj.    b_t                                   u_t
==========  ======  ====================================  ===========================
exact       l2      c_t + s_t  (c_t + α_t s_t retained)   s_t v_t
exact       dot     c_t                                   s_t v_t
boundary    l2      c_t                                   s_t (v_t - k_tᵀ A)
boundary    dot     c_t                                   s_t v_t
==========  ======  ====================================  ===========================

where ``A`` is the anchor (the state at the previous chunk boundary, Hope eq. 90). Read-outs
``y_t = q_tᵀ S`` take ``S_t`` (``after``), ``S_{t-1}`` (``before``) or ``A`` (``boundary``).

Covered: GD and DGD (all three variants) without momentum in both semantics; GD with momentum
in ``boundary`` semantics (Titans' linear memory); power-of-two ``chunk``, ``d_in`` and
``d_out`` of at least 16 (the kernels' tile shapes). Not covered (the dispatcher keeps the chunked
JAX form for them): Newton-Schulz writes, stop-gradient writes, DGD with momentum, momentum
under ``exact`` semantics, MLP memories and other objectives.
"""

from __future__ import annotations

import dataclasses

from nlj.core.level import Level
from nlj.core.memories import MatrixMemory

__all__ = ["OpConfig", "unsupported_reason", "op_config"]

_TILE = (16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class OpConfig:
  """The static description of one matrix-memory op (everything but the arrays).

  Attributes:
    chunk: tokens per chunk ``C``.
    semantics: ``"exact"`` or ``"boundary"``.
    objective: ``"l2"`` or ``"dot"``.
    read: ``"after"``, ``"before"`` or ``"boundary"``.
    step: ``"gd"`` or ``"dgd"``.
    dgd_variant: ``"normalized"``, ``"plain"`` or ``"neurips"``.
    momentum: Titans momentum (GD, boundary semantics only).
    grad_at_retained: gradient at ``α S`` (Gated DeltaNet; exact semantics only).
  """

  chunk: int
  semantics: str = "exact"
  objective: str = "l2"
  read: str = "after"
  step: str = "gd"
  dgd_variant: str = "normalized"
  momentum: bool = False
  grad_at_retained: bool = False

  def __post_init__(self):
    if self.chunk not in _TILE[:-1]:
      raise ValueError(f"OpConfig.chunk must be one of {_TILE[:-1]}, got {self.chunk!r}")
    if self.momentum and (self.step != "gd" or self.semantics != "boundary"):
      raise ValueError("OpConfig.momentum needs step='gd' and semantics='boundary'")
    if self.grad_at_retained and self.semantics != "exact":
      raise ValueError("OpConfig.grad_at_retained needs semantics='exact'")
    if self.objective not in ("l2", "dot"):
      raise ValueError(f"OpConfig.objective must be 'l2' or 'dot', got {self.objective!r}")


def unsupported_reason(level: Level) -> str | None:
  """Why the op cannot run ``level`` (None when it can)."""
  memory, rule = level.memory, level.rule
  if not isinstance(memory, MatrixMemory):
    return f"memory is {type(memory).__name__}, not MatrixMemory"
  if level.objective.name not in ("l2", "dot"):
    return f"objective {level.objective.name!r} is not 'l2' or 'dot'"
  if rule.orthogonalize or rule.stop_grad_writes:
    return "Newton-Schulz and stop-gradient writes are not covered"
  if rule.momentum and (rule.step != "gd" or level.semantics != "boundary"):
    return "momentum is covered for GD under 'boundary' semantics only"
  for name, value in (("chunk", level.chunk), ("d_in", memory.d_in), ("d_out", memory.d_out)):
    allowed = _TILE[:-1] if name == "chunk" else _TILE
    if value not in allowed:
      return f"{name}={value} is not one of {allowed}"
  return None


def op_config(level: Level) -> OpConfig:
  """The op configuration of a covered ``level`` (raises ValueError naming why otherwise)."""
  reason = unsupported_reason(level)
  if reason is not None:
    raise ValueError(f"the matrix-memory kernel does not cover this level: {reason}")
  rule = level.rule
  return OpConfig(level.chunk, level.semantics, level.objective.name, level.read, rule.step,
                  rule.dgd_variant, rule.momentum, rule.grad_at_retained)
