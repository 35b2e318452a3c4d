"""Run a registered experiment: ``python launch.py --experiment=NAME [--config.FIELD=VALUE ...]``.

Flags:
  --experiment  registered name (``--list`` prints them all with a description).
  --workdir     output directory (default ``runs/<experiment>``).
  --steps       overrides the config's ``steps`` field when it has one.
  --mesh        overrides the config's ``mesh`` field when it has one (``data:2,fsdp:4,tensor:1``).
  --coordinator_address, --num_processes, --process_id
                multi-host runs: every process calls ``jax.distributed.initialize`` with these
                before touching a device (skipped when ``--num_processes=1``).
  --config.F=V  overrides any field ``F`` of the experiment's config, parsed as the field's type
                (``none`` for a field that may be None, e.g. ``--config.peak_flops=989e12``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing

from absl import app, flags

import nlj_experiments

flags.DEFINE_string("experiment", "lm/hope_tiny", "Registered experiment to run.")
flags.DEFINE_bool("list", False, "Print every registered experiment and exit.")
flags.DEFINE_string("workdir", None, "Output directory (default runs/<experiment>).")
flags.DEFINE_integer("steps", None, "Override the config's number of training steps.")
flags.DEFINE_string("mesh", None, "Override the config's device mesh, e.g. data:2,fsdp:4,tensor:1.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
flags.DEFINE_integer("num_processes", 1, "Number of processes (hosts) of the run.")
flags.DEFINE_integer("process_id", 0, "This process's index in [0, num_processes).")
FLAGS = flags.FLAGS

_CONFIG_PREFIX = "--config."


def _parse_value(text: str, kind: type):
  if typing.get_origin(kind) in (typing.Union, types.UnionType):
    if type(None) in typing.get_args(kind) and text.lower() == "none":
      return None
    (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
  if kind is bool:
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"expected true/false, got {text!r}")
    return text.lower() in ("true", "1")
  return kind(text)


def apply_overrides(config, overrides: dict[str, str]):
  """``config`` with fields replaced by ``overrides`` (strings parsed as each field's type)."""
  fields = {f.name: f for f in dataclasses.fields(config)}
  hints = typing.get_type_hints(type(config))
  values = {}
  for name, text in overrides.items():
    if name not in fields:
      raise ValueError(f"--config.{name}: {type(config).__name__} has no field {name!r}; "
                       f"fields: {', '.join(sorted(fields))}")
    try:
      values[name] = _parse_value(text, hints[name])
    except ValueError as e:
      kind = getattr(hints[name], "__name__", str(hints[name]))
      raise ValueError(f"--config.{name}={text!r}: not a valid {kind} ({e})")
  return dataclasses.replace(config, **values)


def split_config_flags(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """Separate ``--config.F=V`` arguments (absl does not know them) from the rest."""
  rest, overrides = [], {}
  for arg in argv:
    if arg.startswith(_CONFIG_PREFIX):
      name, sep, value = arg[len(_CONFIG_PREFIX):].partition("=")
      if not sep:
        raise SystemExit(f"{arg}: expected --config.FIELD=VALUE")
      overrides[name] = value
    else:
      rest.append(arg)
  return rest, overrides


def initialize_distributed(coordinator_address: str | None, num_processes: int,
                           process_id: int) -> None:
  """``jax.distributed.initialize`` for a multi-process run; nothing for one process."""
  if num_processes < 1:
    raise app.UsageError(f"--num_processes must be >= 1, got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise app.UsageError(f"--process_id={process_id} must be in "
                         f"[0, --num_processes={num_processes})")
  if num_processes == 1:
    return
  if not coordinator_address:
    raise app.UsageError(f"--coordinator_address=HOST:PORT is required with "
                         f"--num_processes={num_processes}")
  import jax  # pylint: disable=import-outside-toplevel
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def main(argv, overrides: dict[str, str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.list:
    for name in nlj_experiments.names():
      print(f"{name:32s} {nlj_experiments.get(name).description}")
    return
  initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  experiment = nlj_experiments.get(FLAGS.experiment)
  if FLAGS.steps is not None:
    overrides = {**overrides, "steps": str(FLAGS.steps)}
  if FLAGS.mesh is not None:
    overrides = {**overrides, "mesh": FLAGS.mesh}
  config = apply_overrides(experiment.config, overrides)
  workdir = FLAGS.workdir or os.path.join("runs", experiment.name)
  os.makedirs(workdir, exist_ok=True)
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:  # one writer on a shared workdir
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump({"experiment": experiment.name, **dataclasses.asdict(config)}, f, indent=2)
  experiment.run(config, workdir)


if __name__ == "__main__":
  argv, config_overrides = split_config_flags(sys.argv)
  app.run(lambda a: main(a, config_overrides), argv=argv)
