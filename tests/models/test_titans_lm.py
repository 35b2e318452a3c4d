"""The attention families in the decoder LM: transformer and the four Titans variants stacked in
one tiny hybrid (one layer each): causality, per-sample states, streaming, token-by-token
generation and gradients to every parameter."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nlj.models import PRESETS, generate
from tests.models.helpers import assert_trees_close, cached_lm, dead_parameters, nll_gradients

FAMILIES = ("transformer", "titans_lmm", "titans_mac", "titans_mag", "titans_mal")
HYBRID = dataclasses.replace(PRESETS[("titans_mac", "tiny")], layers=5, pattern=FAMILIES,
                             options=(("segment", 8), ("window", 6), ("persistent", 2)))
B, T = 2, 22
TOL = dict(rtol=2e-5, atol=2e-5)


def _lm(config=HYBRID):
  return cached_lm(config, T)


def _tokens(seed=0, seq=T):
  return jax.random.randint(jax.random.key(seed), (B, seq), 0, HYBRID.vocab)


def _close(a, b):
  assert_trees_close(a, b, **TOL)


def test_layers_follow_the_pattern():
  model, _ = _lm()
  assert [type(b.mixer).__name__ for b in model.blocks] == [
      "Attention", "TitansLMM", "TitansMAC", "TitansMAG", "TitansMAL"]


def test_causal_and_batch_independent():
  _, f = _lm()
  tokens, t0 = _tokens(), 9
  logits, _ = f(tokens)
  changed = tokens.at[0, t0].set((tokens[0, t0] + 1) % HYBRID.vocab)
  logits2, _ = f(changed)
  np.testing.assert_allclose(logits2[0, :t0], logits[0, :t0], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(logits2[1], logits[1])
  assert float(jnp.max(jnp.abs(logits2[0, t0:] - logits[0, t0:]))) > 1e-5


def test_streaming_and_generation_equal_one_call():
  model, f = _lm()
  tokens = _tokens(1)
  logits, cache = f(tokens)
  l1, c = f(tokens[:, :11])
  l2, c = f(tokens[:, 11:16], c)
  l3, c = f(tokens[:, 16:], c)
  _close(jnp.concatenate([l1, l2, l3], axis=1), logits)
  _close(c, cache)
  fed, step_logits, step_cache = generate(model, tokens, max_len=T)
  np.testing.assert_array_equal(fed, tokens)
  _close(step_logits, logits)
  _close(step_cache, cache)


def test_gradients_reach_every_parameter():
  model, _ = _lm()
  flat = nll_gradients(model, _tokens(4))
  dead = dead_parameters(flat)
  assert not dead, f"parameters with all-zero or non-finite gradients: {dead}"
