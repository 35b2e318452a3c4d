"""TensorBoard event files: CRC-32C, and scalars written then read back by an independent reader
(and by TensorBoard itself when it is installed)."""

import time

import numpy as np
import pytest

from nlj.train.tensorboard import EventWriter, crc32c, masked_crc32c
from tests.train.events import crc32c_bitwise, event_files, read_events


def test_crc32c_matches_the_check_value_and_a_bitwise_crc():
  assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value
  data = bytes(range(256)) * 3
  assert crc32c(data) == crc32c_bitwise(data)
  assert crc32c(b"") == 0 and masked_crc32c(b"") == 0xA282EAD8


def test_scalars_round_trip(tmp_path):
  before = time.time()
  writer = EventWriter(tmp_path / "run")
  writer.restart(1)
  writer.scalars(0, {"train/loss": 2.5, "train/lr": 1e-3})
  writer.scalars(2**40 + 3, {"val/perplexité": 12.125, "big": 8e10})
  writer.close()
  (path,) = event_files(tmp_path / "run")
  events = read_events(path)
  assert events[0]["file_version"] == "brain.Event:2" and events[0]["step"] == 0
  assert events[1]["session_log"] == 1 and events[1]["step"] == 1  # SessionLog.START
  assert [e["step"] for e in events[2:]] == [0, 2**40 + 3]
  assert events[2]["scalars"] == {"train/loss": 2.5, "train/lr": np.float32(1e-3)}
  assert events[3]["scalars"] == {"val/perplexité": 12.125, "big": np.float32(8e10)}
  assert all(before <= e["wall_time"] <= time.time() for e in events)


def test_negative_step_is_refused(tmp_path):
  writer = EventWriter(tmp_path)
  with pytest.raises(ValueError, match="step must be >= 0"):
    writer.scalars(-1, {"x": 1.0})
  writer.close()


def test_tensorboard_reads_the_files_and_drops_events_past_a_restart(tmp_path):
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  first = EventWriter(tmp_path)
  first.restart(1)
  for step in range(1, 5):
    first.scalars(step, {"train/loss": float(step)})
  first.close()
  resumed = EventWriter(tmp_path)  # resumed from a checkpoint at step 2
  resumed.restart(3)
  for step in (3, 4):
    resumed.scalars(step, {"train/loss": 10.0 * step})
  resumed.close()
  accumulator = event_accumulator.EventAccumulator(str(tmp_path))
  accumulator.Reload()
  assert accumulator.Tags()["scalars"] == ["train/loss"]
  assert [(s.step, s.value) for s in accumulator.Scalars("train/loss")] == [
      (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
