"""DecoderLM over the recurrent families: one tiny hybrid LM stacks linear attention, DeltaNet
and Gated DeltaNet (one layer each), so every property below holds for each family in an LM.

Jitted functions are compiled once per shape and model structure and reused across tests, with
XLA's cheaper CPU optimisation level (compilation dominates CPU test time; results are compared
with tolerances).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlj.models import PRESETS, build_model, count_params, generate

FAMILIES = ("linear_attention", "deltanet", "gated_deltanet")
TINY = PRESETS[("gated_deltanet", "tiny")]
HYBRID = dataclasses.replace(TINY, layers=3, pattern=FAMILIES)  # chunk 8
B, T = 2, 22  # pieces of 11: not multiples of the chunk
TOL = dict(rtol=1e-5, atol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, cache):
  return nnx.merge(graphdef, state)(tokens, cache)


def _run(model, tokens, cache=None):
  """``model(tokens, cache)`` jitted; models of one structure share compilations."""
  graphdef, state = nnx.split(model)
  cache = model.init_cache(tokens.shape[0], T) if cache is None else cache
  return _forward(graphdef, state, tokens, cache)


@functools.cache
def _lm(config=HYBRID):
  """The model of ``config`` (seed 0) and its jitted ``f(tokens, cache=None)``."""
  model = build_model(config, nnx.Rngs(0))
  return model, functools.partial(_run, model)


def _tokens(seed=0, seq=T, vocab=HYBRID.vocab):
  return jax.random.randint(jax.random.key(seed), (B, seq), 0, vocab)


def _close(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, **(tol or TOL))


def test_hybrid_layers_follow_the_pattern():
  model, _ = _lm()
  assert [type(b.mixer).__name__ for b in model.blocks] == ["LinearAttention", "DeltaNet",
                                                            "GatedDeltaNet"]
  assert [b.family for b in model.blocks] == list(FAMILIES)


def test_causal_and_batch_independent():
  _, f = _lm()
  tokens, t0 = _tokens(), 9
  logits, _ = f(tokens)
  assert logits.shape == (B, T, HYBRID.vocab) and logits.dtype == jnp.float32
  changed = tokens.at[0, t0].set((tokens[0, t0] + 1) % HYBRID.vocab)
  logits2, _ = f(changed)
  np.testing.assert_allclose(logits2[0, :t0], logits[0, :t0], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(logits2[1], logits[1])
  assert float(jnp.min(jnp.max(jnp.abs(logits2[0, t0:] - logits[0, t0:]), axis=-1))) > 1e-5


def test_streaming_pieces_equal_one_call():
  _, f = _lm()
  tokens = _tokens(1)
  logits, cache = f(tokens)
  l1, c1 = f(tokens[:, :T // 2])
  l2, c2 = f(tokens[:, T // 2:], c1)
  _close(jnp.concatenate([l1, l2], axis=1), logits)
  _close(c2, cache)


def test_token_by_token_equals_teacher_forced():
  model, f = _lm()
  tokens = _tokens(2)
  logits, cache = f(tokens)
  fed, step_logits, step_cache = generate(model, tokens)
  np.testing.assert_array_equal(fed, tokens)
  _close(step_logits, logits)
  _close(step_cache, cache)


def test_greedy_generation_equals_teacher_forced():
  """Generated tokens are the argmax of the logits before them, and teacher forcing the whole
  generated sequence gives the same logits (one compilation with the test above)."""
  model, f = _lm()
  prompt = _tokens(3, 5)
  fed, logits, cache = generate(model, prompt, steps=T - 5)
  assert fed.shape == (B, T) and logits.shape == (B, T, HYBRID.vocab)
  np.testing.assert_array_equal(fed[:, :5], prompt)
  np.testing.assert_array_equal(jnp.argmax(logits[:, 4:-1], axis=-1), fed[:, 5:])
  forced, forced_cache = f(fed)
  _close(logits, forced)
  _close(cache, forced_cache)


def test_gradients_reach_every_parameter():
  model, _ = _lm()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = _tokens(4)

  def loss(params):
    logits, _ = nnx.merge(graphdef, params, rest)(tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  grads = jax.jit(jax.grad(loss))(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) == len(jax.tree.leaves(params))
  dead = [jax.tree_util.keystr(path) for path, g in flat
          if not bool(jnp.any(g != 0)) or not bool(jnp.all(jnp.isfinite(g)))]
  assert not dead, f"parameters with all-zero or non-finite gradients: {dead}"
  names = {jax.tree_util.keystr(path) for path, _ in flat}
  for name in ("A_log", "dt_bias", "beta_proj", "alpha_proj", "q_conv", "embed", "final_norm"):
    assert any(name in n for n in names), name


def test_reference_equals_chunked():
  _, f = _lm()
  _, f_ref = _lm(dataclasses.replace(HYBRID, impl="reference"))
  tokens = _tokens(5)
  (logits, cache), (logits_ref, cache_ref) = f(tokens), f_ref(tokens)
  _close(logits_ref, logits)
  _close(cache_ref, cache)


UNTIED = dataclasses.replace(TINY, layers=1, tie_embeddings=False)


def test_untied_head_and_bfloat16_compute():
  untied, tied = UNTIED, dataclasses.replace(UNTIED, tie_embeddings=True)
  assert count_params(untied) - count_params(tied) == untied.vocab * untied.d_model
  model, f32 = _lm(untied)
  assert model.lm_head.kernel.shape == (untied.d_model, untied.vocab)
  bf16 = dataclasses.replace(untied, dtype="bfloat16")
  model16, f16 = _lm(bf16)
  tokens = _tokens(6)
  logits, _ = f32(tokens)
  logits16, cache16 = f16(tokens)
  assert logits16.dtype == jnp.float32
  assert model16.embed(tokens).dtype == jnp.bfloat16
  err = jnp.abs(logits16 - logits) / jnp.std(logits)
  assert float(jnp.mean(err)) < 0.02 and float(jnp.max(err)) < 0.25
  # a cache keeps its dtypes through a call (required to carry it through lax.scan)
  fresh = model16.init_cache(B, T)
  assert jax.tree.map(lambda x: x.dtype, fresh) == jax.tree.map(lambda x: x.dtype, cache16)
  memory = cache16[0]["mixer"]["memory"].memory["w"]
  assert memory.dtype == jnp.float32


def test_tied_head_is_the_transposed_embedding():
  """Changing the embedding row of a token absent from the input changes only its logits."""
  model, f = _lm()
  assert model.lm_head is None
  tokens = 1 + _tokens(7, vocab=HYBRID.vocab - 1)  # token 0 never occurs
  logits, _ = f(tokens)
  changed = nnx.clone(model)
  changed.embed.embedding[...] = changed.embed.embedding[...].at[0].add(1.0)
  logits2, _ = _run(changed, tokens)  # same structure: same compilation
  np.testing.assert_allclose(logits2[..., 1:], logits[..., 1:], rtol=0, atol=1e-6)
  assert float(jnp.min(jnp.abs(logits2[..., 0] - logits[..., 0]))) > 1e-3


@pytest.mark.parametrize("fields, match", [
    (dict(heads=3), "ModelConfig.heads"),
    (dict(pattern=("deltanet", "deltanet", "deltanet")), "ModelConfig.pattern"),
    (dict(pattern=()), "ModelConfig.pattern"),
    (dict(dtype="int8"), "ModelConfig.dtype"),
    (dict(param_dtype="float16"), "ModelConfig.param_dtype"),
    (dict(impl="fast"), "ModelConfig.impl"),
    (dict(vocab=0), "ModelConfig.vocab"),
    (dict(chunk=-1), "ModelConfig.chunk"),
    (dict(cms_chunks=(16, 0)), "ModelConfig.cms_chunks"),
    (dict(mlp_hidden=0), "ModelConfig.mlp_hidden"),
    (dict(options=(("window", 4), ("window", 8))), "ModelConfig.options"),
    (dict(family=""), "ModelConfig.family"),
    (dict(scan_layers=1), "ModelConfig.scan_layers"),
    (dict(remat="block"), "ModelConfig.remat"),
])
def test_bad_config_fields_are_named(fields, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(TINY, **fields)


def test_unregistered_families_and_bad_inputs_are_named():
  with pytest.raises(ValueError, match="ModelConfig.family: 'no_such_family'"):
    build_model(dataclasses.replace(TINY, family="no_such_family"), nnx.Rngs(0))
  with pytest.raises(ValueError, match="ModelConfig.pattern: 'no_such_family'"):
    build_model(dataclasses.replace(TINY, pattern=("deltanet", "no_such_family")), nnx.Rngs(0))
  model, _ = _lm()
  with pytest.raises(ValueError, match="tokens must be an int array"):
    model(jnp.zeros((B, 3)))
  with pytest.raises(ValueError, match="cache has 1 entries"):
    model(_tokens(seq=3), model.init_cache(B, T)[:1])
  with pytest.raises(ValueError, match="ModelConfig"):
    build_model(object(), nnx.Rngs(0))


@pytest.mark.parametrize("family, options", [("transformer", (("window", 4),)),
                                             ("gated_deltanet", (("eta_scale", 0.1),)),
                                             ("titans_lmm", (("window", 4),)),
                                             ("hope_attention", (("momentum", False),))])
def test_options_no_family_reads_are_rejected(family, options):
  """An option that none of the pattern's families reads is an error, not silently ignored."""
  config = dataclasses.replace(PRESETS[(family, "tiny")], layers=1, options=options)
  with pytest.raises(ValueError, match=f"ModelConfig.options: unknown option.*{options[0][0]}"):
    build_model(config, nnx.Rngs(0))
