"""Token-by-token stepping with a carried cache: teacher forcing and greedy generation.

:func:`generate` feeds a :class:`DecoderLM` one token per model call -- the given tokens, then
its own greedy predictions -- inside one jitted ``lax.scan`` (the model is split into graph
definition and state and merged in the scan body), so every step sees exactly the cache the
previous step returned. With ``steps=0`` it is the streaming form of ``model(tokens)``.
Compilations are shared by calls of equal total length, whatever the split between given and
generated tokens. Models whose caches hold static positions (:func:`static_period` > 1) step in a
Python loop of jitted single-token calls instead (one compilation per position in the period).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nlj.models.lm import Cache, DecoderLM
from nlj.models.periods import static_period

__all__ = ["generate"]


def _step(graphdef, state, given, carry, xs):
  """One token: the given one while ``i < given``, else the argmax of the previous logits."""
  cache, prev = carry
  i, tok = xs
  tok = jnp.where(i < given, tok, jnp.argmax(prev, axis=-1).astype(tok.dtype))
  logits, cache = nnx.merge(graphdef, state)(tok[:, None], cache)
  return (cache, logits[:, 0]), (tok, logits[:, 0])


@functools.partial(jax.jit, static_argnums=0)
def _generate(graphdef, state, tokens, given, cache, logits0):
  """Feed ``tokens [batch, n]``: the first ``given`` as they are, then argmax predictions."""
  step = functools.partial(_step, graphdef, state, given)
  xs = (jnp.arange(tokens.shape[1]), tokens.T)
  (cache, _), (fed, logits) = jax.lax.scan(step, (cache, logits0), xs)
  return fed.T, jnp.swapaxes(logits, 0, 1), cache


_jit_step = jax.jit(_step, static_argnums=0)


def _generate_loop(graphdef, state, tokens, given, cache, logits0):
  """As :func:`_generate`, one jitted token at a time (caches with static positions)."""
  carry, fed, logits = (cache, logits0), [], []
  for i in range(tokens.shape[1]):
    carry, (tok, out) = _jit_step(graphdef, state, given, carry, (jnp.asarray(i), tokens[:, i]))
    fed.append(tok)
    logits.append(out)
  return jnp.stack(fed, axis=1), jnp.stack(logits, axis=1), carry[0]


def generate(model: DecoderLM, tokens: jax.Array, steps: int = 0, cache: Cache | None = None,
             max_len: int | None = None) -> tuple[jax.Array, jax.Array, Cache]:
  """Feed ``tokens`` one at a time, then ``steps`` greedy tokens, carrying the cache.

  Args:
    model: the LM.
    tokens: ``[batch, seq]`` int, ``seq >= 1``: the prompt (or the whole teacher-forced text).
    steps: number of greedy tokens fed after ``tokens``.
    cache: a cache to continue, or None for a fresh sequence.
    max_len: capacity of a fresh cache (default ``seq + steps``).

  Returns:
    ``(fed [batch, seq + steps], logits [batch, seq + steps, vocab], cache)``: the fed tokens
    (``tokens`` followed by ``fed[:, i] = argmax(logits[:, i - 1])``), the logits after each fed
    token, and the cache after the last one. With ``steps=0``, ``logits`` equals
    ``model(tokens, cache)[0]``.
  """
  if tokens.ndim != 2 or tokens.shape[1] < 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be an int array [batch, seq >= 1], got {tokens.dtype} "
                     f"{tokens.shape}")
  if not isinstance(steps, int) or steps < 0:
    raise ValueError(f"steps must be a non-negative int, got {steps!r}")
  batch, seq = tokens.shape
  if cache is None:
    cache = model.init_cache(batch, max_len or seq + steps)
  padded = jnp.concatenate([tokens, jnp.zeros((batch, steps), tokens.dtype)], axis=1)
  logits0 = jnp.zeros((batch, model.config.vocab), model.logits_dtype)
  graphdef, state = nnx.split(model)
  run = _generate if static_period(model) == 1 else _generate_loop
  return run(graphdef, state, padded, jnp.asarray(seq), cache, logits0)
