"""Training throughput of preset LMs on 1..N devices, same per-device batch (synthetic tokens).

    python benchmarks/train_throughput.py --families=hope,transformer --size=small \\
        --devices=1,2 --per_device_batch=8 --seq_len=512 --dtype=bfloat16 [--remat] \\
        [--impl=auto] --out=DIR

For each family and device count: a ``data:N`` mesh over the first N devices, the preset's train
state (AdamW; memory levels run by ``ModelConfig.impl = --impl``) sharded by
:mod:`nlj.train.sharding`, and the jitted train step timed over ``--steps`` steps after two warm-up
steps (one host sync at the end). Reports tokens/s, the scaling efficiency against one device, and
MFU = ``6 · params · tokens/s`` over N times the bf16 matmul rate measured in the same run
(attention and memory-update FLOPs beyond ``6N`` are not counted). ``peak GiB`` is device 0's peak
memory since the process started (run one family per process to read it per row). A row that fails
(e.g. out of memory) is recorded, not fatal. Prints a ``progress:`` line after each row's init and
warm-up (so a run cut off by a time limit shows how far it got), then a table, and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from nlj.core import IMPLS
from nlj.models import PRESETS, count_params
from nlj.train.sharding import create_train_state, jit_train_step, make_mesh, shard_batch
from nlj.train.step import adamw_cosine, make_train_step


def matmul_tflops() -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  start = time.perf_counter()
  for _ in range(10):
    out = f(a)
  jax.block_until_ready(out)
  return 10 * 2 * 8192 ** 3 / (time.perf_counter() - start) / 1e12


def throughput(family: str, size: str, devices: int, per_device_batch: int, seq_len: int,
               steps: int, dtype: str, remat: bool = False, impl: str = "auto") -> dict:
  config = dataclasses.replace(PRESETS[(family, size)], dtype=dtype, remat=remat, impl=impl)
  mesh = make_mesh(f"data:{devices}", jax.devices()[:devices])
  optimizer, schedule = adamw_cosine(1e-3, 10, 1000)
  init_start = time.perf_counter()
  graphdef, state, shardings = create_train_state(config, optimizer, 0, mesh)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - init_start
  print(f"progress: {family} {size} on {devices} device(s): train state built in {init_s:.1f} s",
        flush=True)
  step = jit_train_step(make_train_step(graphdef, optimizer, schedule), shardings, mesh)
  batch_size = per_device_batch * devices
  tokens = np.random.default_rng(0).integers(0, config.vocab, (batch_size, seq_len + 1),
                                             dtype=np.int32)
  batch = shard_batch(tokens, mesh)
  compile_start = time.perf_counter()
  for _ in range(2):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  warmup_s = time.perf_counter() - compile_start
  print(f"progress: {family} {size}: compile and two warm-up steps in {warmup_s:.1f} s",
        flush=True)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  stats = jax.devices()[0].memory_stats() or {}
  return {"family": family, "size": size, "devices": devices, "params": count_params(config),
          "global_batch": batch_size, "seq_len": seq_len, "dtype": dtype,
          "step_ms": 1e3 * seconds, "tokens_per_s": batch_size * seq_len / seconds,
          "remat": remat, "impl": impl, "init_s": init_s, "warmup_s": warmup_s,
          "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
          "loss": float(metrics["loss"])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--families", default="hope,transformer")
  parser.add_argument("--size", default="small")
  parser.add_argument("--devices", default="1,2")
  parser.add_argument("--per_device_batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--remat", action="store_true",
                      help="recompute each block's forward in the backward pass")
  parser.add_argument("--impl", default="auto", choices=IMPLS,
                      help="ModelConfig.impl: how every memory level runs")
  parser.add_argument("--out", default="benchmarks")
  args = parser.parse_args()
  peak = matmul_tflops()
  rows = []
  for family in args.families.split(","):
    for devices in map(int, args.devices.split(",")):
      if devices > jax.device_count():
        raise SystemExit(f"--devices asks for {devices} but only {jax.device_count()} exist")
      try:
        row = throughput(family, args.size, devices, args.per_device_batch, args.seq_len,
                         args.steps, args.dtype, args.remat, args.impl)
      except Exception as error:  # recorded (e.g. out of memory): the other rows still run
        row = {"family": family, "size": args.size, "devices": devices, "error": repr(error)[:500]}
      else:
        row["mfu"] = 6 * row["params"] * row["tokens_per_s"] / (devices * peak * 1e12)
        base = next((r for r in rows if r["family"] == family and r["devices"] == 1
                     and "error" not in r), None)
        row["scaling"] = row["tokens_per_s"] / (devices * base["tokens_per_s"]) if base else None
      rows.append(row)
      print(row, flush=True)
  os.makedirs(args.out, exist_ok=True)
  report = {"device": jax.devices()[0].device_kind, "date": time.strftime("%Y-%m-%d"),
            "bf16_matmul_tflops_per_device": peak, "rows": rows}
  with open(os.path.join(args.out, "train_throughput.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(f"| family | size | impl | devices | global batch | remat | init s | compile + 2 steps s | "
        f"peak GiB | step ms | tokens/s | scaling | MFU |  "
        f"(bf16 matmul {peak:.0f} TFLOP/s per device)")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['family']} | {r['size']} | {args.impl} | {r['devices']} | "
            f"error: {r['error'][:80]} |")
      continue
    scaling = "-" if r["scaling"] is None else f"{r['scaling']:.2f}"
    print(f"| {r['family']} | {r['size']} | {args.impl} | {r['devices']} | "
          f"{r['global_batch']} | "
          f"{r['remat']} | {r['init_s']:.0f} | {r['warmup_s']:.0f} | {r['peak_gib']:.1f} | "
          f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {scaling} | {100 * r['mfu']:.1f}% |")


if __name__ == "__main__":
  main()
