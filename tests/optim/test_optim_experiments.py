"""Smoke tests: each optim experiment runs a tiny config and writes finite JSON + a PNG."""

import dataclasses
import json
import math
import os

import pytest

import nlj_experiments


def _finite_numbers(x):
  if isinstance(x, dict):
    return all(_finite_numbers(v) for v in x.values())
  if isinstance(x, (list, tuple)):
    return all(_finite_numbers(v) for v in x)
  if isinstance(x, float):
    return math.isfinite(x)
  return not isinstance(x, str) or x not in ("nan", "inf", "-inf")


TINY = {
    "optim/delta_momentum_toy": dict(steps=20, learning_rates=(0.005, 0.01)),
    "optim/orthogonal_tasks": dict(num_tasks=2, dims_per_task=3, steps_per_task=10,
                                   eval_size=16),
    "optim/compare_digits": dict(steps=3, batch_size=16, width=8, depth=1, heads=2,
                                 eval_every=3, timing_steps=2),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_experiment_smoke(name, tmp_path):
  exp = nlj_experiments.get(name)
  cfg = dataclasses.replace(exp.config, **TINY[name])
  result = exp.run(cfg, str(tmp_path))
  stem = name.split("/")[1]
  for ext in ("json", "png"):
    path = tmp_path / f"{stem}.{ext}"
    assert path.exists() and os.path.getsize(path) > 0, path
  with open(tmp_path / f"{stem}.json") as f:
    saved = json.load(f)
  assert _finite_numbers(saved) and _finite_numbers(result)


def test_experiment_configs_reject_bad_names(tmp_path):
  exp = nlj_experiments.get("optim/compare_digits")
  with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
    exp.run(dataclasses.replace(exp.config, optimizers=("sgd",)), str(tmp_path))
  exp = nlj_experiments.get("optim/orthogonal_tasks")
  with pytest.raises(ValueError, match="unknown method 'adam'"):
    exp.run(dataclasses.replace(exp.config, methods=("adam",)), str(tmp_path))
