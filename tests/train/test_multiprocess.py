"""Two CPU processes on localhost joined by ``jax.distributed`` (gloo collectives) train in
lockstep on one mesh over both, and write one set of files and checkpoints."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.train.events import event_files

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_in_lockstep(tmp_path):
  flags = os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=2")
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  address = f"localhost:{_free_port()}"
  processes = [subprocess.Popen(
      [sys.executable, "-m", "tests.train.multiprocess_worker", address, "2", str(i),
       str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=TIMEOUT_S) for p in processes]
  except subprocess.TimeoutExpired:
    for p in processes:
      p.kill()
    stderrs = [p.communicate()[1][-2000:] for p in processes]
    pytest.fail(f"not done after {TIMEOUT_S} s; stderr of each process:\n" + "\n".join(stderrs))
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  reports = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
  assert [r["process"] for r in reports] == [0, 1]
  assert all(r["devices"] == 4 and r["local_devices"] == 2 for r in reports)
  assert len(reports[0]["losses"]) == 4
  assert reports[0]["losses"] == reports[1]["losses"]
  assert reports[0]["val_loss"] == reports[1]["val_loss"]
  # process 0 alone logs and writes the run's files
  assert "validation loss" in outputs[0][0] and "validation loss" not in outputs[1][0]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4]
  assert [r["loss"] for r in records] == pytest.approx(
      np.mean(np.reshape(reports[0]["losses"], (2, 2)), axis=1))
  assert len(event_files(tmp_path)) == 1
  # one checkpoint set, each step holding the arrays of both processes
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]
  for step in ("2", "4"):
    state = tmp_path / "checkpoints" / step / "state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in state.iterdir()}
