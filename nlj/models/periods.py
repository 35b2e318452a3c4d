"""The period of a model's static cache positions.

Some mixers keep their position inside a chunk as static cache metadata (self-modifying Titans'
``phase`` within ``chunk_memory``, a nested CMS's ``pos`` within its reset cycle), so the cache's
tree structure repeats only every :func:`static_period` tokens. Drivers that carry the cache
through ``lax.scan`` (token-by-token decoding, the NTP-signal CMS driver) scan over whole
periods.
"""

from __future__ import annotations

import math

from nlj.layers.cms import ContinuumMemory
from nlj.layers.selfmod import SelfModifyingTitans
from nlj.models.lm import DecoderLM

__all__ = ["static_period"]


def static_period(model: DecoderLM) -> int:
  """Tokens after which every static cache position returns to its value (1: none)."""
  period = 1
  for block in model.blocks:
    for part in (block.mixer, block.mlp):
      if isinstance(part, SelfModifyingTitans):
        period = math.lcm(period, part.config.chunk_memory)
      elif isinstance(part, ContinuumMemory):
        period = math.lcm(period, part.config.reset_cycle)
  return period
