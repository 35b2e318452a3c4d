"""Timing helper shared by the benchmarks (scripts in this folder import it as ``timing``)."""

from __future__ import annotations

import statistics
import time

import jax


def timed(f, *args, repeats: int) -> tuple[float, float]:
  """``(first call's seconds, median milliseconds of the next ``repeats`` calls)``."""
  start = time.perf_counter()
  jax.block_until_ready(f(*args))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return first, 1e3 * statistics.median(times)
