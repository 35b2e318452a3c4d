"""The Hope families in the decoder LM: hope, hope_attention and self_mod_titans stacked in one
tiny hybrid (one layer each), plus CMS reductions and the NTP-signal CMS driver."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlj.models import PRESETS, ModelConfig, build_model, generate
from nlj.models.ntp import forward_with_ntp_updates
from tests.models.helpers import (assert_trees_close, cached_lm, dead_parameters,
                                  nll_gradients)

FAMILIES = ("hope", "hope_attention", "self_mod_titans")
TINY = PRESETS[("hope", "tiny")]  # chunk 8, chunk_others 4, cms (4, 16)
HYBRID = dataclasses.replace(TINY, layers=3, pattern=FAMILIES,
                             options=(("cms_lr", 0.01), ("memory_read", "before")))
B, T = 2, 22
TOL = dict(rtol=2e-5, atol=2e-5)


def _lm(config=HYBRID):
  return cached_lm(config, T)


def _tokens(seed=0, seq=T, vocab=HYBRID.vocab):
  return jax.random.randint(jax.random.key(seed), (B, seq), 0, vocab)


def _close(a, b):
  assert_trees_close(a, b, **TOL)


def test_layers_follow_the_pattern():
  model, _ = _lm()
  assert [type(b.mixer).__name__ for b in model.blocks] == [
      "SelfModifyingTitans", "Attention", "SelfModifyingTitans"]
  assert [type(b.mlp).__name__ for b in model.blocks] == ["ContinuumMemory", "ContinuumMemory",
                                                         "SwiGLU"]


def test_causal_and_batch_independent():
  _, f = _lm()
  tokens, t0 = _tokens(), 9
  logits, _ = f(tokens)
  changed = tokens.at[0, t0].set((tokens[0, t0] + 1) % HYBRID.vocab)
  logits2, _ = f(changed)
  np.testing.assert_allclose(logits2[0, :t0], logits[0, :t0], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(logits2[1], logits[1])
  assert float(jnp.max(jnp.abs(logits2[0, t0:] - logits[0, t0:]))) > 1e-5


def test_streaming_pieces_equal_one_call():
  """11 + 5 + 6 tokens: not multiples of any chunk (8, 4, CMS 4 and 16)."""
  _, f = _lm()
  tokens = _tokens(1)
  logits, cache = f(tokens)
  l1, c = f(tokens[:, :11])
  l2, c = f(tokens[:, 11:16], c)
  l3, c = f(tokens[:, 16:], c)
  _close(jnp.concatenate([l1, l2, l3], axis=1), logits)
  _close(c, cache)


def test_token_by_token_equals_teacher_forced():
  model, f = _lm()
  tokens = _tokens(2, seq=12)
  logits, cache = f(tokens)
  fed, step_logits, step_cache = generate(model, tokens, max_len=T)
  np.testing.assert_array_equal(fed, tokens)
  _close(step_logits, logits)
  _close(step_cache, cache)


def test_gradients_reach_every_parameter():
  model, _ = _lm()
  flat = nll_gradients(model, _tokens(4))
  dead = dead_parameters(flat)
  assert not dead, f"parameters with all-zero or non-finite gradients: {dead}"
  names = " ".join(p for p, _ in flat)
  for memory in ("'k'", "'v'", "'eta'", "'alpha'", "'memory'"):
    assert memory in names  # every meta-learned initial state of self-modifying Titans
  assert "init_params" in names and "mlp" in names  # CMS levels' initial states


def test_hope_attention_with_frozen_cms_is_attention_plus_mlp():
  config = ModelConfig("hope_attention", vocab=64, d_model=16, layers=1, heads=2,
                       cms_chunks=(4,), options=(("cms_lr", 0.0), ("cms_hidden_mult", 4.0)))
  model = build_model(config, nnx.Rngs(1))
  tokens = _tokens(5, seq=10, vocab=64)
  logits, _ = model(tokens)
  block = model.blocks[0]
  x = model.embed(tokens)
  h = x + block.mixer(block.mixer_norm(x))[0]
  w_in, w_out = (w[0] for w in block.mlp.init_params[0].get_value()["layers"])
  y = h + jax.nn.gelu(block.mlp_norm(h) @ w_in.T) @ w_out.T
  want = model.final_norm(y) @ model.embed.embedding[...].T
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_no_cms_option_builds_swiglu_and_unknown_options_are_named():
  config = dataclasses.replace(TINY, layers=1, options=(("cms", False),))
  assert type(build_model(config, nnx.Rngs(0)).blocks[0].mlp).__name__ == "SwiGLU"
  with pytest.raises(ValueError, match="unknown option"):
    build_model(dataclasses.replace(TINY, options=(("cms_speed", 2),)), nnx.Rngs(0))


NTP = ModelConfig("hope", vocab=64, d_model=16, layers=2, heads=2, chunk=8, chunk_others=4,
                  cms_chunks=(4, 8), options=(("cms_signal", "ntp"), ("cms_lr", 0.1)))


def test_ntp_driver_updates_cms_from_the_chunk_loss():
  model = build_model(NTP, nnx.Rngs(0))
  tokens = _tokens(6, seq=16, vocab=64)
  plain, _ = model(tokens)
  run = jax.jit(lambda t: forward_with_ntp_updates(model, t))
  logits, cache = run(tokens)
  _close(logits[:, :4], plain[:, :4])                        # first chunk: frozen initial levels
  assert float(jnp.max(jnp.abs(logits[:, 4:] - plain[:, 4:]))) > 1e-4
  level0 = cache[0]["mlp"].levels[0]
  init0 = model.blocks[0].mlp.init_params[0].get_value()
  assert float(jnp.max(jnp.abs(level0.memory["layers"][0] - init0["layers"][0][None]))) > 0
  # Causal: changing token 9 leaves logits <= 9 unchanged, even through the in-context updates.
  logits2, _ = run(tokens.at[:, 9].set((tokens[:, 9] + 1) % 64))
  np.testing.assert_allclose(logits2[:, :9], logits[:, :9], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_ntp_driver_with_zero_lr_is_the_plain_model_and_is_differentiable():
  frozen = dataclasses.replace(NTP, options=(("cms_signal", "ntp"), ("cms_lr", 0.0)))
  model = build_model(frozen, nnx.Rngs(0))
  tokens = _tokens(7, seq=16, vocab=64)
  _close(forward_with_ntp_updates(model, tokens)[0], model(tokens)[0])
  model = build_model(NTP, nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits, _ = forward_with_ntp_updates(nnx.merge(graphdef, params, rest), tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  grads = jax.jit(jax.grad(loss))(params)
  cms_grads = [g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]
               if "init_params" in jax.tree_util.keystr(p) and "mlp" in jax.tree_util.keystr(p)]
  assert cms_grads and all(bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0))
                           for g in cms_grads)
  with pytest.raises(ValueError, match="multiple of"):
    forward_with_ntp_updates(model, tokens[:, :12])
