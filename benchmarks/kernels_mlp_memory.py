"""GPU check and benchmark of the residual-MLP-memory kernel (op 2).

    python benchmarks/kernels_mlp_memory.py --check --bench --out=DIR

``--check`` (``--cases`` picks levels; ``--check_precision`` the kernel's product precision, default
``highest``, the reference's): relative errors ``‖out − ref‖/‖ref‖`` of the Pallas kernel against
the token-by-token reference (float32, highest matmul precision) for the outputs, the end memory and
anchor of four levels -- self-modifying Titans' main memory (DGD + momentum, chunk 64, boundary
read) and its η memory (``d_out = 1``, chunk 16), Titans' deep memory (GD + momentum, hidden 4d,
chunk 16) and a 3-layer GELU memory with a skip projection (normalized DGD, before read) -- over
lengths the chunk does not divide; and the gradients (params and inputs) of each against
``jax.grad`` of the reference.

``--bench`` (``--bench_cases`` picks levels): forward and forward+backward milliseconds (median of
``--repeats``, and the first call's compile+run seconds) of the kernel
(``Level.run(impl="pallas")``) and of the chunked JAX form (``impl="chunked"``) of the same level,
B×T×H = 8×2048×16, head dim 64, from a chunk boundary (``aligned=True``): a
self-modifying-Titans-like memory (hidden 128, DGD + momentum) at chunk 16 (before read) and chunk
64 (boundary read), and a Titans-LMM-like memory (hidden 256, GD + momentum, chunk 16, after read).
Products run at JAX's default matmul precision (tf32 for float32 on a GPU) in both forms;
``--precisions`` adds kernel variants (``highest``: IEEE float32, ``tf32x3``: tensor cores at nearly
float32 accuracy; ``bf16``: bfloat16 operands, float32 accumulation, half the shared memory
of float32 operands). A failing variant is recorded, not fatal. Prints a table last and writes
``kernels_mlp_memory.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from nlj.core import L2, Level, LevelInputs, MLPMemory, Rule, compositions
from nlj.core.reference import run_reference
from nlj_kernels.mlp_memory import NUM_WARPS, run_level
from timing import timed

SELFMOD_RULE = Rule("dgd", momentum=True, dgd_variant="plain")
CHECK_CASES = {  # name -> (level, batch, length)
    "selfmod_memory": (Level(MLPMemory(64, 64, 128), L2(), SELFMOD_RULE, 64, "boundary",
                             "boundary", 2), 2, 200),
    "selfmod_eta": (Level(MLPMemory(64, 1, 128), L2(), SELFMOD_RULE, 16, "boundary", "after", 2),
                    1, 100),
    "titans_lmm": (compositions.titans_memory(64, 256, 2, 16, 2, "after"), 2, 150),
    "skip_gelu_3_layers": (Level(MLPMemory(32, 64, 64, 3, "gelu"), L2(), Rule("dgd"), 16,
                                 "boundary", "before", 2), 1, 77),
}
BENCH_CASES = {
    "selfmod_c16_before": Level(MLPMemory(64, 64, 128), L2(), SELFMOD_RULE, 16, "boundary",
                                "before", 16),
    "selfmod_c64_boundary": Level(MLPMemory(64, 64, 128), L2(), SELFMOD_RULE, 64, "boundary",
                                  "boundary", 16),
    "titans_lmm_c16_after": compositions.titans_memory(64, 256, 16, 16, 2, "after"),
}
BENCH_SHAPE = (8, 2048)  # batch, length
PRECISIONS = {"default": None, "highest": jax.lax.Precision.HIGHEST,
              "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
              "bf16": jax.lax.DotAlgorithmPreset.BF16_BF16_F32}


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tree_rel(a, b) -> float:
  return max(rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def make_inputs(level: Level, key, b: int, t: int) -> LevelInputs:
  """Unit-norm keys, Gaussian values and queries, η ∈ (0, 0.1), α near 1, β ∈ (0, 1)."""
  h, d_in, d_out = level.heads, level.memory.d_in, level.memory.d_out
  ks = jax.random.split(key, 6)
  k = jax.random.normal(ks[0], (b, t, h, d_in))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[1], (b, t, h, d_out))
  q = jax.random.normal(ks[2], (b, t, h, d_in))
  eta = 0.1 * jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
  alpha = jax.nn.sigmoid(4.0 + jax.random.normal(ks[4], (b, t, h)))
  beta = jax.nn.sigmoid(jax.random.normal(ks[5], (b, t, h)))
  return LevelInputs(k, v, q, eta, alpha, beta)


def check(report: dict, cases: list[str], precision: str) -> None:
  rows = []
  kernel = lambda lv, s, x: run_level(lv, s, x, precision=PRECISIONS[precision])
  with jax.default_matmul_precision("highest"):
    for i, (name, (level, b, t)) in enumerate(CHECK_CASES.items()):
      if name not in cases:
        continue
      params = level.init(jax.random.PRNGKey(i))
      inp = make_inputs(level, jax.random.PRNGKey(100 + i), b, t)
      state = level.init_state(params, b)
      row = {"level": name, "b": b, "t": t, "chunk": level.chunk, "precision": precision}
      try:
        want_state, want_y = jax.jit(lambda s, x: run_reference(level, s, x))(state, inp)
        got_state, got_y = jax.jit(lambda s, x: kernel(level, s, x))(state, inp)
        row.update(y_rel=rel(got_y, want_y), memory_rel=tree_rel(got_state.memory,
                                                                 want_state.memory),
                   anchor_rel=tree_rel(got_state.anchor, want_state.anchor))
        print("check", row, flush=True)  # the values, before the slower gradient compile

        def loss(runner, p, x):
          s, y = runner(level, level.init_state(p, b), x)
          return jnp.sum(y * jnp.cos(y)) + sum(jnp.sum(w ** 2) for w in jax.tree.leaves(s[:3]))
        grad = lambda runner: jax.jit(jax.grad(lambda p, x: loss(runner, p, x), (0, 1)))(
            params, inp)
        row["grad_rel"] = tree_rel(grad(kernel), grad(run_reference))
      except Exception as error:  # recorded: the remaining cases still run
        row["error"] = repr(error)[:500]
      rows.append(row)
      print("check", row, flush=True)
  report["check"] = rows


def bench(report: dict, repeats: int, precisions: list[str], num_warps: int,
          cases: list[str]) -> None:
  b, t = BENCH_SHAPE
  rows = []
  for name in cases:
    level = BENCH_CASES[name]
    params = level.init(jax.random.PRNGKey(0))
    inp = make_inputs(level, jax.random.PRNGKey(1), b, t)
    dy = jax.random.normal(jax.random.PRNGKey(2), inp.v.shape)
    row = {"level": name, "shape": f"{b}x{t}x{level.heads}x{level.memory.d_in}",
           "hidden": level.memory.hidden, "chunk": level.chunk}

    def runners():
      yield "chunked", lambda lv, s, x: lv.run(s, x, impl="chunked", aligned=True)
      for p in precisions:
        yield f"pallas_{p}", lambda lv, s, x, p=p: run_level(
            lv, s, x, aligned=True, precision=PRECISIONS[p], num_warps=num_warps)

    for label, runner in runners():
      def fwd(p, x, runner=runner):
        return runner(level, level.init_state(p, b), x)[1]

      def loss(p, x, fwd=fwd):
        return jnp.sum(fwd(p, x) * dy)

      for mode, f in (("fwd", jax.jit(fwd)), ("fwdbwd", jax.jit(jax.grad(loss, (0, 1))))):
        try:
          first, ms = timed(f, params, inp, repeats=repeats)
          row[f"{label}_{mode}_ms"], row[f"{label}_{mode}_first_s"] = ms, first
        except Exception as error:  # recorded: the other variants still run
          row[f"{label}_{mode}_error"] = repr(error)[:500]
    rows.append(row)
    print("bench", row, flush=True)
  report["bench"] = rows


def table(report: dict, precisions: list[str]) -> str:
  cols = ["chunked"] + [f"pallas_{p}" for p in precisions]
  lines = ["| level | B×T×H×D | hidden | chunk | " + " | ".join(
      f"{c} fwd / fwd+bwd ms" for c in cols) + " |", "|" + "---|" * (len(cols) + 4)]
  for row in report.get("bench", []):
    cells = []
    for c in cols:
      f, fb = row.get(f"{c}_fwd_ms"), row.get(f"{c}_fwdbwd_ms")
      cells.append(" / ".join("error" if x is None else f"{x:.2f}" for x in (f, fb)))
    lines.append(f"| {row['level']} | {row['shape']} | {row['hidden']} | {row['chunk']} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true")
  parser.add_argument("--cases", default=",".join(CHECK_CASES),
                      help=f"comma-separated --check levels from {list(CHECK_CASES)}")
  parser.add_argument("--check_precision", default="highest",
                      help="the kernel's product precision in --check (the reference runs at "
                           "highest)")
  parser.add_argument("--bench", action="store_true")
  parser.add_argument("--bench_cases", default=",".join(BENCH_CASES),
                      help=f"comma-separated --bench levels from {list(BENCH_CASES)}")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--precisions", default="default",
                      help=f"comma-separated kernel product precisions from {sorted(PRECISIONS)}")
  parser.add_argument("--num_warps", type=int, default=NUM_WARPS)
  parser.add_argument("--out", default="benchmarks")
  args = parser.parse_args()
  precisions = args.precisions.split(",")
  for p in precisions + [args.check_precision]:
    if p not in PRECISIONS:
      parser.error(f"--precisions / --check_precision: {p!r} is not one of {sorted(PRECISIONS)}")
  cases, bench_cases = args.cases.split(","), args.bench_cases.split(",")
  for flag, chosen, known in (("--cases", cases, CHECK_CASES),
                              ("--bench_cases", bench_cases, BENCH_CASES)):
    for c in chosen:
      if c not in known:
        parser.error(f"{flag}: {c!r} is not one of {list(known)}")
  report = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "date": time.strftime("%Y-%m-%d"), "num_warps": args.num_warps}
  if args.check:
    check(report, cases, args.check_precision)
  if args.bench:
    bench(report, args.repeats, precisions, args.num_warps, bench_cases)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "kernels_mlp_memory.json"), "w") as f:
    json.dump(report, f, indent=1)
  for row in report.get("check", []):
    print(" ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
  if args.bench:
    print(table(report, precisions))


if __name__ == "__main__":
  main()
