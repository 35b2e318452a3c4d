"""Continuum Memory System: frozen within chunks, updates exactly every C tokens, reductions to an
MLP, variants, streaming, initialisation from MLP weights, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlj.core import LevelInputs
from nlj.layers.cms import CMSConfig, ContinuumMemory
from tests.core.helpers import max_diff

B, D = 2, 6
CFG = CMSConfig(D, chunks=(2, 4), lrs=(0.05, 0.05), hidden_mult=2.0)


def _cms(**changes):
  return ContinuumMemory(dataclasses.replace(CFG, **changes), nnx.Rngs(0),
                         param_dtype=jnp.float64)


def _x(seed=0, seq=12):
  return jax.random.normal(jax.random.key(seed), (B, seq, D), jnp.float64)



def _mlp(params, x, residual):
  w_in, w_out = (w[0] for w in params["layers"])
  y = jax.nn.gelu(x @ w_in.T) @ w_out.T
  return y + x if residual else y


def test_level_parameters_change_exactly_every_chunk():
  with jax.enable_x64(True):
    m = _cms()
    x = _x()
    cache = m.init_cache(B)
    history = []
    for t in range(12):
      _, cache = m(x[:, t:t + 1], cache)
      history.append([lv.anchor for lv in cache.levels])
    for level, chunk in enumerate(CFG.chunks):
      for t in range(1, 12):
        changed = max_diff(history[t][level], history[t - 1][level]) > 0
        assert changed == ((t + 1) % chunk == 0), (level, t)


@pytest.mark.parametrize("changes", [{"lrs": (0.0, 0.0)}, {"chunks": (64, 128)}])
def test_zero_lr_or_infinite_chunk_is_a_plain_mlp_chain(changes):
  with jax.enable_x64(True):
    m = _cms(**changes)
    x = _x(1)
    y, _ = m(x)
    p0, p1 = (p.get_value() for p in m.init_params)
    z = _mlp(p0, x, residual=False)
    np.testing.assert_allclose(y, _mlp(p1, z, residual=True), rtol=1e-12, atol=1e-12)


def test_reads_use_the_state_frozen_at_the_chunk_boundary():
  """Tokens of one chunk see the same weights: perturbing token 1 leaves token 0's output and
  the level-1 output of every token before the next boundary untouched."""
  with jax.enable_x64(True):
    m = _cms(chunks=(4, 8), lrs=(0.5, 0.5))
    x = _x(2)
    y, _ = m(x)
    y2, _ = m(x.at[:, 1].add(1.0))
    assert max_diff(y[:, :1], y2[:, :1]) == 0.0
    assert max_diff(y[:, 2:4], y2[:, 2:4]) == 0.0  # same frozen weights, unchanged inputs
    assert max_diff(y[:, 4:], y2[:, 4:]) > 1e-6     # the next chunk learned from token 1


@pytest.mark.parametrize("variant", ["sequential", "nested", "independent"])
@pytest.mark.parametrize("lengths", [(3, 1, 5, 3), (2, 10)])
def test_streaming_pieces_equal_one_call(variant, lengths):
  with jax.enable_x64(True):
    m = _cms(variant=variant)
    x = _x(3)
    y, cache = m(x)
    ys, c, start = [], None, 0
    for n in lengths:
      out, c = m(x[:, start:start + n], c)
      ys.append(out)
      start += n
    assert max_diff(jnp.concatenate(ys, axis=1), y) < 1e-12
    assert max_diff(c.levels, cache.levels) < 1e-12


def test_nested_variant_restarts_the_faster_level():
  """Level 0 (chunk 2) restarts from its initial state when level 1's chunk (4) ends, so after
  6 tokens it holds exactly one update: the pairs of tokens 4-5, from its initial state."""
  with jax.enable_x64(True):
    m = _cms(variant="nested")
    x = _x(4, seq=6)
    _, cache = m(x)
    _, plain = _cms()(x)
    level = m.levels[0]
    fresh = level.init_state(m.init_params[0].get_value(), B)
    want, _ = level.run(fresh, LevelInputs(x[:, 3:5, None], x[:, 4:6, None]))
    assert max_diff(cache.levels[0].memory, want.memory) < 1e-12
    assert max_diff(cache.levels[0].memory, plain.levels[0].memory) > 1e-6


def test_independent_variant_aggregates_levels_with_softmax_weights():
  with jax.enable_x64(True):
    m = _cms(variant="independent", lrs=(0.0, 0.0))
    x = _x(5)
    y, _ = m(x)
    outs = [_mlp(p.get_value(), x, residual=False) for p in m.init_params]
    np.testing.assert_allclose(y, 0.5 * outs[0] + 0.5 * outs[1], rtol=1e-12, atol=1e-12)


def test_load_mlp_initialises_a_level():
  m = ContinuumMemory(dataclasses.replace(CFG, lrs=(0.0, 0.0)), nnx.Rngs(0))
  w_in = jnp.ones((12, D)) * 0.1
  w_out = jnp.ones((D, 12)) * 0.2
  m.load_mlp(0, w_in, w_out)
  np.testing.assert_array_equal(m.init_params[0].get_value()["layers"][0][0], w_in)
  with pytest.raises(ValueError, match="load_mlp"):
    m.load_mlp(1, w_out, w_in)


@pytest.mark.parametrize("changes, field", [
    ({"chunks": (3, 4), "lrs": (0.1, 0.1)}, "must nest"),
    ({"lrs": (0.1,)}, "CMSConfig.lrs"),
    ({"variant": "tree"}, "CMSConfig.variant"),
    ({"signal": "reward"}, "CMSConfig.signal"),
    ({"chunks": (), "lrs": ()}, "CMSConfig.chunks"),
    ({"lrs": (-1.0, 0.1)}, "CMSConfig.lrs"),
])
def test_bad_config_names_the_field(changes, field):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(CFG, **changes)
