"""Parameter counts of configs and the table of presets (``python -m nlj.models``).

Counts come from the modules themselves under :func:`flax.nnx.eval_shape`, so a 1.3B-parameter
model is counted without allocating it. Building every layer of every preset is slow (NNX
construction costs milliseconds per layer), so :func:`count_params` builds the model with one
period of its layer pattern and adds the blocks of the remaining periods: exact because a family's
parameter shapes do not depend on the layer index or count (the contract of
:mod:`nlj.models.registry`; ``tests/models/test_presets.py`` checks it against full builds at
the tiny size).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from nlj.models.configs import PRESET_FAMILIES, PRESETS, SIZES, ModelConfig
from nlj.models.lm import DecoderLM
from nlj.models.registry import families

__all__ = ["count_params", "preset_rows", "format_table"]

_COLUMNS = ("family", "size", "params", "layers", "d_model", "heads")


def _params(module: nnx.Module) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def count_params(config: ModelConfig) -> int:
  """Number of trainable parameters (``nnx.Param`` elements) of ``DecoderLM(config)``."""
  period = len(config.pattern or (config.family,))
  shell = dataclasses.replace(config, layers=period)
  model = nnx.eval_shape(lambda: DecoderLM(shell, nnx.Rngs(0)))
  blocks = sum(_params(block) for block in model.blocks)
  return _params(model) + (config.layers // period - 1) * blocks


def preset_rows(only_families: tuple[str, ...] = (), only_sizes: tuple[str, ...] = ()
                ) -> list[dict]:
  """One row per preset of every registered preset family, in preset order.

  Args:
    only_families: restrict to these families (all registered ones when empty).
    only_sizes: restrict to these sizes (all of :data:`SIZES` when empty).
  """
  for name, given, known in (("family", only_families, PRESET_FAMILIES),
                             ("size", only_sizes, SIZES)):
    unknown = [g for g in given if g not in known]
    if unknown:
      raise ValueError(f"unknown preset {name} {unknown}; known: {list(known)}")
  registered = families()
  rows = []
  for family in PRESET_FAMILIES:
    if family not in registered or (only_families and family not in only_families):
      continue
    for size in only_sizes or SIZES:
      cfg = PRESETS[(family, size)]
      rows.append(dict(family=family, size=size, params=count_params(cfg), layers=cfg.layers,
                       d_model=cfg.d_model, heads=cfg.heads))
  return rows


def format_table(rows: list[dict]) -> str:
  """A plain-text table of :func:`preset_rows` (parameters in millions, or thousands)."""
  count = lambda n: f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
  cells = [[count(r[c]) if c == "params" else str(r[c]) for c in _COLUMNS] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(_COLUMNS)]
  line = lambda row: "  ".join(v.rjust(w) if i >= 2 else v.ljust(w)
                               for i, (v, w) in enumerate(zip(row, widths)))
  return "\n".join([line(_COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in cells])
