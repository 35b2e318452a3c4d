"""GPU benchmark of a whole self-modifying Titans layer and a whole HOPE block, kernel vs chunked.

    python benchmarks/kernels_layers.py --modules=selfmod --size=760m --batch=4 --seq=2048 --out=DIR
    python benchmarks/kernels_layers.py --modules=hope_block --size=small --batch=1 --out=DIR
    python benchmarks/kernels_layers.py --smoke      # CPU: tiny preset, 1×64, interpret mode

Modules, built from the ``--size`` preset with ``dtype=--dtype`` and ``impl`` set per row:
``selfmod`` -- the self-modifying Titans mixer (family ``self_mod_titans``, five MLP memories:
``k``, ``v``, ``eta``, ``alpha`` at ``chunk_others`` and the main ``memory`` at ``chunk``);
``hope_block`` -- one HOPE block (norm, that mixer, norm, CMS, residuals); ``cms`` -- that
block's Continuum Memory System alone (``cms_chunks`` levels, local signal). Per row: forward and
forward+backward (``jax.grad`` of ``Σ y · dy`` w.r.t. parameters and input
``x [batch, seq, d_model]``) milliseconds (median of ``--repeats`` after the first call), the
first call's seconds (trace, compile and run), XLA's temporary buffer size, and the relative
difference ``‖y - y_chunked‖ / ‖y_chunked‖`` of the forward output against the chunked row.

``levels`` records, per memory level, the implementation the layer asked for and the runner
the dispatcher (:func:`nlj.core.dispatch.resolve`) gave it while the row was traced, e.g.
``"pallas -> mlp_memory"``. The main memory steps one ``chunk``-token chunk at a time (the
outer scan of :func:`nlj.core.run_nested`) and the other four one ``chunk_others``-token chunk at
a time inside it, so each kernel launch covers a single chunk. CMS levels call ``Level.run``
with the default ``impl="auto"``, whatever the config says: the chunked JAX form (``mlp_memory``
is opt-in, and above the tiny preset their widths and chunks exceed its limits). On an H100 the
forward+backward of a ``small`` block at 1×2048 took 0.73 GB of XLA temporaries (BENCHMARKS.md,
thirteenth session). A level no kernel covers under ``impl="pallas"`` would raise in the
dispatcher; here it runs chunked instead and is recorded as ``"pallas -> chunked (no kernel)"``
with the dispatcher's reason under ``fallbacks``. An impl may name a matmul precision after a
colon, e.g. ``--impls=chunked,chunked:BF16_BF16_F32,pallas:BF16_BF16_F32``: the row is traced under
``jax.default_matmul_precision`` of it, which every product without an explicit precision
follows, the kernels' included (``BF16_BF16_F32``: bfloat16 operands, float32 accumulation,
half the shared memory of float32 operands in op 2's kernels). A failing row is recorded, not
fatal. Prints a table last and writes ``kernels_layers.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from nlj.core import Level, dispatch
from nlj.layers.cms import ContinuumMemory
from nlj.models import PRESETS, Block, ModelConfig
from nlj.models.registry import get_family
from timing import timed

MODULES = ("selfmod", "hope_block", "cms")


def build(module: str, size: str, impl: str, dtype: str) -> tuple[nnx.Module, ModelConfig]:
  """The ``selfmod`` mixer, a ``hope_block`` or its ``cms`` (layer 0) of the ``size`` preset,
  and its config."""
  family = "self_mod_titans" if module == "selfmod" else "hope"
  config = dataclasses.replace(PRESETS[(family, size)], impl=impl, dtype=dtype)
  rngs = nnx.Rngs(0)
  if module == "selfmod":
    return get_family(family).make_mixer(config, 0, rngs), config
  if module == "cms":
    return get_family(family).make_mlp(config, 0, rngs), config
  return Block(config, 0, rngs), config


def named_levels(module: nnx.Module) -> dict[str, Level]:
  """Every memory level that runs in a mixer or block: the mixer's by name (projection memories
  that run grouped as their group, e.g. ``k+v``), CMS levels as ``cms{i}``."""
  cms_module = module if isinstance(module, ContinuumMemory) else getattr(module, "mlp", None)
  cms = {f"cms{i}": level for i, level in enumerate(getattr(cms_module, "levels", ()))}
  if isinstance(module, ContinuumMemory):
    return cms
  mixer = getattr(module, "mixer", module)
  groups = {"+".join(names): level for names, level in getattr(mixer, "groups", {}).items()}
  grouped = {name for key in groups for name in key.split("+")}
  named = {name: level for name, level in mixer.levels.items() if name not in grouped}
  return groups | named | cms


def runner_name(runner: dispatch.Runner) -> str:
  kernel = next((k.name for k in dispatch.registered_kernels() if k.run is runner), None)
  return kernel or runner.__name__.removeprefix("run_")


@contextlib.contextmanager
def watched_dispatch(seen: dict, fallbacks: dict) -> Iterator[None]:
  """Record ``(level, impl) -> runner name`` of every resolution; an uncovered level under
  ``impl="pallas"`` gets the chunked form (its reason goes to ``fallbacks[level]``)."""
  resolve = dispatch.resolve

  def watching(level: Level, impl: str) -> dispatch.Runner:
    try:
      runner = resolve(level, impl)
    except ValueError as error:
      if impl != "pallas":
        raise
      fallbacks[level] = str(error)
      seen[level, impl] = "chunked (no kernel)"
      return resolve(level, "chunked")
    seen[level, impl] = runner_name(runner)
    return runner

  dispatch.resolve = watching
  try:
    yield
  finally:
    dispatch.resolve = resolve


def split_impl(spec: str) -> tuple[str, str | None]:
  """``"pallas:BF16_BF16_F32"`` -> ``("pallas", "BF16_BF16_F32")``;
  ``"chunked"`` -> ``("chunked", None)``."""
  impl, _, precision = spec.partition(":")
  return impl, precision or None


def bench_row(module_name: str, size: str, spec: str, dtype: str, b: int, t: int,
              repeats: int) -> tuple[dict, jax.Array | None]:
  """One row (see the module docstring) and the forward output (None if it failed)."""
  impl, precision = split_impl(spec)
  module, config = build(module_name, size, impl, dtype)
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  d = config.d_model
  x = jax.random.normal(jax.random.PRNGKey(1), (b, t, d), jnp.dtype(dtype))
  dy = jax.random.normal(jax.random.PRNGKey(2), (b, t, d), jnp.float32)

  def fwd(p, x):
    return nnx.merge(graphdef, p, rest)(x)[0]

  def loss(p, x):
    return jnp.sum(fwd(p, x).astype(jnp.float32) * dy)

  row: dict[str, Any] = {"module": module_name, "impl": spec, "size": size, "dtype": dtype,
                         "shape": f"{b}x{t}x{d}"}
  seen, fallbacks, y = {}, {}, None
  with watched_dispatch(seen, fallbacks), jax.default_matmul_precision(precision):
    for mode, f in (("fwd", jax.jit(fwd)), ("fwdbwd", jax.jit(jax.grad(loss, (0, 1))))):
      try:
        start = time.perf_counter()
        compiled = f.lower(params, x).compile()
        compile_s = time.perf_counter() - start
        first, ms = timed(compiled, params, x, repeats=repeats)
        memory = compiled.memory_analysis()
        row[f"{mode}_ms"], row[f"{mode}_first_s"] = ms, compile_s + first
        row[f"{mode}_temp_gb"] = None if memory is None else memory.temp_size_in_bytes / 1e9
        if mode == "fwd":
          y = compiled(params, x)
      except Exception as error:  # recorded: the other rows still run
        row[f"{mode}_error"] = repr(error)[:500]
  levels = named_levels(module)
  row["levels"] = {name: " / ".join(f"{i} -> {r}" for (lv, i), r in seen.items() if lv == level)
                   or "not run" for name, level in levels.items()}
  if fallbacks:
    row["fallbacks"] = {name: fallbacks[level] for name, level in levels.items()
                        if level in fallbacks}
  return row, y


def relative_difference(y: jax.Array, want: jax.Array) -> float:
  diff = jnp.linalg.norm((y - want).astype(jnp.float32))
  return float(diff / jnp.maximum(jnp.linalg.norm(want.astype(jnp.float32)), 1e-30))


def levels_cell(levels: dict[str, str]) -> str:
  """``{"k": "pallas -> mlp_memory", "v": ...}`` as ``k, v: pallas -> mlp_memory; ...``."""
  groups: dict[str, list[str]] = {}
  for name, used in levels.items():
    groups.setdefault(used, []).append(name)
  return "; ".join(f"{', '.join(names)}: {used}" for used, names in groups.items())


def table(rows: list[dict]) -> str:
  lines = ["| module | impl | B×T×d | fwd ms | fwd+bwd ms | first call s (fwd / fwd+bwd) | "
           "fwd+bwd temp GB | rel. diff vs chunked | levels |", "|" + "---|" * 9]

  def cell(row: dict, mode: str, field: str, spec: str) -> str:
    if f"{mode}_error" in row:
      return "error"
    value = row.get(f"{mode}_{field}")
    return "–" if value is None else format(value, spec)

  for r in rows:
    rel = r.get("y_rel_vs_chunked")
    lines.append(
        f"| {r['module']} | {r['impl']} | {r['shape']} | {cell(r, 'fwd', 'ms', '.2f')} | "
        f"{cell(r, 'fwdbwd', 'ms', '.2f')} | {cell(r, 'fwd', 'first_s', '.1f')} / "
        f"{cell(r, 'fwdbwd', 'first_s', '.1f')} | {cell(r, 'fwdbwd', 'temp_gb', '.2f')} | "
        f"{'–' if rel is None else f'{rel:.1e}'} | {levels_cell(r['levels'])} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="760m", help="preset size giving d_model, heads, chunks")
  parser.add_argument("--modules", default=",".join(MODULES))
  parser.add_argument("--impls", default="chunked,pallas",
                      help="comma-separated IMPL or IMPL:MATMUL_PRECISION (module docstring)")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype (ModelConfig.dtype)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny preset, batch 1, 64 tokens, 2 repeats (a CPU check)")
  parser.add_argument("--out", default="benchmarks")
  args = parser.parse_args()
  if args.smoke:
    args.size, args.batch, args.seq, args.repeats = "tiny", 1, 64, 2
  modules, impls = args.modules.split(","), args.impls.split(",")
  for m in modules:
    if m not in MODULES:
      parser.error(f"--modules: {m!r} is not one of {MODULES}")
  for spec in impls:
    impl, precision = split_impl(spec)
    if impl not in dispatch.IMPLS:
      parser.error(f"--impls: {impl!r} is not one of {dispatch.IMPLS}")
    try:
      with jax.default_matmul_precision(precision):
        pass
    except ValueError as error:
      parser.error(f"--impls: {spec!r}: {error}")
  rows = []
  for module in modules:
    outputs = {}
    for impl in impls:
      row, outputs[impl] = bench_row(module, args.size, impl, args.dtype, args.batch, args.seq,
                                     args.repeats)
      if impl != "chunked" and outputs[impl] is not None and outputs.get("chunked") is not None:
        row["y_rel_vs_chunked"] = relative_difference(outputs[impl], outputs["chunked"])
      rows.append(row)
      print(row, flush=True)
  report = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "date": time.strftime("%Y-%m-%d"), "rows": rows}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "kernels_layers.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(table(rows))


if __name__ == "__main__":
  main()
