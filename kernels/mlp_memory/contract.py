"""What the residual-MLP-memory op computes, and which levels it covers.

The op runs a :class:`nlj.core.Level` whose memory is a :class:`nlj.core.MLPMemory`
``M(x) = res(x) + W_{L-1} σ(… σ(W_0 x))`` (eq. 89 for ``L = 2``; ``res`` is the identity, a skip
projection ``W_s x`` or nothing) trained on ``½ ||M(k) - v||²`` with ``boundary`` semantics:
every gradient of a chunk is taken at the anchor ``A`` (the state at the previous chunk boundary,
Hope eq. 90, Titans' mini-batch GD). Per token, per weight ``W`` with input ``a_t`` (``k_t`` for
the key-input weights ``W_0`` and ``W_s``, the anchor's hidden activations otherwise) and
back-propagated error ``δ_t`` (so ``∇_W ℓ_t = δ_t a_tᵀ``), the update is exactly
:func:`nlj.core.update.write_token`::

    u_t = -s_t δ_t                                            (the rank-1 write u_t a_tᵀ)
    S_t = β_t S_{t-1} + u_t a_tᵀ ;  D_t = S_t                (momentum; else D_t = u_t a_tᵀ)
    W_t = W_{t-1} (α_t I - c_t k_t k_tᵀ) + D_t                (DGD, key-input weights, eq. 88)
    W_t = α_t W_{t-1} + D_t                                   (GD, and the other weights)

with ``(c_t, s_t)`` from :meth:`nlj.core.Rule.coefficients` and padding tokens as no-ops
(:func:`nlj.core.update.masked_scalars`). Read-outs are ``y_t = M_t(q_t)`` (``after``),
``M_{t-1}(q_t)`` (``before``) or ``A(q_t)`` (``boundary``).

Covered: GD and DGD (all three variants), with or without momentum, any ``layers >= 1``, every
activation of :data:`nlj.core.ACTIVATIONS`, identity / skip / no residual, the three reads, any
``d_in``, ``d_out``, ``hidden`` up to 256 and ``chunk`` up to 128. The kernels work on tiles
whose sides are powers of two of at least 16 (Triton's ``dot``): the runner zero-pads every
dimension to such a size (``d_out = 1`` of self-modifying Titans' η/α memories becomes 16) and
each chunk with no-op tokens, both exact (``σ(0) = 0`` for every activation, so padded units stay
zero). The limits of 256 and 128 bound what one program holds (weights, momenta, ``C × C``
coefficient tiles) in registers and shared memory; they are a sizing choice, not a semantic one.
On an H100 the backward kernel (``jax.vjp`` of the chunk inside one program) exceeds the card's
shared memory well inside them: self-modifying Titans' memories at head dim 64, hidden 128 ask
for 263 KB (η, chunk 16) and 311 KB (main memory, chunk 64) of 227 KB with float32 operands
(BENCHMARKS.md, seventh and eleventh sessions). The products take JAX's default matmul precision
(or the launch's ``precision``); under ``jax.default_matmul_precision("BF16_BF16_F32")`` their
operands are bfloat16 (float32 accumulation and states), which halves that shared memory: those
memories then train on an H100 (twelfth session).

Not covered (the dispatcher keeps the chunked JAX form): other memories and objectives,
``exact`` semantics (the gradient point moves every token), Newton-Schulz and stop-gradient
writes.
"""

from __future__ import annotations

import dataclasses

from nlj.core.level import Level
from nlj.core.memories import ACTIVATIONS, MLPMemory

__all__ = ["OpConfig", "op_config", "unsupported_reason", "tile", "MAX_DIM", "MAX_CHUNK"]

MAX_DIM = 256
MAX_CHUNK = 128
RESIDUALS = ("identity", "skip", "none")


def tile(n: int) -> int:
  """The kernel tile side for a dimension of ``n``: the next power of two, at least 16."""
  return max(16, 1 << (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class OpConfig:
  """The static description of one MLP-memory op (everything but the arrays).

  Attributes:
    layers: weight matrices ``L >= 1`` of the MLP.
    activation: a key of :data:`nlj.core.ACTIVATIONS`.
    residual: ``"identity"``, ``"skip"`` (a key-input weight ``W_s [d_out, d_in]``) or ``"none"``.
    step: ``"gd"`` or ``"dgd"``.
    dgd_variant: ``"normalized"``, ``"plain"`` or ``"neurips"``.
    momentum: Titans momentum on every weight.
    read: ``"after"``, ``"before"`` or ``"boundary"``.
  """

  layers: int
  activation: str = "silu"
  residual: str = "identity"
  step: str = "dgd"
  dgd_variant: str = "plain"
  momentum: bool = True
  read: str = "after"

  def __post_init__(self):
    if self.layers < 1:
      raise ValueError(f"OpConfig.layers must be >= 1, got {self.layers!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"OpConfig.activation must be one of {sorted(ACTIVATIONS)}, "
                       f"got {self.activation!r}")
    if self.residual not in RESIDUALS:
      raise ValueError(f"OpConfig.residual must be one of {RESIDUALS}, got {self.residual!r}")

  @property
  def dgd(self) -> bool:
    """Whether the key-input weights get the DGD decay ``(α I - c k kᵀ)``."""
    return self.step == "dgd"

  @property
  def weights(self) -> int:
    """Weight matrices per state: the layers, plus the skip projection."""
    return self.layers + (self.residual == "skip")


def unsupported_reason(level: Level) -> str | None:
  """Why the op cannot run ``level`` (None when it can)."""
  memory, rule = level.memory, level.rule
  if not isinstance(memory, MLPMemory):
    return f"memory is {type(memory).__name__}, not MLPMemory"
  if level.objective.name != "l2":
    return f"objective {level.objective.name!r} is not 'l2'"
  if level.semantics != "boundary":
    return f"semantics {level.semantics!r} is not 'boundary' (gradients at the chunk's anchor)"
  if rule.orthogonalize or rule.stop_grad_writes:
    return "Newton-Schulz and stop-gradient writes are not covered"
  if level.chunk > MAX_CHUNK:
    return f"chunk={level.chunk} > {MAX_CHUNK}"
  dims = ("d_in", "d_out", "hidden") if memory.layers > 1 else ("d_in", "d_out")
  for name in dims:
    if getattr(memory, name) > MAX_DIM:
      return f"{name}={getattr(memory, name)} > {MAX_DIM}"
  return None


def op_config(level: Level) -> OpConfig:
  """The op configuration of a covered ``level`` (raises ValueError naming why otherwise)."""
  reason = unsupported_reason(level)
  if reason is not None:
    raise ValueError(f"the MLP-memory kernel does not cover this level: {reason}")
  memory, rule = level.memory, level.rule
  if not memory.residual:
    residual = "none"
  else:
    residual = "identity" if memory.d_in == memory.d_out else "skip"
  return OpConfig(memory.layers, memory.activation, residual, rule.step, rule.dgd_variant,
                  rule.momentum, level.read)
