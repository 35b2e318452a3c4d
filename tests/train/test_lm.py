"""End to end: the registered ``lm/*`` experiments, a 3-step run into a workdir, and its resume."""

import dataclasses
import json

import pytest

import nlj_experiments
from nlj.models import families
from nlj.train.loop import TrainConfig, train


def test_every_family_is_registered():
  names = nlj_experiments.names()
  for family in families():
    assert f"lm/{family}_tiny" in names and f"lm/{family}_small" in names


def test_gated_deltanet_tiny_runs_and_resumes(tmp_path):
  experiment = nlj_experiments.get("lm/gated_deltanet_tiny")
  config = dataclasses.replace(experiment.config, steps=3, batch_size=8, seq_len=16, warmup=1,
                               log_every=1, checkpoint_every=2, eval_batches=2)
  results = experiment.run(config, str(tmp_path))
  read = lambda name: (tmp_path / name).read_text()
  records = [json.loads(line) for line in read("metrics.jsonl").splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert set(records[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
  assert records[0]["lr"] == 0.0 and records[1]["lr"] == pytest.approx(3e-3)
  assert json.loads(read("results.json")) == results
  assert results["resumed_from_step"] == 0 and results["val_perplexity"] > 1
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
  assert (tmp_path / "loss.png").stat().st_size > 0

  resumed = experiment.run(dataclasses.replace(config, steps=5), str(tmp_path))
  records = [json.loads(line) for line in read("metrics.jsonl").splitlines()]
  assert resumed["resumed_from_step"] == 3
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("field, value", [("steps", 0), ("family", "nope"), ("tokenizer", "gpt2"),
                                          ("batch_size", 12)])
@pytest.mark.needs_8_devices
def test_bad_config_names_the_field(tmp_path, field, value):
  config = dataclasses.replace(TrainConfig(), mesh="data:8", **{field: value})
  with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
    train(config, str(tmp_path))
