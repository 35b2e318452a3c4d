"""The attention families in the decoder LM: transformer and the four Titans variants stacked in
one tiny hybrid (one layer each): causality, per-sample states, streaming, token-by-token
generation and gradients to every parameter."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nlj.models import PRESETS, build_model, generate
from tests.models.helpers import FAST_COMPILE

FAMILIES = ("transformer", "titans_lmm", "titans_mac", "titans_mag", "titans_mal")
HYBRID = dataclasses.replace(PRESETS[("titans_mac", "tiny")], layers=5, pattern=FAMILIES,
                             options=(("segment", 8), ("window", 6), ("persistent", 2)))
B, T = 2, 22
TOL = dict(rtol=2e-5, atol=2e-5)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward(graphdef, state, tokens, cache):
  return nnx.merge(graphdef, state)(tokens, cache)


@functools.cache
def _lm():
  model = build_model(HYBRID, nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def f(tokens, cache=None):
    cache = model.init_cache(tokens.shape[0], T) if cache is None else cache
    return _forward(graphdef, state, tokens, cache)

  return model, f


def _tokens(seed=0, seq=T):
  return jax.random.randint(jax.random.key(seed), (B, seq), 0, HYBRID.vocab)


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, **TOL)


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
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = _tokens(4)

  def loss(params):
    logits, _ = nnx.merge(graphdef, params, rest)(tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  grads = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  dead = [jax.tree_util.keystr(p) for p, g in flat
          if not bool(jnp.any(g != 0)) or not bool(jnp.all(jnp.isfinite(g)))]
  assert not dead, f"parameters with all-zero or non-finite gradients: {dead}"
