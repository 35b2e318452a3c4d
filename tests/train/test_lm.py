"""End to end: the registered ``lm/*`` experiments, a 3-step run into a workdir, and its resume."""

import dataclasses
import json

import jax
import pytest

import nlj_experiments
from nlj.models import families
from nlj.train import loop
from nlj.train.loop import TrainConfig, model_config, parse_model_options, train
from tests.train.events import event_files, read_events


def test_every_family_is_registered():
  names = nlj_experiments.names()
  for family in families():
    assert f"lm/{family}_tiny" in names and f"lm/{family}_small" in names


def test_gated_deltanet_tiny_runs_and_resumes(tmp_path):
  experiment = nlj_experiments.get("lm/gated_deltanet_tiny")
  config = dataclasses.replace(experiment.config, steps=3, batch_size=8, seq_len=16, warmup=1,
                               log_every=1, checkpoint_every=2, eval_batches=2, peak_flops=1e12)
  results = experiment.run(config, str(tmp_path))
  read = lambda name: (tmp_path / name).read_text()
  records = [json.loads(line) for line in read("metrics.jsonl").splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert set(records[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                             "memory_bytes"}
  assert records[0]["lr"] == 0.0 and records[1]["lr"] == pytest.approx(3e-3)
  for r in records:
    assert r["mfu"] == pytest.approx(
        6 * results["params"] * r["tokens_per_s"] / (1e12 * jax.device_count()))
    assert r["memory_bytes"] is None  # the CPU backend reports no memory stats
  assert json.loads(read("results.json")) == results
  assert results["resumed_from_step"] == 0 and results["val_perplexity"] > 1
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
  assert (tmp_path / "loss.png").stat().st_size > 0
  (events,) = [read_events(path) for path in event_files(tmp_path)]
  assert events[1]["session_log"] == 1 and events[1]["step"] == 1  # (re)start at step 1
  logged = [e for e in events if "train/loss" in e.get("scalars", {})]
  assert [e["step"] for e in logged] == [1, 2, 3]
  assert [e["scalars"]["train/loss"] for e in logged] == pytest.approx(
      [r["loss"] for r in records], rel=1e-6)
  assert set(logged[0]["scalars"]) == {"train/loss", "train/lr", "train/grad_norm",
                                       "train/tokens_per_s", "train/mfu"}
  assert events[-1]["step"] == 3 and events[-1]["scalars"] == pytest.approx(
      {"val/loss": results["val_loss"], "val/perplexity": results["val_perplexity"]}, rel=1e-6)

  resumed = experiment.run(dataclasses.replace(config, steps=5), str(tmp_path))
  records = [json.loads(line) for line in read("metrics.jsonl").splitlines()]
  assert resumed["resumed_from_step"] == 3
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  _, newest = event_files(tmp_path)
  events = read_events(newest)
  assert events[1]["session_log"] == 1 and events[1]["step"] == 4
  assert [e["step"] for e in events[2:]] == [4, 5, 5]


@pytest.mark.parametrize("field, value", [("steps", 0), ("family", "nope"), ("tokenizer", "gpt2"),
                                          ("batch_size", 12), ("peak_flops", 0.0),
                                          ("warmup", 1000), ("dtype", "int8"),
                                          ("remat", "yes"), ("model_options", "eta_scale"),
                                          ("matmul_precision", "bfloat17"), ("impl", "fast")])
@pytest.mark.needs_8_devices
def test_bad_config_names_the_field(tmp_path, field, value):
  config = dataclasses.replace(TrainConfig(), mesh="data:8", **{field: value})
  with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
    train(config, str(tmp_path))


def test_matmul_precision_holds_while_the_steps_are_traced(tmp_path, monkeypatch):
  """Every product that names no precision follows the config's, the kernels' included
  (``tests/kernels/test_mlp_memory.py``), so the step must be traced under it."""
  seen = []

  def spying(make):
    def make_step(*args, **kwargs):
      step = make(*args, **kwargs)

      def traced(*step_args):
        seen.append((make.__name__, jax.config.jax_default_matmul_precision))
        return step(*step_args)
      return traced
    return make_step

  for name in ("make_train_step", "make_eval_step"):
    monkeypatch.setattr(loop, name, spying(getattr(loop, name)))
  config = TrainConfig(steps=2, batch_size=8, seq_len=16, warmup=1, log_every=1,
                       checkpoint_every=2, eval_batches=1, matmul_precision="BF16_BF16_F32")
  train(config, str(tmp_path))
  assert sorted(set(seen)) == [("make_eval_step", "BF16_BF16_F32"),
                               ("make_train_step", "BF16_BF16_F32")]
  assert jax.config.jax_default_matmul_precision is None  # restored after the run


def test_model_options_reach_the_preset():
  config = TrainConfig(family="hope", size="tiny",
                       model_options="eta_scale=0.01, momentum=false,cms_variant=nested,beta=1")
  assert parse_model_options(config.model_options) == (
      ("eta_scale", 0.01), ("momentum", False), ("cms_variant", "nested"), ("beta", 1))
  options = dict(model_config(config).options)
  assert options["eta_scale"] == 0.01 and options["momentum"] is False
  assert model_config(TrainConfig(family="hope", size="tiny")).options == ()
  assert model_config(TrainConfig(family="hope", size="tiny", impl="pallas")).impl == "pallas"


@pytest.mark.parametrize("text, match", [("eta_scale=", "not NAME=VALUE"),
                                         ("beta=0.5,beta=0.9", "repeated"),
                                         ("etta_scale=0.01", "unknown option")])
def test_bad_model_options_name_the_field(tmp_path, text, match):
  config = TrainConfig(family="hope", size="tiny", model_options=text)
  with pytest.raises(ValueError, match=f"TrainConfig.model_options.*{match}"):
    train(config, str(tmp_path))
