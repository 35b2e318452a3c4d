"""The MLP-memory kernel (op 2) against the token-by-token reference, in interpret mode.

Every rule (GD, the three DGD variants, with and without momentum) and read is checked for
outputs and states (memory, momentum, anchor, phase) when a sequence is streamed in pieces from
phase 0 and mid-chunk; memory variants (layers 1-3, identity / skip / no residual, activations,
padded dimensions and chunks) likewise; gradients against ``jax.grad`` of the reference and
numerically; the dispatcher; the whole self-modifying Titans layer against its chunked form;
uncovered levels; the Mosaic-TPU form in interpret mode; and that both kernels lower to Mosaic
for a TPU and to Triton for a Hopper GPU with every ``dot`` on power-of-two tiles of at least 16.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.test_util import check_grads

from nlj.core import Level, MatrixMemory, MLPMemory, Rule, compositions
from nlj.core.dispatch import resolve
from nlj.core.objectives import L2, Huber
from nlj.core.reference import run_reference
from nlj.layers.selfmod import SelfModConfig, SelfModifyingTitans
from nlj_kernels.mlp_memory import KERNEL, launch_options, run_level, unsupported_reason
from tests.core.helpers import max_diff, random_inputs, slice_inputs

DGD_VARIANTS = ("normalized", "plain", "neurips")
READS = ("after", "before", "boundary")

# memory variants: (MLPMemory, rule, read, chunk)
VARIANTS = {
    "one_layer_identity": (MLPMemory(16, 16, 16, 1, "silu"), Rule("dgd", momentum=True), "after",
                           16),
    "three_layers_gelu": (MLPMemory(16, 16, 32, 3, "gelu"), Rule("gd", momentum=True), "before",
                          16),
    "selfmod_eta_memory": (MLPMemory(16, 1, 32, 2, "silu"),
                           Rule("dgd", momentum=True, dgd_variant="plain"), "boundary", 16),
    "skip_padded_dims_tanh": (MLPMemory(24, 20, 40, 2, "tanh"), Rule("dgd"), "after", 12),
    "no_residual_relu": (MLPMemory(16, 32, 16, 2, "relu", residual=False),
                         Rule("dgd", dgd_variant="neurips", momentum=True), "before", 32),
    "one_layer_skip_identity_act": (MLPMemory(32, 16, 16, 1, "identity"), Rule("gd"), "after", 4),
}


def make_level(rule: Rule, read: str, memory: MLPMemory | None = None, chunk: int = 16,
               heads: int = 2) -> Level:
  return Level(memory or MLPMemory(16, 16, 32, 2, "silu"), L2(), rule, chunk, "boundary", read,
               heads)


def initial_state(level: Level, batch: int, seed: int = 1):
  params = level.init(jax.random.PRNGKey(seed), jnp.float64)
  return params, level.init_state(params, batch)


def assert_streams_like_reference(level, inputs, state, pieces, tol=1e-10, **launch):
  """Run ``inputs`` in ``pieces`` (jitted: the carried phase is traced) against one reference;
  ``launch``: more launch options (``backend``)."""
  want_state, want_y = run_reference(level, state, inputs)
  step = jax.jit(lambda s, x: run_level(level, s, x, interpret=True, **launch))
  got, ys = state, []
  for start, stop in pieces:
    got, y = step(got, slice_inputs(inputs, start, stop))
    ys.append(y)
  if inputs.q is None:
    assert all(y is None for y in ys)
  else:
    assert max_diff(jnp.concatenate(ys, 1), want_y) < tol
  assert int(got.phase) == int(want_state.phase)
  assert max_diff((got.memory, got.momentum, got.anchor),
                  (want_state.memory, want_state.momentum, want_state.anchor)) < tol


@pytest.mark.parametrize("step,momentum,read", itertools.product(("gd", "dgd"), (False, True),
                                                                  READS))
def test_rules_and_reads_equal_reference(step, momentum, read):
  """Pieces of 20 tokens start at phases 0 and 4 of chunks of 16; the DGD variants (which only
  change stage 1's coefficients) take turns."""
  with jax.enable_x64(True):
    variant = DGD_VARIANTS[(2 * READS.index(read) + momentum) % 3]
    level = make_level(Rule(step, momentum=momentum, dgd_variant=variant), read)
    inputs = random_inputs(level, batch=2, seq=40, seed=READS.index(read) + 3 * momentum)
    _, state = initial_state(level, 2)
    assert_streams_like_reference(level, inputs, state, ((0, 20), (20, 40)))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_memory_variants_stream_like_reference(name):
  with jax.enable_x64(True):
    memory, rule, read, chunk = VARIANTS[name]
    level = make_level(rule, read, memory, chunk)
    inputs = random_inputs(level, batch=2, seq=45, seed=sorted(VARIANTS).index(name))
    _, state = initial_state(level, 2)
    assert_streams_like_reference(level, inputs, state, ((0, 5), (5, 38), (38, 45)))


def test_aligned_unread_and_alpha_resets():
  with jax.enable_x64(True):
    level = make_level(Rule("dgd", momentum=True, dgd_variant="plain"), "after", chunk=16)
    inputs = random_inputs(level, batch=1, seq=48, seed=5)
    inputs = inputs._replace(alpha=inputs.alpha.at[:, 7].set(0.0).at[:, 20].set(0.0))
    _, state = initial_state(level, 1)
    want_state, want_y = run_reference(level, state, inputs)
    got_state, got_y = run_level(level, state, inputs, aligned=True, interpret=True)
    assert max_diff(got_y, want_y) < 1e-10
    assert max_diff(got_state, want_state) < 1e-10
    assert_streams_like_reference(level, inputs._replace(q=None), state, ((0, 24), (24, 48)))


def test_reference_distinguishes_reads_and_anchors():
  """The equalities above have power: the reads and a wrong anchor change the results."""
  with jax.enable_x64(True):
    rule = Rule("dgd", momentum=True)
    inputs = random_inputs(make_level(rule, "after"), 1, 32, seed=2)
    _, state = initial_state(make_level(rule, "after"), 1)
    ys = [run_reference(make_level(rule, read), state, inputs)[1] for read in READS]
    assert min(max_diff(a, b) for a, b in itertools.combinations(ys, 2)) > 1e-3
    moved = state._replace(anchor=jax.tree.map(lambda a: 1.01 * a, state.anchor))
    level = make_level(rule, "before")
    assert max_diff(run_reference(level, moved, inputs)[1],
                    run_reference(level, state, inputs)[1]) > 1e-3


def _loss(level, runner, params, inputs, batch):
  state, y = runner(level, level.init_state(params, batch), inputs)
  weights = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
  total = jnp.sum(y * weights)
  total += sum(jnp.sum(w ** 2) for w in jax.tree.leaves(state.memory))
  total += sum(jnp.sum(jnp.cos(w)) for w in jax.tree.leaves(state.anchor))
  return total + sum(jnp.sum(jnp.sin(w)) for w in jax.tree.leaves(state.momentum))


@pytest.mark.parametrize("rule,read,memory,backend", [
    (Rule("gd", momentum=True), "after", MLPMemory(16, 16, 32, 2, "silu"), "triton"),
    (Rule("dgd"), "boundary", MLPMemory(16, 24, 16, 3, "tanh"), "triton"),
    (Rule("dgd", momentum=True, dgd_variant="plain"), "before", MLPMemory(16, 16, 32, 2, "silu"),
     "tpu"),
])
def test_gradients_equal_reference(rule, read, memory, backend):
  with jax.enable_x64(True):
    level = make_level(rule, read, memory)
    inputs = random_inputs(level, 2, 37, seed=7)  # 37 = 2 chunks + 5: an incomplete last chunk
    params, _ = initial_state(level, 2)
    grad = lambda runner: jax.grad(lambda p, i: _loss(level, runner, p, i, 2), (0, 1))(
        params, inputs)
    kernel = lambda *a: run_level(*a, interpret=True, backend=backend)
    assert max_diff(grad(kernel), grad(run_reference)) < 1e-9


@pytest.mark.parametrize("rule,read", [(Rule("dgd", momentum=True, dgd_variant="plain"), "after"),
                                       (Rule("gd"), "boundary")])
def test_tpu_backend_streams_like_reference(rule, read):
  """The Mosaic-TPU form of the kernels (per-chunk scalars whole in SMEM, a sequential backward
  grid), in interpret mode, from phase 0 and mid-chunk."""
  with jax.enable_x64(True):
    level = make_level(rule, read)
    inputs = random_inputs(level, batch=2, seq=40, seed=13)
    _, state = initial_state(level, 2)
    assert_streams_like_reference(level, inputs, state, ((0, 20), (20, 40)), backend="tpu")


@pytest.mark.slow
def test_gradients_from_mid_chunk_state():
  """Gradients reach a carried state whose anchor differs from its memory (phase 6), through a
  piece that completes no chunk (the anchor passes through) and one that does."""
  with jax.enable_x64(True):
    level = make_level(Rule("dgd", momentum=True, dgd_variant="plain"), "before",
                       MLPMemory(16, 8, 32, 2, "silu"))
    inputs = random_inputs(level, 1, 30, seed=9)
    _, state = initial_state(level, 1)
    state, _ = run_reference(level, state, slice_inputs(inputs, 0, 6))
    rest = slice_inputs(inputs, 6, 30)
    squares = lambda tree: sum(jnp.sum(jnp.sin(w) ** 2) for w in jax.tree.leaves(tree))

    def loss(runner, fast, rest):
      mid, y1 = runner(level, type(state)(*fast, state.phase), slice_inputs(rest, 0, 5))
      end, y2 = runner(level, mid, slice_inputs(rest, 5, 24))
      return jnp.sum(jnp.sin(y1)) + jnp.sum(jnp.sin(y2)) + squares(mid[:3]) + squares(end[:3])

    grad = lambda runner: jax.grad(lambda s, i: loss(runner, s, i), (0, 1))(state[:3], rest)
    kernel = lambda *a: run_level(*a, interpret=True)
    assert max_diff(grad(kernel), grad(run_reference)) < 1e-9


def test_check_grads_through_the_kernels():
  with jax.enable_x64(True):
    level = make_level(Rule("dgd", momentum=True, dgd_variant="plain"), "after",
                       MLPMemory(16, 16, 16, 2, "silu"), heads=1)
    inputs = random_inputs(level, 1, 20, seed=11)
    params, _ = initial_state(level, 1)

    def f(params, k, v, q, eta, alpha, beta):
      state, y = run_level(level, level.init_state(params, 1),
                           inputs._replace(k=k, v=v, q=q, eta=eta, alpha=alpha, beta=beta),
                           interpret=True)
      return jnp.sum(y ** 2) + sum(jnp.sum(w * w) for w in jax.tree.leaves(state[:3]))

    check_grads(f, (params,) + tuple(inputs), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_dispatcher_takes_the_kernel_for_covered_levels():
  with jax.enable_x64(True):
    level = compositions.titans_memory(16, 32, heads=2, chunk=16)
    assert resolve(level, "pallas") is KERNEL.run
    inputs = random_inputs(level, 1, 20, seed=19)
    _, state = initial_state(level, 1)
    _, y_pallas = level.run(state, inputs, impl="pallas")
    _, y_chunked = level.run(state, inputs, impl="chunked")
    assert max_diff(y_pallas, y_chunked) < 1e-10
    exact = Level(MLPMemory(16, 16, 32), L2(), Rule("gd"), 16, "exact", heads=2)
    with pytest.raises(ValueError, match="no registered kernel covers memory=MLPMemory"):
      exact.run(exact.init_state(exact.init(jax.random.PRNGKey(0)), 1), inputs, impl="pallas")


@pytest.mark.slow
def test_selfmod_layer_under_pallas_equals_chunked():
  """The whole self-modifying Titans mixer with ``impl="pallas"``: the kernel runs all five
  memories (each stepped one chunk at a time inside the nested scan, then token by token in a
  tail of 3 tokens) with the chunked layer's outputs, states and gradients."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 19, 16), jnp.float64)
    results = []
    for impl in ("chunked", "pallas"):
      config = SelfModConfig(d_model=16, heads=2, chunk_memory=8, chunk_other=4, eta_scale=0.3,
                             impl=impl)
      layer = SelfModifyingTitans(config, nnx.Rngs(0), param_dtype=jnp.float64)
      graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

      def loss(p, graphdef=graphdef, rest=rest):
        y, cache = nnx.merge(graphdef, p, rest)(x)
        return jnp.sum(jnp.sin(y)), (y, cache.levels)

      results.append(jax.jit(jax.grad(loss, has_aux=True))(params))
    assert all(resolve(level, "pallas") is KERNEL.run for level in layer.levels.values())
    assert max_diff(results[1], results[0]) < 1e-10


@pytest.mark.parametrize("level,reason", [
    (Level(MatrixMemory(16, 16), L2(), Rule("gd"), 16), "not MLPMemory"),
    (Level(MLPMemory(16, 16, 16), Huber(), Rule("gd"), 16), "objective 'huber'"),
    (Level(MLPMemory(16, 16, 16), L2(), Rule("gd"), 16, "exact"), "semantics 'exact'"),
    (Level(MLPMemory(16, 16, 16), L2(), Rule("gd", orthogonalize=True), 16), "Newton-Schulz"),
    (Level(MLPMemory(16, 16, 16), L2(), Rule("gd", stop_grad_writes=True), 16), "stop-gradient"),
    (Level(MLPMemory(16, 16, 16), L2(), Rule("gd"), 256), "chunk=256 > 128"),
    (Level(MLPMemory(16, 16, 512), L2(), Rule("gd"), 16), "hidden=512 > 256"),
    (Level(MLPMemory(300, 16, 16), L2(), Rule("gd"), 16), "d_in=300 > 256"),
])
def test_uncovered_levels_are_named(level, reason):
  assert reason in unsupported_reason(level)


def test_covered_levels_have_no_reason():
  assert unsupported_reason(Level(MLPMemory(16, 16, 512, layers=1), L2(), Rule("gd"), 16)) is None
  assert unsupported_reason(compositions.titans_memory(64, 256, 16, 16)) is None


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for x in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(x, "eqns"):
        yield x
      elif hasattr(getattr(x, "jaxpr", None), "eqns"):
        yield x.jaxpr


def _kernel_jaxprs(jaxpr):
  """The kernel bodies of every ``pallas_call`` in ``jaxpr`` (recursively)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn.params["jaxpr"]
    else:
      for sub in _subjaxprs(eqn):
        yield from _kernel_jaxprs(sub)


LOWERING_CASES = [  # self-modifying Titans' η memory, Titans' deep memory, a 3-layer GELU memory
    (Rule("dgd", momentum=True, dgd_variant="plain"), "boundary", MLPMemory(64, 1, 128, 2)),
    (Rule("gd", momentum=True), "after", MLPMemory(64, 64, 256, 2)),
    (Rule("dgd"), "before", MLPMemory(32, 48, 64, 3, "gelu")),
]


def _equations(jaxpr):
  """Every equation of ``jaxpr`` and its sub-jaxprs."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in _subjaxprs(eqn):
      yield from _equations(sub)


@pytest.mark.parametrize("rule,read,memory", LOWERING_CASES)
def test_kernels_lower_for_tpu(rule, read, memory):
  """Cross-platform lowering to Mosaic (no TPU needed) catches what Pallas' TPU backend
  rejects, e.g. scalar blocks outside SMEM; Mosaic's own compiler runs only on a TPU."""
  level = make_level(rule, read, memory, chunk=16)
  inputs = random_inputs(level, 1, 40, seed=0, dtype=jnp.float32)
  params = level.init(jax.random.PRNGKey(0))

  def loss(params, inputs):
    state, y = run_level(level, level.init_state(params, 1), inputs, interpret=False,
                         backend="tpu")
    return jnp.sum(y) + sum(jnp.sum(w) for w in jax.tree.leaves(state[:3]))

  text = jax.jit(jax.grad(loss, (0, 1))).trace(params, inputs).lower(
      lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 2  # the forward and the backward kernel


@pytest.mark.parametrize("rule,read,memory", LOWERING_CASES)
def test_kernels_lower_to_triton_for_hopper(monkeypatch, rule, read, memory):
  """Cross-platform lowering (no GPU needed) catches ops Pallas' Triton backend rejects; Triton's
  ``dot`` needs power-of-two sides of at least 16, which lowering does not check, so the kernel
  bodies are checked for that."""
  from jax._src.pallas.triton import gpu_info  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(gpu_info, "get_gpu_info",
                      lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
  level = make_level(rule, read, memory, chunk=16)
  inputs = random_inputs(level, 1, 40, seed=0, dtype=jnp.float32)
  params = level.init(jax.random.PRNGKey(0))

  def loss(params, inputs):
    state, y = run_level(level, level.init_state(params, 1), inputs, interpret=False)
    return jnp.sum(y) + sum(jnp.sum(w) for w in jax.tree.leaves(state[:3]))

  grad = jax.grad(loss, (0, 1))
  text = jax.jit(grad).trace(params, inputs).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2  # the forward and the backward kernel
  kernels = list(_kernel_jaxprs(jax.make_jaxpr(grad)(params, inputs).jaxpr))
  assert len(kernels) == 2
  power = lambda d: d >= 16 and d & (d - 1) == 0
  dots = [e for kernel in kernels for e in _equations(kernel) if e.primitive.name == "dot_general"]
  assert dots
  for eqn in dots:
    for var in eqn.invars:
      assert all(power(d) for d in var.aval.shape), (eqn, var.aval.shape)


@pytest.mark.parametrize("setting,want", [(None, None), ("BF16_BF16_F32",
                                                       jax.lax.DotAlgorithmPreset.BF16_BF16_F32)])
def test_kernel_products_follow_the_default_matmul_precision(setting, want):
  """With ``precision=None`` every product of both kernels takes JAX's default matmul precision
  when traced: ``jax.default_matmul_precision("BF16_BF16_F32")`` gives bfloat16 operands (what
  lets op 2's backward fit an H100's shared memory at self-modifying Titans' widths)."""
  level = make_level(Rule("dgd", momentum=True, dgd_variant="plain"), "boundary",
                     MLPMemory(16, 16, 32, 2), chunk=16)
  inputs = random_inputs(level, 1, 40, seed=0, dtype=jnp.float32)
  params = level.init(jax.random.PRNGKey(0))

  def loss(params, inputs):
    state, y = run_level(level, level.init_state(params, 1), inputs, interpret=True)
    return jnp.sum(y) + sum(jnp.sum(w) for w in jax.tree.leaves(state[:3]))

  with jax.default_matmul_precision(setting):
    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(params, inputs).jaxpr
  kernels = list(_kernel_jaxprs(jaxpr))
  assert len(kernels) == 2  # the forward and the backward kernel
  precisions = {e.params["precision"] for kernel in kernels for e in _equations(kernel)
                if e.primitive.name == "dot_general"}
  assert precisions == {want}


def test_launch_options_name_bad_backends():
  with pytest.raises(ValueError, match=r"backend must be one of \('triton', 'tpu'\), got 'cuda'"):
    launch_options(backend="cuda")
  assert launch_options(backend="tpu", interpret=True).backend == "tpu"
  assert launch_options(interpret=True).backend == "triton"  # on a CPU: Triton in interpret mode
