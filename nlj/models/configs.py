"""Model configs and the presets of the paper's sizes.

:class:`ModelConfig` is data (a frozen dataclass validated on construction, errors naming the
field); :data:`PRESETS` maps ``(family, size)`` to a config for every family of the paper's
tables and the sizes of PAPER.md §7:

=======  =====  ======  =====  =====  =================================================
size     vocab  d       layers heads  source
=======  =====  ======  =====  =====  =================================================
tiny     257    32      2      2      CPU tests (byte tokenizer), chunks 8 / 4 / (4, 16)
small    32000  512     10     8      ~50M, a quick-experiment size
340m     32000  1024    24     16     Miras family table (PAPER.md §3.7, §7)
760m     32000  1536    24     16     Miras family table
1.3b     32000  2048    24     16     [A] 18-24 layers, d 2048, 16 heads (PAPER.md §7)
=======  =====  ======  =====  =====  =================================================

Embeddings are tied (PAPER.md §5.3 [A]) and the count of a preset is its full parameter count
(embeddings included, computed from the module by :func:`nlj.models.summary.count_params`);
every preset of a registered family lands within ±10% of its size's name
(``tests/models/test_presets.py``), adjusted per family in ``_OVERRIDES`` where needed.
Chunk sizes follow PAPER.md §5.4 [A]: ``C_memory = 64``, ``C_others = 16``, CMS chunks
(16, 256, 2048); Titans' neural memory uses chunk 16 (its paper's range is 16-64).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nlj.core.dispatch import IMPLS

__all__ = ["ModelConfig", "PRESETS", "PRESET_FAMILIES", "SIZES", "TARGET_PARAMS", "DTYPES",
           "PARAM_DTYPES"]

DTYPES = ("float32", "bfloat16", "float16", "float64")
PARAM_DTYPES = ("float32", "bfloat16", "float64")


def _positive_int(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder LM (:class:`nlj.models.DecoderLM`).

  Attributes:
    family: registered family of every layer (:func:`nlj.models.families`); with ``pattern``
      set, a label of the hybrid.
    size: preset size name, or ``"custom"``.
    vocab: vocabulary size.
    d_model: model width.
    layers: number of blocks.
    heads: heads of every mixer; must divide ``d_model``.
    pattern: families repeated over the layers (layer ``i`` is ``pattern[i % len(pattern)]``),
      e.g. ``("gated_deltanet", "transformer")``; None uses ``family`` everywhere. Its length
      must divide ``layers``.
    mlp_hidden: hidden width of the default SwiGLU MLP; None uses
      :func:`nlj.models.blocks.swiglu_hidden`.
    chunk: chunk size of the main memory (linear attention / DeltaNet / Gated DeltaNet chunked
      form; Titans' and self-modifying Titans' ``C_memory``).
    chunk_others: self-modifying Titans' chunk for its other memories (``C_others``).
    cms_chunks: CMS update periods in tokens, fastest level first.
    conv_width: width of the causal short convolutions on q/k/v.
    tie_embeddings: the LM head is the transposed embedding.
    dtype: compute dtype, one of :data:`DTYPES` (memory states stay float32; logits are float32,
      float64 under float64).
    param_dtype: parameter dtype, one of :data:`PARAM_DTYPES`.
    impl: memory implementation for every level (``nlj.core.IMPLS``).
    norm_eps: RMSNorm epsilon.
    scan_layers: run the blocks as one ``lax.scan`` over layers (compile time flat in depth;
      :class:`nlj.models.DecoderLM`); False unrolls them.
    remat: recompute each block's forward in the backward pass (``jax.checkpoint``) instead of
      storing its activations.
    options: family-specific knobs as ``(name, value)`` pairs, read by that family's factories
      (``dict(config.options)``); keeps the config hashable.
  """

  family: str
  size: str = "custom"
  vocab: int = 32000
  d_model: int = 1024
  layers: int = 24
  heads: int = 16
  pattern: tuple[str, ...] | None = None
  mlp_hidden: int | None = None
  chunk: int = 64
  chunk_others: int = 16
  cms_chunks: tuple[int, ...] = (16, 256, 2048)
  conv_width: int = 4
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  impl: str = "auto"
  norm_eps: float = 1e-6
  scan_layers: bool = True
  remat: bool = False
  options: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if not isinstance(self.family, str) or not self.family:
      raise ValueError(f"ModelConfig.family must be a non-empty str, got {self.family!r}")
    for name in ("vocab", "d_model", "layers", "heads", "chunk", "chunk_others", "conv_width"):
      _positive_int(name, getattr(self, name))
    if self.d_model % self.heads:
      raise ValueError(f"ModelConfig.heads={self.heads} must divide d_model={self.d_model}")
    if self.pattern is not None:
      if (not isinstance(self.pattern, tuple) or not self.pattern
          or not all(isinstance(p, str) and p for p in self.pattern)):
        raise ValueError(f"ModelConfig.pattern must be None or a non-empty tuple of family names, "
                         f"got {self.pattern!r}")
      if self.layers % len(self.pattern):
        raise ValueError(f"ModelConfig.pattern has {len(self.pattern)} entries, which must divide "
                         f"layers={self.layers}")
    if self.mlp_hidden is not None:
      _positive_int("mlp_hidden", self.mlp_hidden)
    if not isinstance(self.cms_chunks, tuple) or not self.cms_chunks:
      raise ValueError(f"ModelConfig.cms_chunks must be a non-empty tuple, got {self.cms_chunks!r}")
    for c in self.cms_chunks:
      _positive_int("cms_chunks entries", c)
    for name in ("tie_embeddings", "scan_layers", "remat"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"ModelConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.param_dtype not in PARAM_DTYPES:
      raise ValueError(f"ModelConfig.param_dtype must be one of {PARAM_DTYPES}, "
                       f"got {self.param_dtype!r}")
    if self.impl not in IMPLS:
      raise ValueError(f"ModelConfig.impl must be one of {IMPLS}, got {self.impl!r}")
    if not (isinstance(self.norm_eps, float) and self.norm_eps > 0):
      raise ValueError(f"ModelConfig.norm_eps must be a positive float, got {self.norm_eps!r}")
    names = [o[0] if isinstance(o, tuple) and len(o) == 2 else None for o in self.options]
    if (not isinstance(self.options, tuple) or not all(isinstance(n, str) for n in names)
        or len(set(names)) != len(names)):
      raise ValueError(f"ModelConfig.options must be a tuple of (name, value) pairs with unique "
                       f"str names, got {self.options!r}")


SIZES = ("tiny", "small", "340m", "760m", "1.3b")
TARGET_PARAMS = {"small": 50e6, "340m": 340e6, "760m": 760e6, "1.3b": 1.3e9}
PRESET_FAMILIES = ("hope", "hope_attention", "titans_lmm", "titans_mac", "titans_mag",
                   "titans_mal", "self_mod_titans", "transformer", "deltanet", "gated_deltanet",
                   "linear_attention")

_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab=257, d_model=32, layers=2, heads=2, chunk=8, chunk_others=4,
                 cms_chunks=(4, 16)),
    "small": dict(vocab=32000, d_model=512, layers=10, heads=8),
    "340m": dict(vocab=32000, d_model=1024, layers=24, heads=16),
    "760m": dict(vocab=32000, d_model=1536, layers=24, heads=16),
    "1.3b": dict(vocab=32000, d_model=2048, layers=24, heads=16),
}
_FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    family: dict(chunk=16) for family in ("titans_lmm", "titans_mac", "titans_mag", "titans_mal")
}
# (family, size) -> fields that bring a preset's count within ±10% of its size's name.
# Titans hybrids carry attention, a memory and an MLP per block: fewer layers keep each preset
# within ±10% of its name (PAPER.md §7 gives no Titans depths at these sizes).
_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    **{(f, "small"): {"layers": 7} for f in ("titans_mac", "titans_mag", "titans_mal")},
    **{(f, "340m"): {"layers": 16} for f in ("titans_mac", "titans_mag", "titans_mal")},
    **{(f, "760m"): {"layers": 16} for f in ("titans_mac", "titans_mag")},
    **{(f, "1.3b"): {"layers": 16} for f in ("titans_mac", "titans_mag")},
    ("titans_mal", "760m"): {"layers": 17},
    ("titans_mal", "1.3b"): {"layers": 17},
    **{("titans_lmm", size): {"layers": 22} for size in ("340m", "760m", "1.3b")},
}


def _preset(family: str, size: str) -> ModelConfig:
  fields = {**_FAMILY_FIELDS.get(family, {}), **_SHAPES[size], **_OVERRIDES.get((family, size), {})}
  return ModelConfig(family=family, size=size, **fields)


PRESETS: dict[tuple[str, str], ModelConfig] = {
    (family, size): _preset(family, size) for family in PRESET_FAMILIES for size in SIZES}
