"""``launch.py``'s mesh and multi-host flags."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import app

import launch
from nlj.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def test_single_process_skips_distributed_initialize():
  launch.initialize_distributed(None, 1, 0)


@pytest.mark.parametrize("args, message", [
    ((None, 0, 0), "--num_processes must be >= 1"),
    (("localhost:1234", 2, 2), r"--process_id=2 must be in \[0, --num_processes=2\)"),
    ((None, 2, 0), "--coordinator_address=HOST:PORT is required")])
def test_distributed_flags_are_checked(args, message):
  with pytest.raises(app.UsageError, match=message):
    launch.initialize_distributed(*args)


def test_config_overrides_of_a_field_that_may_be_none():
  assert launch.apply_overrides(TrainConfig(), {"peak_flops": "989e12"}).peak_flops == 989e12
  with_flops = TrainConfig(peak_flops=1.0)
  assert launch.apply_overrides(with_flops, {"peak_flops": "None"}).peak_flops is None
  with pytest.raises(ValueError, match=r"--config.peak_flops='fast': not a valid float \| None"):
    launch.apply_overrides(TrainConfig(), {"peak_flops": "fast"})


def test_mesh_flag_reaches_the_run(tmp_path):
  flags = os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=2")
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "launch.py", "--experiment=lm/gated_deltanet_tiny",
             f"--workdir={tmp_path}", "--steps=2", "--mesh=fsdp:2", "--config.batch_size=4",
             "--config.seq_len=16", "--config.warmup=1", "--config.eval_batches=1"]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
  assert json.loads((tmp_path / "config.json").read_text())["mesh"] == "fsdp:2"
