"""Where the GPU time of a jitted function goes: device kernels by total time, from a JAX
profiler trace (CUPTI) of a few calls.

    python benchmarks/profile_kernels.py --what=gdn_fwdbwd --shape=8x2048x16x128 --out=DIR

``--what`` names a function of :data:`TARGETS`: the matrix-memory op at Gated DeltaNet or
Titans-momentum semantics, forward or forward+backward (``--shape=BxTxHxD``, ``--stage1``,
``--inverse``, ``--tiles_forward`` / ``--tiles_backward`` as ``BLOCK,WARPS``, ``--block_v``,
``--num_stages``, ``--num_warps``, ``--stage2``), or the same Gated DeltaNet in our chunked JAX form
(``chunked_fwd``, ``chunked_fwdbwd``) or jax-linear-attention's (Mosaic GPU; ``jla_fwd``,
``jla_fwdbwd``, needs ``jla`` importable) on the same inputs, or
``train_step``, one AdamW step of a preset LM (``--model=FAMILY:SIZE``, ``--shape=BxT``,
``--dtype``, ``--remat``, ``--layers``), or ``layer_fwd`` / ``layer_fwdbwd``, a module of
:mod:`kernels_layers` (``--module``, ``--model=FAMILY:SIZE`` for the size, ``--impl``,
``--shape=BxT``, ``--dtype``) on random input. Prints the top
kernels (name, calls, total and mean µs, share of the device time), after the untraced wall
time of a call synchronised after each call (median) and of back-to-back calls (mean), and writes
them as JSON beside the raw trace (``DIR/trace``, a Perfetto ``.json.gz`` that ui.perfetto.dev opens).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import time

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels_layers
import timing
from kernels_matrix_memory import (BENCH_OPS, chunked_gated_deltanet, inputs, jla_args,
                                   jla_gated_deltanet)
from nlj.models import PRESETS
from nlj.train.sharding import create_train_state, make_mesh
from nlj.train.step import adamw_cosine, make_train_step
from nlj_kernels.matrix_memory import matrix_memory
from nlj_kernels.matrix_memory.recurrence import STAGE2_KERNELS

TARGETS = ("gdn_fwd", "gdn_fwdbwd", "titans_fwd", "titans_fwdbwd", "chunked_fwd", "chunked_fwdbwd",
           "jla_fwd", "jla_fwdbwd", "train_step", "layer_fwd", "layer_fwdbwd")


def build(what: str, shape: tuple[int, int, int, int], **launch):
  """A jitted ``f(inputs)`` and its arguments for target ``what``."""
  b, t, h, d = shape
  inp = inputs(jax.random.PRNGKey(0), b, t, h, d, jnp.bfloat16)
  dy = jax.random.normal(jax.random.PRNGKey(9), (b, t, h, d), jnp.float32)
  s0 = jnp.zeros((b, h, d, d))
  if what.startswith("jla"):
    from jla.ops import linear_attention  # pylint: disable=import-outside-toplevel
    peer = jla_gated_deltanet(linear_attention, "mosaic_gpu")
    fwd, inp = lambda i: peer(*i), jla_args(inp)
  elif what.startswith("chunked"):
    fwd = chunked_gated_deltanet(b, h, d)
  else:
    config = BENCH_OPS[what.split("_")[0]]
    fwd = lambda i: matrix_memory(config, *i, s0, s0 if config.momentum else None, **launch)[0]
  if what.endswith("fwdbwd"):
    return jax.jit(jax.grad(lambda i: jnp.sum(fwd(i).astype(jnp.float32) * dy))), inp
  return jax.jit(fwd), inp


def build_train_step(model: str, shape: tuple[int, int], dtype: str, remat: bool,
                     layers: int | None):
  """A jitted ``state -> state`` AdamW step of preset ``FAMILY:SIZE`` on random tokens ``BxT``."""
  family, size = model.split(":")
  config = dataclasses.replace(PRESETS[(family, size)], dtype=dtype, remat=remat)
  if layers:
    config = dataclasses.replace(config, layers=layers)
  optimizer, schedule = adamw_cosine(1e-3, 10, 1000)
  graphdef, state, _ = create_train_state(config, optimizer, 0, make_mesh("data:1"))
  step = make_train_step(graphdef, optimizer, schedule)
  batch = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab, (shape[0], shape[1] + 1),
                                                        dtype=np.int32))
  return jax.jit(lambda s: step(s, batch)[0]), state


def build_layer(what: str, module: str, model: str, impl: str, shape: tuple[int, int],
                dtype: str):
  """A jitted forward (``layer_fwd``) or gradient w.r.t. parameters and input (``layer_fwdbwd``)
  of :func:`kernels_layers.build`'s ``module`` at size ``model``'s, on random ``x [B, T, d]``."""
  layer, config = kernels_layers.build(module, model.split(":")[1], impl, dtype)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jax.random.normal(jax.random.PRNGKey(1), shape + (config.d_model,), jnp.dtype(dtype))

  def fwd(inp):
    return nnx.merge(graphdef, inp[0], rest)(inp[1])[0]
  if what == "layer_fwdbwd":
    return jax.jit(jax.grad(lambda inp: jnp.sum(fwd(inp).astype(jnp.float32)))), (params, x)
  return jax.jit(fwd), (params, x)


def device_kernels(trace_dir: str) -> list[dict]:
  """Kernel rows ``{name, calls, total_us, args}`` (``args``: one event's, e.g. its HLO op) of
  the newest Perfetto trace under ``trace_dir``, from the trace's GPU processes (names holding
  "GPU" or "stream")."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(paths[-1], "rt") as f:
    events = json.load(f)["traceEvents"]
  gpu = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
         and any(s in str(e.get("args", {}).get("name", "")) for s in ("GPU", "stream"))}
  totals, calls, args = collections.Counter(), collections.Counter(), {}
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu:
      totals[e["name"]] += float(e.get("dur", 0.0))
      calls[e["name"]] += 1
      args.setdefault(e["name"], e.get("args", {}))
  return [{"name": n, "calls": calls[n], "total_us": us, "args": args[n]}
          for n, us in totals.most_common()]


def _pair(text: str) -> tuple[int, int]:
  """``"64,4"`` -> ``(64, 4)``."""
  block, warps = text.split(",")
  return int(block), int(warps)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--what", default="gdn_fwdbwd", choices=TARGETS)
  parser.add_argument("--shape", default="8x2048x16x128", help="BxTxHxD")
  parser.add_argument("--stage1", default=None, help="launch option stage1 (default: the op's)")
  parser.add_argument("--inverse", default=None, help="launch option inverse (default: the op's)")
  for name in ("tiles_forward", "tiles_backward"):
    parser.add_argument(f"--{name}", default=None, type=_pair,
                        help=f"launch option {name} as BLOCK,WARPS (default: the op's)")
  for name in ("block_v", "num_stages", "num_warps"):
    parser.add_argument(f"--{name}", default=None, type=int,
                        help=f"launch option {name} (default: the op's)")
  parser.add_argument("--stage2", default=None, choices=STAGE2_KERNELS,
                      help="launch option stage2 (default: the op's)")
  parser.add_argument("--model", default="hope:small", help="train_step: FAMILY:SIZE preset")
  parser.add_argument("--dtype", default="bfloat16", help="train_step: compute dtype")
  parser.add_argument("--remat", action="store_true", help="train_step: ModelConfig.remat")
  parser.add_argument("--layers", type=int, default=None, help="train_step: override layers")
  parser.add_argument("--module", default="selfmod", choices=kernels_layers.MODULES,
                      help="layer_*: the module")
  parser.add_argument("--impl", default="chunked", help="layer_*: ModelConfig.impl")
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--out", default="/tmp/profile_kernels")
  args = parser.parse_args()
  launch = {k: getattr(args, k) for k in ("stage1", "inverse", "tiles_forward", "tiles_backward",
                                          "block_v", "num_stages", "num_warps", "stage2")
            if getattr(args, k)}
  shape = tuple(map(int, args.shape.split("x")))
  if args.what == "train_step":
    f, inp = build_train_step(args.model, shape, args.dtype, args.remat, args.layers)
  elif args.what.startswith("layer"):
    f, inp = build_layer(args.what, args.module, args.model, args.impl, shape, args.dtype)
  else:
    f, inp = build(args.what, shape, **launch)
  _, sync_ms = timing.timed(f, inp, repeats=args.calls)  # compiles outside the trace
  start = time.perf_counter()
  jax.block_until_ready([f(inp) for _ in range(args.calls)])
  back_to_back_ms = 1e3 * (time.perf_counter() - start) / args.calls
  trace_dir = os.path.join(args.out, "trace")
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.calls):
      out = f(inp)
    jax.block_until_ready(out)
  wall_ms = 1e3 * (time.perf_counter() - start) / args.calls
  rows = device_kernels(trace_dir)
  total = sum(r["total_us"] for r in rows) or 1.0
  with open(os.path.join(args.out, f"{args.what}.json"), "w") as fh:
    json.dump({"what": args.what, "shape": args.shape, "launch": launch, "calls": args.calls,
               "wall_ms": wall_ms, "sync_ms": sync_ms, "back_to_back_ms": back_to_back_ms,
               "kernels": rows}, fh, indent=1)
  launches = sum(r["calls"] for r in rows) / args.calls
  print(f"{args.what} {args.shape} {launch}: device time per call "
        f"{total / args.calls:.1f} µs over {len(rows)} kernel names, {launches:.0f} kernel "
        f"launches per call, wall time per call (traced) {wall_ms:.1f} ms")
  print(f"untraced wall time per call: synchronised {sync_ms:.3f} ms, back to back "
        f"{back_to_back_ms:.3f} ms")
  print("| kernel | calls/call | µs/call | share |\n|---|---:|---:|---:|")
  for r in rows[:args.top]:
    print(f"| {r['name'][:70]} | {r['calls'] / args.calls:.0f} | "
          f"{r['total_us'] / args.calls:.1f} | {100 * r['total_us'] / total:.1f}% |")


if __name__ == "__main__":
  main()
