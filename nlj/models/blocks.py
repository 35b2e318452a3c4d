"""The pre-norm residual block of every decoder LM family.

``h = x + mixer(RMSNorm(x))``, ``y = h + mlp(RMSNorm(h))`` (Llama-style macro-architecture of
Titans/Miras/Hope, PAPER.md §5.3, §8 item 16). The mixer and the MLP come from the block's
family in the registry (:mod:`nlj.models.registry`); the default MLP is SwiGLU with hidden width
:func:`swiglu_hidden`. The block follows the streaming contract of :mod:`nlj.layers`; its cache
is ``{"mixer": ..., "mlp": ...}`` (``"mlp"`` is None for a stateless MLP).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nlj.layers.common import RMSNorm, SwiGLU
from nlj.models.configs import PRESET_FAMILIES, ModelConfig
from nlj.models.registry import check_options, families, get_family

__all__ = ["Block", "default_mlp", "swiglu_hidden", "layer_families", "check_families"]


def swiglu_hidden(d_model: int) -> int:
  """``8/3 · d_model`` rounded to the nearest multiple of 64 (at least 64).

  A SwiGLU of this width has ``≈ 8 d_model²`` parameters, like a ``4 d_model`` two-layer MLP;
  the multiple of 64 keeps matmuls tile-aligned (Llama rounds up to 256 instead).
  """
  return max(64, 64 * round(8 * d_model / (3 * 64)))


def default_mlp(config: ModelConfig, layer: int, rngs: nnx.Rngs) -> SwiGLU:
  """SwiGLU of width ``config.mlp_hidden`` or :func:`swiglu_hidden`."""
  hidden = config.mlp_hidden or swiglu_hidden(config.d_model)
  return SwiGLU(config.d_model, hidden, rngs, jnp.dtype(config.dtype),
                jnp.dtype(config.param_dtype))


def layer_families(config: ModelConfig) -> tuple[str, ...]:
  """The family of each layer: ``pattern`` repeated, or ``family`` everywhere."""
  pattern = config.pattern or (config.family,)
  return pattern * (config.layers // len(pattern))


def check_families(config: ModelConfig) -> None:
  """Raise, naming the field, if a layer's family is not registered."""
  registered = families()
  field = "pattern" if config.pattern else "family"
  for name in config.pattern or (config.family,):
    if name not in registered:
      hint = (" (a preset family whose module is not implemented yet)"
              if name in PRESET_FAMILIES else "")
      raise ValueError(f"ModelConfig.{field}: {name!r} is not a registered family{hint}; "
                       f"registered: {list(registered)}")


class Block(nnx.Module):
  """``x + mixer(norm(x))``, then ``+ mlp(norm(·))``, for layer ``layer`` of ``config``."""

  def __init__(self, config: ModelConfig, layer: int, rngs: nnx.Rngs):
    check_options(config.options, layer_families(config))
    family = get_family(layer_families(config)[layer])
    param_dtype = jnp.dtype(config.param_dtype)
    self.family = family.name
    self.mixer_norm = RMSNorm(config.d_model, config.norm_eps, param_dtype)
    self.mixer = family.make_mixer(config, layer, rngs)
    self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, param_dtype)
    self.mlp = (family.make_mlp or default_mlp)(config, layer, rngs)
    self.streaming_mlp = hasattr(self.mlp, "init_cache")

  def init_cache(self, batch: int, max_len: int) -> dict[str, Any]:
    """``{"mixer": mixer cache, "mlp": mlp cache or None}`` of a fresh sequence."""
    mlp = self.mlp.init_cache(batch, max_len) if self.streaming_mlp else None
    return {"mixer": self.mixer.init_cache(batch, max_len), "mlp": mlp}

  def __call__(self, x: jax.Array, cache: dict[str, Any] | None = None
               ) -> tuple[jax.Array, dict[str, Any]]:
    """``x [batch, seq, d_model] -> (y [batch, seq, d_model], cache)``."""
    cache = cache or {"mixer": None, "mlp": None}
    h, mixer_cache = self.mixer(self.mixer_norm(x), cache["mixer"])
    x = x + h.astype(x.dtype)
    if self.streaming_mlp:
      h, mlp_cache = self.mlp(self.mlp_norm(x), cache["mlp"])
    else:
      h, mlp_cache = self.mlp(self.mlp_norm(x)), None
    return x + h.astype(x.dtype), {"mixer": mixer_cache, "mlp": mlp_cache}
