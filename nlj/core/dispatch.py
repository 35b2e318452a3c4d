"""The ``impl=`` dispatcher: reference, chunked JAX, or a registered Pallas kernel.

Implementations are chosen explicitly, never by a silent try/except:

* ``"reference"`` -- :func:`nlj.core.reference.run_reference`, the token-by-token oracle;
* ``"chunked"``   -- :func:`nlj.core.chunked.run_chunked`;
* ``"pallas"``    -- the first registered kernel whose ``applies(level)`` is true; an error
  naming the level's memory, objective and rule when none covers it;
* ``"auto"``      -- a covering kernel marked ``auto`` on GPU/TPU, otherwise ``"chunked"``.

Kernels (``nlj_kernels``) register themselves with :func:`register_kernel`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from nlj.core.chunked import run_chunked
from nlj.core.level import Level
from nlj.core.reference import run_reference

__all__ = ["IMPLS", "Kernel", "register_kernel", "registered_kernels", "resolve"]

IMPLS = ("reference", "chunked", "pallas", "auto")
Runner = Callable  # (level, state, inputs, aligned=False) -> (state, y)


@dataclasses.dataclass(frozen=True)
class Kernel:
  """A kernel backend for some levels: ``applies(level)`` says which; ``run`` is a Runner.

  ``auto=False`` keeps a kernel out of ``impl="auto"`` (only ``impl="pallas"`` runs it), for a
  kernel whose results have not yet been checked on the accelerators ``"auto"`` would use it on.
  """

  name: str
  applies: Callable[[Level], bool]
  run: Runner
  auto: bool = True


_KERNELS: list[Kernel] = []


def register_kernel(kernel: Kernel) -> None:
  """Make ``kernel`` available to ``impl="pallas"`` and ``impl="auto"`` (on GPU/TPU)."""
  if any(k.name == kernel.name for k in _KERNELS):
    raise ValueError(f"a kernel named {kernel.name!r} is already registered")
  _KERNELS.append(kernel)


def registered_kernels() -> tuple[Kernel, ...]:
  return tuple(_KERNELS)


def _covering(level: Level, auto_only: bool = False) -> Kernel | None:
  return next((k for k in _KERNELS if k.applies(level) and (k.auto or not auto_only)), None)


def resolve(level: Level, impl: str) -> Runner:
  """The runner for ``level`` under ``impl`` (see the module docstring)."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl == "reference":
    return run_reference
  if impl == "chunked":
    return run_chunked
  import nlj_kernels  # pylint: disable=import-outside-toplevel,unused-import  (registers kernels)
  kernel = _covering(level, auto_only=impl == "auto")
  if impl == "pallas":
    if kernel is None:
      raise ValueError(
          f"impl='pallas': no registered kernel covers memory={type(level.memory).__name__}, "
          f"objective={level.objective.name!r}, rule={level.rule}, semantics={level.semantics!r}; "
          f"registered: {[k.name for k in _KERNELS]}; use impl='chunked' or 'auto'")
    return kernel.run
  if kernel is not None and jax.default_backend() in ("gpu", "tpu"):
    return kernel.run
  return run_chunked
