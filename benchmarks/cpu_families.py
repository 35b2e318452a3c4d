"""Forward+backward time of every registered family at its ``tiny`` preset (informative, CPU).

Usage: ``python benchmarks/cpu_families.py [--batch 4 --seq 64 --repeats 5 --out FILE]``.
Prints a table (compile seconds, median step milliseconds, parameters) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import jax
import optax
from flax import nnx

from nlj.models import PRESETS, build_model, families


def time_family(family: str, batch: int, seq: int, repeats: int) -> dict:
  config = PRESETS[(family, "tiny")]
  model = build_model(config, nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, config.vocab)

  @jax.jit
  def loss_and_grad(params, tokens):
    def loss(params):
      logits, _ = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return jax.value_and_grad(loss)(params)

  start = time.perf_counter()
  jax.block_until_ready(loss_and_grad(params, tokens))
  compile_s = time.perf_counter() - start
  steps = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(loss_and_grad(params, tokens))
    steps.append(time.perf_counter() - start)
  count = sum(x.size for x in jax.tree.leaves(params))
  return {"family": family, "compile_s": compile_s, "step_ms": 1e3 * statistics.median(steps),
          "params": count}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="benchmarks/cpu_families.json")
  args = parser.parse_args()
  rows = [time_family(f, args.batch, args.seq, args.repeats) for f in families()]
  print(f"{'family':18s} {'params':>8s} {'compile s':>10s} {'fwd+bwd ms':>11s}")
  for r in rows:
    print(f"{r['family']:18s} {r['params']:8d} {r['compile_s']:10.1f} {r['step_ms']:11.1f}")
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
  meta = {"batch": args.batch, "seq": args.seq, "device": str(jax.devices()[0]),
          "machine": platform.machine(), "cpus": jax.local_device_count(), "commit": commit,
          "date": time.strftime("%Y-%m-%d", time.gmtime())}
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
