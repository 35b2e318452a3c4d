"""The training loop compiles its train step once: nothing recompiles after step 1, resumed too."""

import collections
import dataclasses

import pytest
from jax import monitoring

from nlj.train.loop import TrainConfig, train

TRACE = "/jax/core/compile/jaxpr_trace_duration"
COMPILE = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compilations():
  """``{(event, function name): count}`` of the traces and XLA compilations during the test."""
  counts: collections.Counter = collections.Counter()

  def listener(event: str, duration: float, **kwargs) -> None:
    del duration
    if event in (TRACE, COMPILE):
      counts[event, kwargs["fun_name"].removeprefix("jit(").removesuffix(")")] += 1

  monitoring.register_event_duration_secs_listener(listener)
  yield counts
  monitoring.unregister_event_duration_listener(listener)


def test_train_step_compiles_once_per_run(tmp_path, compilations):
  # batch 8 over every device: 8 fake CPU devices here, or however many this process has
  config = TrainConfig(family="transformer", size="tiny", steps=6, batch_size=8, seq_len=16,
                       warmup=1, log_every=2, checkpoint_every=3, eval_batches=2, mesh="data:-1")
  train(config, str(tmp_path))
  for event in (TRACE, COMPILE):
    assert compilations[event, "train_step"] == 1, compilations
    assert compilations[event, "eval_step"] == 1, compilations

  compilations.clear()
  resumed = train(dataclasses.replace(config, steps=9), str(tmp_path))  # restored state
  assert resumed["resumed_from_step"] == 6
  assert compilations[COMPILE, "train_step"] == 1, compilations
