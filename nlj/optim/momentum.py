r"""Generalized momentum: the momentum as an associative memory (eqs. 33–37, 46–52).

Nested Learning reads the momentum buffer :math:`m` as a memory trained online, one GD step per
optimizer step, on an *internal objective* whose key is the current gradient
:math:`g_t` and whose value is :math:`P_t` (eqs. 46–49). This module implements the family in
optax's sign convention (the transform returns a *descent direction*; ``-η`` is applied after
it, so the paper's ``W + m`` with ``m = -η·(ours)`` is ``W - η·(ours)``):

.. math::
  v_t &= P_t\big(\phi(g_t)\big) &&\text{value: preconditioner (46–47) of a feature map (51)}\\
  m_t &= \alpha_t m_{t-1} + v_t &&\text{objective="dot" (eqs. 33–34, 46–47)}\\
  m_t &= m_{t-1}\big(\alpha_t I - \zeta\,\hat K_t^\top \hat K_t\big) + v_t
      &&\text{objective="l2": delta momentum (eqs. 48–49)}\\
  u_t &= \sigma(m_t) &&\text{non-linear output (eq. 52)}

* ``objective="dot"`` with ``P = φ = σ = identity`` is ``optax.trace(decay=α)``: standard
  (heavy-ball) momentum, i.e. ``optax.sgd(η, momentum=α)`` after scaling (tested).
* ``objective="l2"`` is GD on :math:`\tfrac12\|m K^\top - P\|^2` with retention α (eq. 49): the
  memory erases what it stored along the current gradient direction before writing (a delta
  rule, "learns to forget"). Two shapes of the key :math:`K` (``delta_form``):

  - ``"rank1"`` (**default**): the whole leaf, flattened, is one key
    :math:`k = \mathrm{vec}(g)`, so the erase is the rank-1 projection
    :math:`m \leftarrow \alpha m - \zeta \langle m, \hat k\rangle \hat k`. O(size) time and no
    extra memory, works for every leaf rank and shards like the parameter. Default because it
    is the only form that scales to real models unchanged.
  - ``"gram"``: for a 2-D leaf ``[d_in, d_out]`` (Flax's ``x @ W`` layout; ``gram_axis=0``) the
    rows of the gradient are the keys and the erase uses the Gram matrix,
    :math:`m \leftarrow \alpha m - \zeta\, \hat G \hat G^\top m` (the paper's
    :math:`m(\alpha I - \nabla L^\top\nabla L)` in its column-vector layout; [S3] left-multiplies,
    which is the same thing in this layout). Costs one ``[d_in,d_in]``-sized matmul chain per
    step. Leaves that are not 2-D fall back to ``"rank1"``.

  With ``normalize_keys=True`` (**default**) the key is divided by its Frobenius norm, so the
  erase is a (partial) projection whose strength ``ζ ∈ [0, 1]`` does not depend on the gradient
  scale and a zero gradient erases nothing. ``normalize_keys=False`` is eq. 49 literally
  (:math:`\zeta g^\top g` with raw gradients): the decay is gradient-magnitude dependent, as in
  the paper's toy (eq. 53), but diverges when :math:`\zeta\|g\|^2 > 1 + \alpha`.
* ``precondition`` (eqs. 46–47): ``None`` (identity), a pytree of arrays broadcast-multiplied
  leaf by leaf (a diagonal/per-leaf :math:`P`), or a callable ``updates -> updates`` applied to
  the whole tree (any :math:`P`, e.g. a matrix per leaf).
* ``feature_map`` φ (eq. 51) and ``output_fn`` σ (eq. 52) are per-leaf callables
  ``array -> array``; ``output_fn=newton_schulz`` gives a Muon-style update (eq. 52).

The paper's inner learning rate η of the momentum memory is folded into the outer learning
rate; this is exact for a constant η and linear σ (the updates are linear in ``v_t``).

References:
  Behrouz et al., Nested Learning, eqs. 33–37 and 46–52, https://arxiv.org/abs/2512.24695
  Polyak, Some methods of speeding up the convergence of iteration methods, 1964.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nlj.optim import _utils

__all__ = [
    "GeneralizedMomentumState",
    "scale_by_generalized_momentum",
    "generalized_momentum",
    "delta_momentum",
]

_OBJECTIVES = ("dot", "l2")
_DELTA_FORMS = ("rank1", "gram")


class GeneralizedMomentumState(NamedTuple):
  """State of :func:`scale_by_generalized_momentum`.

  Attributes:
    count: ``[]`` int32, number of updates so far (drives schedules of ``alpha``).
    momentum: the memory ``m`` with each parameter's shape and ``accumulator_dtype``.
  """

  count: jax.Array
  momentum: optax.Updates


def _erase_rank1(m: jax.Array, g: jax.Array, zeta: float, normalize: bool) -> jax.Array:
  """``ζ ⟨m, k⟩ k`` with ``k = vec(g)`` (normalised if asked); zero for ``g = 0``."""
  if normalize:
    sq = jnp.sum(jnp.square(g))
    inv = jnp.where(sq > 0, 1.0 / jnp.where(sq > 0, sq, 1.0), 0.0)
    return zeta * jnp.sum(m * g) * inv * g
  return zeta * jnp.sum(m * g) * g


def _erase_gram(m: jax.Array, g: jax.Array, zeta: float, normalize: bool,
                gram_axis: int) -> jax.Array:
  """``ζ Ĝ Ĝᵀ m`` with the Gram matrix over ``gram_axis`` of a 2-D leaf."""
  if gram_axis == 1:
    return _erase_gram(m.T, g.T, zeta, normalize, 0).T
  d_in, d_out = g.shape
  # (G Gᵀ) m costs 2·d_in²·d_out, G (Gᵀ m) costs 2·d_in·d_out²: pick the cheaper order.
  if d_out <= d_in:
    e = g @ (g.T @ m)
  else:
    e = (g @ g.T) @ m
  if normalize:
    sq = jnp.sum(jnp.square(g))
    e = e * jnp.where(sq > 0, 1.0 / jnp.where(sq > 0, sq, 1.0), 0.0)
  return zeta * e


def _apply_precondition(precondition: Any, values: optax.Updates) -> optax.Updates:
  if precondition is None:
    return values
  if callable(precondition):
    return precondition(values)
  return jax.tree.map(lambda p, v: jnp.asarray(p, v.dtype) * v, precondition, values)


def scale_by_generalized_momentum(
    alpha: _utils.ScalarOrSchedule = 0.9,
    *,
    objective: str = "dot",
    delta_form: str = "rank1",
    delta_strength: float = 1.0,
    normalize_keys: bool = True,
    gram_axis: int = 0,
    precondition: Any = None,
    feature_map: Callable[[jax.Array], jax.Array] | None = None,
    output_fn: Callable[[jax.Array], jax.Array] | None = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
  """Momentum as a memory with a chosen internal objective (eqs. 33–37, 46–52).

  Args:
    alpha: forget gate α (retention of the momentum memory), a number in ``[0, 1]`` or a
      schedule ``count -> α``.
    objective: ``"dot"`` (standard momentum, eqs. 33–34/46–47) or ``"l2"`` (delta momentum,
      eqs. 48–49).
    delta_form: for ``"l2"``: ``"rank1"`` (default; whole-leaf key, O(size)) or ``"gram"``
      (Gram matrix over ``gram_axis`` of 2-D leaves; others use ``"rank1"``).
    delta_strength: ζ, the erase strength along the current key, ``>= 0``. With normalised
      keys ``ζ ∈ [0, 1 + α]`` keeps the memory stable; ``ζ = α`` replaces the stored
      component along the key exactly.
    normalize_keys: divide the key by its Frobenius norm (default) or use raw gradients (eq. 49
      literally).
    gram_axis: for ``delta_form="gram"``, the axis of a 2-D leaf that multiplies the layer
      input (0 for Flax ``[d_in, d_out]`` kernels, 1 for ``[d_out, d_in]``).
    precondition: ``P`` of eqs. 46–47: ``None``, a pytree of per-leaf arrays (broadcast
      multiply), or a callable ``updates -> updates``.
    feature_map: φ of eq. 51, applied per leaf to the gradient before ``P``.
    output_fn: σ of eq. 52, applied per leaf to the momentum to form the update.
    accumulator_dtype: dtype of the momentum (default: the parameter's).

  Returns:
    An ``optax.GradientTransformation``; updates have each parameter's shape (unless
    ``output_fn`` changes it) and point downhill (scale by ``-learning_rate``).
  """
  fn = "scale_by_generalized_momentum"
  _utils.check_range(fn, "alpha", alpha, low=0.0, high=1.0, allow_schedule=True)
  _utils.check_choice(fn, "objective", objective, _OBJECTIVES)
  _utils.check_choice(fn, "delta_form", delta_form, _DELTA_FORMS)
  _utils.check_range(fn, "delta_strength", delta_strength, low=0.0)
  if gram_axis not in (0, 1):
    raise ValueError(f"{fn}: gram_axis must be 0 or 1; got {gram_axis!r}")
  for name, f in (("feature_map", feature_map), ("output_fn", output_fn)):
    if f is not None and not callable(f):
      raise ValueError(f"{fn}: {name} must be a callable array -> array or None; got {f!r}")

  def init_fn(params):
    return GeneralizedMomentumState(count=jnp.zeros([], jnp.int32),
                                    momentum=_utils.zeros_like(params, accumulator_dtype))

  def update_fn(updates, state, params=None):
    del params
    a = _utils.value_at(alpha, state.count)
    feats = updates if feature_map is None else jax.tree.map(feature_map, updates)
    values = _apply_precondition(precondition, feats)

    def write(m, g, v):
      new = a.astype(m.dtype) * m + v.astype(m.dtype)
      if objective == "l2":
        if delta_form == "gram" and g.ndim == 2:
          erase = _erase_gram(m, g.astype(m.dtype), delta_strength, normalize_keys, gram_axis)
        else:
          erase = _erase_rank1(m, g.astype(m.dtype), delta_strength, normalize_keys)
        new = new - erase
      return new

    momentum = jax.tree.map(write, state.momentum, updates, values)
    out = momentum if output_fn is None else jax.tree.map(output_fn, momentum)
    out = jax.tree.map(lambda o, g: o.astype(g.dtype), out, updates)
    return out, GeneralizedMomentumState(count=optax.safe_increment(state.count),
                                         momentum=momentum)

  return optax.GradientTransformation(init_fn, update_fn)


def generalized_momentum(
    learning_rate: _utils.ScalarOrSchedule,
    alpha: _utils.ScalarOrSchedule = 0.9,
    **kwargs: Any,
) -> optax.GradientTransformation:
  """SGD with a generalized momentum memory: ``W ← W - η σ(m_t)``.

  Args:
    learning_rate: η, a float ``>= 0`` or an ``optax.Schedule``.
    alpha: forget gate α in ``[0, 1]`` or a schedule.
    **kwargs: forwarded to :func:`scale_by_generalized_momentum`.

  Returns:
    An ``optax.GradientTransformation``.
  """
  _utils.check_learning_rate("generalized_momentum", learning_rate)
  return optax.chain(scale_by_generalized_momentum(alpha, **kwargs),
                     optax.scale_by_learning_rate(learning_rate))


def delta_momentum(
    learning_rate: _utils.ScalarOrSchedule,
    alpha: _utils.ScalarOrSchedule = 0.9,
    delta_strength: float = 1.0,
    **kwargs: Any,
) -> optax.GradientTransformation:
  """Delta momentum (eqs. 48–49): :func:`generalized_momentum` with ``objective="l2"``.

  Args:
    learning_rate: η, a float ``>= 0`` or an ``optax.Schedule``.
    alpha: forget gate α.
    delta_strength: ζ, erase strength along the current gradient direction.
    **kwargs: forwarded to :func:`scale_by_generalized_momentum` (``delta_form``,
      ``normalize_keys``, ``precondition``, ...).

  Returns:
    An ``optax.GradientTransformation``.
  """
  return generalized_momentum(learning_rate, alpha, objective="l2",
                              delta_strength=delta_strength, **kwargs)
