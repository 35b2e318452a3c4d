"""The family registry, the block's streaming MLP slot and the default MLP width rule."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlj.models import PRESETS, build_model, families, register_family, swiglu_hidden
from nlj.models import registry
from nlj.models.blocks import layer_families

TINY = PRESETS[("deltanet", "tiny")]


class _CumMixer(nnx.Module):
  """A causal toy mixer ``y_t = W Σ_{i<=t} x_i`` whose cache is the running sum."""

  def __init__(self, config, layer, rngs):
    self.w = nnx.Linear(config.d_model, config.d_model, use_bias=False, rngs=rngs)
    self.layer = layer

  def init_cache(self, batch, max_len):
    return jnp.zeros((batch, self.w.in_features))

  def __call__(self, x, cache=None):
    cache = self.init_cache(x.shape[0], 0) if cache is None else cache
    s = cache[:, None] + jnp.cumsum(x, axis=1)
    return self.w(s), s[:, -1]


class _CountingMLP(nnx.Module):
  """A streaming MLP: adds the number of tokens seen so far (its cache) to every feature."""

  def __init__(self, config, layer, rngs):
    self.scale = nnx.Param(jnp.ones((config.d_model,)))

  def init_cache(self, batch, max_len):
    return jnp.zeros((batch,), jnp.int32)

  def __call__(self, x, cache=None):
    cache = self.init_cache(x.shape[0], 0) if cache is None else cache
    pos = cache[:, None] + jnp.arange(1, x.shape[1] + 1)
    return x * self.scale[...] + pos[..., None].astype(x.dtype), cache + x.shape[1]


@pytest.fixture
def clean_registry(monkeypatch):
  """Registrations made in a test are undone afterwards."""
  families()  # load the real families first
  monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))


def test_recurrent_families_are_registered():
  assert {"linear_attention", "deltanet", "gated_deltanet"} <= set(families())


def test_registered_family_with_streaming_mlp(clean_registry):
  register_family("toy_cum", _CumMixer, _CountingMLP)
  config = dataclasses.replace(TINY, family="toy", pattern=("toy_cum", "toy_cum"), layers=4,
                               scan_layers=False)  # _CumMixer keeps its layer: not scannable
  with pytest.raises(ValueError, match="ModelConfig.scan_layers=True .* block 2 differs"):
    build_model(dataclasses.replace(config, scan_layers=True), nnx.Rngs(0))
  model = build_model(config, nnx.Rngs(0))
  assert [b.mixer.layer for b in model.blocks] == [0, 1, 2, 3]
  assert all(b.streaming_mlp for b in model.blocks)
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda state, tokens, cache: nnx.merge(graphdef, state)(tokens, cache))
  f = functools.partial(f, state)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, config.vocab)
  logits, cache = f(tokens, model.init_cache(2, 9))
  l1, c1 = f(tokens[:, :4], model.init_cache(2, 9))
  l2, c2 = f(tokens[:, 4:], c1)
  np.testing.assert_allclose(jnp.concatenate([l1, l2], axis=1), logits, rtol=1e-5, atol=1e-5)
  assert [int(c["mlp"][0]) for c in c2] == [9] * 4
  assert cache[0]["mlp"].dtype == jnp.int32


def test_default_mlp_blocks_carry_no_mlp_cache():
  model = nnx.eval_shape(lambda: build_model(TINY, nnx.Rngs(0)))
  cache = model.init_cache(1, 8)
  assert all(c["mlp"] is None for c in cache)
  assert model.blocks[0].mlp.gate.out_features == swiglu_hidden(TINY.d_model)


def test_register_family_rejects_conflicts_and_bad_factories(clean_registry):
  register_family("toy_cum", _CumMixer)
  register_family("toy_cum", _CumMixer)  # the same factories again: a no-op
  with pytest.raises(ValueError, match="already registered"):
    register_family("toy_cum", _CumMixer, _CountingMLP)
  with pytest.raises(ValueError, match="make_mixer must be callable"):
    register_family("toy_bad", "not callable")
  with pytest.raises(ValueError, match="name must be a non-empty str"):
    register_family("", _CumMixer)


def test_load_families_skips_absent_modules_but_not_broken_ones(tmp_path, monkeypatch,
                                                               clean_registry):
  (tmp_path / "nlj_broken_family.py").write_text("raise RuntimeError('broken family module')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setattr(registry, "FAMILY_MODULES", ("nlj.layers.no_such_module",))
  assert "deltanet" in families()
  monkeypatch.setattr(registry, "FAMILY_MODULES", ("nlj_broken_family",))
  with pytest.raises(RuntimeError, match="broken family module"):
    families()


def test_swiglu_hidden_rule_and_layer_pattern():
  assert [swiglu_hidden(d) for d in (32, 64, 512, 1024, 1536, 2048)] == [
      64, 192, 1344, 2752, 4096, 5440]
  config = dataclasses.replace(TINY, layers=4, pattern=("deltanet", "gated_deltanet"))
  assert layer_families(config) == ("deltanet", "gated_deltanet") * 2
  assert layer_families(TINY) == ("deltanet", "deltanet")
