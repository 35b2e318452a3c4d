"""The pure train / eval steps on the tiny Gated DeltaNet preset (one CPU device)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nlj.models import PRESETS, build_model
from nlj.train import (adamw_cosine, init_train_state, make_eval_step, make_train_step,
                       next_token_loss, split_model)

CONFIG = PRESETS[("gated_deltanet", "tiny")]


def _batch(seed: int = 0, rows: int = 4, seq_len: int = 16) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab, (rows, seq_len + 1)),
                     jnp.int32)


def test_loss_is_mean_next_token_cross_entropy():
  model = build_model(CONFIG, nnx.Rngs(0))
  graphdef, params = split_model(model)
  batch = _batch()
  logits, _ = model(batch[:, :-1])
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  expected = -jnp.take_along_axis(log_probs, batch[:, 1:, None], axis=-1).mean()
  np.testing.assert_allclose(next_token_loss(graphdef, params, batch), expected, rtol=1e-6)
  np.testing.assert_allclose(make_eval_step(graphdef)(params, batch)["loss"], expected, rtol=1e-6)


def test_train_step_metrics_and_progress():
  optimizer, schedule = adamw_cosine(1e-2, warmup=2, steps=10)
  graphdef, params = split_model(build_model(CONFIG, nnx.Rngs(0)))
  state = init_train_state(params, optimizer, seed=0)
  step = jax.jit(make_train_step(graphdef, optimizer, schedule))
  batch, losses = _batch(), []
  for i in range(6):
    rng = state.rng
    state, metrics = step(state, batch)
    assert int(state.step) == i + 1
    assert not np.array_equal(state.rng, rng)
    np.testing.assert_allclose(metrics["learning_rate"], schedule(i), rtol=1e-6)
    assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses


def test_grad_norm_is_of_unclipped_gradients():
  graphdef, params = split_model(build_model(CONFIG, nnx.Rngs(0)))
  batch = _batch()
  grads = jax.grad(next_token_loss, argnums=1)(graphdef, params, batch)
  optimizer, schedule = adamw_cosine(1e-3, warmup=0, steps=5, grad_clip=1e-3)
  _, metrics = make_train_step(graphdef, optimizer, schedule)(
      init_train_state(params, optimizer, 0), batch)
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)


@pytest.mark.parametrize("kwargs, field", [(dict(warmup=10, steps=10), "warmup"),
                                           (dict(learning_rate=0.0), "learning_rate"),
                                           (dict(grad_clip=0.0), "grad_clip")])
def test_adamw_cosine_rejects_bad_settings(kwargs, field):
  args = dict(learning_rate=1e-3, warmup=1, steps=10) | kwargs
  with pytest.raises(ValueError, match=field):
    adamw_cosine(**args)


def test_batch_shape_is_checked():
  graphdef, params = split_model(build_model(CONFIG, nnx.Rngs(0)))
  with pytest.raises(ValueError, match="seq_len"):
    next_token_loss(graphdef, params, jnp.zeros((2, 1), jnp.int32))
