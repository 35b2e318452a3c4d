"""Optimizer experiments (Nested Learning §4, §7.2, §9.7): ``optim/...`` in the registry.

* ``optim/delta_momentum_toy`` -- eq. 53 / Fig. 4: momentum vs delta momentum on a 2-D toy.
* ``optim/orthogonal_tasks``   -- eq. 45: momentum's memory on regression tasks in orthogonal
  subspaces.
* ``optim/compare_digits``     -- AdamW vs Muon vs M3 vs DMGD training a small ViT on
  scikit-learn's 8x8 digits; loss curves and step times.

Each module registers itself on import and has no other import-time side effect; plotting and
scikit-learn are imported inside ``run`` (install them with the ``experiments`` extra).
"""
