"""Deep optimizers as optax transformations (Nested Learning §4, §7.2, App. B–C).

Each optimizer is an associative memory over the gradient stream (Behrouz et al., 2025,
arXiv:2512.24695). One transform family per module:

* :mod:`~nlj.optim.momentum` -- generalized momentum: dot-product (standard) and L2 "delta"
  momentum, preconditioned values ``P``, feature maps φ, non-linear outputs σ (eqs. 33–53).
* :mod:`~nlj.optim.dmgd` -- Deep Momentum GD: the momentum is an MLP memory (eq. 50).
* :mod:`~nlj.optim.newton_schulz`, :mod:`~nlj.optim.muon` -- Muon (eqs. 42–44, 52).
* :mod:`~nlj.optim.m3` -- M3, Multi-scale Momentum Muon (§7.2, Algorithm 1).
* :mod:`~nlj.optim.dgd` -- Delta Gradient Descent as an outer optimizer (eq. 57).
* :mod:`~nlj.optim.adam_memory` -- Adam / AdaGrad as optimal associative memories (eqs. 100–111).

All are ``optax.GradientTransformation`` s (``dgd`` takes extra args): they compose with
``optax.chain``, ``optax.partition``, ``optax.MultiSteps`` and learning-rate schedules, jit, and
keep parameter-shaped states.
"""

from nlj.optim.adam_memory import (MemoryPreconditionerState, adagrad_memory, adam_memory,
                                   scale_by_memory_preconditioner)
from nlj.optim.dgd import DGDState, dgd, dgd_step
from nlj.optim.dmgd import DMGDState, dmgd, scale_by_dmgd
from nlj.optim.m3 import M3State, m3, scale_by_m3
from nlj.optim.momentum import (GeneralizedMomentumState, delta_momentum, generalized_momentum,
                                scale_by_generalized_momentum)
from nlj.optim.muon import MuonState, matrix_labels, muon, scale_by_muon
from nlj.optim.newton_schulz import NS_COEFFS, newton_schulz

__all__ = [
    "DGDState", "DMGDState", "GeneralizedMomentumState", "M3State", "MemoryPreconditionerState",
    "MuonState", "NS_COEFFS", "adagrad_memory", "adam_memory", "delta_momentum", "dgd",
    "dgd_step", "dmgd", "generalized_momentum", "m3", "matrix_labels", "muon", "newton_schulz",
    "scale_by_dmgd", "scale_by_generalized_momentum", "scale_by_m3",
    "scale_by_memory_preconditioner", "scale_by_muon",
]
