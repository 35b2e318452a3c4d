"""Shared helpers for the model tests.

Test jits use XLA's default CPU options: the cheaper ones (``xla_backend_optimization_level=0``)
made an XLA CPU compilation segfault, now and then, in full-suite runs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nlj.models import build_model


@functools.partial(jax.jit, static_argnums=0)
def jit_forward(graphdef, state, tokens, cache):
  """``model(tokens, cache)`` jitted; models of one structure share compilations."""
  return nnx.merge(graphdef, state)(tokens, cache)


@functools.cache
def cached_lm(config, max_len: int):
  """The model of ``config`` (seed 0) and its jitted ``f(tokens, cache=None)``."""
  model = build_model(config, nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def f(tokens, cache=None):
    cache = model.init_cache(tokens.shape[0], max_len) if cache is None else cache
    return jit_forward(graphdef, state, tokens, cache)

  return model, f


def assert_trees_close(a, b, rtol: float = 1e-5, atol: float = 1e-5) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def nll_gradients(model, tokens):
  """Flattened ``(path, gradient)`` of the mean next-token loss w.r.t. every ``nnx.Param``."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits, _ = nnx.merge(graphdef, params, rest)(tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  grads = jax.jit(jax.grad(loss))(params)
  flat = [(jax.tree_util.keystr(p), g) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]]
  assert len(flat) == len(jax.tree.leaves(params))
  return flat


def dead_parameters(flat) -> list[str]:
  """Paths whose gradient is all zero or not finite."""
  return [p for p, g in flat if not bool(jnp.any(g != 0)) or not bool(jnp.all(jnp.isfinite(g)))]
