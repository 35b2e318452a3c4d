"""The family registry: which token mixer and which MLP a block of a given family builds.

A *family* names the two halves of a pre-norm block (:mod:`nlj.models.blocks`):

* ``make_mixer(config, layer, rngs) -> mixer`` -- a token mixer following the streaming
  contract of :mod:`nlj.layers` (``init_cache(batch, max_len)``, ``__call__(x, cache)``);
* ``make_mlp(config, layer, rngs) -> mlp`` (optional; default: SwiGLU, see
  :func:`nlj.models.blocks.default_mlp`) -- either a stateless ``mlp(x) -> y`` or, when it has an
  ``init_cache`` method, a streaming module under the same contract as a mixer (e.g. a CMS whose
  levels learn in context).

``config`` is the :class:`nlj.models.ModelConfig` and ``layer`` the block's index. With
``ModelConfig.scan_layers`` (the default) the blocks at one position ``j`` of the layer pattern are
initialised by one ``jax.vmap`` over their keys with ``layer=j``, so a family whose module
structure depends on ``layer`` needs ``scan_layers=False`` (building it raises otherwise), as does
a depth-dependent initialisation. A family's parameter *shapes* must not depend on ``layer`` or
``config.layers``: :func:`nlj.models.count_params` counts one period of the layer pattern and
scales it (checked against full builds at the tiny size by ``tests/models/test_presets.py``).
Layer modules
register their families when imported (e.g. :mod:`nlj.layers.recurrent` registers
``linear_attention``, ``deltanet`` and ``gated_deltanet``); :func:`load_families` imports every
module of :data:`FAMILY_MODULES` that exists. This module imports nothing from ``nlj.layers``, so
layer modules can import it without a cycle.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Any, Callable

__all__ = ["FAMILY_MODULES", "Family", "register_family", "get_family", "families",
           "load_families", "check_options"]

Factory = Callable[..., Any]  # (config, layer, rngs) -> module

FAMILY_MODULES = ("nlj.layers.recurrent", "nlj.layers.attention", "nlj.layers.titans",
                  "nlj.layers.hope")


@dataclasses.dataclass(frozen=True)
class Family:
  """A registered family: its name and block factories (``make_mlp`` None: the default MLP)."""

  name: str
  make_mixer: Factory
  make_mlp: Factory | None = None
  options: tuple[str, ...] = ()


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, make_mixer: Factory, make_mlp: Factory | None = None,
                    options: tuple[str, ...] = ()) -> None:
  """Register family ``name`` (see the module docstring for the factory signatures).

  ``options`` names the ``ModelConfig.options`` its factories read; building a block rejects
  any other name (:func:`check_options`), so no option is silently ignored.

  Registering the same factories again is a no-op; different factories under a registered name
  raise, so two modules cannot silently shadow each other.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"register_family: name must be a non-empty str, got {name!r}")
  for field, value in (("make_mixer", make_mixer), ("make_mlp", make_mlp)):
    if value is not None and not callable(value):
      raise ValueError(f"register_family({name!r}): {field} must be callable, got {value!r}")
  if not isinstance(options, tuple) or not all(isinstance(o, str) for o in options):
    raise ValueError(f"register_family({name!r}): options must be a tuple of str, got {options!r}")
  family = Family(name, make_mixer, make_mlp, options)
  if _FAMILIES.get(name, family) != family:
    raise ValueError(f"family {name!r} is already registered with other factories")
  _FAMILIES[name] = family


def load_families() -> None:
  """Import the modules of :data:`FAMILY_MODULES` that exist, so their families register.

  A module that is absent is skipped; errors raised while importing one that exists propagate.
  """
  for module in FAMILY_MODULES:
    if importlib.util.find_spec(module) is not None:
      importlib.import_module(module)


def families() -> tuple[str, ...]:
  """Names of every registered family (after :func:`load_families`), sorted."""
  load_families()
  return tuple(sorted(_FAMILIES))


def get_family(name: str) -> Family:
  """The registered family ``name``; an error listing the registered ones otherwise."""
  load_families()
  if name not in _FAMILIES:
    raise ValueError(f"unknown family {name!r}; registered: {sorted(_FAMILIES)}")
  return _FAMILIES[name]


def check_options(options: tuple[tuple[str, Any], ...], names: tuple[str, ...]) -> None:
  """Raise a ValueError naming ``ModelConfig.options`` when an option is read by none of the
  families ``names`` (those a model's layer pattern uses)."""
  known = sorted({o for name in names for o in get_family(name).options})
  unknown = sorted(set(dict(options)) - set(known))
  if unknown:
    raise ValueError(f"ModelConfig.options: unknown option(s) {unknown} for families "
                     f"{sorted(set(names))}; known: {known}")
