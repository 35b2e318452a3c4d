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


def gdn_level(d_in: int, d_out: int, heads: int = 2) -> Level:
  return Level(MatrixMemory(d_in, d_out, init_scale=1.0), L2(), Rule("gd", grad_at_retained=True),
               64, "exact", "after", heads)


def settled(f, *args):
  """``jax.jit(f)(*args)``, waited for (see the module docstring)."""
  return jax.block_until_ready(jax.jit(f)(*args))


def rel(a: jax.Array, b: jax.Array) -> float:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def bf16_fields(d_k: int, d_v: int, seq: int, seed: int = 3):
  """Stage-1 fields of a Gated DeltaNet (2 heads, batch 1) in bf16, and a random state."""
  level = gdn_level(d_k, d_v)
  inputs = random_inputs(level, 1, seq, seed=seed, dtype=jnp.float32)
  coeffs = prepare(GDN, *inputs, jnp.ones((1, seq, 2)))
  s0 = 0.3 * jax.random.normal(jax.random.PRNGKey(seed), (1, 2, d_k, d_v))
  return kernel_fields(coeffs, jnp.bfloat16), s0


def test_forward_equals_the_portable_forward_and_writes_everything():
  """Outputs, end state and saved chunk-start states equal the portable kernel's (both round
  ``S`` and ``U`` to bf16 for the products; the interpreter fills unwritten outputs with NaN)."""
  fields, s0 = bf16_fields(64, 128, 192)  # 3 chunks, 2 value blocks
  y, s, states = settled(
      lambda f, s: mosaic_recurrence.forward(f, s, save_states=True, interpret=True), fields, s0)
  want_y, want_s, _, want_states, _ = pallas_recurrence.forward(
      fields, s0, None, block_v=64, save_states=True, interpret=True)
  for got in (y, s, states):
    assert bool(jnp.all(jnp.isfinite(got)))
  assert y.dtype == states.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert rel(y, want_y) < 2e-3
  assert rel(s, want_s) < 1e-3
  assert rel(states, want_states) < 1e-3


def test_backward_equals_the_portable_backward():
  """Every field's cotangent and the initial state's through the Hopper passes (the first pass
  in Mosaic GPU, the chunk-parallel one in Triton) equal the portable backward's."""
  fields, s0 = bf16_fields(64, 128, 192, seed=5)
  cot = jax.random.split(jax.random.PRNGKey(6), 2)
  dy = jax.random.normal(cot[0], fields[1].shape).astype(jnp.bfloat16)
  ds = jax.random.normal(cot[1], s0.shape)

  def grads(stage2: str):
    run = lambda f, s: chunk_recurrence(f, s, None, 64, 4, 1, True, "triton", stage2)[:2]

    def cotangents(f, s):
      dfields, ds0 = jax.vjp(run, f, s)[1]((dy, ds))
      return dfields + (ds0,)
    return settled(cotangents, fields, s0)

  for got, want in zip(grads("mosaic_gpu"), grads("pallas")):
    assert bool(jnp.all(jnp.isfinite(got)))
    assert rel(got, want) < 2e-3


def test_no_shared_memory_race():
  """The interpreter's race detector sees every TMA load and store of both kernels ordered
  against the products that read or write the same shared-memory slots (it reports the race
  when the wait before reusing the store buffers is removed)."""
  fields, s0 = bf16_fields(64, 64, 256, seed=4)  # a shape no other test traces
  dy = jnp.ones(fields[1].shape, jnp.bfloat16)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
    settled(lambda f, s: mosaic_recurrence.forward(f, s, save_states=True, interpret=True),
            fields, s0)
    settled(lambda f, d, s: mosaic_recurrence.backward_states(f, d, s, interpret=True),
            fields, dy, s0)
  assert not gpu_callbacks.get_races().races_found


def test_op_with_the_hopper_kernels_is_within_bf16_error_of_the_reference():
  """Outputs, end state and gradients of the whole op (bf16 keys, values and queries) against
  the float32 token-by-token reference, as the portable kernels are tested."""
  level = gdn_level(64, 64)
  inputs = random_inputs(level, 1, 128, seed=13, dtype=jnp.float32)
  low = inputs._replace(k=inputs.k.astype(jnp.bfloat16), v=inputs.v.astype(jnp.bfloat16),
                        q=inputs.q.astype(jnp.bfloat16))
  s0 = jnp.zeros((1, 2, 64, 64))
  op = lambda i: matrix_memory(GDN, *i, s0, interpret=True, stage2="mosaic_gpu")
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
  for name in ("k", "v", "q", "eta", "alpha"):
    assert rel(getattr(grads, name), getattr(want_grads, name)) < 1e-2, name


def test_level_runner_with_the_hopper_kernels_streams_any_length():
  """Two eager calls of 70 and 90 tokens (the second starts mid-chunk) equal the portable
  kernels'."""
  level = gdn_level(64, 64)
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
  assert rel(state.memory["w"], want_state.memory["w"]) < 1e-3
  assert rel(state.anchor["w"], want_state.anchor["w"]) < 1e-3


def test_default_stage2(monkeypatch):
  """The Hopper kernels for compiled Triton launches on a Hopper GPU that they cover, else the
  portable ones; an explicit choice they cannot run names the reason."""
  monkeypatch.setattr(runner, "hopper_gpu", lambda: True)
  compiled = launch_options(interpret=False, backend="triton")
  pick = lambda launch=compiled, chunk=64, d_k=128, dtype=jnp.bfloat16, momentum=False: (
      default_stage2(chunk, d_k, 128, dtype, momentum, launch))
  assert pick() == pick(d_k=64) == pick(dtype=jnp.float16) == "mosaic_gpu"
  assert pick(launch=launch_options(interpret=True, backend="triton")) == "pallas"
  assert pick(launch=launch_options(interpret=True, backend="tpu")) == "pallas"
  assert pick(momentum=True) == pick(dtype=jnp.float32) == pick(chunk=32) == "pallas"
  assert pick(chunk=128) == pick(d_k=256) == "pallas"  # beyond shared memory
  monkeypatch.setattr(runner, "hopper_gpu", lambda: False)  # an older GPU, or none
  assert pick() == "pallas"
  with pytest.raises(ValueError, match="stage2 must be None or one of"):
    launch_options(stage2="mosaic")
  with pytest.raises(ValueError, match="'mosaic_gpu' with backend='triton' only"):
    launch_options(stage2="mosaic_gpu", backend="tpu")
  momentum = OpConfig(64, "boundary", "l2", "after", momentum=True)
  x = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
  g, s0 = jnp.ones((1, 64, 2)), jnp.zeros((1, 2, 64, 64))
  with pytest.raises(ValueError, match="cannot run this op: momentum is not covered"):
    matrix_memory(momentum, x, x, x, g, g, g, s0, s0, interpret=True, stage2="mosaic_gpu")
  with pytest.raises(ValueError, match="must be bfloat16 or float16"):
    matrix_memory(GDN, *(x.astype(jnp.float32),) * 3, g, g, g, s0, interpret=True,
                  stage2="mosaic_gpu")


def test_hopper_kernels_lower_to_mosaic_gpu(monkeypatch):
  """Cross-platform lowering (no GPU needed) runs Mosaic GPU's own lowering of the kernel,
  which rejects layouts and transfers the interpreter accepts."""
  from jax._src.pallas.triton import gpu_info  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(gpu_info, "get_gpu_info",  # for the backward's Triton kernels
                      lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
  x = jnp.ones((1, 128, 2, 128), jnp.bfloat16)
  g, s0 = jnp.ones((1, 128, 2)), jnp.zeros((1, 2, 128, 128))

  def loss(k, v, q, s0, gates):
    y, s, _ = matrix_memory(GDN, k, v, q, gates, gates, gates, s0, interpret=False,
                            stage2="mosaic_gpu", stage1="jax")
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)

  text = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4))).trace(x, x, x, s0, g).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "matrix_memory_fwd_mosaic_gpu" in text
  assert "matrix_memory_bwd_states_mosaic_gpu" in text
  # the backward's chunk-parallel pass stays Triton
  assert text.count("__gpu$xla.gpu.triton") == 1
