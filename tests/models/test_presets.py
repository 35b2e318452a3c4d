"""Presets: every (family, size) exists, and every registered family's presets land within ±10%
of their size's name (counted from the modules with ``nnx.eval_shape``)."""

import dataclasses
import math
import sys

import jax
import pytest
from flax import nnx

from nlj.models import (PRESET_FAMILIES, PRESETS, SIZES, TARGET_PARAMS, build_model, count_params,
                        families)
from nlj.models.__main__ import main
from nlj.models.summary import format_table, preset_rows


def test_every_family_has_every_size():
  assert set(PRESETS) == {(f, s) for f in PRESET_FAMILIES for s in SIZES}
  for (family, size), cfg in PRESETS.items():
    assert (cfg.family, cfg.size) == (family, size)
    if size == "tiny":
      assert cfg.vocab in (256, 257) and 32 <= cfg.d_model <= 64 and cfg.layers == 2
    else:
      assert cfg.vocab == 32000 and cfg.tie_embeddings


def test_registered_presets_within_ten_percent():
  rows = preset_rows()
  print("\n" + format_table(rows))
  assert {r["family"] for r in rows} == set(PRESET_FAMILIES) & set(families())
  off = [(r["family"], r["size"], r["params"]) for r in rows if r["size"] in TARGET_PARAMS
         and abs(r["params"] / TARGET_PARAMS[r["size"]] - 1) > 0.10]
  assert not off, f"presets off their size by more than 10%: {off}"


def _full_count(cfg):
  model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("family", [f for f in PRESET_FAMILIES if f in families()])
def test_count_params_equals_a_full_build(family):
  """The one-period count equals the count with every layer built (tiny, under eval_shape)."""
  cfg = dataclasses.replace(PRESETS[(family, "tiny")], layers=3)
  assert count_params(cfg) == _full_count(cfg)


def test_count_params_of_a_hybrid_pattern():
  cfg = dataclasses.replace(PRESETS[("deltanet", "tiny")], layers=4,
                            pattern=("deltanet", "gated_deltanet"))
  assert count_params(cfg) == _full_count(cfg)
  untied = dataclasses.replace(cfg, tie_embeddings=False)
  assert count_params(untied) - count_params(cfg) == cfg.vocab * cfg.d_model


def test_cli_prints_the_table(monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["nlj.models", "deltanet", "--size", "tiny", "small"])
  main()
  out = capsys.readouterr().out
  assert "deltanet" in out and "small" in out and "50." in out
  monkeypatch.setattr(sys, "argv", ["nlj.models", "--size", "huge"])
  with pytest.raises(SystemExit):
    main()
