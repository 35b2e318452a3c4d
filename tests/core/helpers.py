"""Random level inputs for the core tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nlj.core import Level, LevelInputs


def random_inputs(level: Level, batch: int, seq: int, seed: int = 0, dtype=jnp.float64,
                  with_q: bool = True) -> LevelInputs:
  """Unit-norm keys, Gaussian values/queries, η in (0, 0.5), α in (0.8, 1), β in (0, 0.5)."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  shape = (batch, seq, level.heads)
  k = jax.random.normal(ks[0], shape + (level.memory.d_in,), dtype)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[1], shape + (level.memory.d_out,), dtype)
  q = jax.random.normal(ks[2], shape + (level.memory.d_in,), dtype) if with_q else None
  eta = 0.5 * jax.nn.sigmoid(jax.random.normal(ks[3], shape, dtype))
  alpha = 0.8 + 0.2 * jax.nn.sigmoid(jax.random.normal(ks[4], shape, dtype))
  beta = 0.5 * jax.nn.sigmoid(jax.random.normal(ks[5], shape, dtype))
  return LevelInputs(k, v, q, eta, alpha, beta)


def slice_inputs(inputs: LevelInputs, start: int, stop: int) -> LevelInputs:
  return jax.tree.map(lambda x: x[:, start:stop], inputs)


def max_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
