"""Mesh flags, the parameter rule, and sharded steps equal to the single-device step."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from nlj.models import PRESETS, build_model
from nlj.train import (create_train_state, jit_eval_step, jit_train_step, make_eval_step,
                       make_mesh, make_train_step, param_spec, parse_mesh, shard_batch)
from nlj.train.sharding import threefry_as_gpu_kernel
from nlj.train.step import split_model

CONFIG = PRESETS[("gated_deltanet", "tiny")]


@pytest.mark.parametrize("spec, sizes", [
    ("data:2,fsdp:4,tensor:1", (2, 4, 1)), ("fsdp:8", (1, 8, 1)), ("tensor:2,data:-1", (4, 1, 2)),
    (" data:8 ", (8, 1, 1))])
def test_parse_mesh(spec, sizes):
  assert tuple(parse_mesh(spec, 8).values()) == sizes


@pytest.mark.parametrize("spec, message", [
    ("data:2,fsdp:2", r"--mesh='data:2,fsdp:2': axis sizes multiply to 4, but there are 8"),
    ("model:8", r"--mesh='model:8'.*distinct axes"), ("data:2,data:4", "distinct axes"),
    ("data:x", "must be an int"), ("data:0", "positive or -1"),
    ("data:-1,fsdp:-1", "at most one axis"),
    ("data:3,fsdp:-1", "do not divide the device count 8")])
def test_parse_mesh_errors_name_flag_and_device_count(spec, message):
  with pytest.raises(ValueError, match=message):
    parse_mesh(spec, 8)


@pytest.mark.needs_8_devices
def test_param_spec_rule():
  mesh = make_mesh("data:2,fsdp:2,tensor:2")
  key = lambda name: jax.tree_util.DictKey(name)
  embedding = (key("embed"), key("embedding"))
  assert param_spec(embedding, (258, 32), mesh, 32) == jax.P("tensor", "fsdp")
  assert param_spec(embedding, (257, 32), mesh, 32) == jax.P(None, "fsdp")
  assert param_spec((key("up"),), (32, 64), mesh, 32) == jax.P("fsdp", "tensor")
  assert param_spec((key("down"),), (64, 32), mesh, 32) == jax.P("tensor", "fsdp")
  assert param_spec((key("w"),), (3, 32, 5), mesh, 32) == jax.P(None, "fsdp", None)
  assert param_spec((key("scale"),), (32,), mesh, 32) == jax.P()


def _run(spec: str, devices, optimizer, steps: int = 2):
  mesh = make_mesh(spec, devices)
  graphdef, state, shardings = create_train_state(CONFIG, optimizer, 0, mesh)
  step = jit_train_step(make_train_step(graphdef, optimizer, optax.constant_schedule(0.05)),
                        shardings, mesh)
  evaluate = jit_eval_step(make_eval_step(graphdef), shardings, mesh)
  rng, metrics = np.random.default_rng(0), []
  for _ in range(steps):
    batch = shard_batch(rng.integers(0, CONFIG.vocab, (8, 17)).astype(np.int32), mesh)
    state, m = step(state, batch)
    metrics.append(m)
  metrics.append(evaluate(state.params, batch))
  return jax.device_get(state), jax.device_get(metrics), shardings


@pytest.mark.needs_8_devices
@pytest.mark.parametrize("spec", ["data:8", "fsdp:8", "data:2,fsdp:2,tensor:2"])
def test_sharded_step_equals_single_device(spec):
  # SGD keeps parameter differences proportional to gradient differences (Adam's first update is
  # ±lr wherever a gradient is ~0, which turns float32 rounding into lr-sized differences).
  optimizer = optax.sgd(0.05)
  single, single_metrics, _ = _run("data:1", jax.devices()[:1], optimizer)
  sharded, sharded_metrics, shardings = _run(spec, None, optimizer)
  specs = {s.spec for s in jax.tree.leaves(shardings.params)}
  for axis in ("fsdp", "tensor"):
    if axis in spec:
      assert any(axis in str(s) for s in specs), (axis, specs)
  # Sharded reductions sum in another order: float32 rounding, amplified a little by the
  # gated recurrence from one step to the next.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               (single_metrics, single.params), (sharded_metrics, sharded.params))
  np.testing.assert_allclose(single_metrics[0]["loss"], sharded_metrics[0]["loss"], rtol=1e-6)


@pytest.mark.needs_8_devices
def test_batch_not_divisible_by_data_times_fsdp():
  mesh = make_mesh("data:2,fsdp:4")
  with pytest.raises(ValueError, match="batch_size=6 must be divisible by data \\* fsdp = 8"):
    shard_batch(np.zeros((6, 17), np.int32), mesh)


def test_threefry_kernel_flag_is_scoped_to_the_block():
  flag = lambda: jax.config.jax_threefry_gpu_kernel_lowering
  before = flag()
  with threefry_as_gpu_kernel():
    assert flag() is True
  assert flag() == before
  with pytest.raises(RuntimeError, match="inside"):
    with threefry_as_gpu_kernel():
      raise RuntimeError("inside")
  assert flag() == before


def test_train_state_params_are_the_plain_init():
  # create_train_state (jitted, sharded, threefry flag set) gives the eager model's parameters,
  # up to the last bit of fused float math (XLA fuses the jitted init's inverse erf).
  _, state, _ = create_train_state(CONFIG, optax.sgd(0.1), 3, make_mesh("data:1",
                                                                        jax.devices()[:1]))
  _, eager = split_model(build_model(CONFIG, nnx.Rngs(jax.random.key(3))))
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(eager), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-7)
