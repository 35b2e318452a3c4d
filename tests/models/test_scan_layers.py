"""``ModelConfig.scan_layers`` and ``remat``: the scanned (and rematerialised) LM is the unrolled
one, and its compiled program holds one block per pattern position whatever the depth."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nlj.models import PRESETS, build_model

from tests.models.helpers import assert_trees_close

B, T, PIECE = 2, 20, 7  # pieces not aligned with any chunk
HYBRID = dataclasses.replace(PRESETS[("gated_deltanet", "tiny")], layers=4,
                             pattern=("gated_deltanet", "transformer"))
HOPE = dataclasses.replace(PRESETS[("hope", "tiny")], layers=2)


def _loss_and_grads(graphdef, params, tokens):
  f = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens)[0] ** 2)
  return jax.jit(jax.value_and_grad(f))(params)


def _streamed(graphdef, params, tokens):
  """Logits and cache of ``tokens`` fed in pieces of ``PIECE`` (each call jitted)."""
  model = nnx.merge(graphdef, params)
  cache, logits = model.init_cache(B, T), []
  call = jax.jit(lambda p, x, c: nnx.merge(graphdef, p)(x, c))
  for start in range(0, T, PIECE):
    out, cache = call(params, tokens[:, start:start + PIECE], cache)
    logits.append(out)
  return jnp.concatenate(logits, axis=1), cache


def _outputs(graphdef, params, tokens, streamed: bool):
  out = _loss_and_grads(graphdef, params, tokens)
  return (out, _streamed(graphdef, params, tokens)) if streamed else out


@pytest.mark.parametrize("config, variants, streamed", [
    pytest.param(HYBRID, ((True, False), (True, True), (False, True)), True,
                 id="gdn_transformer_pattern"),
    # HOPE compiles slowly on the CPU: one variant, no pieces
    pytest.param(HOPE, ((True, True),), False, id="hope", marks=pytest.mark.slow),
])
def test_scanned_and_remat_equal_unrolled(config, variants, streamed):
  """Same parameters: loss, gradients (and streamed logits and caches) of the ``(scan_layers,
  remat)`` variants equal the unrolled loop's."""
  unrolled = build_model(dataclasses.replace(config, scan_layers=False), nnx.Rngs(0))
  graphdef, params = nnx.split(unrolled)
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, config.vocab)
  expected = _outputs(graphdef, params, tokens, streamed)
  for scan, remat in variants:
    variant = dataclasses.replace(config, scan_layers=scan, remat=remat)
    other = nnx.graphdef(nnx.eval_shape(lambda: build_model(variant, nnx.Rngs(0))))
    assert_trees_close(_outputs(other, params, tokens, streamed), expected, rtol=2e-5, atol=2e-6)


def test_vmapped_initialisation_draws_distinct_layers_deterministically():
  config = dataclasses.replace(HYBRID, layers=6)
  first, again = (nnx.state(build_model(config, nnx.Rngs(3)), nnx.Param) for _ in range(2))
  assert_trees_close(first, again, rtol=0, atol=0)
  blocks = nnx.state(build_model(config, nnx.Rngs(3))).blocks
  for j in range(2):  # the blocks of one pattern position share a structure, not values
    a, b = (jax.tree.leaves(blocks[i]) for i in (j, j + 2))
    assert len(a) == len(b)
    assert all(not np.array_equal(x, y) for x, y in zip(a, b) if x.ndim == 2)


def _train_step_ops(config) -> int:
  graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))))
  f = lambda p, t: jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(t)[0]))(p)
  text = jax.jit(f).lower(params, jax.ShapeDtypeStruct((B, T), jnp.int32)).as_text()
  return len(re.findall(r"= stablehlo\.", text))


def test_scanned_program_size_is_flat_in_depth():
  """4× the layers adds only per-layer stacking and slicing, not copies of the block."""
  shallow, deep = (_train_step_ops(dataclasses.replace(HYBRID, layers=n)) for n in (2, 8))
  unrolled = _train_step_ops(dataclasses.replace(HYBRID, layers=8, scan_layers=False))
  assert deep < 1.3 * shallow, (shallow, deep)
  assert unrolled > 2 * deep, (deep, unrolled)
