"""nlj: Nested Learning in JAX.

Every part of a model and its optimizer is an associative memory trained by its own gradient
steps on its own context, at its own frequency (Behrouz et al., 2025, arXiv:2512.24695).

Subpackages:
  nlj.core   memories, objectives, inner rules, levels and their nesting.
  nlj.optim  deep optimizers as optax transformations.
  nlj.data   corpora, tokenizers and synthetic tasks.
"""

__version__ = "0.1.0"
