"""Registry of runnable experiments (``launch.py --experiment=NAME``).

An experiment is a function ``run(config, workdir) -> dict`` paired with a frozen dataclass
config holding its defaults. Modules in this package register themselves with :func:`register`;
:func:`get` and :func:`names` import every module first so the registry is complete.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable

__all__ = ["Experiment", "register", "get", "names"]


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A registered experiment: a name, a one-line description, a default config and a runner."""

  name: str
  description: str
  config: Any
  run: Callable[[Any, str], dict]


_REGISTRY: dict[str, Experiment] = {}


def register(name: str, description: str, config: Any):
  """Decorator registering ``run(config, workdir) -> dict`` under ``name``."""

  def wrap(run: Callable[[Any, str], dict]):
    if name in _REGISTRY:
      raise ValueError(f"experiment name {name!r} is registered twice")
    _REGISTRY[name] = Experiment(name, description, config, run)
    return run

  return wrap


def _import_all() -> None:
  for info in pkgutil.walk_packages(__path__, prefix=__name__ + "."):
    importlib.import_module(info.name)


def names() -> list[str]:
  """Every registered experiment name, sorted."""
  _import_all()
  return sorted(_REGISTRY)


def get(name: str) -> Experiment:
  """The experiment registered as ``name``; a ValueError lists the known names otherwise."""
  _import_all()
  if name not in _REGISTRY:
    raise ValueError(f"--experiment={name!r} is not registered; known: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]
