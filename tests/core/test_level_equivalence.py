"""Chunked form == token-by-token reference, over rules, memories, objectives and random shapes."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nlj.core import (DotProduct, Huber, L2, Level, Lp, MatrixMemory, MLPMemory, Rule)
from nlj.core import chunked
from nlj.core.chunked import uses_ut
from tests.core.helpers import max_diff, random_inputs

RULES = {
    "gd": Rule("gd"),
    "gd_momentum": Rule("gd", momentum=True),
    "dgd": Rule("dgd"),
    "dgd_plain_momentum": Rule("dgd", momentum=True, dgd_variant="plain"),
    "dgd_neurips": Rule("dgd", dgd_variant="neurips"),
    "gd_momentum_ns": Rule("gd", momentum=True, orthogonalize=True),
    "dgd_ns": Rule("dgd", orthogonalize=True),
    "gd_stop_grad": Rule("gd", stop_grad_writes=True),
}
OBJECTIVES = [DotProduct(), L2(), Lp(3.0), Huber(0.5)]


def _memory(rng, d_in, d_out):
  kind = rng.integers(3)
  if kind == 0:
    return MatrixMemory(d_in, d_out, init_scale=1.0)
  if kind == 1:
    return MLPMemory(d_in, d_in, hidden=int(rng.integers(2, 6)), layers=2, activation="silu")
  return MLPMemory(d_in, d_out, hidden=int(rng.integers(2, 6)), layers=int(rng.integers(1, 4)),
                   activation="tanh")


def _assert_equivalent(level, batch, seq, seed):
  with jax.enable_x64(True):
    inputs = random_inputs(level, batch, seq, seed=seed)
    params = level.init(jax.random.PRNGKey(seed + 100), jnp.float64)
    state = level.init_state(params, batch)
    s_ref, y_ref = level.run(state, inputs, impl="reference")
    s_chk, y_chk = level.run(state, inputs, impl="chunked")
    assert bool(jnp.all(jnp.isfinite(y_ref))), level
    scale = 1.0 + float(jnp.max(jnp.abs(y_ref)))
    assert max_diff(y_ref, y_chk) < 1e-9 * scale, level
    assert max_diff(s_ref, s_chk) < 1e-9 * (1.0 + max(float(jnp.max(jnp.abs(x)))
                                                       for x in jax.tree.leaves(s_ref))), level
    assert int(s_chk.phase) == seq % level.chunk


@pytest.mark.parametrize("semantics", ["boundary", "exact"])
@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_every_rule(rule_name, semantics):
  rng = np.random.default_rng(zlib.crc32(f"{rule_name}/{semantics}".encode()))  # stable seed
  level = Level(_memory(rng, 4, 3), OBJECTIVES[rng.integers(4)], RULES[rule_name],
                chunk=int(rng.integers(2, 5)), semantics=semantics,
                read=["after", "before", "boundary"][rng.integers(3)], heads=2)
  _assert_equivalent(level, batch=2, seq=11, seed=int(rng.integers(1000)))


@pytest.mark.parametrize("seed", range(12))
def test_random_configurations(seed):
  rng = np.random.default_rng(seed)
  d_in, d_out = int(rng.integers(2, 6)), int(rng.integers(2, 6))
  semantics = ["boundary", "exact"][rng.integers(2)]
  rule = RULES[sorted(RULES)[rng.integers(len(RULES))]]
  level = Level(_memory(rng, d_in, d_out), OBJECTIVES[rng.integers(4)], rule,
                chunk=int(rng.integers(1, 7)), semantics=semantics,
                read=["after", "before", "boundary"][rng.integers(3)],
                heads=int(rng.integers(1, 3)))
  _assert_equivalent(level, batch=int(rng.integers(1, 3)), seq=int(rng.integers(1, 18)),
                     seed=seed)


@pytest.mark.parametrize("objective", [DotProduct(), L2()], ids=["dot", "l2"])
@pytest.mark.parametrize("read", ["after", "before", "boundary"])
@pytest.mark.parametrize("rule", [Rule("gd"), Rule("dgd"), Rule("gd", grad_at_retained=True)],
                         ids=["gd", "dgd", "retained"])
def test_exact_ut_form(objective, read, rule):
  level = Level(MatrixMemory(5, 3, init_scale=1.0), objective, rule, chunk=4, semantics="exact",
                read=read, heads=2)
  assert uses_ut(level)
  _assert_equivalent(level, batch=2, seq=14, seed=3)


def test_sequence_shorter_than_chunk():
  level = Level(MLPMemory(3, 3, hidden=4), L2(), Rule("dgd", momentum=True), chunk=8, heads=1)
  _assert_equivalent(level, batch=1, seq=5, seed=0)


def test_exact_ut_form_with_zero_retention_resets():
  """α_t = 0 wipes the memory (Gated DeltaNet); the UT form's log-space decays stay finite."""
  with jax.enable_x64(True):
    level = Level(MatrixMemory(3, 2, init_scale=1.0), L2(), Rule("gd", grad_at_retained=True),
                  chunk=4, semantics="exact", heads=1)
    inputs = random_inputs(level, 1, 10, seed=5)
    inputs = inputs._replace(alpha=inputs.alpha.at[:, 2].set(0.0).at[:, 7].set(0.0))
    state = level.init_state(level.init(jax.random.PRNGKey(0), jnp.float64), 1)
    s_ref, y_ref = level.run(state, inputs, impl="reference")
    s_chk, y_chk = level.run(state, inputs, impl="chunked")
    assert bool(jnp.all(jnp.isfinite(y_chk)))
    assert max_diff(y_ref, y_chk) < 1e-10 and max_diff(s_ref, s_chk) < 1e-10


END_STATE_RULES = {"gd": Rule("gd"), "gd_momentum": Rule("gd", momentum=True),
                   "gd_stop_grad": Rule("gd", stop_grad_writes=True),
                   "gd_momentum_stop_grad": Rule("gd", momentum=True, stop_grad_writes=True),
                   "dgd": Rule("dgd"),
                   "dgd_plain_momentum": Rule("dgd", momentum=True, dgd_variant="plain"),
                   "dgd_neurips_momentum_stop_grad": Rule("dgd", momentum=True,
                                                          dgd_variant="neurips",
                                                          stop_grad_writes=True)}
END_STATE_MEMORIES = {"matrix": MatrixMemory(4, 3, init_scale=1.0),
                      "mlp_skip": MLPMemory(4, 3, hidden=5, layers=2, activation="silu"),
                      "mlp_residual": MLPMemory(4, 4, hidden=5, layers=2, activation="silu"),
                      "mlp_3_layers": MLPMemory(4, 1, hidden=6, layers=3, activation="tanh")}


@pytest.mark.parametrize("rule_name", sorted(END_STATE_RULES))
@pytest.mark.parametrize("memory", sorted(END_STATE_MEMORIES))
def test_end_state_only_boundary_chunks(rule_name, memory):
  """Boundary-read GD and DGD levels take the end-state-only form (no per-token states; DGD's
  key decay in closed form); it equals the reference in outputs, states and gradients, with
  retention resets and unread calls."""
  mem = END_STATE_MEMORIES[memory]
  rule = END_STATE_RULES[rule_name]
  level = Level(mem, L2(), rule, chunk=4, semantics="boundary", read="boundary", heads=2)
  assert chunked.reads_end_state_only(level, has_q=True)
  assert not chunked.reads_end_state_only(Level(mem, L2(), rule, chunk=4, read="after", heads=2),
                                          has_q=True)
  with jax.enable_x64(True):
    inputs = random_inputs(level, 2, 13, seed=9)
    inputs = inputs._replace(alpha=inputs.alpha.at[:, 5].set(0.0))
    params = level.init(jax.random.PRNGKey(4), jnp.float64)
    state = level.init_state(params, 2)
    for inp in (inputs, inputs._replace(q=None)):
      s_ref, y_ref = level.run(state, inp, impl="reference")
      s_chk, y_chk = level.run(state, inp, impl="chunked")
      assert max_diff(s_ref, s_chk) < 1e-10 and (y_ref is None or max_diff(y_ref, y_chk) < 1e-10)

    def loss(impl, p, inp):
      s, y = level.run(level.init_state(p, 2), inp, impl=impl)
      extra = 0.0 if s.momentum is None else sum(jnp.sum(jnp.sin(x))
                                                 for x in jax.tree.leaves(s.momentum))
      return (jnp.sum(jnp.cos(y)) + sum(jnp.sum(x ** 2) for x in jax.tree.leaves(s.memory))
              + extra)
    grad = lambda impl: jax.grad(lambda p, i: loss(impl, p, i), (0, 1))(params, inputs)
    assert max_diff(grad("chunked"), grad("reference")) < 1e-9


def test_static_phase_runs_only_the_chunks_it_fills():
  """A Python-int phase (a fresh state known to the caller) gets exactly the chunks its tokens
  fill, with the same results as the traced phase's conservative layout."""
  assert chunked.chunk_layout(8, 5, 0, False) == (1, 0)
  assert chunked.chunk_layout(8, 5, 3, False) == (1, 3)
  assert chunked.chunk_layout(8, 5, jnp.asarray(0), False)[0] == 2
  level = Level(MLPMemory(3, 3, hidden=4), L2(), Rule("gd", momentum=True), chunk=8,
                read="after", heads=1)
  with jax.enable_x64(True):
    inputs = random_inputs(level, 2, 13, seed=2)
    state = level.init_state(level.init(jax.random.PRNGKey(1), jnp.float64), 2)
    s_ref, y_ref = level.run(state, inputs, impl="reference")
    s_chk, y_chk = level.run(state._replace(phase=0), inputs, impl="chunked")
    assert max_diff(y_ref, y_chk) < 1e-10 and max_diff(s_ref, s_chk) < 1e-10


def test_span_products_derivative_is_the_exact_product_rule():
  """``_span_products``' own derivative (forward and reverse, second order) matches finite
  differences and autodiff of the masked cumulative product, also at a factor 0 (a reset)."""
  with jax.enable_x64(True):
    x = jax.random.uniform(jax.random.PRNGKey(0), (7,), jnp.float64).at[3].set(0.0)
    check_grads(chunked._span_products, (x,), order=2, modes=("fwd", "rev"))
    size = x.shape[0]

    def plain(x):
      factors = jnp.where(jnp.arange(size)[None, :] >= jnp.arange(size + 1)[:, None],
                          x[None, :], 1)
      return jnp.concatenate([jnp.ones((size + 1, 1), x.dtype), jnp.cumprod(factors, axis=1)], 1)
    ct = jax.random.normal(jax.random.PRNGKey(1), (size + 1, size + 1), jnp.float64)
    want = jax.vjp(plain, x)[1](ct)[0]
    got = jax.vjp(chunked._span_products, x)[1](ct)[0]
    assert max_diff(got, want) < 1e-14
    assert max_diff(chunked._span_products(x), plain(x)) == 0.0
