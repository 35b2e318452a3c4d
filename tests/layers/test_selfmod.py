"""Self-modifying Titans: chunked (nested scan) == token-by-token eq. 90 reference, streaming,
causality, per-sample states, gradients to every meta-learned initial state, switches."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from nlj.layers.selfmod import SelfModConfig, SelfModifyingTitans
from tests.core.helpers import max_diff
from tests.layers.helpers import zero_grad_paths

B, T, D = 2, 13, 8
CFG = SelfModConfig(d_model=D, heads=2, chunk_memory=4, chunk_other=2, impl="chunked",
                    eta_scale=0.3)


def _module(**changes):
  return SelfModifyingTitans(dataclasses.replace(CFG, **changes), nnx.Rngs(0),
                             param_dtype=jnp.float64)


def _x(seed=0, batch=B, seq=T):
  return jax.random.normal(jax.random.key(seed), (batch, seq, D), jnp.float64)


@pytest.mark.parametrize("changes", [
    {}, {"memory_read": "before"}, {"memory_read": "after", "adaptive_q": True},
    {"adaptive_k": False, "weight_decay": False}, {"dgd": False, "momentum": False},
    {"projection_checkpoint": "sub_chunk", "stop_grad_targets": True},
], ids=["default", "before", "after_adaptive_q", "static_k_no_decay", "gd_no_momentum",
        "sub_chunk_checkpoint_stop_grad_targets"])
def test_chunked_equals_token_reference(changes):
  with jax.enable_x64(True):
    m = _module(**changes)
    y, cache = m(_x())
    y_ref, cache_ref = m(_x(), reference=True)
    assert max_diff(y, y_ref) < 1e-10 and max_diff(cache, cache_ref) < 1e-10
    assert cache.phase == T % CFG.chunk_memory
    moved = max_diff(cache.levels, m.init_cache(B).levels)
    assert moved > 1e-3  # the memories learned in context


def _param_grads(m, x, cotangent, reference):
  """Gradients of ``sum(y * cotangent)`` w.r.t. every ``nnx.Param`` of ``m``."""
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  def loss(params):
    y, _ = nnx.merge(graphdef, params, rest)(x, reference=reference)
    return jnp.sum(y * cotangent)

  return jax.grad(loss)(params)


@pytest.mark.parametrize("changes", [{}, {"memory_read": "after", "momentum": False},
                                     {"projection_checkpoint": "sub_chunk"}],
                         ids=["default", "after_no_momentum", "sub_chunk_checkpoint"])
def test_chunked_gradients_equal_token_reference(changes):
  """Every parameter gradient of the chunked path equals the reference's in float64 (the
  projections, convs included, compute in the parameters' precision, not a float32 cast whose
  rounding would depend on how each path groups tokens)."""
  with jax.enable_x64(True):
    m = _module(**changes)
    x, cotangent = _x(5, seq=9), _x(6, seq=9)
    grads = _param_grads(m, x, cotangent, reference=False)
    ref = _param_grads(m, x, cotangent, reference=True)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    for (path, g), g_ref in zip(flat, jax.tree.leaves(ref)):
      scale = float(jnp.max(jnp.abs(g_ref)))
      assert scale > 0 and max_diff(g, g_ref) <= 1e-9 * scale, jax.tree_util.keystr(path)


@pytest.mark.parametrize("lengths", [(3, 1, 7, 2), (5, 8), (1,) * 13])
def test_streaming_pieces_equal_one_call(lengths):
  with jax.enable_x64(True):
    m = _module(memory_read="before")
    x = _x(1)
    y, cache = m(x)
    ys, c, start = [], None, 0
    for n in lengths:
      out, c = m(x[:, start:start + n], c)
      ys.append(out)
      start += n
    assert max_diff(jnp.concatenate(ys, axis=1), y) < 1e-10 and max_diff(c, cache) < 1e-10


def test_causal_and_per_sample():
  with jax.enable_x64(True):
    m = _module(memory_read="after")
    x = _x(2, batch=3)
    y, _ = m(x)
    t = 6
    y2, _ = m(x.at[1, t + 1:].add(1.0))
    assert max_diff(y2[1, :t + 1], y[1, :t + 1]) == 0.0
    assert max_diff(y2[0], y[0]) == 0.0 and max_diff(y2[2], y[2]) == 0.0
    assert max_diff(y2[1, t + 1:], y[1, t + 1:]) > 1e-6


def test_outputs_use_memories_only_through_boundary_states():
  """Default eq. 90 reading: within the first memory chunk the output ignores in-context
  learning; after it, the learned memories change the output."""
  with jax.enable_x64(True):
    learn, frozen = _module(), _module(eta_scale=1e-12)
    y, _ = learn(_x(3))
    y0, _ = frozen(_x(3))
    assert max_diff(y[:, :CFG.chunk_memory], y0[:, :CFG.chunk_memory]) < 1e-9
    assert max_diff(y[:, CFG.chunk_memory:], y0[:, CFG.chunk_memory:]) > 1e-6


@pytest.mark.parametrize("read", ["boundary", "before"])
def test_gradients_reach_every_meta_learned_initial_state(read):
  m = SelfModifyingTitans(dataclasses.replace(CFG, memory_read=read, adaptive_q=True),
                          nnx.Rngs(0))
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(4), (B, 12, D))

  def loss(params):
    y, _ = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(jnp.sin(y))

  grads = jax.grad(loss)(params)
  assert zero_grad_paths(grads) == []
  for name in ("k", "v", "q", "eta", "alpha", "memory"):
    assert name in m.init_params


def test_table6_switches_change_what_learns():
  with jax.enable_x64(True):
    m = _module(adaptive_k=False, adaptive_v=False, weight_decay=False)
    assert set(m.init_cache(1).levels) == {"eta", "memory"}
    m = _module(dgd=False, momentum=False)
    rule = m.levels["memory"].rule
    assert rule.step == "gd" and not rule.momentum
    assert _module().levels["memory"].rule.step == "dgd"


@pytest.mark.parametrize("changes, field", [
    ({"heads": 3}, "heads"), ({"chunk_other": 3}, "chunk_other"),
    ({"memory_read": "late"}, "memory_read"), ({"eta_scale": 0.0}, "eta_scale"),
    ({"chunk_memory": 0}, "chunk_memory"),
    ({"projection_checkpoint": "token"}, "projection_checkpoint"),
])
def test_bad_config_names_the_field(changes, field):
  with pytest.raises(ValueError, match=f"SelfModConfig.{field}"):
    dataclasses.replace(CFG, **changes)
