"""The optax contract for every nlj.optim optimizer: jit, schedules, chain, partition,
MultiSteps, parameter-shaped states and an orbax round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from nlj import optim
from optim_testutil import grads

SHAPES = {"w1": (4, 3), "w2": (3, 5), "b": (5,)}
SCHED = optax.linear_schedule(0.05, 0.01, 10)

FACTORIES = {
    "momentum": lambda lr: optim.generalized_momentum(lr, 0.9),
    "delta_momentum_gram": lambda lr: optim.delta_momentum(lr, 0.9, delta_form="gram"),
    "dmgd": lambda lr: optim.dmgd(lr, 0.9, mlp_lr=0.1),
    "muon": lambda lr: optim.muon(lr),
    "m3_literal": lambda lr: optim.m3(lr, frequency=2, mode="literal"),
    "m3_ema": lambda lr: optim.m3(lr, frequency=2),
    "adam_memory": lambda lr: optim.adam_memory(lr),
    "adagrad_memory": lambda lr: optim.adagrad_memory(lr),
    "dgd": lambda lr: optim.dgd(lr),
}
NAMES = sorted(FACTORIES)


def allclose(a, b, **kw):
  kw = dict(rtol=1e-5, atol=1e-7) | kw
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def steps(tx, params, gs, update=None):
  update = update or tx.update
  state = tx.init(params)
  outs = []
  for g in gs:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    outs.append(u)
  return outs, state, params


@pytest.mark.parametrize("name", NAMES)
def test_jit_schedule_and_parameter_shaped_state(name):
  tx = FACTORIES[name](SCHED)
  params = grads(100, SHAPES)
  gs = [grads(i, SHAPES) for i in range(3)]
  eager, state, _ = steps(tx, params, gs)
  jitted, jstate, _ = steps(tx, params, gs, jax.jit(tx.update))
  allclose(eager, jitted, rtol=1e-4, atol=1e-6)
  for u in eager:
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(u))
    assert jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, params)
  shapes = set(SHAPES.values())
  for leaf in jax.tree.leaves(jstate):
    s = jnp.shape(leaf)
    assert s == () or s in shapes or (name == "dmgd" and s == (4,)), (name, s)


@pytest.mark.parametrize("name", NAMES)
def test_chain_and_multisteps(name):
  params = grads(101, SHAPES)
  g1, g2 = grads(1, SHAPES), grads(2, SHAPES)
  tx = optax.chain(optax.clip_by_global_norm(1e6), FACTORIES[name](0.05))
  ms = optax.MultiSteps(tx, every_k_schedule=2)
  state = ms.init(params)
  u1, state = ms.update(g1, state, params)
  u2, state = ms.update(g2, state, params)
  assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(u1))
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  ref, _ = tx.update(mean, tx.init(params), params)
  allclose(u2, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_partition(name):
  params = grads(102, SHAPES)
  gs = [grads(i, SHAPES) for i in range(2)]
  labels = {"w1": "ours", "b": "ours", "w2": "sgd"}
  tx = optax.partition({"ours": FACTORIES[name](0.05), "sgd": optax.sgd(0.1)}, labels)
  outs, _, _ = steps(tx, params, gs)
  sub = lambda t: {k: t[k] for k in ("w1", "b")}
  ref, _, _ = steps(FACTORIES[name](0.05), sub(params), [sub(g) for g in gs])
  for u, r, g in zip(outs, ref, gs):
    allclose(sub(u), r)
    np.testing.assert_allclose(u["w2"], -0.1 * g["w2"], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_orbax_round_trip(name, tmp_path):
  tx = FACTORIES[name](SCHED)
  params = grads(103, SHAPES)
  gs = [grads(i, SHAPES) for i in range(3)]
  _, state, p = steps(tx, params, gs[:2])
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "state", state)
    ckptr.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = ckptr.restore(tmp_path / "state", abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  allclose(restored, state, rtol=0, atol=0)
  u_orig, _ = tx.update(gs[2], state, p)
  u_rest, _ = tx.update(gs[2], restored, p)
  allclose(u_orig, u_rest, rtol=0, atol=0)
