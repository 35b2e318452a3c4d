"""Host-loop overhead of ``nlj.train.train``: the full loop per step vs its jitted step alone.

Usage: ``python benchmarks/host_loop.py [--families transformer,gated_deltanet --size tiny
--batch 16 --seq 128 --steps 60 --log-every 10 --repeats 5 --out FILE]``. Prints a table and
writes JSON.

For each family's ``--size`` preset (byte tokens) and each repeat:

* loop: ``train()`` of ``steps`` steps in a fresh workdir (checkpoint at the end only, one
  validation batch); its per-step time is the wall time of the log intervals after the first
  (the first holds the compilation) over their steps, read from ``metrics.jsonl``, so it counts
  everything the loop does per step: batch assembly and transfer, dispatch, the host sync and
  the ``metrics.jsonl`` / TensorBoard / stdout writes of each log interval. Run once with
  ``--log-every`` and once logging every step (a host sync per step, the worst case).
* step alone: the very jitted step that ``train()`` compiled (captured from the loop, so no
  recompilation), called ``steps - log_every`` times back to back on one device-resident batch
  from the loop's final state, with one ``block_until_ready`` at the end.

Overhead = loop / step alone - 1, the median over repeats of each repeat's ratio (a repeat runs
its three measurements back to back, so a ratio compares times taken under the same machine
load); the issue's target is below 5%. The times reported are the medians over repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Callable

import jax

from nlj.train import loop
from nlj.train.loop import TrainConfig
from nlj.train.step import TrainState


def run_loop(config: TrainConfig) -> tuple[float, dict]:
  """One ``train()`` of ``config``: its seconds per step after the first log interval, and
  ``{"step", "state", "batch"}`` (its jitted step, final state and last batch)."""
  captured = {}
  jit_train_step = loop.jit_train_step

  def capturing_jit_train_step(*args):
    step = jit_train_step(*args)

    def run(state, batch):
      state, metrics = step(state, batch)
      captured.update(step=step, state=state, batch=batch)
      return state, metrics

    return run

  loop.jit_train_step = capturing_jit_train_step
  try:
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(io.StringIO()):
      loop.train(config, workdir)
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
  finally:
    loop.jit_train_step = jit_train_step
  tokens = config.batch_size * config.seq_len
  intervals = [b["step"] - a["step"] for a, b in zip(records, records[1:])]
  seconds = sum(n * tokens / r["tokens_per_s"] for n, r in zip(intervals, records[1:]))
  return seconds / sum(intervals), captured


def time_step_alone(step: Callable, state: TrainState, batch: jax.Array, count: int) -> float:
  """Seconds per call of ``count`` back-to-back ``step(state, batch)``, synced once at the end."""
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(count):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / count


def measure(family: str, args: argparse.Namespace) -> dict:
  config = TrainConfig(family=family, size=args.size, steps=args.steps, batch_size=args.batch,
                       seq_len=args.seq, warmup=1, log_every=args.log_every,
                       checkpoint_every=args.steps, eval_batches=1, mesh="data:-1")
  alone, logged, every_step = [], [], []
  for _ in range(args.repeats):
    per_step, captured = run_loop(config)
    logged.append(per_step)
    alone.append(time_step_alone(**captured, count=args.steps - args.log_every))
    every_step.append(run_loop(dataclasses.replace(config, log_every=1))[0])
  ms = lambda xs: 1e3 * statistics.median(xs)
  row = {"family": family, "step_alone_ms": ms(alone), "loop_ms": ms(logged),
         "loop_log_every_step_ms": ms(every_step)}
  overhead = lambda xs: statistics.median(x / a for x, a in zip(xs, alone)) - 1
  row["overhead"], row["overhead_log_every_step"] = overhead(logged), overhead(every_step)
  row["runs_ms"] = {"step_alone": [1e3 * x for x in alone], "loop": [1e3 * x for x in logged],
                    "loop_log_every_step": [1e3 * x for x in every_step]}
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--families", default="transformer,gated_deltanet")
  parser.add_argument("--size", default="tiny", help="model preset size")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--log-every", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="benchmarks/host_loop.json")
  args = parser.parse_args()
  if args.steps % args.log_every or args.steps < 2 * args.log_every:
    parser.error("--steps must be a multiple of --log-every, at least two intervals")
  load_before = os.getloadavg()
  rows = [measure(f, args) for f in args.families.split(",")]
  print(f"{'family':16s} {'step alone ms':>14s} {'loop ms':>8s} {'overhead':>9s} "
        f"{'loop, log every step ms':>24s} {'overhead':>9s}")
  for r in rows:
    print(f"{r['family']:16s} {r['step_alone_ms']:14.2f} {r['loop_ms']:8.2f} "
          f"{r['overhead']:9.1%} {r['loop_log_every_step_ms']:24.2f} "
          f"{r['overhead_log_every_step']:9.1%}")
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
  meta = {**vars(args), "device": str(jax.devices()[0]), "devices": jax.device_count(),
          "machine": platform.machine(), "cpus": os.cpu_count(), "commit": commit,
          "load_average_before": load_before, "load_average_after": os.getloadavg(),
          "date": time.strftime("%Y-%m-%d", time.gmtime())}
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
