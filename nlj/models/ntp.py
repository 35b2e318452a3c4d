"""The faithful CMS signal: in-context updates from the next-token loss of the chunk just seen.

Eq. 71 updates each CMS level once per chunk with the accumulated error of the chunk's tokens,
where the error is that of "the objective of the task", next-token prediction (PAPER.md §8 item
11a). :func:`forward_with_ntp_updates` runs a :class:`~nlj.models.DecoderLM` whose CMS levels use
``signal="ntp"`` chunk by chunk (``C = min(cms_chunks)`` tokens): for each chunk it

1. runs the model on the chunk with every CMS level frozen at its boundary state, with a zero
   probe added to each level's output;
2. takes ``δ = ∂L_chunk/∂probe`` -- the teach signal of every CMS level at every token, where
   ``L_chunk`` sums the next-token losses whose targets lie inside the chunk (causal: all of them
   are already in the prefix);
3. writes ``θ^(ℓ) <- θ^(ℓ) - η^(ℓ) Σ_t VJP_θ(MLP^(ℓ)(z_t), δ_t)`` into each level, which applies
   it at that level's own chunk boundary (:meth:`nlj.layers.cms.ContinuumMemory.write`).

Cost: one extra backward of the model per chunk, and the outer gradient differentiates through
it (second order). Chunks run in a ``lax.scan`` over rounds of chunks (a round spans the period
of the model's static cache positions, e.g. self-modifying Titans' ``C_memory``), with the NNX
model split into graph and state around the scan.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nlj.layers.cms import ContinuumMemory
from nlj.models.lm import Cache, DecoderLM
from nlj.models.periods import static_period

__all__ = ["forward_with_ntp_updates", "ntp_chunk"]


def _ntp_blocks(model: DecoderLM) -> list[int]:
  return [i for i, block in enumerate(model.blocks)
          if isinstance(block.mlp, ContinuumMemory) and block.mlp.config.signal == "ntp"]


def ntp_chunk(model: DecoderLM) -> int:
  """The driver's chunk: the smallest CMS chunk of the model's ``"ntp"`` levels."""
  blocks = _ntp_blocks(model)
  if not blocks:
    raise ValueError("forward_with_ntp_updates needs CMS levels with signal='ntp' "
                     "(ModelConfig.options cms_signal='ntp')")
  return min(min(model.blocks[i].mlp.config.chunks) for i in blocks)


def _round(model: DecoderLM, chunk: int) -> int:
  """Chunks per round: the static cache positions repeat after ``round * chunk`` tokens."""
  return math.lcm(chunk, static_period(model)) // chunk


def forward_with_ntp_updates(model: DecoderLM, tokens: jax.Array, cache: Cache | None = None
                             ) -> tuple[jax.Array, Cache]:
  """Logits of ``tokens [batch, seq]`` with CMS levels learning from each chunk's NTP loss.

  ``seq`` must be a multiple of ``round * chunk`` (:func:`ntp_chunk`; the round is 1 unless the
  model has self-modifying Titans or nested CMS, see the module docstring), and a given cache
  must sit at a round boundary.

  Returns:
    ``(logits [batch, seq, vocab], cache)``.
  """
  chunk = ntp_chunk(model)
  per_round = _round(model, chunk)
  span = chunk * per_round
  batch, seq = tokens.shape
  if seq % span:
    raise ValueError(f"forward_with_ntp_updates: seq={seq} must be a multiple of {span} "
                     f"(chunk {chunk} x {per_round} chunks per round)")
  if cache is None:
    cache = model.init_cache(batch, seq)
  blocks = _ntp_blocks(model)
  graphdef, state = nnx.split(model)

  def one_chunk(cache, toks):
    def loss(probes):
      m = nnx.merge(graphdef, state)
      c = list(cache)
      for i, p in zip(blocks, probes):
        c[i] = dict(c[i], mlp=dataclasses.replace(c[i]["mlp"], probes=p))
      logits, new_cache = m(toks, tuple(c))
      nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], toks[:, 1:])
      return jnp.sum(nll), (logits, new_cache)

    m = nnx.merge(graphdef, state)
    probes = tuple(tuple(jnp.zeros((batch, chunk, m.config.d_model), jnp.float32)
                         for _ in m.blocks[i].mlp.levels) for i in blocks)
    deltas, (logits, new_cache) = jax.grad(loss, has_aux=True)(probes)
    new_cache = list(new_cache)
    for i, d in zip(blocks, deltas):
      new_cache[i] = dict(new_cache[i], mlp=m.blocks[i].mlp.write(new_cache[i]["mlp"], d))
    return tuple(new_cache), logits

  def one_round(cache, toks_round):  # toks_round [per_round, batch, chunk]
    outs = []
    for r in range(per_round):
      cache, logits = one_chunk(cache, toks_round[r])
      outs.append(logits)
    return cache, jnp.stack(outs)

  rounds = tokens.reshape(batch, seq // span, per_round, chunk).transpose(1, 2, 0, 3)
  cache, logits = jax.lax.scan(one_round, cache, rounds)
  logits = logits.transpose(2, 0, 1, 3, 4).reshape(batch, seq, -1)
  return logits, cache
