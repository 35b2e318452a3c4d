"""Inverses of unit lower-triangular chunk matrices (:mod:`nlj.core.triangular`)."""

import jax
import jax.numpy as jnp
import pytest

from nlj.core.triangular import INVERSES, blocked_inverse, solve_inverse


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 17, 20, 33, 48, 80])
def test_blocked_inverse_is_exact_for_every_size(size):
  """The nilpotent series covers every power below ``size``, also for sizes that are not powers
  of two (within a block, and for a number of blocks that is not a power of two)."""
  with jax.enable_x64(True):
    n = jnp.tril(jax.random.normal(jax.random.PRNGKey(size), (size, size), jnp.float64), -1)
    n = n / jnp.sqrt(size)  # well conditioned at every size
    want = solve_inverse(n)
    assert float(jnp.max(jnp.abs(blocked_inverse(n) - want))) < 1e-9 * float(jnp.max(jnp.abs(want)))
    assert float(jnp.max(jnp.abs(want @ (jnp.eye(size) + n) - jnp.eye(size)))) < 1e-9


@pytest.mark.parametrize("name", sorted(INVERSES))
def test_inverse_rule_gradient_matches_autodiff_of_the_solve(name):
  with jax.enable_x64(True):
    n = 0.3 * jnp.tril(jax.random.normal(jax.random.PRNGKey(0), (6, 6), jnp.float64), -1)
    weights = jax.random.normal(jax.random.PRNGKey(1), (6, 6), jnp.float64)
    loss = lambda inverse: lambda x: jnp.sum(weights * inverse(jnp.tril(x, -1)))
    want = jax.grad(loss(solve_inverse))(n)
    assert float(jnp.max(jnp.abs(jax.grad(loss(INVERSES[name]))(n) - want))) < 1e-12


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_blocked_inverse_float32_with_repeated_keys(size):
  """The in-kernel inverse against a float64 solve, on random keys and on the worst case the
  docstring names (many identical unit keys with steps near 1)."""
  with jax.enable_x64(True):
    keys = jax.random.normal(jax.random.PRNGKey(size), (size, 32), jnp.float64)
    keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
    repeated = keys.at[size // 4:].set(keys[size // 4])
    for k, step in ((keys, 0.9), (repeated, 0.99)):
      n = jnp.tril(step * (k @ k.T), -1)
      want = solve_inverse(n)
      got = blocked_inverse(n.astype(jnp.float32)).astype(jnp.float64)
      assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-4
