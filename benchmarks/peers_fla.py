"""FLA's delta-rule kernels (PyTorch, Triton), timed for the side-by-side table of op 1.

    python benchmarks/peers_fla.py --shapes=0,3 --out=DIR

Run it on the same card as ``kernels_matrix_memory.py --bench`` (same machine, in a process of
its own: JAX and PyTorch each reserve GPU memory). It needs ``torch`` and ``fla-core==0.6.0``
(``../shared/peers/README.md``), neither of which nlj depends on.

Times, at B×T×H×D with bfloat16 ``q, k, v`` (L2-normalised keys) and float32 gates, the median of
``triton.testing.do_bench`` after its warm-up, and the first call's seconds (FLA autotunes its
Triton kernels there):

- ``chunk_gated_delta_rule``: forward only. FLA refuses its backward on Triton < 3.7.1 on Hopper
  (its own guard), which the GPU image has.
- ``chunk_delta_rule`` (DeltaNet, no gate): forward and forward+backward.
- ``chunk_momentum_delta_rule``: the closest public kernel to Titans' linear memory with
  momentum (op 1 with ``momentum=True``); forward and forward+backward.

An op that fails is recorded as an error and the others still run. Prints a table and writes
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from fla.ops.delta_rule import chunk_delta_rule
from fla.ops.gated_delta_rule import chunk_gated_delta_rule
from fla.ops.momentum_delta_rule import chunk_momentum_delta_rule

SHAPES = ((8, 2048, 16, 128), (4, 4096, 16, 128), (2, 8192, 16, 128), (1, 16384, 16, 128))
OPS = ("gated_delta_rule_fwd", "delta_rule_fwd", "delta_rule_fwdbwd", "momentum_delta_rule_fwd",
       "momentum_delta_rule_fwdbwd")


def parse_shapes(text: str) -> list[tuple[int, ...]]:
  """``"0,3"`` (indices into :data:`SHAPES`) or ``"8x2048x16x128,..."``."""
  shapes = []
  for item in text.split(","):
    if item.isdigit() and int(item) < len(SHAPES):
      shapes.append(SHAPES[int(item)])
    elif len(item.split("x")) == 4 and all(p.isdigit() for p in item.split("x")):
      shapes.append(tuple(int(p) for p in item.split("x")))
    else:
      raise ValueError(f"--shapes: {item!r} is neither an index below {len(SHAPES)} nor BxTxHxD")
  return shapes


def calls(b: int, t: int, h: int, d: int) -> dict[str, Callable[[], None]]:
  """One closure per name of :data:`OPS` on fixed random inputs of shape ``[b, t, h, d]``."""
  torch.manual_seed(0)
  dev, dt = "cuda", torch.bfloat16
  q = torch.randn(b, t, h, d, device=dev, dtype=dt, requires_grad=True)
  k = F.normalize(torch.randn(b, t, h, d, device=dev), dim=-1).to(dt).requires_grad_()
  v = torch.randn(b, t, h, d, device=dev, dtype=dt, requires_grad=True)
  gate = F.logsigmoid(torch.randn(b, t, h, device=dev)).requires_grad_()
  beta = torch.rand(b, t, h, device=dev).sigmoid().requires_grad_()
  log_alpha = F.logsigmoid(torch.randn(b, t, h, device=dev)).requires_grad_()
  log_mu = F.logsigmoid(torch.randn(b, t, h, device=dev)).requires_grad_()
  dy = torch.randn(b, t, h, d, device=dev, dtype=dt)
  forwards = {
      "gated_delta_rule": lambda: chunk_gated_delta_rule(q, k, v, gate, beta),
      "delta_rule": lambda: chunk_delta_rule(q, k, v, beta),
      "momentum_delta_rule": lambda: chunk_momentum_delta_rule(q, k, v, log_alpha, log_mu,
                                                               beta=beta),
  }

  def forward_only(f):
    def run():
      with torch.no_grad():
        f()
    return run

  def forward_backward(f):
    return lambda: f()[0].backward(dy)
  return {name: (forward_backward if name.endswith("fwdbwd") else forward_only)(
      forwards[name.rsplit("_", 1)[0]]) for name in OPS}


def time_op(row: dict, name: str, fn: Callable[[], None]) -> None:
  """``row[name + "_ms"]`` (median) and ``row[name + "_first_s"]``, or ``row[name + "_error"]``."""
  try:
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    row[f"{name}_first_s"] = round(time.perf_counter() - start, 1)
    row[f"{name}_ms"] = triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")
  except Exception as error:  # pylint: disable=broad-except  # record it, time the others
    row[f"{name}_error"] = repr(error)[:300]
  print(row["shape"], name, {k: v for k, v in row.items() if k.startswith(name)}, flush=True)


def table(rows: list[dict]) -> str:
  pairs = (("gated_delta_rule", ("fwd",)), ("delta_rule", ("fwd", "fwdbwd")),
           ("momentum_delta_rule", ("fwd", "fwdbwd")))

  def cell(row, op, modes):
    return " / ".join(f"{row[f'{op}_{m}_ms']:.2f}" if f"{op}_{m}_ms" in row else "error"
                      for m in modes)
  lines = ["| shape | " + " | ".join(f"fla {op} {' / '.join(m)} ms" for op, m in pairs) + " |",
           "|---|" + "---|" * len(pairs)]
  lines += [f"| {row['shape']} | " + " | ".join(cell(row, op, m) for op, m in pairs) + " |"
            for row in rows]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="0,1,2,3",
                      help="indices into SHAPES, or BxTxHxD shapes")
  parser.add_argument("--out", default="bench_out", help="directory for peers_fla.json")
  args = parser.parse_args()
  try:
    shapes = parse_shapes(args.shapes)
  except ValueError as error:
    parser.error(str(error))
  report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "rows": []}
  for shape in shapes:
    row = {"shape": "x".join(map(str, shape))}
    for name, fn in calls(*shape).items():
      time_op(row, name, fn)
    report["rows"].append(row)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "peers_fla.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  print(table(report["rows"]))


if __name__ == "__main__":
  main()
