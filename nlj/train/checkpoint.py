"""Checkpoints of a training run: orbax ``CheckpointManager``, async, keep-N, atomic.

A checkpoint at step ``s`` holds two items:

* ``state`` -- the :class:`nlj.train.TrainState` (step, params, optimizer state, key);
* ``data`` -- the training iterator's position, ``PackedBatches.state()`` (JSON).

Saves run in a background thread after the arrays are copied off the devices, so training
continues while they are written. Orbax writes each step into a temporary directory and renames
it when complete, so a process killed during a save leaves the previous checkpoints intact and
the partial one invisible (``tests/train/test_checkpoint.py`` kills a saver with SIGKILL).
Restores read the arrays straight into the target shardings, so a run saved on one mesh resumes
on another.

Example:
  checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=3)
  if checkpoints.latest_step() is not None:
    state, position = checkpoints.restore(state, shardings)
    batches.restore(position)
  ...
  checkpoints.save(state, batches.state())
  checkpoints.close()                  # waits for the last save
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from nlj.train.step import TrainState

__all__ = ["Checkpoints"]


class Checkpoints:
  """The checkpoints of one run in ``directory`` (created if missing).

  Args:
    directory: where step directories ``<step>/`` are written.
    keep: keep the newest ``keep`` checkpoints (older ones are deleted after a save).
    async_save: write in a background thread (False: ``save`` returns when written).
  """

  def __init__(self, directory: str | os.PathLike[str], keep: int = 3, async_save: bool = True):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep must be a positive int, got {keep!r}")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.directory = os.fspath(directory)
    self._manager = ocp.CheckpointManager(os.path.abspath(self.directory), options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of every complete checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, state: TrainState, data_position: Mapping[str, int]) -> None:
    """Start saving ``state`` and the iterator position at step ``int(state.step)``."""
    position = {k: int(v) for k, v in data_position.items()}
    self._manager.save(int(jax.device_get(state.step)),
                       args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=ocp.args.JsonSave(position)))

  def restore(self, target: TrainState, shardings: TrainState | None = None,
              step: int | None = None) -> tuple[TrainState, dict[str, int]]:
    """``(state, data_position)`` of checkpoint ``step`` (default: the newest).

    Args:
      target: a ``TrainState`` of arrays or ``jax.ShapeDtypeStruct`` s giving the structure,
        shapes and dtypes to restore into.
      shardings: a ``TrainState`` of ``NamedSharding`` s to place the arrays with (e.g. of
        another mesh than the one saved from); None uses the shardings of ``target``'s arrays.

    Raises:
      FileNotFoundError: there is no complete checkpoint (or none at ``step``).
    """
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(f"no complete checkpoint{'' if step is None else f' at step {step}'}"
                              f" in {self.directory}; steps: {self.all_steps()}")
    if shardings is None:
      shardings = jax.tree.map(lambda x: x.sharding, target)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            target, shardings)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored["state"], {k: int(v) for k, v in restored["data"].items()}

  def wait(self) -> None:
    """Block until pending saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Wait for pending saves and release the manager's threads."""
    self._manager.close()

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
