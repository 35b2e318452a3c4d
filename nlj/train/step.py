"""Pure train and eval steps of a :class:`nlj.models.DecoderLM` with an optax optimizer.

The model is split once into a static ``graphdef`` and its ``nnx.Param`` state (the maxtext
idiom): the steps are pure functions of plain pytrees that merge the module back inside the
traced function, so they jit, shard (:mod:`nlj.train.sharding`) and checkpoint
(:mod:`nlj.train.checkpoint`) like any JAX function.

The loss is the mean next-token cross-entropy of a packed batch ``[batch, seq_len + 1]``
(``inputs = batch[:, :-1]``, ``targets = batch[:, 1:]``), computed on float32 logits:

  L(θ) = -1/(B·T) Σ_b Σ_t log softmax(f_θ(x_b,≤t))[x_b,t+1].

Example:
  optimizer, schedule = adamw_cosine(3e-3, warmup=20, steps=200)
  graphdef, params = split_model(build_model(config, nnx.Rngs(0)))
  state = init_train_state(params, optimizer, seed=0)
  train_step = jax.jit(make_train_step(graphdef, optimizer, schedule), donate_argnums=0)
  state, metrics = train_step(state, batch)        # batch: int32 [8, 129]
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["TrainState", "adamw_cosine", "split_model", "init_train_state", "next_token_loss",
           "make_train_step", "make_eval_step"]

Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
  """Everything a training run carries from step to step (and checkpoints).

  Attributes:
    step: int32 ``[]``, the number of updates applied so far.
    params: the model's ``nnx.Param`` state (an ``nnx.State`` pytree).
    opt_state: the optax optimizer state of ``params``.
    rng: uint32 ``[2]`` key, split every step (the stream a stochastic layer would draw from),
      so a resumed run continues the same stream.
  """

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array


def adamw_cosine(learning_rate: float, warmup: int, steps: int, weight_decay: float = 0.1,
                 grad_clip: float = 1.0
                 ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (β₂ = 0.95) after global-norm clipping, with linear warmup and cosine decay to 10%.

  Args:
    learning_rate: peak learning rate, reached after ``warmup`` steps.
    warmup: linear warmup steps (``0 <= warmup < steps``).
    steps: total steps; the cosine ends at ``0.1 * learning_rate``.
    weight_decay: decoupled weight decay.
    grad_clip: clip the gradients' global norm to this value.

  Returns:
    ``(optimizer, schedule)``; ``schedule(step)`` is the learning rate of update ``step``.
  """
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be positive, got {learning_rate}")
  if not 0 <= warmup < steps:
    raise ValueError(f"warmup must be in [0, steps={steps}), got {warmup}")
  if not grad_clip > 0:
    raise ValueError(f"grad_clip must be positive, got {grad_clip}")
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, steps,
                                                end_value=0.1 * learning_rate)
  optimizer = optax.chain(optax.clip_by_global_norm(grad_clip),
                          optax.adamw(schedule, b2=0.95, weight_decay=weight_decay))
  return optimizer, schedule


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
  """``(graphdef, params)`` of ``model``; raises if it holds state other than ``nnx.Param``.

  The steps carry only parameters, so a module with other variables (counters, caches kept on
  the module) would silently lose them: that is an error here.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(rest)]
    raise ValueError(f"model holds non-Param variables the train step would drop: {paths[:5]}")
  return graphdef, params


def init_train_state(params: nnx.State, optimizer: optax.GradientTransformation,
                     seed: int) -> TrainState:
  """Step 0 of a run: ``params``, a fresh optimizer state and the key of ``seed``."""
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                    jax.random.PRNGKey(seed))


def next_token_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (float32 ``[]``) of ``batch``: int ``[batch, seq_len + 1]``."""
  if batch.ndim != 2 or batch.shape[1] < 2:
    raise ValueError(f"batch must be int [batch, seq_len + 1] with seq_len >= 1, got {batch.shape}")
  model = nnx.merge(graphdef, params)
  logits, _ = model(batch[:, :-1])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch[:, 1:])
  return losses.mean()


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule
                    ) -> Callable[[TrainState, jax.Array], tuple[TrainState, Metrics]]:
  """The pure ``train_step(state, batch) -> (state, metrics)`` of one optimizer update.

  ``batch`` is int ``[batch, seq_len + 1]``; ``metrics`` holds float32 scalars ``loss`` (before
  the update), ``grad_norm`` (global norm of the unclipped gradients) and
  ``learning_rate`` (``schedule(state.step)``, the rate of this update).
  """

  def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, Metrics]:
    loss, grads = jax.value_and_grad(next_token_loss, argnums=1)(graphdef, state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng, _ = jax.random.split(state.rng)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32)}
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], Metrics]:
  """The pure ``eval_step(params, batch) -> {"loss": float32 []}`` on int ``[batch, seq + 1]``."""

  def eval_step(params: nnx.State, batch: jax.Array) -> Metrics:
    return {"loss": next_token_loss(graphdef, params, batch)}

  return eval_step
