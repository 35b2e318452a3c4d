"""Known sequence models written as compositions of the core pieces.

Each factory returns a :class:`nlj.core.Level`; a layer feeds it projected, per-head
``LevelInputs`` (keys, values, queries and per-token η, α, β).

==================  ==========  =========  ===============================  ==========
model               memory      objective  rule                             semantics
==================  ==========  =========  ===============================  ==========
linear attention    matrix      dot        GD, η = 1                        any chunk
DeltaNet            matrix      l2         GD, η = β_t                      exact
Gated DeltaNet      matrix      l2         GD at the retained state, α_t    exact
Titans (LMM)        res. MLP    l2         GD + momentum + retention        boundary
DGD matrix memory   matrix      l2         DGD (eq. 57 / 93)                boundary
==================  ==========  =========  ===============================  ==========

Linear attention's dot objective has a gradient ``-v kᵀ`` that does not depend on the state, so
every chunk size gives the chunk-1 recurrence ``M_t = M_{t-1} + v_t k_tᵀ`` (eq. 15); a larger
chunk is only a faster computation. Titans writes retention as ``(1 - α_t) M``; here ``α`` is the
kept fraction, i.e. Titans' ``1 - α_t``.
"""

from __future__ import annotations

from nlj.core.level import Level
from nlj.core.memories import MatrixMemory, MLPMemory
from nlj.core.objectives import DotProduct, L2
from nlj.core.rules import Rule

__all__ = ["linear_attention", "deltanet", "gated_deltanet", "titans_memory", "dgd_memory"]


def linear_attention(d_k: int, d_v: int, heads: int = 1, chunk: int = 64) -> Level:
  """``M_t = M_{t-1} + v_t k_tᵀ``, ``y_t = M_t q_t`` (eqs. 14-18)."""
  return Level(MatrixMemory(d_k, d_v), DotProduct(), Rule("gd"), chunk, "exact", "after", heads)


def deltanet(d_k: int, d_v: int, heads: int = 1, chunk: int = 64) -> Level:
  """``M_t = M_{t-1} - β_t (M_{t-1} k_t - v_t) k_tᵀ`` (§2.8); pass ``β_t`` as ``eta``."""
  return Level(MatrixMemory(d_k, d_v), L2(), Rule("gd"), chunk, "exact", "after", heads)


def gated_deltanet(d_k: int, d_v: int, heads: int = 1, chunk: int = 64) -> Level:
  """``M_t = α_t M_{t-1} (I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ`` (Yang et al. 2025); ``β`` as ``eta``."""
  return Level(MatrixMemory(d_k, d_v), L2(), Rule("gd", grad_at_retained=True), chunk, "exact",
               "after", heads)


def titans_memory(d: int, hidden: int, heads: int = 1, chunk: int = 16, layers: int = 2,
                  read: str = "after") -> Level:
  """Titans' neural memory: ``S_t = β_t S_{t-1} - η_t ∇ℓ``, ``M_t = α_t M_{t-1} + S_t`` with
  ``ℓ = ½||M(k) - v||²`` on a residual MLP, gradients at the chunk boundary (Titans eqs. 9-14)."""
  memory = MLPMemory(d, d, hidden, layers=layers, activation="silu")
  return Level(memory, L2(), Rule("gd", momentum=True), chunk, "boundary", read, heads)


def dgd_memory(d_k: int, d_v: int, heads: int = 1, chunk: int = 16, variant: str = "normalized",
               read: str = "after") -> Level:
  """Delta gradient descent on a matrix memory with an L2 objective (eqs. 57, 93)."""
  return Level(MatrixMemory(d_k, d_v), L2(), Rule("dgd", dgd_variant=variant), chunk, "boundary",
               read, heads)
