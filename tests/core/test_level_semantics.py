"""Level semantics: streaming, causality, batch independence, gradients, dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nlj.core import (DotProduct, L2, Level, LevelInputs, MatrixMemory, MLPMemory, Rule, deltanet,
                      titans_memory)
from tests.core.helpers import max_diff, random_inputs, slice_inputs

IMPLS = ("reference", "chunked")
LEVELS = {
    "titans_mlp_dgd_momentum": Level(MLPMemory(4, 4, hidden=5), L2(), Rule("dgd", momentum=True),
                                     chunk=4, heads=2, read="before"),
    "deltanet_exact": deltanet(4, 3, heads=2, chunk=4),
    "matrix_boundary_read": Level(MatrixMemory(4, 3, init_scale=1.0), L2(),
                                  Rule("gd", momentum=True), chunk=3, heads=2, read="boundary"),
}


def _setup(level, batch=2, seq=13, seed=0):
  inputs = random_inputs(level, batch, seq, seed=seed)
  params = level.init(jax.random.PRNGKey(seed + 1), jnp.float64)
  return params, level.init_state(params, batch), inputs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(LEVELS))
@pytest.mark.parametrize("cuts", [(5, 9), (1, 2, 3, 12), (4, 8)])
def test_streaming_equals_one_call(name, impl, cuts):
  """Pieces of any lengths with the carried state == one call (partial chunks included)."""
  with jax.enable_x64(True):
    level = LEVELS[name]
    _, state, inputs = _setup(level)
    full_state, full_y = level.run(state, inputs, impl=impl)
    ys, bounds = [], (0,) + cuts + (13,)
    for start, stop in zip(bounds[:-1], bounds[1:]):
      state, y = level.run(state, slice_inputs(inputs, start, stop), impl=impl)
      ys.append(y)
    assert max_diff(jnp.concatenate(ys, axis=1), full_y) < 1e-10
    assert max_diff(state, full_state) < 1e-10


def test_streaming_can_switch_implementations():
  with jax.enable_x64(True):
    level = LEVELS["titans_mlp_dgd_momentum"]
    _, state, inputs = _setup(level)
    _, want = level.run(state, inputs, impl="reference")
    state, y1 = level.run(state, slice_inputs(inputs, 0, 6), impl="chunked")
    state, y2 = level.run(state, slice_inputs(inputs, 6, 13), impl="reference")
    assert max_diff(jnp.concatenate([y1, y2], axis=1), want) < 1e-10


def test_step_is_one_chunk_of_run():
  with jax.enable_x64(True):
    level = LEVELS["titans_mlp_dgd_momentum"]
    _, state, inputs = _setup(level, seq=12)
    want_state, want = level.run(state, inputs)
    ys = []
    for c in range(3):
      state, y = level.step(state, slice_inputs(inputs, 4 * c, 4 * c + 4))
      ys.append(y)
    assert max_diff(jnp.concatenate(ys, axis=1), want) < 1e-10
    assert max_diff(state, want_state) < 1e-10


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(LEVELS))
def test_causality(name, impl):
  with jax.enable_x64(True):
    level = LEVELS[name]
    _, state, inputs = _setup(level)
    _, y = level.run(state, inputs, impl=impl)
    t = 6
    bumped = jax.tree.map(lambda x: x.at[:, t + 1:].add(0.7), inputs)
    _, y2 = level.run(state, bumped, impl=impl)
    assert max_diff(y[:, :t + 1], y2[:, :t + 1]) == 0.0
    assert max_diff(y[:, t + 1:], y2[:, t + 1:]) > 1e-3  # the perturbation is seen later


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(LEVELS))
def test_batch_independence(name, impl):
  with jax.enable_x64(True):
    level = LEVELS[name]
    _, state, inputs = _setup(level, batch=3)
    _, y = level.run(state, inputs, impl=impl)
    bumped = jax.tree.map(lambda x: x.at[1].multiply(0.5), inputs)
    _, y2 = level.run(state, bumped, impl=impl)
    assert max_diff(y[0], y2[0]) == 0.0 and max_diff(y[2], y2[2]) == 0.0
    assert max_diff(y[1], y2[1]) > 1e-3


@pytest.mark.parametrize("name", sorted(LEVELS))
def test_check_grads_through_multi_chunk_inner_loop(name):
  """Numerical vs autodiff gradients w.r.t. the meta-learned initial state and the context."""
  with jax.enable_x64(True):
    level = LEVELS[name]
    params, _, inputs = _setup(level, batch=1, seq=9)

    def f(params, k, v, eta):
      state = level.init_state(params, 1)
      _, y = level.run(state, inputs._replace(k=k, v=v, eta=eta), impl="chunked")
      return y

    check_grads(f, (params, inputs.k, inputs.v, inputs.eta), order=1, modes=("rev",),
                atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LEVELS))
def test_chunked_gradients_equal_reference_gradients(name):
  with jax.enable_x64(True):
    level = LEVELS[name]
    params, _, inputs = _setup(level, seq=11)

    def loss(params, inputs, impl):
      state, y = level.run(level.init_state(params, 2), inputs, impl=impl)
      return jnp.sum(jnp.sin(y)) + sum(jnp.sum(x**2) for x in jax.tree.leaves(state.memory))

    g_ref = jax.grad(loss, argnums=(0, 1))(params, inputs, "reference")
    g_chk = jax.grad(loss, argnums=(0, 1))(params, inputs, "chunked")
    assert max_diff(g_ref, g_chk) < 1e-8
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(g_ref[0]))


@pytest.mark.parametrize("impl", IMPLS)
def test_stop_grad_writes_blocks_gradient_through_writes(impl):
  with jax.enable_x64(True):
    make = lambda stop: Level(MatrixMemory(3, 2), L2(), Rule("gd", stop_grad_writes=stop),
                              chunk=2, heads=1)
    for stop, expect_zero in ((False, False), (True, True)):
      level = make(stop)
      params, state, inputs = _setup(level, batch=1, seq=6)
      grad_v = jax.grad(lambda v: jnp.sum(level.run(state, inputs._replace(v=v), impl=impl)[1]))(
          inputs.v)
      assert (float(jnp.max(jnp.abs(grad_v))) == 0.0) == expect_zero


def test_states_float32_for_bf16_inputs_and_jit():
  level = titans_memory(8, hidden=8, heads=2, chunk=4)
  params = level.init(jax.random.PRNGKey(0), jnp.bfloat16)
  state = level.init_state(params, 2)
  inputs = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                        random_inputs(level, 2, 8, dtype=jnp.float32))
  new_state, y = jax.jit(level.run)(state, inputs)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state.memory))
  assert y.dtype == jnp.float32 and y.shape == (2, 8, 2, 8)


def test_read_modes_by_hand():
  """after = M_t q_t, before = M_{t-1} q_t, boundary = anchor q_t (linear attention, η = 1)."""
  with jax.enable_x64(True):
    k = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])[None, :, None]
    v = jnp.array([[1.0], [2.0], [3.0]])[None, :, None]
    q = jnp.ones((1, 3, 1, 2))
    want = {"after": [1.0, 3.0, 9.0], "before": [0.0, 1.0, 3.0], "boundary": [0.0, 0.0, 3.0]}
    for read, expected in want.items():
      level = Level(MatrixMemory(2, 1), DotProduct(), Rule("gd"), chunk=2, heads=1, read=read)
      state = level.init_state(level.init(jax.random.PRNGKey(0), jnp.float64), 1)
      for impl in IMPLS:
        _, y = level.run(state, LevelInputs(k, v, q), impl=impl)
        np.testing.assert_allclose(y[0, :, 0, 0], expected, err_msg=f"{read} {impl}")


@pytest.mark.parametrize("make, match", [
    (lambda: Level(MatrixMemory(2, 2), chunk=0), "Level.chunk"),
    (lambda: Level(MatrixMemory(2, 2), chunk=2.5), "Level.chunk"),
    (lambda: Level(MatrixMemory(2, 2), semantics="online"), "Level.semantics"),
    (lambda: Level(MatrixMemory(2, 2), read="sometimes"), "Level.read"),
    (lambda: Level(MatrixMemory(2, 2), heads=0), "Level.heads"),
    (lambda: Level(MatrixMemory(2, 2), objective="l2"), "Level.objective"),
    (lambda: Rule("adam"), "Rule.step"),
    (lambda: Rule("dgd", dgd_variant="v3"), "Rule.dgd_variant"),
    (lambda: Level(MatrixMemory(2, 2), rule=Rule(grad_at_retained=True)), "grad_at_retained"),
])
def test_bad_configs_name_the_field(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bad_inputs_name_the_field():
  level = deltanet(4, 3, heads=2, chunk=4)
  state = level.init_state(level.init(jax.random.PRNGKey(0)), 2)
  good = random_inputs(level, 2, 8, dtype=jnp.float32)
  cases = [
      (good._replace(k=good.k[..., :3]), "memory.d_in"),
      (good._replace(k=good.k[0]), r"inputs\.k must be \[batch, seq, heads, d_in\]"),
      (good._replace(v=good.v[..., :2]), r"inputs\.v"),
      (good._replace(q=good.q[:, :5]), r"inputs\.q"),
      (good._replace(eta=good.eta[..., 0]), r"inputs\.eta"),
      (jax.tree.map(lambda x: x[:1], good), "batch"),
      (jax.tree.map(lambda x: x[:, :, :1], good), "heads"),
  ]
  for bad, match in cases:
    with pytest.raises(ValueError, match=match):
      level.run(state, bad)
  with pytest.raises(ValueError, match="impl must be one of"):
    level.run(state, good, impl="cuda")
  with pytest.raises(ValueError, match="Level.step takes one chunk"):
    level.step(state, slice_inputs(good, 0, 3))
  with pytest.raises(ValueError, match="seq % Level.chunk"):
    level.run(state, slice_inputs(good, 0, 6), aligned=True)
  moved, _ = level.run(state, slice_inputs(good, 0, 3))
  with pytest.raises(ValueError, match="chunk boundary"):
    level.run(moved, slice_inputs(good, 3, 7), aligned=True)
  with pytest.raises(ValueError, match="batch must be a positive int"):
    level.init_state(level.init(jax.random.PRNGKey(0)), 0)
