"""GPU check and benchmark of the matrix-memory kernel (op 1), with the peers in the same run.

    python benchmarks/kernels_matrix_memory.py --check --bench --out=DIR

``--check``: relative errors ``‖out − ref‖/‖ref‖`` of the Pallas kernel against the token-by-token
reference (float32, highest matmul precision) for the covered rules, head dims 64/128/256,
lengths the chunk does not divide and batch 1; gradients (head dims 64 and 128) against
``jax.vjp`` of the reference; bfloat16 inputs (values and gradients against the reference on
the same values in float32); and a poisoned-output run (every element of ``y`` and ``S``
written).

``--bench``: forward and forward+backward milliseconds (median of ``--repeats``) at
B×T×H×D ∈ {8×2048, 4×4096, 2×8192, 1×16384} × 16 × 128 with bfloat16 inputs, for the kernel
(Gated DeltaNet semantics with the op's default stage 1 -- the Pallas tiles kernels on a GPU --
and with the plain-JAX stage 1, and Titans' linear memory with momentum), the chunked JAX form
of the same level (float32, as ``Level.run`` computes; launch, tile-shape and chunk-size variants
of :data:`VARIANTS` by ``--variants``), and jax-linear-attention's Gated DeltaNet
(Pallas Mosaic GPU and plain JAX) when ``jla`` is importable. Ceilings (bf16 matmul TFLOP/s,
device copy GB/s) are measured in the same run. A variant or peer that fails (e.g. a kernel
asking for more shared memory than the card has) is recorded as an error, not fatal. Prints a
table and writes JSON. FLA's kernels (PyTorch) are timed by ``peers_fla.py`` in a process of its
own on the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nlj.core import Level, LevelInputs, MatrixMemory, Rule, compositions
from nlj.core.objectives import L2, DotProduct
from nlj.core.reference import run_reference
from nlj_kernels.matrix_memory import OpConfig, matrix_memory, run_level
from nlj_kernels.matrix_memory import pallas_recurrence
from nlj_kernels.matrix_memory.pallas_stage1 import prepare_pallas
from nlj_kernels.matrix_memory.prepare import prepare
from nlj_kernels.matrix_memory.runner import kernel_fields, launch_options
from timing import timed

CHECK_CASES = (  # (level, head dim, batch, length): lengths the chunk of 64 does not divide
    ("gated_deltanet", 64, 1, 200), ("gated_deltanet", 128, 2, 130),
    ("gated_deltanet", 256, 1, 100), ("deltanet", 128, 1, 150), ("linear_attention", 64, 2, 77),
    ("dgd_boundary", 64, 1, 200), ("titans_linear", 64, 1, 200), ("titans_linear", 128, 2, 130))
SHAPES = ((8, 2048, 16, 128), (4, 4096, 16, 128), (2, 8192, 16, 128), (1, 16384, 16, 128))
CHECK_LEVELS = {
    "gated_deltanet": lambda d: compositions.gated_deltanet(d, d, 2, 64),
    "deltanet": lambda d: compositions.deltanet(d, d, 2, 64),
    "linear_attention": lambda d: Level(MatrixMemory(d, d), DotProduct(), Rule("gd"), 64, "exact",
                                        "after", 2),
    "dgd_boundary": lambda d: compositions.dgd_memory(d, d, 2, 64, read="before"),
    "titans_linear": lambda d: Level(MatrixMemory(d, d), L2(), Rule("gd", momentum=True), 64,
                                     "boundary", "after", 2),
}


def timed_ms(f, *args, repeats: int) -> float:
  """Median milliseconds of ``f(*args)`` after a warm-up call."""
  return timed(f, *args, repeats=repeats)[1]


def record(row: dict, key: str, f, *args, repeats: int) -> None:
  """``row[key + "_ms"]`` (median) and ``row[key + "_first_s"]`` (compilation + one call); a
  failure (e.g. a kernel asking for more shared memory than the card has) goes to
  ``row[key + "_error"]`` instead, so the other variants and peers still run."""
  try:
    row[f"{key}_first_s"], row[f"{key}_ms"] = timed(f, *args, repeats=repeats)
  except Exception as error:  # recorded, not fatal
    row[f"{key}_error"] = repr(error)[:300]
    print(f"  {key}: error {row[f'{key}_error']}", flush=True)
    return
  print(f"  {key}: {row[f'{key}_ms']:.3f} ms (first call {row[f'{key}_first_s']:.1f} s)",
        flush=True)


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(key, b, t, h, d, dtype=jnp.float32):
  ks = jax.random.split(key, 6)
  k = jax.random.normal(ks[0], (b, t, h, d), jnp.float32)
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
  v = jax.random.normal(ks[1], (b, t, h, d), dtype)
  q = jax.random.normal(ks[2], (b, t, h, d), dtype)
  eta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
  alpha = jax.nn.sigmoid(3.0 + jax.random.normal(ks[4], (b, t, h)))
  beta = jax.nn.sigmoid(jax.random.normal(ks[5], (b, t, h)))
  return LevelInputs(k, v, q, eta, alpha, beta)


def streamed_rows(stage1: str | None) -> list[dict]:
  """bf16 Gated DeltaNet and Titans (d 128) through the level runner in two calls of 100 and
  156 tokens, the default kernels against ``stage2="pallas"`` (the Triton sequential passes):
  the second call starts mid-chunk from nonzero states (and momentum), which the other bf16
  rows, starting from zeros, do not load. Relative differences of the outputs and of every
  state array."""
  rows = []
  for name in ("gated_deltanet", "titans_linear"):
    level = CHECK_LEVELS[name](128)
    params = Level(MatrixMemory(128, 128, init_scale=1.0), heads=2).init(jax.random.PRNGKey(9))
    inp = inputs(jax.random.PRNGKey(10), 2, 256, 2, 128, jnp.bfloat16)
    run = jax.jit(lambda s, i, stage2: run_level(level, s, i, stage1=stage1, stage2=stage2),
                  static_argnums=2)

    def stream(stage2):
      state, ys = level.init_state(params, 2), []
      for a, b in ((0, 100), (100, 256)):
        state, y = run(state, jax.tree.map(lambda x: x[:, a:b], inp), stage2)
        ys.append(y)
      return state, jnp.concatenate(ys, axis=1)

    (state, y), (want_state, want_y) = stream(None), stream("pallas")
    arrays = [(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want_state))
              if jnp.issubdtype(a.dtype, jnp.floating)]
    rows.append({"level": f"bf16 {name} in two calls, default against stage2='pallas'",
                 "d": 128, "y_rel": rel(y, want_y),
                 "state_rel": max(rel(a, b) for a, b in arrays)})
  return rows


def check(report: dict, cases: list[int], stage1: str | None) -> None:
  key = jax.random.PRNGKey(1)
  rows = []
  with jax.default_matmul_precision("highest"):
    for name, d, b, t in (CHECK_CASES[i] for i in cases):
      make = CHECK_LEVELS[name]
      key, k1, k2 = jax.random.split(key, 3)
      level = make(d)
      params = Level(MatrixMemory(d, d, init_scale=1.0), heads=2).init(k1)
      inp = inputs(k2, b, t, 2, d)
      state = level.init_state(params, b)
      ref_state, ref_y = jax.jit(lambda s, i: run_reference(level, s, i))(state, inp)
      kernel = lambda lv, s, i: run_level(lv, s, i, stage1=stage1)
      got_state, got_y = jax.jit(lambda s, i: kernel(level, s, i))(state, inp)
      row = {"level": name, "d": d, "b": b, "t": t, "y_rel": rel(got_y, ref_y),
             "state_rel": rel(got_state.memory["w"], ref_state.memory["w"])}
      if d <= 128:  # d 128 takes two d_v blocks of the default block_v: the multi-block backward
        def loss(runner, p, i):
          s, y = runner(level, level.init_state(p, b), i)
          return jnp.sum(y * jnp.cos(y)) + jnp.sum(s.memory["w"] ** 2)
        g_ref = jax.jit(jax.grad(lambda p, i: loss(run_reference, p, i), (0, 1)))(params, inp)
        g = jax.jit(jax.grad(lambda p, i: loss(kernel, p, i), (0, 1)))(params, inp)
        row["grad_rel"] = max(rel(a, r) for a, r in zip(jax.tree.leaves(g),
                                                        jax.tree.leaves(g_ref)))
      rows.append(row)
      print("check", row, flush=True)
    # bfloat16 inputs through the op, each level also with the Triton sequential kernels
    # forced (a Hopper GPU takes the Mosaic GPU ones by default), and at head dim 256 (the
    # Triton kernels throughout; gradients at d 256 are checked only here); reference on the
    # same values
    for mom, stage2, d in ((False, None, 128), (False, "pallas", 128), (True, None, 128),
                           (True, "pallas", 128), (False, None, 256), (True, None, 256)):
      config = OpConfig(64, "boundary" if mom else "exact", "l2", "after", momentum=mom,
                        grad_at_retained=not mom)
      level = CHECK_LEVELS["titans_linear" if mom else "gated_deltanet"](d)
      inp = inputs(jax.random.PRNGKey(7), 2, 256, 2, d, jnp.bfloat16)
      s0 = jnp.zeros((2, 2, d, d))
      op = lambda i: matrix_memory(config, *i, s0, s0 if mom else None, stage1=stage1,
                                   stage2=stage2)
      y, s, _ = jax.jit(op)(inp)
      up = jax.tree.map(lambda x: x.astype(jnp.float32), inp)
      zero = level.init_state({"w": jnp.zeros((2, d, d))}, 2)
      ref_state, ref_y = jax.jit(lambda s, i: run_reference(level, s, i))(zero, up)
      dy = jax.random.normal(jax.random.PRNGKey(8), ref_y.shape)  # gradients of <y, dy>
      g = jax.jit(jax.grad(lambda i: jnp.sum(op(i)[0].astype(jnp.float32) * dy)))(inp)
      g_ref = jax.jit(jax.grad(lambda i: jnp.sum(run_reference(level, zero, i)[1] * dy)))(up)
      name = "titans_linear" if mom else "gated_deltanet"
      rows.append({"level": f"bf16 {name}" + (f", {stage2}" if stage2 else ""),
                   "d": d,
                   "y_rel": rel(y, ref_y), "state_rel": rel(s, jnp.swapaxes(
                       ref_state.memory["w"], -1, -2)),
                   "grad_rel": max(rel(a, r) for a, r in zip(g, g_ref) if a is not None)})
      print("check", rows[-1], flush=True)
    for row in streamed_rows(stage1):
      rows.append(row)
      print("check", row, flush=True)
    for mom in (False, True):  # poisoned outputs
      config = OpConfig(64, "boundary" if mom else "exact", "l2", "after", momentum=mom,
                        grad_at_retained=not mom)
      inp = inputs(jax.random.PRNGKey(3), 2, 256, 4, 128)
      coeffs = prepare(config, *inp[:3], inp.eta, inp.alpha, inp.beta, jnp.ones(inp.eta.shape))
      fields = kernel_fields(coeffs, jnp.float32)
      s0 = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 128, 128))
      run = lambda poison: pallas_recurrence.forward(
          fields, s0, jnp.cos(s0) if mom else None, block_v=64, poison=poison,
          interpret=launch_options().interpret)
      clean, poisoned = run(False), run(True)
      ok = all(bool(jnp.all(jnp.isfinite(p))) and bool(jnp.all(p == c))
               for p, c in zip(poisoned[:2], clean[:2]))
      rows.append({"level": f"poisoned outputs all written and equal "
                            f"({'titans_linear' if mom else 'gated_deltanet'})", "ok": ok})
      print("check", rows[-1], flush=True)
  report["check"] = rows


def ceilings(report: dict, repeats: int) -> None:
  a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
  ms = timed_ms(jax.jit(lambda x, y: x @ y), a, a, repeats=repeats)
  big = jax.random.normal(jax.random.PRNGKey(1), (1024, 1024, 512), jnp.float32)
  copy_ms = timed_ms(jax.jit(lambda x: x + 1), big, repeats=repeats)
  report["ceilings"] = {"bf16_matmul_tflops": 2 * 8192 ** 3 / ms / 1e9,
                        "copy_gbps": 2 * big.size * 4 / copy_ms / 1e6}
  print("ceilings", report["ceilings"], flush=True)


def op_cost(b, t, h, d, chunk=64):
  """(FLOPs, bytes) of one forward: stage 1 and 2 products; bf16 q, k, v, y and f32 gates."""
  per_chunk = 2 * chunk * chunk * (2 * d) + chunk * chunk * 2 * d + 2 * chunk * d * d * 3 \
      + 2 * chunk * chunk * d
  flops = b * h * (t // chunk) * per_chunk
  return flops, b * t * h * (4 * d * 2 + 2 * 4)


VARIANTS = {  # label: (op, launch options) of our kernel in --bench
    "pallas_gdn": ("gdn", {}),
    "pallas_gdn_stage2_pallas": ("gdn", {"stage2": "pallas"}),  # the default before
    "pallas_gdn_stage2_mosaic_gpu": ("gdn", {"stage2": "mosaic_gpu"}),
    "pallas_gdn_stage2_mosaic_gpu_bv32": ("gdn", {"stage2": "mosaic_gpu", "block_v": 32}),
    "pallas_gdn_stage1_jax": ("gdn", {"stage1": "jax"}),
    "pallas_gdn_stage1_jax_blocked_inverse": ("gdn", {"stage1": "jax", "inverse": "blocked"}),
    "pallas_gdn_bv32": ("gdn", {"block_v": 32}),
    "pallas_gdn_bv64_w8": ("gdn", {"num_warps": 8}),
    "pallas_gdn_bv128_w8": ("gdn", {"block_v": 128, "num_warps": 8}),
    "pallas_gdn_tiles16": ("gdn", {"tiles_backward": (16, 4)}),
    "pallas_gdn_tiles32w4": ("gdn", {"tiles_backward": (32, 4)}),
    "pallas_gdn_tiles32": ("gdn", {"tiles_backward": (32, 8)}),
    "pallas_gdn_tiles64w4": ("gdn", {"tiles_backward": (64, 4)}),  # the default (14th session)
    "pallas_gdn_tiles64w8": ("gdn", {"tiles_backward": (64, 8)}),  # the default before
    "pallas_gdn_fwd16": ("gdn", {"tiles_forward": (16, 4)}),
    "pallas_gdn_fwd32w4": ("gdn", {"tiles_forward": (32, 4)}),
    "pallas_gdn_fwd64w8": ("gdn", {"tiles_forward": (64, 8)}),
    "pallas_gdn_bv16": ("gdn", {"block_v": 16}),
    "pallas_gdn_c32": ("gdn_c32", {}),
    "pallas_gdn_c128": ("gdn_c128", {}),
    "pallas_titans_momentum": ("titans", {}),
    "pallas_titans_stage1_jax": ("titans", {"stage1": "jax"}),
    "pallas_titans_stage2_pallas": ("titans", {"stage2": "pallas"}),
    "pallas_titans_stage2_mosaic_gpu": ("titans", {"stage2": "mosaic_gpu"}),
    "pallas_titans_stage2_mosaic_gpu_bv16": ("titans", {"stage2": "mosaic_gpu", "block_v": 16}),
    "pallas_titans_tiles16": ("titans", {"tiles_backward": (16, 4)}),
    "pallas_titans_tiles32": ("titans", {"tiles_backward": (32, 8)}),
    "pallas_titans_fwd16": ("titans", {"tiles_forward": (16, 4)}),
    "pallas_titans_w8": ("titans", {"num_warps": 8}),
    "pallas_titans_bv32": ("titans", {"block_v": 32}),
    "pallas_titans_bv16": ("titans", {"block_v": 16}),
    "pallas_titans_bv128_w8": ("titans", {"block_v": 128, "num_warps": 8}),
    "pallas_titans_c32": ("titans_c32", {}),
    "pallas_gdn_st1": ("gdn", {"num_stages": 1}),
    "pallas_gdn_st2": ("gdn", {"num_stages": 2}),
    "pallas_gdn_st3": ("gdn", {"num_stages": 3}),
    "pallas_titans_st1": ("titans", {"num_stages": 1}),
    "pallas_titans_st2": ("titans", {"num_stages": 2}),
    "pallas_gdn_bv16_st3": ("gdn", {"block_v": 16, "num_stages": 3}),
    "pallas_gdn_bv64_st3": ("gdn", {"block_v": 64, "num_stages": 3}),
    "pallas_titans_bv16_st2": ("titans", {"block_v": 16, "num_stages": 2}),
    "pallas_titans_bv64_st2": ("titans", {"block_v": 64, "num_stages": 2}),
}
PEERS = ("chunked", "jla")
BENCH_OPS = {"gdn": OpConfig(64, "exact", "l2", "after", grad_at_retained=True),
             "titans": OpConfig(64, "boundary", "l2", "after", momentum=True)}
BENCH_OPS.update({f"{op}_c{chunk}": dataclasses.replace(BENCH_OPS[op], chunk=chunk)
                  for op in BENCH_OPS for chunk in (32, 128)})  # chunk-size variants


def stage1_only(config: OpConfig, inp: LevelInputs, **launch):
  """Jitted forward and gradient of stage 1 alone (the per-chunk coefficients), for the
  breakdown of a variant's time; inputs ``[B, T, H, ·]`` with ``T % chunk == 0``; ``launch``
  as :func:`~nlj_kernels.matrix_memory.runner.launch_options`."""
  options = launch_options(**launch)
  mask = jnp.ones(inp.eta.shape, inp.eta.dtype)

  def fwd(i):
    args = (i.k, i.v, i.q, i.eta, i.alpha, i.beta, mask)
    if options.stage1 == "pallas":
      return prepare_pallas(config, *args, forward=options.tiles_forward,
                            backward=options.tiles_backward,
                            interpret=options.interpret, backend=options.backend)
    return prepare(config, *args, inverse=options.inverse)

  def loss(i):
    return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(fwd(i)))
  return jax.jit(fwd), jax.jit(jax.grad(loss))


def chunked_gated_deltanet(b: int, h: int, d: int) -> Callable:
  """Our chunked JAX Gated DeltaNet (chunk 64, zero initial state) as ``f(inputs) -> y``."""
  level = compositions.gated_deltanet(d, d, h, 64)
  state = level.init_state({"w": jnp.zeros((h, d, d))}, b)
  return lambda i: level.run(state, i, impl="chunked", aligned=True)[1]


def jla_gated_deltanet(linear_attention: Callable, impl: str) -> Callable:
  """jax-linear-attention's Gated DeltaNet (``impl`` ``"mosaic_gpu"`` or ``"chunked"``) as
  ``f(q, k, v, log_gates, beta) -> o``, all ``[B, T, H, ·]``, ``log_gates, beta [B, T, H]``."""
  def fwd(q, k, v, log_gates, beta):
    return linear_attention("gated_deltanet", q, k, v, g=log_gates, beta=beta, impl=impl)[0]
  return fwd


def jla_args(inp: LevelInputs) -> tuple:
  """:func:`jla_gated_deltanet`'s arguments for our inputs: ``α`` as log gates, ``η`` as β."""
  return inp.q, inp.k, inp.v, jnp.log(inp.alpha), inp.eta


def bench(report: dict, repeats: int, shapes, variants: list[str], peers: list[str],
          breakdown: bool) -> None:
  linear_attention = None
  if "jla" in peers:
    try:
      from jla.ops import linear_attention  # pylint: disable=import-outside-toplevel
    except ImportError as error:
      report["jla"] = f"not importable: {error}"
  rows = []
  for (b, t, h, d) in shapes:
    inp = inputs(jax.random.PRNGKey(0), b, t, h, d, jnp.bfloat16)
    dy = jax.random.normal(jax.random.PRNGKey(9), (b, t, h, d), jnp.bfloat16)
    s0 = jnp.zeros((b, h, d, d))
    row = {"shape": f"{b}x{t}x{h}x{d}"}
    print("bench", row["shape"], flush=True)

    for label in variants:
      op, launch = VARIANTS[label]
      config = BENCH_OPS[op]

      def fwd(i, config=config, launch=launch):
        return matrix_memory(config, *i, s0, s0 if config.momentum else None, **launch)[0]
      def loss(i, fwd=fwd):
        return jnp.sum(fwd(i).astype(jnp.float32) * dy.astype(jnp.float32))
      record(row, f"{label}_fwd", jax.jit(fwd), inp, repeats=repeats)
      record(row, f"{label}_fwdbwd", jax.jit(jax.grad(loss)), inp, repeats=repeats)
      if breakdown:
        f1, g1 = stage1_only(config, inp, **launch)
        record(row, f"{label}_stage1_fwd", f1, inp, repeats=repeats)
        record(row, f"{label}_stage1_fwdbwd", g1, inp, repeats=repeats)
    if "chunked" in peers and t in (2048, 16384):  # slow: two shapes suffice for the ratio
      chunked_fwd = chunked_gated_deltanet(b, h, d)
      def chunked_loss(i):
        return jnp.sum(chunked_fwd(i) * dy.astype(jnp.float32))
      slow = max(3, repeats // 5)
      record(row, "chunked_jax_gdn_fwd", jax.jit(chunked_fwd), inp, repeats=slow)
      record(row, "chunked_jax_gdn_fwdbwd", jax.jit(jax.grad(chunked_loss)), inp, repeats=slow)
    if linear_attention is not None:
      args = jla_args(inp)
      for impl in ("mosaic_gpu", "chunked"):
        jfwd = jla_gated_deltanet(linear_attention, impl)
        def jloss(q, k, v, g_, beta, jfwd=jfwd):
          return jnp.sum(jfwd(q, k, v, g_, beta).astype(jnp.float32) * dy.astype(jnp.float32))
        record(row, f"jla_{impl}_fwd", jax.jit(jfwd), *args, repeats=repeats)
        record(row, f"jla_{impl}_fwdbwd", jax.jit(jax.grad(jloss, (0, 1, 2, 3, 4))), *args,
               repeats=repeats)
    for label in variants:
      op = VARIANTS[label][0]
      if op.startswith("gdn") and f"{label}_fwd_ms" in row:
        flops, nbytes = op_cost(b, t, h, d, BENCH_OPS[op].chunk)
        fwd_s = row[f"{label}_fwd_ms"] / 1e3
        row[f"{label}_fwd_tflops"] = flops / fwd_s / 1e12
        row[f"{label}_fwd_gbps"] = nbytes / fwd_s / 1e9
    rows.append(row)
    print("bench", row, flush=True)
  report["bench"] = rows


def table(report: dict) -> str:
  cols = list(VARIANTS) + [f"{label}_stage1" for label in VARIANTS] + [
      "chunked_jax_gdn", "jla_mosaic_gpu", "jla_chunked"]
  rows = report.get("bench", [])
  cols = [c for c in cols if any(f"{c}_{m}" in row for row in rows
                                 for m in ("fwd_ms", "fwd_error", "fwdbwd_error"))]
  lines = ["| shape | " + " | ".join(f"{c} fwd / fwd+bwd ms" for c in cols) + " |",
           "|" + "---|" * (len(cols) + 1)]
  for row in rows:
    cells = []
    for c in cols:
      f, fb = (row.get(f"{c}_{mode}_ms") for mode in ("fwd", "fwdbwd"))
      cells.append(" / ".join(
          f"{x:.2f}" if x is not None else "error" if f"{c}_{mode}_error" in row else "-"
          for x, mode in ((f, "fwd"), (fb, "fwdbwd"))))
    lines.append(f"| {row['shape']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true")
  parser.add_argument("--cases", default=",".join(map(str, range(len(CHECK_CASES)))),
                      help="indices into CHECK_CASES for --check")
  parser.add_argument("--shapes", default="0,1,2,3",
                      help="indices into SHAPES, or BxTxHxD shapes, for --bench")
  parser.add_argument("--stage1", default=None, choices=("jax", "pallas"),
                      help="stage 1 the --check runs (default: the op's for the platform)")
  parser.add_argument("--bench", action="store_true")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"our kernel variants for --bench, from {','.join(VARIANTS)}")
  parser.add_argument("--peers", default=",".join(PEERS),
                      help=f"peers for --bench, from {','.join(PEERS)} (empty: none)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time stage 1 alone for each variant")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default="benchmarks")
  args = parser.parse_args()
  report = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "date": time.strftime("%Y-%m-%d")}
  if args.check:
    check(report, [int(i) for i in args.cases.split(",")], args.stage1)
  if args.bench:
    ceilings(report, args.repeats)
    variants = [v for v in args.variants.split(",") if v]
    peers = [p for p in args.peers.split(",") if p]
    for name, allowed, given in (("--variants", VARIANTS, variants), ("--peers", PEERS, peers)):
      if unknown := [x for x in given if x not in allowed]:
        parser.error(f"{name}: unknown {unknown}; allowed: {', '.join(allowed)}")
    shapes = [tuple(map(int, x.split("x"))) if "x" in x else SHAPES[int(x)]
              for x in args.shapes.split(",")]
    bench(report, args.repeats, shapes, variants,
          peers, args.breakdown)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "kernels_matrix_memory.json"), "w") as f:
    json.dump(report, f, indent=1)
  if args.check:
    for row in report["check"]:
      print(" ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in row.items()))
  print(table(report))


if __name__ == "__main__":
  main()
