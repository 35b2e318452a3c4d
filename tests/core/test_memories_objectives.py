"""Memories and objectives: closed-form gradients, architecture, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlj.core import (DotProduct, Huber, L2, Lp, MatrixMemory, MLPMemory, get_objective,
                      memory_grad)

OBJECTIVES = [DotProduct(), L2(), Lp(3.0), Lp(1.5), Huber(0.3)]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: repr(o))
def test_matrix_closed_form_grad_equals_autodiff(objective):
  with jax.enable_x64(True):
    mem = MatrixMemory(5, 3, init_scale=1.0)
    params = mem.init(jax.random.PRNGKey(0), jnp.float64)
    k = jax.random.normal(jax.random.PRNGKey(1), (5,), jnp.float64)
    v = jax.random.normal(jax.random.PRNGKey(2), (3,), jnp.float64)
    closed = memory_grad(mem, objective, params, k, v)
    auto = jax.grad(lambda p: objective.loss(mem.apply(p, k), v))(params)
    np.testing.assert_allclose(closed["w"], auto["w"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: repr(o))
def test_mlp_grad_equals_autodiff(objective):
  with jax.enable_x64(True):
    mem = MLPMemory(4, 3, hidden=6, layers=3, activation="gelu")
    params = mem.init(jax.random.PRNGKey(0), jnp.float64)
    k = jax.random.normal(jax.random.PRNGKey(1), (4,), jnp.float64)
    v = jax.random.normal(jax.random.PRNGKey(2), (3,), jnp.float64)
    got = memory_grad(mem, objective, params, k, v)
    want = jax.grad(lambda p: objective.loss(mem.apply(p, k), v))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_objective_values_by_hand():
  y, v = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5])
  assert float(DotProduct().loss(y, v)) == pytest.approx(-(0.5 - 1.0))
  assert float(L2().loss(y, v)) == pytest.approx(0.5 * (0.25 + 6.25))
  assert float(Lp(3.0).loss(y, v)) == pytest.approx((0.125 + 15.625) / 3)
  # Huber, delta=1: |0.5| quadratic, |-2.5| linear.
  assert float(Huber(1.0).loss(y, v)) == pytest.approx(0.125 + (2.5 - 0.5))
  np.testing.assert_allclose(Huber(1.0).output_grad(y, v), [0.5, -1.0])


def test_residual_mlp_is_eq_89():
  mem = MLPMemory(4, 4, hidden=7, layers=2, activation="silu")
  p = mem.init(jax.random.PRNGKey(3))
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 4))
  w_in, w_out = p["layers"]
  assert w_in.shape == (7, 4) and w_out.shape == (4, 7) and "skip" not in p
  np.testing.assert_allclose(mem.apply(p, x), x + jax.nn.silu(x @ w_in.T) @ w_out.T, rtol=1e-6)
  assert mem.key_inputs() == {"layers": (True, False)}


def test_skip_projection_when_dims_differ():
  mem = MLPMemory(4, 2, hidden=3, layers=1)
  p = mem.init(jax.random.PRNGKey(0))
  x = jnp.ones((4,))
  assert p["skip"].shape == (2, 4)
  np.testing.assert_allclose(mem.apply(p, x), p["layers"][0] @ x + p["skip"] @ x, rtol=1e-6)
  assert mem.key_inputs() == {"layers": (True,), "skip": True}


def test_matrix_memory_zero_init_and_scaled_init():
  assert float(jnp.abs(MatrixMemory(3, 2).init(jax.random.PRNGKey(0))["w"]).max()) == 0.0
  w = MatrixMemory(64, 64, init_scale=1.0).init(jax.random.PRNGKey(0))["w"]
  assert 0.08 < float(jnp.std(w)) < 0.17  # 1/sqrt(64) = 0.125


@pytest.mark.parametrize("make, field", [
    (lambda: MatrixMemory(0, 3), "MatrixMemory.d_in"),
    (lambda: MatrixMemory(3, -1), "MatrixMemory.d_out"),
    (lambda: MLPMemory(3, 3, hidden=0), "MLPMemory.hidden"),
    (lambda: MLPMemory(3, 3, hidden=4, layers=0), "MLPMemory.layers"),
    (lambda: MLPMemory(3, 3, hidden=4, activation="swish9"), "MLPMemory.activation"),
    (lambda: get_objective("cosine"), "objective"),
    (lambda: Lp(1.0), "Lp.p"),
    (lambda: Huber(0.0), "Huber.delta"),
])
def test_bad_arguments_name_the_field(make, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    make()


def test_get_objective_by_name():
  assert get_objective("lp", p=4.0) == Lp(4.0)
  assert isinstance(get_objective("dot"), DotProduct)
