"""The matrix-memory kernel (op 1) against the token-by-token reference, in interpret mode.

Every covered rule/semantics/read is checked for outputs, states (memory, momentum, anchor,
phase), streaming in pieces of any length, gradients (against ``jax.grad`` of the reference and
numerically), bfloat16 inputs, unwritten outputs (poisoned buffers), the dispatcher, and that the
forward and backward kernels lower to Triton for a Hopper GPU.
"""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nlj.core import Level, MatrixMemory, MLPMemory, Rule, compositions
from nlj.core.objectives import L2, DotProduct, Huber
from nlj.core.reference import run_reference
from nlj.core.triangular import inverse_named
from nlj_kernels.matrix_memory import (OpConfig, launch_options, matrix_memory, run_level,
                                       unsupported_reason)
from nlj_kernels.matrix_memory import pallas_recurrence
from nlj_kernels.matrix_memory.pallas_tiles import (TileShape, fit_shapes,
                                                     tiles_pallas)
from nlj_kernels.matrix_memory.pallas_momentum_reads import READ_INPUTS, momentum_reads_backward
from nlj_kernels.matrix_memory.pallas_tiles_momentum import MOMENTUM_BACKWARD, momentum_tiles_pallas
from nlj_kernels.matrix_memory.runner import (STAGE_BYTES, default_block_v, default_num_stages,
                                              kernel_fields)
from nlj_kernels.matrix_memory.prepare import (ChunkScalars, MomentumScalars, ReadForm,
                                               chunk_tiles, momentum_reads, momentum_tiles,
                                               prepare, to_chunks)
from tests.core.helpers import max_diff, random_inputs, slice_inputs

# (objective, rule, semantics, read): every combination the kernel covers, by family
COVERED = {
    "linear_attention": (DotProduct(), Rule("gd"), "exact", "after"),
    "deltanet_before": (L2(), Rule("gd"), "exact", "before"),
    "gated_deltanet": (L2(), Rule("gd", grad_at_retained=True), "exact", "after"),
    "dgd_exact_boundary_read": (L2(), Rule("dgd", dgd_variant="plain"), "exact", "boundary"),
    "dgd_normalized": (L2(), Rule("dgd"), "boundary", "after"),
    "dgd_neurips_before": (L2(), Rule("dgd", dgd_variant="neurips"), "boundary", "before"),
    "gd_boundary_read": (L2(), Rule("gd"), "boundary", "boundary"),
    "hebbian_boundary": (DotProduct(), Rule("dgd"), "boundary", "after"),
    "titans_momentum": (L2(), Rule("gd", momentum=True), "boundary", "after"),
    "titans_momentum_before": (L2(), Rule("gd", momentum=True), "boundary", "before"),
    "titans_momentum_boundary_read": (L2(), Rule("gd", momentum=True), "boundary", "boundary"),
    "hebbian_momentum": (DotProduct(), Rule("gd", momentum=True), "boundary", "after"),
}


# stage-1 paths: plain JAX with the solve or the products-only inverse, and the Pallas kernels
STAGE1_PATHS = {"jax": {"stage1": "jax"}, "jax_blocked": {"stage1": "jax", "inverse": "blocked"},
                "pallas": {"stage1": "pallas"}}


def make_level(name: str, d_in: int = 16, d_out: int = 32, chunk: int = 16, heads: int = 2):
  objective, rule, semantics, read = COVERED[name]
  return Level(MatrixMemory(d_in, d_out, init_scale=1.0), objective, rule, chunk, semantics, read,
               heads)


def random_state(level: Level, batch: int, seed: int = 1):
  params = level.init(jax.random.PRNGKey(seed), jnp.float64)
  return params, level.init_state(params, batch)


def assert_states_close(got, want, tol):
  assert int(got.phase) == int(want.phase)
  assert max_diff((got.memory, got.momentum, got.anchor),
                  (want.memory, want.momentum, want.anchor)) < tol


@pytest.mark.parametrize("stage1", ["jax", "pallas"])
@pytest.mark.parametrize("name", sorted(COVERED))
def test_equals_reference_streaming_in_pieces(name, stage1):
  with jax.enable_x64(True):
    level = make_level(name)
    inputs = random_inputs(level, batch=2, seq=45, seed=sorted(COVERED).index(name))
    _, state = random_state(level, 2)
    want_state, want_y = run_reference(level, state, inputs)
    got, ys = state, []
    for start, stop in ((0, 5), (5, 37), (37, 38), (38, 45)):  # phases 0, 5, 5, 6
      got, y = run_level(level, got, slice_inputs(inputs, start, stop), interpret=True,
                         stage1=stage1)
      ys.append(y)
    assert max_diff(jnp.concatenate(ys, 1), want_y) < 1e-10
    assert_states_close(got, want_state, 1e-10)


@pytest.mark.parametrize("name", ["gated_deltanet", "titans_momentum", "dgd_normalized"])
@pytest.mark.parametrize("d_in,d_out,batch,seq,chunk,stage1", [
    (32, 16, 1, 64, 16, "pallas"), (16, 64, 3, 96, 32, "pallas"), (16, 32, 2, 64, 64, "pallas"),
    (16, 64, 3, 48, 16, "jax"), (16, 32, 2, 64, 64, "jax"), (16, 32, 2, 128, 64, "jax_blocked"),
    (32, 16, 1, 64, 32, "jax_blocked")])
def test_aligned_equals_reference(name, d_in, d_out, batch, seq, chunk, stage1):
  with jax.enable_x64(True):
    level = make_level(name, d_in, d_out, chunk)
    inputs = random_inputs(level, batch, seq, seed=3)
    _, state = random_state(level, batch)
    want_state, want_y = run_reference(level, state, inputs)
    got_state, got_y = run_level(level, state, inputs, aligned=True, interpret=True, block_v=16,
                                 **STAGE1_PATHS[stage1])
    assert max_diff(got_y, want_y) < 1e-10
    assert_states_close(got_state, want_state, 1e-10)


def test_alpha_zero_resets_and_unread_levels():
  with jax.enable_x64(True):
    level = make_level("gated_deltanet")
    inputs = random_inputs(level, 1, 40, seed=5)
    inputs = inputs._replace(alpha=inputs.alpha.at[:, 7].set(0.0).at[:, 20].set(0.0))
    _, state = random_state(level, 1)
    want_state, want_y = run_reference(level, state, inputs)
    got_state, got_y = run_level(level, state, inputs, interpret=True)
    assert max_diff(got_y, want_y) < 1e-10
    assert_states_close(got_state, want_state, 1e-10)
    written_only, _ = run_level(level, state, inputs._replace(q=None), interpret=True)
    assert_states_close(written_only, want_state, 1e-10)


def _loss(level, runner, params, inputs, batch):
  state, y = runner(level, level.init_state(params, batch), inputs)
  weights = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
  extra = 0.0 if state.momentum is None else jnp.sum(jnp.sin(state.momentum["w"]))
  return jnp.sum(y * weights) + jnp.sum(state.memory["w"] ** 2) + extra


@pytest.mark.parametrize("stage1", sorted(STAGE1_PATHS))
@pytest.mark.parametrize("name", ["gated_deltanet", "titans_momentum_before", "dgd_normalized",
                                  "gd_boundary_read"])
def test_gradients_equal_reference(name, stage1):
  with jax.enable_x64(True):
    level = make_level(name)
    inputs = random_inputs(level, 2, 37, seed=7)
    params, _ = random_state(level, 2)
    grad = lambda runner: jax.grad(lambda p, i: _loss(level, runner, p, i, 2), (0, 1))(
        params, inputs)
    kernel = lambda *a: run_level(*a, interpret=True, **STAGE1_PATHS[stage1])
    assert max_diff(grad(kernel), grad(run_reference)) < 1e-9


@pytest.mark.parametrize("name", ["gated_deltanet", "titans_momentum"])
def test_gradients_over_several_value_blocks(name):
  """``block_v < d_v``: the sequential kernels run one program per ``d_v`` block, and with
  ``d_v = 2 GRADIENT_COLUMNS`` the backward's chunk-parallel pass walks two column blocks; gradients still
  equal the reference's."""
  with jax.enable_x64(True):
    level = make_level(name, d_in=16, d_out=2 * pallas_recurrence.GRADIENT_COLUMNS)
    inputs = random_inputs(level, 2, 40, seed=3)
    params, _ = random_state(level, 2)
    grad = lambda runner: jax.grad(lambda p, i: _loss(level, runner, p, i, 2), (0, 1))(
        params, inputs)
    kernel = lambda *a: run_level(*a, interpret=True, block_v=16, stage1="pallas")
    assert max_diff(grad(kernel), grad(run_reference)) < 1e-9


@pytest.mark.parametrize("momentum", [False, True])
def test_check_grads_through_the_kernels(momentum):
  with jax.enable_x64(True):
    config = OpConfig(16, "boundary" if momentum else "exact", "l2", "after",
                      momentum=momentum, grad_at_retained=not momentum)
    level = make_level("titans_momentum" if momentum else "gated_deltanet", 16, 16, heads=1)
    inputs = random_inputs(level, 1, 32, seed=11)
    s0 = 0.3 * jax.random.normal(jax.random.PRNGKey(2), (1, 1, 16, 16), jnp.float64)

    def f(k, v, q, eta, alpha, s0):
      y, s, m = matrix_memory(config, k, v, q, eta, alpha, inputs.beta, s0,
                              s0 if momentum else None, interpret=True, block_v=16)
      return jnp.sum(y ** 2) + jnp.sum(s * s0) + (0.0 if m is None else jnp.sum(m))

    check_grads(f, (inputs.k, inputs.v, inputs.q, inputs.eta, inputs.alpha, s0), order=1,
                modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("momentum,stage1", [(False, "jax"), (True, "jax"), (False, "pallas"),
                                             (True, "pallas")])
def test_bfloat16_inputs_relative_error(momentum, stage1):
  """bf16 keys, values and queries through either stage 1 (the Pallas tiles save ``T`` and
  ``E ⊙ G`` in bf16 then): outputs, state and gradients within bf16 error of the float32
  reference."""
  config = OpConfig(16, "boundary" if momentum else "exact", "l2", "after", momentum=momentum,
                    grad_at_retained=not momentum)
  level = make_level("titans_momentum" if momentum else "gated_deltanet", 32, 32)
  inputs = random_inputs(level, 2, 64, seed=13, dtype=jnp.float32)
  low = inputs._replace(k=inputs.k.astype(jnp.bfloat16), v=inputs.v.astype(jnp.bfloat16),
                        q=inputs.q.astype(jnp.bfloat16))
  s0 = jnp.zeros((2, 2, 32, 32))
  op = lambda i: matrix_memory(config, *i, s0, s0 if momentum else None, interpret=True,
                               stage1=stage1)
  y, s, _ = op(low)
  assert y.dtype == jnp.bfloat16
  up = jax.tree.map(lambda x: x.astype(jnp.float32), low)
  zero = level.init_state({"w": jnp.zeros((2, 32, 32))}, 2)
  dy = jax.random.normal(jax.random.PRNGKey(5), y.shape)
  with jax.default_matmul_precision("highest"):
    want_state, want_y = run_reference(level, zero, up)
    # the backward keeps its saved states in bfloat16 here: gradients stay within bf16 error
    grads = jax.grad(lambda i: jnp.sum(op(i)[0].astype(jnp.float32) * dy))(low)
    want_grads = jax.grad(lambda i: jnp.sum(run_reference(level, zero, i)[1] * dy))(up)
  rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
  assert rel(y, want_y) < 1e-2
  assert rel(s, jnp.swapaxes(want_state.memory["w"], -1, -2)) < 1e-2
  for name in ("k", "v", "q", "eta", "alpha"):
    assert rel(getattr(grads, name), getattr(want_grads, name)) < 1e-2, name


@pytest.mark.parametrize("momentum", [False, True])
def test_every_output_element_is_written(momentum):
  """Outputs written into NaN-filled buffers equal the clean ones, with and without momentum."""
  config = OpConfig(16, "boundary" if momentum else "exact", "l2", "after", momentum=momentum,
                    grad_at_retained=not momentum)
  level = make_level("titans_momentum" if momentum else "gated_deltanet", 16, 32)
  inputs = random_inputs(level, 2, 48, seed=17, dtype=jnp.float32)
  coeffs = prepare(config, *inputs, jnp.ones((2, 48, 2)))
  fields = kernel_fields(coeffs, jnp.float32)
  s0 = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 16, 32))
  m0 = jnp.cos(s0) if momentum else None
  clean = pallas_recurrence.forward(fields, s0, m0, block_v=16, interpret=True)
  poisoned = pallas_recurrence.forward(fields, s0, m0, block_v=16, poison=True, interpret=True)
  for got, want in zip(poisoned[:2], clean[:2]):
    assert bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_dispatcher_takes_the_kernel_for_covered_levels():
  with jax.enable_x64(True):
    level = compositions.gated_deltanet(16, 16, heads=2, chunk=16)
    inputs = random_inputs(level, 1, 20, seed=19)
    state = level.init_state(level.init(jax.random.PRNGKey(0), jnp.float64), 1)
    _, y_pallas = level.run(state, inputs, impl="pallas")
    _, y_chunked = level.run(state, inputs, impl="chunked")
    assert max_diff(y_pallas, y_chunked) < 1e-10
    huber = Level(MatrixMemory(16, 16), Huber(), Rule("gd"), 16, heads=2)
    with pytest.raises(ValueError, match="no registered kernel covers memory=MatrixMemory, "
                                         "objective='huber'"):
      huber.run(huber.init_state(huber.init(jax.random.PRNGKey(0)), 1), inputs, impl="pallas")


@pytest.mark.parametrize("level,reason", [
    (Level(MLPMemory(16, 16, 16), L2(), Rule("gd"), 16), "not MatrixMemory"),
    (Level(MatrixMemory(16, 16), Huber(), Rule("gd"), 16), "objective 'huber'"),
    (Level(MatrixMemory(16, 16), L2(), Rule("gd", orthogonalize=True), 16), "Newton-Schulz"),
    (Level(MatrixMemory(16, 16), L2(), Rule("dgd", momentum=True), 16, "boundary"), "momentum"),
    (Level(MatrixMemory(16, 16), L2(), Rule("gd", momentum=True), 16, "exact"), "momentum"),
    (Level(MatrixMemory(24, 16), L2(), Rule("gd"), 16), "d_in=24"),
    (Level(MatrixMemory(16, 16), L2(), Rule("gd"), 8), "chunk=8"),
])
def test_uncovered_levels_are_named(level, reason):
  assert reason in unsupported_reason(level)


def test_op_errors_name_the_field():
  config = OpConfig(16, "exact", "l2", "after")
  x = jnp.zeros((1, 20, 1, 16))
  g = jnp.ones((1, 20, 1))
  with pytest.raises(ValueError, match="T % chunk == 0"):
    matrix_memory(config, x, x, x, g, g, g, jnp.zeros((1, 1, 16, 16)), interpret=True)
  with pytest.raises(ValueError, match="m0 must be given exactly when config.momentum"):
    matrix_memory(config, x[:, :16], x[:, :16], x[:, :16], g[:, :16], g[:, :16], g[:, :16],
                  jnp.zeros((1, 1, 16, 16)), jnp.zeros((1, 1, 16, 16)), interpret=True)
  with pytest.raises(ValueError, match="OpConfig.chunk must be one of"):
    OpConfig(12)
  with pytest.raises(ValueError, match="OpConfig.momentum needs"):
    OpConfig(16, "exact", momentum=True)


@pytest.mark.parametrize("name", ["gated_deltanet", "titans_momentum_before"])
def test_tpu_backend_interpreted_equals_reference(name):
  """The Mosaic-TPU variant (SMEM scalars, parallel grid) computes the same, in interpret mode."""
  with jax.enable_x64(True):
    level = make_level(name)
    inputs = random_inputs(level, 2, 37, seed=23)
    params, state = random_state(level, 2)
    want_state, want_y = run_reference(level, state, inputs)
    got_state, got_y = run_level(level, state, inputs, interpret=True, backend="tpu")
    assert max_diff(got_y, want_y) < 1e-10
    assert_states_close(got_state, want_state, 1e-10)
    tpu = lambda *a: run_level(*a, interpret=True, backend="tpu")
    grad = lambda runner: jax.grad(lambda p, i: _loss(level, runner, p, i, 2), (0, 1))(
        params, inputs)
    assert max_diff(grad(tpu), grad(run_reference)) < 1e-9


@pytest.mark.parametrize("momentum", [False, True])
def test_kernels_lower_for_tpu(momentum):
  """Cross-platform lowering of the TPU variant to Mosaic (no TPU needed)."""
  config = OpConfig(64, "boundary" if momentum else "exact", "l2", "after", momentum=momentum,
                    grad_at_retained=not momentum)
  x = jnp.ones((1, 128, 2, 128), jnp.bfloat16)
  g = jnp.ones((1, 128, 2))
  s0 = jnp.zeros((1, 2, 128, 128))

  def loss(k, v, q, s0):
    y, s, _ = matrix_memory(config, k, v, q, g, g, g, s0, s0 if momentum else None,
                            interpret=False, backend="tpu", block_v=128)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)

  text = jax.jit(jax.grad(loss, (0, 1, 2, 3))).trace(x, x, x, s0).lower(
      lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3  # forward, backward passes 1 and 2


def test_stage1_default_is_the_pallas_kernels_when_compiled_for_triton():
  assert launch_options(interpret=False, backend="triton").stage1 == "pallas"
  assert launch_options(interpret=True, backend="triton").stage1 == "jax"
  assert launch_options(interpret=True, backend="tpu").stage1 == "jax"
  assert launch_options(interpret=False, backend="triton", stage1="jax").stage1 == "jax"


def test_launch_options_name_bad_backends():
  with pytest.raises(ValueError, match="backend must be one of"):
    run_level(make_level("gated_deltanet"), None, None, backend="cuda")
  with pytest.raises(ValueError, match="stage1 must be one of"):
    run_level(make_level("gated_deltanet"), None, None, backend="tpu", stage1="pallas")
  with pytest.raises(ValueError, match="inverse must be one of"):
    run_level(make_level("gated_deltanet"), None, None, inverse="lu")
  for bad in (0, 2.0):
    with pytest.raises(ValueError, match=f"num_stages must be None or a positive int, got {bad}"):
      run_level(make_level("gated_deltanet"), None, None, num_stages=bad)


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_triton_for_hopper(monkeypatch, momentum, dtype):
  """Cross-platform lowering (no GPU needed) catches ops Pallas' Triton backend rejects."""
  from jax._src.pallas.triton import gpu_info  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(gpu_info, "get_gpu_info",
                      lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
  config = OpConfig(64, "boundary" if momentum else "exact", "l2", "after", momentum=momentum,
                    grad_at_retained=not momentum)
  x = jnp.ones((1, 128, 2, 128), dtype)
  g = jnp.ones((1, 128, 2))
  s0 = jnp.zeros((1, 2, 128, 128))

  def loss(k, v, q, s0, gates, stage1="jax"):
    y, s, _ = matrix_memory(config, k, v, q, gates, gates, gates, s0, s0 if momentum else None,
                            interpret=False, stage1=stage1, stage2="pallas")  # the Triton ones
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)

  text = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4))).trace(x, x, x, s0, g).lower(
      lowering_platforms=("cuda",)).as_text()
  # stage 2: forward and the two backward passes (stage 1 in plain JAX by default) ...
  assert text.count("__gpu$xla.gpu.triton") == 3
  staged = jax.jit(jax.grad(lambda *a: loss(*a, stage1="pallas"), (0, 1, 2, 3, 4))).trace(
      x, x, x, s0, g).lower(lowering_platforms=("cuda",)).as_text()
  # ... and the tiles' forward and backward (the WY products, or the momentum tiles and the
  # backward of their read decays)
  assert staged.count("__gpu$xla.gpu.triton") == (6 if momentum else 5)
  # 2 heads of 1 sequence: the sequential kernels pipeline their loop over chunks
  stages = dict(re.findall(r'name = "matrix_memory_(\w+)".*?num_stages = (\d+) : i32', staged))
  want = default_num_stages(1, 2, 128, 128, 64, 32, jnp.dtype(dtype).itemsize, momentum)
  tiles = "momentum_tiles" if momentum else "tiles"
  reads = {"momentum_reads_bwd": "1"} if momentum else {}
  assert stages == {f"{tiles}_fwd": "1", "fwd": str(want), "bwd_states": str(want),
                    "bwd_chunks": "1", f"{tiles}_bwd": "1", **reads}
  # the tiles kernels launch with their own default warps (momentum's backward: 8)
  warps = dict(re.findall(r'name = "matrix_memory_(\w+)".*?num_warps = (\d+) : i32', staged))
  assert (warps[f"{tiles}_fwd"], warps[f"{tiles}_bwd"]) == ("4", "8" if momentum else "4")


@pytest.mark.parametrize("family", ["gated_deltanet", "linear_attention"])
def test_language_model_with_the_kernel_equals_chunked(family):
  """A preset LM run with ``impl="pallas"`` (training call, then cached decoding) equals
  ``impl="chunked"``: logits and every parameter gradient."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from nlj.models import PRESETS, build_model  # pylint: disable=import-outside-toplevel
  from tests.models.helpers import nll_gradients  # pylint: disable=import-outside-toplevel
  base = dataclasses.replace(PRESETS[(family, "tiny")], chunk=16)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, base.vocab)
  models = {impl: build_model(dataclasses.replace(base, impl=impl), nnx.Rngs(0))
            for impl in ("pallas", "chunked")}
  logits = {impl: m(tokens)[0] for impl, m in models.items()}
  np.testing.assert_allclose(logits["pallas"], logits["chunked"], atol=2e-5, rtol=2e-5)
  grads = {impl: dict(nll_gradients(m, tokens)) for impl, m in models.items()}
  for path, g in grads["chunked"].items():
    np.testing.assert_allclose(grads["pallas"][path], g, atol=2e-5, rtol=2e-4, err_msg=str(path))
  model = models["pallas"]  # streaming: 20 tokens, then 12 more (non-aligned phases)
  first, cache = model(tokens[:, :20], model.init_cache(2, 32))
  rest, _ = model(tokens[:, 20:], cache)
  np.testing.assert_allclose(jnp.concatenate([first, rest], 1), logits["chunked"], atol=2e-5,
                             rtol=2e-5)


@pytest.mark.parametrize("seq", [5, 21])
def test_static_phase_equals_reference(seq):
  """A Python-int phase (exact chunk count, no padding chunk) through the kernel's runner."""
  with jax.enable_x64(True):
    level = make_level("titans_momentum")
    inputs = random_inputs(level, 1, seq, seed=13)
    _, state = random_state(level, 1)
    want_state, want_y = run_reference(level, state, inputs)
    got_state, got_y = run_level(level, state._replace(phase=0), inputs, interpret=True)
    assert max_diff(got_y, want_y) < 1e-10
    assert_states_close(got_state, want_state, 1e-10)


def _stage1_inputs(chunk: int, dk: int = 16, dv: int = 32):
  """Unit-norm keys, values, queries ``[2, 2 * chunk, 2, ·]`` (float64) and a key for more."""
  keys = jax.random.split(jax.random.PRNGKey(chunk), 4)
  shape = (2, 2 * chunk, 2)
  k = jax.random.normal(keys[0], shape + (dk,), jnp.float64)
  v = jax.random.normal(keys[1], shape + (dv,), jnp.float64)
  q = jax.random.normal(keys[2], shape + (dk,), jnp.float64)
  return k / jnp.linalg.norm(k, axis=-1, keepdims=True), v, q, keys[3]


def _assert_tiles_and_grads_equal(kernel, reference, k, v, q, scalars):
  """Kernel tiles equal the plain-JAX ones, and so do every input's gradients of a weighted
  sum of them."""
  want, got = reference(k, v, q, scalars), kernel(k, v, q, scalars)
  assert set(got) == set(want) and all((got[n] is None) == (want[n] is None) for n in want)
  assert max_diff(got, want) < 1e-12
  weights = {n: jnp.cos(jnp.arange(x.size, dtype=x.dtype) + i).reshape(x.shape)
             for i, (n, x) in enumerate(want.items()) if x is not None}
  loss = lambda f: lambda *a: sum(jnp.sum(f(*a)[n] * w) for n, w in weights.items())
  grads = lambda f: jax.grad(loss(f), (0, 1, 2, 3))(k, v, q, scalars)
  assert max_diff(grads(kernel), grads(reference)) < 1e-11


def _per_chunk(one, chunk: int):
  """``one(k, v, q, *scalars)`` on ``[C, ·]`` chunks mapped over ``[B, T, H, ·]`` inputs."""
  return lambda k, v, q, s: jax.vmap(jax.vmap(jax.vmap(one)))(
      to_chunks(k, chunk), to_chunks(v, chunk), to_chunks(q, chunk), *s)


@pytest.mark.parametrize("chunk,form,shapes", [
    (32, (False, False, False), None), (64, (True, True, False), None),
    (128, (False, False, False), None), (32, (True, True, True), None),
    (48, (False, False, False), None), (64, (True, True, False), ((64, 4), (16, 2))),
    (64, (False, False, False), ((16, 4), None))])
def test_stage1_kernels_equal_plain_jax(chunk, form, shapes):
  """The tiles of the Pallas stage 1 (row blocks of the default or given sizes, hand-derived
  backward) against :func:`chunk_tiles` with a triangular solve, values and every input's
  gradient, with a retention reset (α = 0, as
  :func:`~nlj_kernels.matrix_memory.prepare.chunk_parts` clamps it) inside a chunk."""
  form = ReadForm(*form)
  with jax.enable_x64(True):
    k, v, q, key = _stage1_inputs(chunk)
    keys = jax.random.split(key, 6)
    shape = (2, 2, 2, chunk)
    uniform = lambda i: jax.random.uniform(keys[i], shape, jnp.float64)
    log_alpha = jnp.log(0.8 + 0.2 * uniform(0))
    log_alpha = log_alpha.at[:, :, 0, chunk // 2 + 3].set(jnp.log(jnp.finfo(jnp.float64).tiny))
    log_g = jnp.cumsum(log_alpha, -1)
    log_read = log_g - log_alpha if form.strict else log_g
    scalars = ChunkScalars(0.6 * uniform(1), uniform(2), uniform(3), log_g - log_alpha, log_g,
                           log_read, uniform(4), uniform(5))
    if chunk % 16:
      with pytest.raises(ValueError, match="chunk % 16 == 0"):
        tiles_pallas(form, k, v, q, scalars, chunk, interpret=True)
      return
    reference = _per_chunk(lambda kk, vv, qq, *s: chunk_tiles(
        form, inverse_named("solve"), kk, vv, qq, ChunkScalars(*s)), chunk)
    forward, backward = shapes or (None, None)
    kernel = lambda k, v, q, s: tiles_pallas(form, k, v, q, s, chunk, forward=forward,
                                             backward=backward, interpret=True)
    _assert_tiles_and_grads_equal(kernel, reference, k, v, q, scalars)


@pytest.mark.parametrize("chunk,form,shapes", [
    (32, (True, False, False), None), (64, (True, True, False), None),
    (32, (True, True, True), None), (32, (False, False, False), ((16, 4), (16, 2))),
    (64, (True, False, False), ((32, 4), (64, 8)))])
def test_momentum_stage1_kernels_equal_plain_jax(chunk, form, shapes):
  """The momentum tiles of the Pallas stage 1 (read decays formed in the kernels) against
  :func:`momentum_tiles` in plain JAX, values and every input's gradient, with a reset of the
  momentum decay and padding tokens at the end of the chunk."""
  form = ReadForm(*form)
  with jax.enable_x64(True):
    k, v, q, key = _stage1_inputs(chunk)
    keys = jax.random.split(key, 7)
    uniform = lambda i: jax.random.uniform(keys[i], (2, 2, 2, chunk), jnp.float64)
    log_alpha = jnp.log(0.8 + 0.2 * uniform(4))
    log_g = jnp.cumsum(log_alpha, -1)
    log_beta = jnp.log(0.5 + 0.5 * uniform(5)).at[:, :, 1, chunk // 2].set(-30.0)
    mask = jnp.ones_like(log_g).at[:, :, :, -3:].set(0.0)
    scalars = MomentumScalars(uniform(0), uniform(1), uniform(2), uniform(3) * mask,
                              log_g - log_alpha if form.strict else log_g, log_g,
                              jnp.cumsum(log_beta, -1), mask)
    reference = _per_chunk(lambda kk, vv, qq, *s: momentum_tiles(form, kk, vv, qq,
                                                                 MomentumScalars(*s)), chunk)
    forward, backward = shapes or (None, None)
    kernel = lambda k, v, q, s: momentum_tiles_pallas(form, k, v, q, s, chunk, forward=forward,
                                                      backward=backward, interpret=True)
    _assert_tiles_and_grads_equal(kernel, reference, k, v, q, scalars)


@pytest.mark.parametrize("form", [(True, False, False), (False, True, False), (True, True, True)])
def test_momentum_reads_backward_kernel_equals_vjp(form):
  """The hand-derived backward of the read decays (one program per chunk) against ``jax.vjp`` of
  :func:`momentum_reads`, for plain, strict and anchor reads, with a momentum reset and padding;
  ``ā`` is lower triangular, as the tiles' backward kernel writes it, and ``a`` is the forward's
  (the kernel reads it as the tiles' forward saved it)."""
  form, chunk = ReadForm(*form), 32
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.PRNGKey(3), 8)
    uniform = lambda i: jax.random.uniform(keys[i], (2, 2, 3, chunk), jnp.float64)
    log_g = jnp.cumsum(jnp.log(0.8 + 0.2 * uniform(0)), -1)
    log_b = jnp.cumsum(jnp.log(0.5 + 0.5 * uniform(1)).at[:, :, 1, chunk // 2].set(-30.0), -1)
    mask = jnp.ones_like(log_g).at[:, :, :, -3:].set(0.0)
    reads = (uniform(2) * mask, log_g - 0.1 * uniform(3), log_g, log_b, mask)
    d_qm, d_decay = uniform(4) - 0.5, uniform(5) - 0.5
    d_a = jnp.tril(jax.random.normal(keys[6], (2, 2, 3, chunk, chunk), jnp.float64))

    def one(*x):
      zeros = jnp.zeros_like(x[0])
      scalars = MomentumScalars(zeros, zeros, zeros, **dict(zip(READ_INPUTS, x)))
      return momentum_reads(form, scalars)
    (_, _, a), vjp = jax.vjp(jax.vmap(jax.vmap(jax.vmap(one))), *reads)
    want = vjp((d_qm, d_decay, d_a))
    got = momentum_reads_backward(form, reads, d_qm, d_decay, d_a, a, interpret=True)
    for name, w, g in zip(READ_INPUTS, want, got):
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=name)
    assert form.reads_anchor or float(jnp.max(jnp.abs(got[1]))) > 1e-3  # log_read is used


def test_default_block_v_keeps_the_sequential_kernels_busy():
  """64 columns where batch · heads · d_v / 64 >= 128 programs, else 32; never above d_v."""
  assert default_block_v(8, 16, 128) == 64
  assert default_block_v(4, 16, 128) == 64
  assert default_block_v(2, 16, 128) == 32
  assert default_block_v(1, 16, 128) == 32
  assert default_block_v(1, 1, 256) == 32
  assert default_block_v(1, 2, 16) == 16
  assert default_block_v(64, 2, 32) == 32


def test_default_num_stages_pipelines_only_few_programs_within_shared_memory():
  """1 stage where the sequential kernels fill the card; else 3 or 2 as the buffered chunk
  fields fit (measured on an H100: Gated DeltaNet 3, Titans' momentum 2, at 1×16384 bf16)."""
  bf16 = dict(d_k=128, d_v=128, chunk=64, block_v=32, itemsize=2)
  assert default_num_stages(1, 16, **bf16, momentum=False) == 3
  assert default_num_stages(1, 16, **bf16, momentum=True) == 2
  assert default_num_stages(2, 16, **bf16, momentum=True) == 2
  assert default_num_stages(4, 16, **bf16, momentum=False) == 1  # 128 programs of 64 columns
  assert default_num_stages(8, 16, **dict(bf16, block_v=64), momentum=True) == 1
  assert default_num_stages(1, 16, **dict(bf16, itemsize=4), momentum=False) == 1
  assert default_num_stages(1, 16, **dict(bf16, d_k=256, d_v=256), momentum=False) == 1
  for b, h, d, momentum, size in itertools.product((1, 2), (1, 16), (64, 128, 256),
                                                   (False, True), (2, 4)):
    stages = default_num_stages(b, h, d, d, 64, 32, size, momentum)
    per_stage = size * 64 * ((5 if momentum else 3) * d + 32 + 64)
    assert stages == 1 or stages * per_stage <= STAGE_BYTES


def test_stage1_tile_shapes():
  """Defaults fit the chunk (the largest power of two from 16 up to the measured block that
  divides it); given shapes that do not fit raise, naming the kernel and the rule."""
  assert fit_shapes(64) == (TileShape(64, 4), TileShape(64, 4))
  assert fit_shapes(128) == (TileShape(64, 4), TileShape(64, 4))
  assert fit_shapes(32) == (TileShape(32, 4), TileShape(32, 4))
  assert fit_shapes(48) == (TileShape(16, 4), TileShape(16, 4))
  assert fit_shapes(16) == (TileShape(16, 4), TileShape(16, 4))
  assert fit_shapes(64, (64, 2)) == (TileShape(64, 2), TileShape(64, 4))
  momentum = (TileShape(64, 4), MOMENTUM_BACKWARD)  # the momentum tiles' defaults
  assert fit_shapes(64, defaults=momentum) == (TileShape(64, 4), TileShape(64, 8))
  assert fit_shapes(32, defaults=momentum) == (TileShape(32, 4), TileShape(32, 8))
  assert fit_shapes(64, None, (32, 2), defaults=momentum) == (TileShape(64, 4), TileShape(32, 2))
  with pytest.raises(ValueError, match="backward block=32 must be a power of two, at least 16, "
                                       "dividing the chunk 48"):
    fit_shapes(48, None, (32, 4))
  with pytest.raises(ValueError, match="forward block=48 must be a power of two"):
    fit_shapes(96, (48, 4))
  with pytest.raises(ValueError, match="forward block=24"):
    fit_shapes(48, (24, 4))
  with pytest.raises(ValueError, match="forward num_warps=3 must be a power of two"):
    fit_shapes(64, (16, 3))
  with pytest.raises(ValueError, match="chunk % 16 == 0"):
    fit_shapes(40)


@pytest.mark.parametrize("momentum", [False, True])
def test_chunk_gradients_over_wide_bf16_column_blocks(momentum):
  """bf16 fields with ``d_k <= 128`` take :data:`WIDE_GRADIENT_COLUMNS` columns at a time in
  the chunk-parallel pass; at ``d_v = 2 · 128`` its two blocks give the module docstring's
  products on the same bf16 operands, accumulated in float32."""
  assert pallas_recurrence.gradient_columns(128, jnp.bfloat16) == 128
  assert pallas_recurrence.gradient_columns(256, jnp.bfloat16) == 64
  assert pallas_recurrence.gradient_columns(128, jnp.float32) == 64
  b, h, n, c, dk, dv = 1, 2, 2, 16, 16, 2 * pallas_recurrence.WIDE_GRADIENT_COLUMNS
  keys = iter(jax.random.split(jax.random.PRNGKey(11), 16))
  normal = lambda *shape: jax.random.normal(next(keys), shape).astype(jnp.bfloat16)
  kw, vu, dy, du = normal(b, h, n, c, dk), normal(b, h, n, c, dv), normal(b, h, n, c, dv), \
      normal(b, h, n, c, dv)
  s, ds, m, dm = (normal(b, h, n, dk, dv) for _ in range(4))
  gates = jnp.ones((b, h, n))
  coeffs = (kw, vu, kw, normal(b, h, n, c, c), kw, gates) + (
      (kw, kw, gates, gates) if momentum else ())
  got = pallas_recurrence.chunk_gradients(coeffs, s, m if momentum else None, dy, du, ds,
                                          dm if momentum else None, interpret=True)
  f = lambda x: x.astype(jnp.float32)
  mm = lambda x, y: jnp.einsum("...ij,...kj->...ik", f(x), f(y),
                               precision=jax.lax.Precision.HIGHEST)
  u = (f(vu) - jnp.einsum("...cd,...dv->...cv", f(kw), f(s),
                          precision=jax.lax.Precision.HIGHEST)).astype(jnp.bfloat16)
  want = {"kw": -mm(du, s), "qs": mm(dy, s), "p": mm(dy, u), "kd": mm(u, ds),
          "gs": jnp.sum(f(s) * f(ds), axis=(-2, -1))}
  if momentum:
    want.update(qm=mm(dy, m), km=mm(u, dm), mc=jnp.sum(f(m) * f(ds), axis=(-2, -1)),
                gm=jnp.sum(f(m) * f(dm), axis=(-2, -1)))
  assert set(got) == set(want) | {"vu"}
  for name, value in want.items():
    err = float(jnp.max(jnp.abs(f(got[name]) - value)) / jnp.max(jnp.abs(value)))
    assert err < 1e-2, name  # the tiles come back in bf16
