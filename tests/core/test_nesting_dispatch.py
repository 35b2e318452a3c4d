"""Nested levels (outer = slowest scan) and the impl dispatcher."""

import jax
import jax.numpy as jnp
import pytest

from nlj.core import (L2, Kernel, Level, LevelInputs, MLPMemory, Rule, deltanet, register_kernel,
                      run_nested)
from nlj.core import dispatch
from tests.core.helpers import max_diff

B, T, H, D = 2, 12, 2, 3
SLOW = Level(MLPMemory(D, D, hidden=4), L2(), Rule("dgd", momentum=True), chunk=6, heads=H,
             eta=0.3)
FAST = deltanet(D, D, heads=H, chunk=2)


def _inner(slow_memory, fast_state, x):
  """Keys from the frozen slow memory; the slow level learns to map x to the fast read-out."""
  k = SLOW.apply(slow_memory, x)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  fast_state, y = FAST.run(fast_state, LevelInputs(k, x, q=k, eta=0.5 * jnp.ones(x.shape[:3])))
  return fast_state, y, LevelInputs(x, y)


def _manual(slow_params, fast_params, x):
  """The same system as an explicit Python loop over slow chunks."""
  slow_state, fast_state = SLOW.init_state(slow_params, B), FAST.init_state(fast_params, B)
  ys = []
  for c in range(T // SLOW.chunk):
    xc = x[:, c * SLOW.chunk:(c + 1) * SLOW.chunk]
    fast_state, y, slow_inputs = _inner(slow_state.memory, fast_state, xc)
    slow_state, _ = SLOW.run(slow_state, slow_inputs, impl="reference")
    ys.append(y)
  return (slow_state, fast_state), jnp.concatenate(ys, axis=1)


def _params():
  return (SLOW.init(jax.random.PRNGKey(1), jnp.float64),
          jax.tree.map(lambda w: w + 0.1, FAST.init(jax.random.PRNGKey(2), jnp.float64)))


def _x():
  return jax.random.normal(jax.random.PRNGKey(0), (B, T, H, D), jnp.float64)


def _nested(slow_params, fast_params, x, impl="chunked"):
  return run_nested(SLOW, SLOW.init_state(slow_params, B), _inner,
                    FAST.init_state(fast_params, B), x, impl=impl)


def test_nested_scan_equals_explicit_loop():
  with jax.enable_x64(True):
    slow_p, fast_p = _params()
    (slow_s, fast_s), y = _nested(slow_p, fast_p, _x())
    (slow_m, fast_m), y_m = _manual(slow_p, fast_p, _x())
    assert max_diff(y, y_m) < 1e-10
    assert max_diff(slow_s, slow_m) < 1e-10 and max_diff(fast_s, fast_m) < 1e-10
    # The slow level really moved, exactly once per slow chunk.
    assert max_diff(slow_s.memory, SLOW.init_state(slow_p, B).memory) > 1e-4


def test_slow_memory_is_frozen_within_its_chunk():
  """Changing the second half of a slow chunk leaves the keys of its first half unchanged."""
  with jax.enable_x64(True):
    slow_p, fast_p = _params()
    x = _x()
    _, y = _nested(slow_p, fast_p, x)
    _, y2 = _nested(slow_p, fast_p, x.at[:, 3:].add(1.0))
    assert max_diff(y[:, :3], y2[:, :3]) == 0.0


def test_outer_gradients_reach_every_initial_state():
  with jax.enable_x64(True):
    slow_p, fast_p = _params()
    loss = lambda s, f: jnp.mean(_nested(s, f, _x())[1] ** 2)
    g_slow, g_fast = jax.grad(loss, argnums=(0, 1))(slow_p, fast_p)
    for g in jax.tree.leaves((g_slow, g_fast)):
      assert float(jnp.max(jnp.abs(g))) > 0
    manual = lambda s, f: jnp.mean(_manual(s, f, _x())[1] ** 2)
    assert max_diff((g_slow, g_fast), jax.grad(manual, argnums=(0, 1))(slow_p, fast_p)) < 1e-9


def test_nested_streaming_in_outer_chunk_multiples():
  with jax.enable_x64(True):
    slow_p, fast_p = _params()
    x = _x()
    (slow_s, fast_s), y = _nested(slow_p, fast_p, x)
    (s1, f1), y1 = _nested(slow_p, fast_p, x[:, :6])
    (s2, f2), y2 = run_nested(SLOW, s1, _inner, f1, x[:, 6:])
    assert max_diff(jnp.concatenate([y1, y2], axis=1), y) < 1e-10
    assert max_diff((s2, f2), (slow_s, fast_s)) < 1e-10


def test_nested_rejects_partial_outer_chunks():
  with jax.enable_x64(True):
    slow_p, fast_p = _params()
    with pytest.raises(ValueError, match=r"seq % outer.chunk"):
      _nested(slow_p, fast_p, _x()[:, :7])


def test_dispatch_auto_and_pallas(monkeypatch):
  level = deltanet(2, 2)
  assert dispatch.resolve(level, "auto") is dispatch.run_chunked  # CPU, no kernel registered
  with pytest.raises(ValueError, match="no registered kernel covers"):
    dispatch.resolve(level, "pallas")
  monkeypatch.setattr(dispatch, "_KERNELS", [])
  opt_in = Kernel("opt-in", lambda lv: lv.semantics == "exact", dispatch.run_chunked, auto=False)
  register_kernel(opt_in)
  assert dispatch.resolve(level, "pallas") is dispatch.run_chunked
  fake = Kernel("test-kernel", lambda lv: lv.semantics == "exact", dispatch.run_reference)
  register_kernel(fake)
  assert dispatch.resolve(level, "pallas") is dispatch.run_chunked  # the first covering one
  assert dispatch.resolve(level, "auto") is dispatch.run_chunked  # kernels only on GPU/TPU
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
  assert dispatch.resolve(level, "auto") is dispatch.run_reference  # skips the opt-in kernel
  with pytest.raises(ValueError, match="already registered"):
    register_kernel(fake)
