"""Op 1's Hopper sequential kernels (:mod:`nlj_kernels.matrix_memory.mosaic_recurrence`) in
Pallas' GPU interpret mode: the forward and the backward's first pass equal to the portable
kernels on real stage-1 fields, every output element written, no shared-memory race, the op's
outputs and gradients within bf16 error of the float32 reference, any length through the level
runner, their choice and errors, and that they lower to Mosaic GPU for a Hopper GPU.

The GPU interpreter's callbacks run JAX operations of their own, and an operation dispatched
while an interpreted kernel is in flight can deadlock the CPU client against them (seen in a
test worker with eager calls, JAX 0.11.2). The kernels wait for their eager interpreted results
themselves (the streaming test calls the runner eagerly, as users do); the other tests jit the
computations that run the kernels whole and wait for them (:func:`settled`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

from nlj.core import Level, MatrixMemory, Rule
from nlj.core.objectives import L2
from nlj.core.reference import run_reference
from nlj_kernels.matrix_memory import OpConfig, launch_options, matrix_memory, run_level
from nlj_kernels.matrix_memory import mosaic_recurrence, pallas_recurrence
from nlj_kernels.matrix_memory.prepare import prepare
from nlj_kernels.matrix_memory.recurrence import chunk_recurrence
from nlj_kernels.matrix_memory import runner
from nlj_kernels.matrix_memory.runner import default_stage2, kernel_fields
from tests.core.helpers import random_inputs

GDN = OpConfig(64, "exact", "l2", "after", grad_at_retained=True)
TITANS = OpConfig(64, "boundary", "l2", "after", momentum=True)
CONFIGS = {"gdn": GDN, "titans": TITANS}


def level_of(name: str, d_in: int, d_out: int, heads: int = 2) -> Level:
  """Gated DeltaNet (``"gdn"``) or Titans' linear memory with momentum (``"titans"``)."""
  rule = (Rule("gd", grad_at_retained=True) if name == "gdn" else Rule("gd", momentum=True))
  return Level(MatrixMemory(d_in, d_out, init_scale=1.0), L2(), rule, 64,
               "exact" if name == "gdn" else "boundary", "after", heads)


def settled(f, *args):
  """``jax.jit(f)(*args)``, waited for (see the module docstring)."""
  return jax.block_until_ready(jax.jit(f)(*args))


def rel(a: jax.Array, b: jax.Array) -> float:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def bf16_fields(name: str, d_k: int, d_v: int, seq: int, seed: int = 3):
  """Stage-1 fields of level ``name`` (2 heads, batch 1) in bf16, and random initial states
  ``(s0, m0)`` (m0 None without momentum)."""
  inputs = random_inputs(level_of(name, d_k, d_v), 1, seq, seed=seed, dtype=jnp.float32)
  coeffs = prepare(CONFIGS[name], *inputs, jnp.ones((1, seq, 2)))
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  s0, m0 = (0.3 * jax.random.normal(key, (1, 2, d_k, d_v)) for key in keys)
  return kernel_fields(coeffs, jnp.bfloat16), s0, (m0 if name == "titans" else None)


@pytest.mark.parametrize("name", ["gdn", "titans"])
def test_forward_equals_the_portable_forward_and_writes_everything(name):
  """Outputs, end states and saved chunk-start states equal the portable kernel's (both round
  the states and ``U`` to bf16 for the products; the interpreter fills unwritten outputs with
  NaN). Titans' 96 columns are three of its 32-column blocks."""
  fields, s0, m0 = bf16_fields(name, 64, 128 if name == "gdn" else 96, 192)  # 3 chunks
  got = settled(lambda f, s, m: mosaic_recurrence.forward(f, s, m, save_states=True,
                                                          interpret=True), fields, s0, m0)
  want = pallas_recurrence.forward(fields, s0, m0, block_v=32, save_states=True, interpret=True)
  assert (got[4] is None) == (m0 is None)
  assert got[0].dtype == got[3].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
  for label, x, y, tol in zip(("y", "s", "m", "states", "mstates"), got, want,
                              (2e-3, 1e-3, 1e-3, 1e-3, 1e-3)):
    if y is not None:
      assert bool(jnp.all(jnp.isfinite(x))), label
      assert rel(x, y) < tol, label


@pytest.mark.parametrize("name", ["gdn", "titans"])
def test_backward_equals_the_portable_backward(name):
  """Every field's cotangent and the initial states' through the Hopper passes (the first pass
  in Mosaic GPU, the chunk-parallel one in Triton) equal the portable backward's."""
  fields, s0, m0 = bf16_fields(name, 64, 128 if name == "gdn" else 64, 192, seed=5)
  cot = jax.random.split(jax.random.PRNGKey(6), 3)
  dy = jax.random.normal(cot[0], fields[1].shape).astype(jnp.bfloat16)
  ds, dm = (jax.random.normal(key, s0.shape) for key in cot[1:])

  block = mosaic_recurrence.block_columns(m0 is not None)  # each kernel's default

  def grads(stage2: str):
    run = lambda f, s, m: chunk_recurrence(f, s, m, block, 4, 1, True, "triton", stage2)

    def cotangents(f, s, m):
      dfields, ds0, dm0 = jax.vjp(run, f, s, m)[1]((dy, ds, None if m is None else dm))
      return dfields + (ds0,) + (() if m is None else (dm0,))
    return settled(cotangents, fields, s0, m0)

  got, want = grads("mosaic_gpu"), grads("pallas")
  assert len(got) == len(want) == (12 if name == "titans" else 7)
  for x, y in zip(got, want):
    assert bool(jnp.all(jnp.isfinite(x)))
    assert rel(x, y) < 2e-3


def test_no_shared_memory_race():
  """The interpreter's race detector sees every TMA load and store of both kernels, with and
  without momentum, ordered against the products that read or write the same shared-memory
  slots (it reports the race when the wait before reusing the store buffers is removed)."""
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
    for name in ("gdn", "titans"):
      fields, s0, m0 = bf16_fields(name, 64, 64, 256, seed=4)  # shapes no other test traces
      dy = jnp.ones(fields[1].shape, jnp.bfloat16)
      settled(lambda f, s, m: mosaic_recurrence.forward(f, s, m, save_states=True,
                                                        interpret=True), fields, s0, m0)
      settled(lambda f, d, s, m: mosaic_recurrence.backward_states(f, d, s, m, interpret=True),
              fields, dy, s0, m0)
  assert not gpu_callbacks.get_races().races_found


@pytest.mark.parametrize("name", ["gdn", "titans"])
def test_op_with_the_hopper_kernels_is_within_bf16_error_of_the_reference(name):
  """Outputs, end state and gradients of the whole op (bf16 keys, values and queries) against
  the float32 token-by-token reference, as the portable kernels are tested."""
  level = level_of(name, 64, 64)
  inputs = random_inputs(level, 1, 128, seed=13, dtype=jnp.float32)
  low = inputs._replace(k=inputs.k.astype(jnp.bfloat16), v=inputs.v.astype(jnp.bfloat16),
                        q=inputs.q.astype(jnp.bfloat16))
  s0 = jnp.zeros((1, 2, 64, 64))
  m0 = s0 if name == "titans" else None
  op = lambda i: matrix_memory(CONFIGS[name], *i, s0, m0, interpret=True, stage2="mosaic_gpu")
  y, s, _ = settled(op, low)
  up = jax.tree.map(lambda x: x.astype(jnp.float32), low)
  zero = level.init_state({"w": jnp.zeros((2, 64, 64))}, 1)
  dy = jax.random.normal(jax.random.PRNGKey(5), y.shape)
  with jax.default_matmul_precision("highest"):
    want_state, want_y = run_reference(level, zero, up)
    grads = settled(jax.grad(lambda i: jnp.sum(op(i)[0].astype(jnp.float32) * dy)), low)
    want_grads = jax.grad(lambda i: jnp.sum(run_reference(level, zero, i)[1] * dy))(up)
  assert rel(y, want_y) < 1e-2
  assert rel(s, jnp.swapaxes(want_state.memory["w"], -1, -2)) < 1e-2
  names = ("k", "v", "q", "eta", "alpha") + (("beta",) if name == "titans" else ())
  for field in names:
    assert rel(getattr(grads, field), getattr(want_grads, field)) < 1e-2, field


@pytest.mark.parametrize("name", ["gdn", "titans"])
def test_level_runner_with_the_hopper_kernels_streams_any_length(name):
  """Two eager calls of 70 and 90 tokens (the second starts mid-chunk) equal the portable
  kernels'."""
  level = level_of(name, 64, 64)
  params = level.init(jax.random.PRNGKey(1), jnp.float32)
  inputs = random_inputs(level, 1, 160, seed=7, dtype=jnp.float32)
  inputs = inputs._replace(k=inputs.k.astype(jnp.bfloat16), v=inputs.v.astype(jnp.bfloat16),
                           q=inputs.q.astype(jnp.bfloat16))
  pieces = [jax.tree.map(lambda x: x[:, a:b], inputs) for a, b in ((0, 70), (70, 160))]

  def stream(kernel: str):
    state, ys = level.init_state(params, 1), []
    for piece in pieces:
      state, y = run_level(level, state, piece, interpret=True, stage2=kernel)
      ys.append(y)
    return state, jnp.concatenate(ys, axis=1)

  (state, y), (want_state, want_y) = stream("mosaic_gpu"), stream("pallas")
  assert int(state.phase) == int(want_state.phase) == 160 % 64
  assert rel(y, want_y) < 2e-3
  for got, want in zip(jax.tree.leaves(state.memory) + jax.tree.leaves(state.anchor),
                       jax.tree.leaves(want_state.memory) + jax.tree.leaves(want_state.anchor)):
    assert rel(got, want) < 1e-3


def test_default_stage2(monkeypatch):
  """The Hopper kernels for compiled Triton launches on a Hopper GPU that they cover, else the
  portable ones; an explicit choice they cannot run names the reason."""
  monkeypatch.setattr(runner, "hopper_gpu", lambda: True)
  compiled = launch_options(interpret=False, backend="triton")
  pick = lambda launch=compiled, chunk=64, d_k=128, dtype=jnp.bfloat16, momentum=False: (
      default_stage2(chunk, d_k, 128, dtype, momentum, launch))
  assert pick() == pick(d_k=64) == pick(dtype=jnp.float16) == pick(momentum=True) == "mosaic_gpu"
  assert pick(launch=launch_options(interpret=True, backend="triton")) == "pallas"
  assert pick(launch=launch_options(interpret=True, backend="tpu")) == "pallas"
  # a block the Hopper kernels do not take (the portable kernels' 128) keeps the portable ones
  assert pick(launch=launch_options(interpret=False, backend="triton", block_v=128)) == "pallas"
  assert pick(launch=launch_options(interpret=False, backend="triton", block_v=32)) == (
      "mosaic_gpu")
  assert pick(dtype=jnp.float32) == pick(chunk=32) == "pallas"
  beyond_shared_memory = (pick(chunk=128), pick(d_k=256), pick(d_k=192, momentum=True))
  assert beyond_shared_memory == ("pallas",) * 3
  monkeypatch.setattr(runner, "hopper_gpu", lambda: False)  # an older GPU, or none
  assert pick() == "pallas"
  with pytest.raises(ValueError, match="stage2 must be None or one of"):
    launch_options(stage2="mosaic")
  with pytest.raises(ValueError, match="'mosaic_gpu' with backend='triton' only"):
    launch_options(stage2="mosaic_gpu", backend="tpu")
  x = jnp.ones((1, 64, 2, 192), jnp.bfloat16)
  g, s0 = jnp.ones((1, 64, 2)), jnp.zeros((1, 2, 192, 192))
  with pytest.raises(ValueError, match="cannot run this op: chunk=64, d_k=192 with momentum "
                                       "need 327680 bytes of shared memory, more than 232448"):
    matrix_memory(TITANS, x, x, x, g, g, g, s0, s0, interpret=True, stage2="mosaic_gpu")
  with pytest.raises(ValueError, match="must be bfloat16 or float16"):
    matrix_memory(GDN, *(x.astype(jnp.float32),) * 3, g, g, g, s0, interpret=True,
                  stage2="mosaic_gpu")
  fields, s0, m0 = bf16_fields("titans", 64, 64, 64)
  with pytest.raises(ValueError, match="the momentum fields and the momentum state come "
                                       "together \\(10 fields, momentum state None\\)"):
    mosaic_recurrence.forward(fields, s0, None)
  with pytest.raises(ValueError, match="needs float32 states, got bfloat16"):
    mosaic_recurrence.backward_states(fields, fields[1], s0, m0.astype(jnp.bfloat16))


@pytest.mark.parametrize("name", ["gdn", "titans"])
def test_hopper_kernels_lower_to_mosaic_gpu(monkeypatch, name):
  """Cross-platform lowering (no GPU needed) runs Mosaic GPU's own lowering of the kernels,
  which rejects layouts and transfers the interpreter accepts; at ``d_k`` 128 Titans' kernels
  take their 224 KB of shared memory."""
  from jax._src.pallas.triton import gpu_info  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(gpu_info, "get_gpu_info",  # for the backward's Triton kernels
                      lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
  x = jnp.ones((1, 128, 2, 128), jnp.bfloat16)
  g, s0 = jnp.ones((1, 128, 2)), jnp.zeros((1, 2, 128, 128))
  m0 = s0 if name == "titans" else None

  def loss(k, v, q, s0, gates):
    y, s, m = matrix_memory(CONFIGS[name], k, v, q, gates, gates, gates, s0, m0,
                            interpret=False, stage2="mosaic_gpu", stage1="jax")
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s) + (0.0 if m is None else jnp.sum(m))

  text = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4))).trace(x, x, x, s0, g).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "matrix_memory_fwd_mosaic_gpu" in text
  assert "matrix_memory_bwd_states_mosaic_gpu" in text
  # the backward's chunk-parallel pass stays Triton
  assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("name, block", [("gdn", 32), ("titans", 16)])
def test_narrower_blocks_equal_the_default(name, block):
  """The kernels in blocks of fewer ``d_v`` columns (more programs; each swizzles its shared
  memory for its own block) give the default block's forward and first backward pass."""
  fields, s0, m0 = bf16_fields(name, 64, 64, 128, seed=9)
  dy = jax.random.normal(jax.random.PRNGKey(2), fields[1].shape).astype(jnp.bfloat16)

  def both(f, d, s, m, block):
    return (mosaic_recurrence.forward(f, s, m, block=block, save_states=True, interpret=True),
            mosaic_recurrence.backward_states(f, d, s, m, block=block, interpret=True))

  got = jax.tree.leaves(settled(lambda *a: both(*a, block), fields, dy, s0, m0))
  want = jax.tree.leaves(settled(lambda *a: both(*a, None), fields, dy, s0, m0))
  assert len(got) == len(want) == (6 if name == "gdn" else 10)
  for x, y in zip(got, want):
    assert bool(jnp.all(jnp.isfinite(x)))
    assert rel(x, y) < 1e-6
  with pytest.raises(ValueError, match=r"the d_v block must be one of \(16, 32, 64\), got 8"):
    mosaic_recurrence.forward(fields, s0, m0, block=8)
