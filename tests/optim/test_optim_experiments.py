"""Smoke tests: each optim experiment runs a tiny config and writes finite JSON + a PNG."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nlj_experiments
from nlj_experiments.optim import _compare, compare_lm


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
    # NestedLM at toy width; Muon and M3 only (the M3/Muon ratio and the embedding routing),
    # AdamW and DMGD go through the same code path in compare_digits above.
    "optim/compare_lm": dict(steps=3, batch_size=2, seq_len=32, d_model=16, heads=2,
                             slow_chunk=16, fast_chunk=8, eval_batches=1, eval_every=3,
                             timing_steps=2, optimizers=("muon", "m3")),
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
  if {"m3", "muon"} <= set(getattr(cfg, "optimizers", ())):
    assert saved["ratios"]["m3_over_muon_step_time"] > 0


@pytest.mark.parametrize("name", ["muon", "m3"])
def test_adam_leaves_routes_2d_leaves_to_adamw(name):
  """``adam_leaves`` sends a 2-D leaf (the LM's tied embedding) to AdamW: its first update is
  ``-lr·sign(g)``; the other leaves get what the optimizer without ``adam_leaves`` gives them
  (Newton–Schulz for the 2-D ``w``, its own AdamW branch for the 3-D ``mem``)."""
  cfg = compare_lm.Config()
  params = {"embed": jnp.ones((12, 4)), "w": jnp.ones((4, 6)), "mem": jnp.ones((2, 3, 3))}
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(0), p.shape), params)
  tx = _compare.make_optimizer(name, cfg, adam_leaves=compare_lm._adam_leaves)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["embed"], -cfg.aux_adam_lr * jnp.sign(grads["embed"]),
                             rtol=1e-4)
  assert not np.allclose(np.abs(updates["w"]), np.abs(updates["w"]).max())
  plain = _compare.make_optimizer(name, cfg)
  expected, _ = plain.update(grads, plain.init(params), params)
  for leaf in ("w", "mem"):
    np.testing.assert_allclose(updates[leaf], expected[leaf], rtol=1e-5)


def test_experiment_configs_reject_bad_names(tmp_path):
  for name in ("optim/compare_digits", "optim/compare_lm"):
    exp = nlj_experiments.get(name)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
      exp.run(dataclasses.replace(exp.config, optimizers=("sgd",)), str(tmp_path))
  exp = nlj_experiments.get("optim/orthogonal_tasks")
  with pytest.raises(ValueError, match="unknown method 'adam'"):
    exp.run(dataclasses.replace(exp.config, methods=("adam",)), str(tmp_path))
