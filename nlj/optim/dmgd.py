r"""DMGD: Deep Momentum Gradient Descent (eq. 50) — the momentum is a small MLP memory.

Eq. 50 makes the momentum a *deep* memory :math:`m(\cdot)` with its own parameters, trained
inside the optimizer by GD (with retention α) on its own internal objective, keyed by the
gradient :math:`u_i = \nabla L(W_i)` and read at it:

.. math::
  W_{i+1} = W_i + m_{i+1}(u_i),\qquad m_{i+1} = \alpha m_i - \eta\,\nabla L^{(2)}(m_i; u_i, \mathbf 1).

The paper gives no concrete architecture (and no experiment); it warns that the memory and its
objective "need to be designed carefully". **Design used here [A]** — chosen so that it costs
one extra parameter-shaped buffer plus ``2·hidden`` scalars per leaf, shards like the
parameters, and contains standard momentum as its linear special case:

* For each leaf, the memory is an element-wise residual MLP over the gradient coordinates,
  with *one tiny weight set shared by all coordinates of the leaf*:

  .. math::
    m_\theta(u)_j = \mu_j + s\, f_\omega(u_j / s),\qquad
    f_\omega(x) = \textstyle\sum_{k=1}^{h} w_{2,k}\tanh(w_{1,k}\,x),\qquad s = \mathrm{RMS}(u),

  :math:`\theta = (\mu, \omega)`: a per-coordinate linear slot :math:`\mu` (parameter-shaped)
  and a shared odd scalar MLP :math:`\omega = (w_1, w_2) \in \mathbb R^{h}\times\mathbb R^{h}`
  acting on RMS-normalised coordinates (scale-equivariant; :math:`f(0) = 0`, so a zero gradient
  adds nothing and gives no NaN). ``w2`` starts at 0, so step 1 is plain momentum.
* Write: one GD step on the internal objective, over all memory parameters.

  - ``objective="dot"`` (**default**; eq. 50's :math:`\langle m(u), \mathbf 1\rangle` read as the
    dot-product memory :math:`-\langle m(u), u\rangle`, the deep version of eq. 34/46):
    :math:`\mu \leftarrow \alpha\mu + u` and
    :math:`\omega \leftarrow \alpha_\omega\omega + \eta_\omega \nabla_\omega
    \mathrm{mean}_j[f_\omega(x_j)\,x_j]`.
  - ``objective="l2"`` (the memory regresses the gradient, :math:`\tfrac12\|m(u)-u\|^2`):
    :math:`\mu \leftarrow \mu - (1-\alpha)(m_\theta(u) - u)` and
    :math:`\omega \leftarrow \alpha_\omega\omega - \eta_\omega \nabla_\omega \tfrac12
    \mathrm{mean}_j[(\mu_j/s + f_\omega(x_j) - x_j)^2]`.
* Read: the update (descent direction) is :math:`m_{\theta_{t}}(u_t)` with the new parameters.

Special cases (tested): with ``mlp_lr=0`` the dot version is ``optax.trace(decay=α)`` and the
L2 version is the EMA ``optax.ema(α, debias=False)``.

References:
  Behrouz et al., Nested Learning, eq. 50 (§4.4), https://arxiv.org/abs/2512.24695
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nlj.optim import _utils

__all__ = ["DMGDState", "scale_by_dmgd", "dmgd"]

_OBJECTIVES = ("dot", "l2")


class DMGDState(NamedTuple):
  """State of :func:`scale_by_dmgd`: the memory's parameters, part of the optimizer state.

  Attributes:
    count: ``[]`` int32, number of updates so far.
    mu: per-coordinate linear slots, each parameter's shape (float32).
    w1: per leaf, ``[hidden]`` input weights of the shared MLP.
    w2: per leaf, ``[hidden]`` output weights of the shared MLP.
  """

  count: jax.Array
  mu: optax.Updates
  w1: optax.Updates
  w2: optax.Updates


def _mlp(w1: jax.Array, w2: jax.Array, x: jax.Array) -> jax.Array:
  """``f_ω(x) = Σ_k w2_k tanh(w1_k x)`` element-wise; ``x`` any shape."""
  return jnp.tanh(x[..., None] * w1) @ w2


def scale_by_dmgd(
    alpha: _utils.ScalarOrSchedule = 0.9,
    *,
    objective: str = "dot",
    hidden: int = 4,
    mlp_lr: float = 0.01,
    mlp_alpha: float | None = None,
    eps: float = 1e-12,
) -> optax.GradientTransformation:
  """Deep momentum memory (eq. 50); see the module docstring for the exact update.

  Args:
    alpha: forget gate of the linear slots μ, in ``[0, 1]`` (or a schedule). For
      ``objective="l2"`` the slot step size is ``1 - α`` (an EMA when the MLP is off).
    objective: internal objective, ``"dot"`` (default) or ``"l2"``.
    hidden: width ``h`` of the shared per-leaf MLP (>= 1).
    mlp_lr: η_ω, inner learning rate of the MLP weights (>= 0; 0 freezes them at init).
    mlp_alpha: retention α_ω of the MLP weights in ``[0, 1]``; defaults to ``alpha`` (as a number;
      must be given explicitly when ``alpha`` is a schedule).
    eps: floor on the per-leaf gradient RMS used to normalise the MLP's input.

  Returns:
    An ``optax.GradientTransformation`` whose updates have each parameter's shape and point
    downhill (scale by ``-learning_rate``).
  """
  fn = "scale_by_dmgd"
  _utils.check_range(fn, "alpha", alpha, low=0.0, high=1.0, allow_schedule=True)
  _utils.check_choice(fn, "objective", objective, _OBJECTIVES)
  _utils.check_int(fn, "hidden", hidden, low=1)
  _utils.check_range(fn, "mlp_lr", mlp_lr, low=0.0)
  if mlp_alpha is None:
    if callable(alpha):
      raise ValueError(f"{fn}: mlp_alpha must be given when alpha is a schedule")
    mlp_alpha = alpha
  _utils.check_range(fn, "mlp_alpha", mlp_alpha, low=0.0, high=1.0)
  _utils.check_range(fn, "eps", eps, low=0.0)

  def init_fn(params):
    mu = _utils.zeros_like(params, jnp.float32)
    w1 = jax.tree.map(lambda _: jnp.linspace(0.5, 2.0, hidden, dtype=jnp.float32), params)
    w2 = jax.tree.map(lambda _: jnp.zeros([hidden], jnp.float32), params)
    return DMGDState(count=jnp.zeros([], jnp.int32), mu=mu, w1=w1, w2=w2)

  def leaf(u, mu, w1, w2, a):
    u32 = u.astype(jnp.float32)
    s = jnp.sqrt(jnp.mean(jnp.square(u32)))
    s = jnp.where(s > eps, s, 1.0)
    x = u32 / s
    if objective == "dot":
      mu = a * mu + u32
      loss = lambda w1_, w2_: jnp.mean(_mlp(w1_, w2_, x) * x)  # ascent on <m(u), u>
      g1, g2 = jax.grad(loss, argnums=(0, 1))(w1, w2)
      w1, w2 = mlp_alpha * w1 + mlp_lr * g1, mlp_alpha * w2 + mlp_lr * g2
    else:
      mu_n = mu / s
      mu = mu - (1.0 - a) * (mu + s * _mlp(w1, w2, x) - u32)
      loss = lambda w1_, w2_: 0.5 * jnp.mean(jnp.square(mu_n + _mlp(w1_, w2_, x) - x))
      g1, g2 = jax.grad(loss, argnums=(0, 1))(w1, w2)
      w1, w2 = mlp_alpha * w1 - mlp_lr * g1, mlp_alpha * w2 - mlp_lr * g2
    out = mu + s * _mlp(w1, w2, x)
    return out.astype(u.dtype), mu, w1, w2

  def update_fn(updates, state, params=None):
    del params
    a = _utils.value_at(alpha, state.count).astype(jnp.float32)
    treedef = jax.tree.structure(updates)
    res = [leaf(u, m, w1, w2, a) for u, m, w1, w2 in zip(
        treedef.flatten_up_to(updates), treedef.flatten_up_to(state.mu),
        treedef.flatten_up_to(state.w1), treedef.flatten_up_to(state.w2))]
    out, mu, w1, w2 = (treedef.unflatten([r[i] for r in res]) for i in range(4))
    return out, DMGDState(count=optax.safe_increment(state.count), mu=mu, w1=w1, w2=w2)

  return optax.GradientTransformation(init_fn, update_fn)


def dmgd(
    learning_rate: _utils.ScalarOrSchedule,
    alpha: _utils.ScalarOrSchedule = 0.9,
    **kwargs: Any,
) -> optax.GradientTransformation:
  """DMGD optimizer: ``W ← W - η m_θ(u)`` with the deep momentum of :func:`scale_by_dmgd`.

  Args:
    learning_rate: η, a float ``>= 0`` or an ``optax.Schedule``.
    alpha: forget gate of the momentum slots.
    **kwargs: forwarded to :func:`scale_by_dmgd`.

  Returns:
    An ``optax.GradientTransformation``.
  """
  _utils.check_learning_rate("dmgd", learning_rate)
  return optax.chain(scale_by_dmgd(alpha, **kwargs), optax.scale_by_learning_rate(learning_rate))
