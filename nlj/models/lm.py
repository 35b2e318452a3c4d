"""Decoder-only language model over the registered block families.

``tokens -> Embed -> Block × layers -> RMSNorm -> LM head -> logits``, with the blocks of
:mod:`nlj.models.blocks` (mixer and MLP from each layer's family). The model follows the
streaming contract of :mod:`nlj.layers`: ``init_cache(batch, max_len)`` gives a fresh sequence's
cache (one entry per block), and ``model(tokens, cache)`` continues it, so a sequence run in one
call equals the same sequence run in pieces (:func:`~nlj.models.decoding.generate` steps
token by token).

Embeddings are ``N(0, 0.02²)``; the head is the transposed embedding (``tie_embeddings``) or a
separate ``[d_model, vocab]`` matrix. Activations use ``config.dtype``; the head and the logits
are computed in float32 (float64 under float64) whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nlj.layers.common import RMSNorm, dense
from nlj.models.blocks import Block, check_families
from nlj.models.configs import ModelConfig

__all__ = ["DecoderLM", "build_model"]

Cache = tuple[Any, ...]


class DecoderLM(nnx.Module):
  """Decoder LM of ``config`` (:class:`nlj.models.ModelConfig`); see the module docstring."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    if not isinstance(config, ModelConfig):
      raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
    check_families(config)
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.logits_dtype = jnp.promote_types(dtype, jnp.float32)
    self.embed = nnx.Embed(config.vocab, config.d_model, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.blocks = nnx.List([Block(config, i, rngs) for i in range(config.layers)])
    self.final_norm = RMSNorm(config.d_model, config.norm_eps, param_dtype)
    self.lm_head = (None if config.tie_embeddings else
                    dense(config.d_model, config.vocab, rngs, self.logits_dtype, param_dtype))

  def init_cache(self, batch: int, max_len: int) -> Cache:
    """One cache per block for a fresh sequence of at most ``max_len`` tokens."""
    return tuple(block.init_cache(batch, max_len) for block in self.blocks)

  def __call__(self, tokens: jax.Array, cache: Cache | None = None) -> tuple[jax.Array, Cache]:
    """``tokens [batch, seq] int -> (logits [batch, seq, vocab] float32, cache)``.

    ``cache=None`` starts a fresh sequence; a cache from :meth:`init_cache` or an earlier call
    continues it.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an int array [batch, seq], got {tokens.dtype} "
                       f"{tokens.shape}")
    if cache is not None and len(cache) != len(self.blocks):
      raise ValueError(f"cache has {len(cache)} entries, the model has {len(self.blocks)} blocks")
    x = self.embed(tokens)
    caches = []
    for i, block in enumerate(self.blocks):
      x, c = block(x, None if cache is None else cache[i])
      caches.append(c)
    x = self.final_norm(x).astype(self.logits_dtype)
    if self.lm_head is None:
      logits = x @ self.embed.embedding[...].astype(self.logits_dtype).T
    else:
      logits = self.lm_head(x)
    return logits, tuple(caches)


def build_model(config: ModelConfig, rngs: nnx.Rngs) -> DecoderLM:
  """The :class:`DecoderLM` of ``config``; imports the layer modules that register families."""
  return DecoderLM(config, rngs)
