"""Decoder-only language model over the registered block families.

``tokens -> Embed -> Block × layers -> RMSNorm -> LM head -> logits``, with the blocks of
:mod:`nlj.models.blocks` (mixer and MLP from each layer's family). The model follows the
streaming contract of :mod:`nlj.layers`: ``init_cache(batch, max_len)`` gives a fresh sequence's
cache (one entry per block), and ``model(tokens, cache)`` continues it, so a sequence run in one
call equals the same sequence run in pieces (:func:`~nlj.models.decoding.generate` steps
token by token).

With ``config.scan_layers`` (the default) the blocks run as one ``jax.lax.scan`` over the
layers (over the periods of ``config.pattern``, one step applying each block of a period), so the
compiled program holds one block whatever the depth: compile time stays flat in ``layers``. The
blocks of one pattern position are also initialised by one ``jax.vmap`` over their keys (so
initialising under ``jax.jit`` compiles one block too; see :mod:`nlj.models.registry`). The
parameters keep their per-block layout (``blocks/<i>/...``, what sharding rules, checkpoints and
parameter counts see); each call stacks them along a new leading layer axis for the scan (one
transient copy of the block parameters) and stacks / unstacks the per-block caches the same
way. ``config.remat`` wraps each scan step (or each block, unscanned) in ``jax.checkpoint``: the
backward pass recomputes a block's forward from its input instead of storing its activations.

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
    self.period = len(config.pattern or (config.family,))
    self.blocks = nnx.List(_vmapped_blocks(config, self.period, rngs) if config.scan_layers
                           else [Block(config, i, rngs) for i in range(config.layers)])
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
    run = self._scanned if self.config.scan_layers else self._unrolled
    x, caches = run(x, cache)
    x = self.final_norm(x).astype(self.logits_dtype)
    if self.lm_head is None:
      logits = x @ self.embed.embedding[...].astype(self.logits_dtype).T
    else:
      logits = self.lm_head(x)
    return logits, caches

  def _unrolled(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
    """The blocks one after the other in Python (one copy of each block in the program)."""
    caches = []
    for i, block in enumerate(self.blocks):
      block_cache = None if cache is None else cache[i]
      if self.config.remat:
        x, c = jax.checkpoint(_apply_block)(*nnx.split(block), x, block_cache)
      else:
        x, c = block(x, block_cache)
      caches.append(c)
    return x, tuple(caches)

  def _scanned(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
    """The blocks as a ``lax.scan`` over the ``layers / period`` repeats of the layer pattern.

    ``x [batch, seq, d_model]``; ``cache`` None or one entry per block. Slot ``j`` of the period
    stacks blocks ``j, j + period, ...`` (parameters and caches, leading axis ``layers / period``).
    """
    period, blocks = self.period, list(self.blocks)
    graphdefs = [nnx.graphdef(blocks[j]) for j in range(period)]
    stack = lambda trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
    states = [stack([nnx.state(b) for b in blocks[j::period]]) for j in range(period)]
    caches = None if cache is None else [stack(cache[j::period]) for j in range(period)]

    def one_period(x, slot):
      states, caches = slot
      out = []
      for j in range(period):
        x, c = _apply_block(graphdefs[j], states[j], x, None if caches is None else caches[j])
        out.append(c)
      return x, out

    body = jax.checkpoint(one_period, prevent_cse=False) if self.config.remat else one_period
    x, stacked = jax.lax.scan(body, x, (states, caches))
    unstack = lambda tree, i: jax.tree.map(lambda leaf: leaf[i], tree)
    return x, tuple(unstack(stacked[layer % period], layer // period)
                    for layer in range(len(blocks)))


def _apply_block(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array,
                 cache: Any) -> tuple[jax.Array, Any]:
  """Block ``nnx.merge(graphdef, state)`` on ``x [batch, seq, d_model]`` (pure, for transforms)."""
  return nnx.merge(graphdef, state)(x, cache)


def _vmapped_blocks(config: ModelConfig, period: int, rngs: nnx.Rngs) -> list[Block]:
  """The blocks at each position ``j`` of the period built by one ``jax.vmap`` over their keys.

  One block's initialisation is traced per position (with ``layer=j``), so initialising under
  ``jax.jit`` compiles in time independent of depth, and every block of a position has the
  structure :meth:`DecoderLM._scanned` needs. A family whose module structure depends on
  ``layer`` raises here (it needs ``scan_layers=False``).
  """
  repeats = config.layers // period
  shape = lambda layer: nnx.graphdef(nnx.eval_shape(lambda: Block(config, layer, nnx.Rngs(0))))
  slots = []
  for j in range(period):
    graphdef = shape(j)
    for layer in range(j + period, config.layers, period):
      if shape(layer) != graphdef:
        raise ValueError(f"ModelConfig.scan_layers=True needs every block at position {j} of the "
                         f"layer pattern to share one structure, but block {layer} differs from "
                         f"block {j} (its family builds a layer-dependent module); set "
                         f"scan_layers=False")
    keys = jax.random.split(rngs.params(), repeats)
    states = jax.vmap(lambda key: nnx.state(Block(config, j, nnx.Rngs(key))))(keys)
    slots.append([nnx.merge(graphdef, jax.tree.map(lambda x: x[i], states))
                  for i in range(repeats)])
  return [slots[layer % period][layer // period] for layer in range(config.layers)]


def build_model(config: ModelConfig, rngs: nnx.Rngs) -> DecoderLM:
  """The :class:`DecoderLM` of ``config``; imports the layer modules that register families."""
  return DecoderLM(config, rngs)
