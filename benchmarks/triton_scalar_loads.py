"""Where a sequential Pallas-Triton kernel loads its per-chunk scalars, and what it costs.

    python benchmarks/triton_scalar_loads.py --out=DIR

A loop over ``--chunks`` chunks per program, shaped like the matrix-memory op's forward
recurrence (:mod:`nlj_kernels.matrix_memory.pallas_recurrence`): per chunk ``u = s₀ ⊙ (A S)``,
``y = s₁ ⊙ (A S) + A₀ u``, ``S += 10⁻³ Aᵀ (s₂ ⊙ u)`` with a ``[C, D]`` tile ``A`` (``A₀`` its
first ``C`` columns), a float32 state ``S [D, BV]`` and three ``[C]`` row scales ``s_i``. Modes:

- ``plain``: no scales (the floor);
- ``use``: each scale loaded where it is used;
- ``first``: all three loaded at the top of the chunk's step;
- ``ahead``: the next chunk's loaded at the top of each step and carried into it.

Triton pipelines (``num_stages``) only the loads that feed products, so ``use`` and ``first``
wait for global memory inside every step; ``ahead`` overlaps that wait with a whole step. The
sixteenth session's measurements (BENCHMARKS.md) led the op's recurrence kernels to load
Titans' per-chunk scalars a step ahead. Prints a table (µs a call, the largest difference from
``use``'s output: 0 for every mode that applies the scales) and writes
``triton_scalar_loads.json`` under ``--out``. ``--interpret`` runs the kernels in interpret
mode (any device; a check of the modes' equality, not a timing).
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from timing import timed

MODES = ("plain", "use", "first", "ahead")
SCALES = 3


def _kernel(a_ref, w_ref, s_ref, o_ref, *, mode: str, chunks: int):
  """One program: ``a_ref [N, C, D]``, ``w_ref [D, BV]`` (the initial state), ``s_ref [N, 3,
  C]``, ``o_ref [N, C, BV]``."""
  c_rows = a_ref.shape[1]
  load = lambda c: tuple(s_ref[c, i][:, None] for i in range(SCALES))

  def step(c, carry):
    state, loaded = carry
    following = load(jnp.minimum(c + 1, chunks - 1)) if mode == "ahead" else ()
    top = load(c) if mode == "first" else loaded
    scale = {"plain": lambda i: 1.0, "use": lambda i: s_ref[c, i][:, None],
             "first": lambda i: top[i], "ahead": lambda i: loaded[i]}[mode]
    a = a_ref[c]
    s_c = state.astype(a.dtype)
    u = scale(0) * jnp.dot(a, s_c, preferred_element_type=jnp.float32)
    y = scale(1) * jnp.dot(a, s_c, preferred_element_type=jnp.float32) + jnp.dot(
        a_ref[c, :, pl.ds(0, c_rows)], u.astype(a.dtype), preferred_element_type=jnp.float32)
    state = state + 1e-3 * jax.lax.dot_general(
        a, (scale(2) * u).astype(a.dtype), (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)
    o_ref[c] = y.astype(o_ref.dtype)
    return state, following

  first = load(0) if mode == "ahead" else ()
  jax.lax.fori_loop(0, chunks, step, (w_ref[...].astype(jnp.float32), first))


@functools.partial(jax.jit, static_argnames=("mode", "num_stages", "interpret"))
def run(a: jax.Array, w: jax.Array, s: jax.Array, *, mode: str, num_stages: int,
        interpret: bool) -> jax.Array:
  """``a [P, N, C, D]`` (bf16), ``w [D, BV]``, ``s [P, N, 3, C]`` -> ``y [P, N, C, BV]``."""
  programs, chunks, c_rows, d = a.shape
  bv = w.shape[1]
  return pl.pallas_call(
      functools.partial(_kernel, mode=mode, chunks=chunks),
      out_shape=jax.ShapeDtypeStruct((programs, chunks, c_rows, bv), a.dtype),
      grid=(programs,),
      in_specs=[pl.BlockSpec((None, chunks, c_rows, d), lambda p: (p, 0, 0, 0)),
                pl.BlockSpec((d, bv), lambda p: (0, 0)),
                pl.BlockSpec((None, chunks, SCALES, c_rows), lambda p: (p, 0, 0, 0))],
      out_specs=pl.BlockSpec((None, chunks, c_rows, bv), lambda p: (p, 0, 0, 0)),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=num_stages),
      interpret=interpret, name=f"scalar_loads_{mode}")(a, w, s)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--programs", type=int, default=512)
  parser.add_argument("--chunks", type=int, default=32)
  parser.add_argument("--chunk", type=int, default=64, help="C, rows a chunk")
  parser.add_argument("--d", type=int, default=128, help="D, the tile's columns")
  parser.add_argument("--block_v", type=int, default=32, help="BV, the state's columns")
  parser.add_argument("--stages", default="2,1", help="num_stages values, comma-separated")
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--interpret", action="store_true")
  parser.add_argument("--out", default="bench_out")
  args = parser.parse_args()
  if args.d < args.chunk:
    parser.error(f"--d={args.d} must be at least --chunk={args.chunk}")
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  a = jax.random.normal(keys[0], (args.programs, args.chunks, args.chunk, args.d), jnp.bfloat16)
  w = 0.1 * jax.random.normal(keys[1], (args.d, args.block_v), jnp.bfloat16)
  s = jax.random.uniform(keys[2], (args.programs, args.chunks, SCALES, args.chunk))
  rows = []
  for stages in (int(x) for x in args.stages.split(",")):
    call = lambda mode: run(a, w, s, mode=mode, num_stages=stages, interpret=args.interpret)
    want = call("use").astype(jnp.float32)
    for mode in MODES:
      _, ms = timed(call, mode, repeats=args.repeats)
      diff = float(jnp.max(jnp.abs(call(mode).astype(jnp.float32) - want)))
      rows.append({"mode": mode, "num_stages": stages, "us": 1e3 * ms, "max_diff_vs_use": diff})
  device = jax.devices()[0].device_kind
  lines = [f"device: {device}; {vars(args)}", "| mode | num_stages | µs a call | max diff vs use |",
           "|---|---:|---:|---:|"]
  lines += [f"| {r['mode']} | {r['num_stages']} | {r['us']:.1f} | {r['max_diff_vs_use']:.2g} |"
            for r in rows]
  print("\n".join(lines))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "triton_scalar_loads.json"), "w") as f:
    json.dump({"device": device, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
