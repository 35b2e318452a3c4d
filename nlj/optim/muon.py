r"""Muon: momentum whose output is orthogonalised by Newton–Schulz (eqs. 42–44, 52).

In Nested Learning terms Muon is a two-level memory: a linear momentum memory (eq. 42)

.. math::
  m_t = \beta m_{t-1} + (1 - \beta) g_t ,

read through a non-linear output :math:`\sigma = \mathrm{NewtonSchulz}_k` (eq. 52: "with σ = NS
and a linear m this *is* Muon"), itself the result of a faster inner GD on the orthogonality
objective (eqs. 43–44). The update for a 2-D weight :math:`W \in \mathbb R^{d_{in}\times d_{out}}`
is

.. math::
  W \leftarrow W - \eta \sqrt{\max(1, d_{out}/d_{in})}\; \mathrm{NS}_5(\hat m_t),

with :math:`\hat m_t` the bias-corrected (optionally Nesterov) momentum. Parameters that are
not 2-D go to AdamW. This is numerically the same as ``optax.contrib.muon`` with its defaults
(tested), written out so the NL reading is visible and the pieces are reusable (M3 uses
:func:`scale_by_muon`'s Newton–Schulz).

References:
  Behrouz et al., Nested Learning, eqs. 42–44 and 52, https://arxiv.org/abs/2512.24695
  Jordan, Muon, https://kellerjordan.github.io/posts/muon/
  Liu et al., Muon is Scalable for LLM Training, https://arxiv.org/abs/2502.16982
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nlj.optim import _utils
from nlj.optim.newton_schulz import NS_COEFFS, newton_schulz

__all__ = ["MuonState", "scale_by_muon", "muon", "matrix_labels"]


class MuonState(NamedTuple):
  """State of :func:`scale_by_muon`.

  Attributes:
    count: ``[]`` int32, number of updates so far.
    mu: momentum with each parameter's shape.
  """

  count: jax.Array
  mu: optax.Updates


def scale_by_muon(
    beta: float = 0.95,
    *,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: tuple[float, float, float] = NS_COEFFS,
    eps: float = 1e-8,
    width_scaling: bool = True,
) -> optax.GradientTransformation:
  """Momentum + Newton–Schulz output for 2-D leaves (eqs. 42, 52); no learning rate.

  Args:
    beta: momentum EMA decay in ``[0, 1)``.
    nesterov: use the Nesterov look-ahead ``β m̂_t + (1-β) ĝ_t`` (as optax).
    ns_steps: Newton–Schulz iterations (>= 1).
    ns_coeffs: quintic coefficients ``(a, b, c)``.
    eps: Frobenius-norm stabiliser inside Newton–Schulz.
    width_scaling: multiply by ``sqrt(max(1, d_out / d_in))`` for a ``[d_in, d_out]`` leaf.

  Returns:
    An ``optax.GradientTransformation`` whose updates (descent direction, to be scaled by
    ``-learning_rate``) have each leaf's shape. Every leaf must be 2-D.
  """
  fn = "scale_by_muon"
  _utils.check_range(fn, "beta", beta, low=0.0, high=1.0, high_inclusive=False)
  _utils.check_int(fn, "ns_steps", ns_steps, low=1)
  _utils.check_range(fn, "eps", eps, low=0.0)

  def init_fn(params):
    for leaf in jax.tree.leaves(params):
      if jnp.ndim(leaf) != 2:
        raise ValueError(f"{fn}: every leaf must be 2-D (use muon() to route others to AdamW); "
                         f"got shape {jnp.shape(leaf)}")
    return MuonState(count=jnp.zeros([], jnp.int32), mu=_utils.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, state.mu, updates)
    c1 = 1 - beta**count.astype(jnp.float32)
    if nesterov:
      c2 = 1 - beta**(count.astype(jnp.float32) + 1)
      mu_hat = jax.tree.map(lambda m, g: beta * m / c2 + (1 - beta) * g / c1, mu, updates)
    else:
      mu_hat = jax.tree.map(lambda m: m / c1, mu)

    def out(m):
      o = newton_schulz(m, ns_steps, ns_coeffs, eps)
      if width_scaling:
        o = o * jnp.sqrt(jnp.maximum(1.0, m.shape[1] / m.shape[0]))
      return o

    return jax.tree.map(out, mu_hat), MuonState(count=count, mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)


def matrix_labels(params: optax.Params, matrix_label: str, other_label: str) -> optax.Params:
  """Labels each leaf ``matrix_label`` if it is 2-D, ``other_label`` otherwise (for partition)."""
  return jax.tree.map(lambda p: matrix_label if jnp.ndim(p) == 2 else other_label, params)


def matrices_with_adamw(fn: str, matrix_tx: optax.GradientTransformation,
                        learning_rate: _utils.ScalarOrSchedule, weight_decay: float,
                        adam_learning_rate: _utils.ScalarOrSchedule | None,
                        adam_kwargs: dict) -> optax.GradientTransformation:
  """``matrix_tx`` + decoupled weight decay + ``-η`` on 2-D leaves, AdamW on the others.

  Args:
    fn: the public optimizer's name (for error messages and the partition labels).
    matrix_tx: the scale-by transformation of the 2-D branch (Muon, M3).
    learning_rate: ``η`` of the 2-D branch.
    weight_decay: decoupled weight decay of the 2-D branch (multiplied by ``η``).
    adam_learning_rate: learning rate of the AdamW branch; None uses ``learning_rate``.
    adam_kwargs: the other ``optax.adamw`` arguments.
  """
  _utils.check_learning_rate(fn, learning_rate)
  if adam_learning_rate is None:
    adam_learning_rate = learning_rate
  _utils.check_learning_rate(fn, adam_learning_rate, "adam_learning_rate")
  _utils.check_range(fn, "weight_decay", weight_decay, low=0.0)
  return optax.partition(
      {
          fn: optax.chain(matrix_tx, optax.add_decayed_weights(weight_decay),
                          optax.scale_by_learning_rate(learning_rate)),
          "adam": optax.adamw(adam_learning_rate, **adam_kwargs),
      },
      lambda p: matrix_labels(p, fn, "adam"),
  )


def muon(
    learning_rate: _utils.ScalarOrSchedule,
    beta: float = 0.95,
    *,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: tuple[float, float, float] = NS_COEFFS,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    adam_learning_rate: _utils.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """Muon on 2-D leaves, AdamW on the rest; matches ``optax.contrib.muon`` defaults.

  Args:
    learning_rate: step size ``η`` (float >= 0 or an ``optax.Schedule``).
    beta: momentum decay in ``[0, 1)``.
    nesterov: Nesterov momentum for both branches (as optax).
    ns_steps: Newton–Schulz iterations.
    ns_coeffs: quintic Newton–Schulz coefficients.
    eps: Newton–Schulz stabiliser and AdamW's ``eps``.
    weight_decay: decoupled weight decay on the Muon branch (multiplied by ``η``).
    adam_learning_rate: learning rate of the AdamW branch; defaults to ``learning_rate``.
    adam_b1: AdamW ``b1``.
    adam_b2: AdamW ``b2``.
    adam_weight_decay: AdamW weight decay.

  Returns:
    An ``optax.GradientTransformation`` (a partition over ``"muon"`` / ``"adam"`` leaves).
  """
  return matrices_with_adamw(
      "muon", scale_by_muon(beta, nesterov=nesterov, ns_steps=ns_steps, ns_coeffs=ns_coeffs,
                            eps=eps),
      learning_rate, weight_decay, adam_learning_rate,
      dict(b1=adam_b1, b2=adam_b2, eps=eps, weight_decay=adam_weight_decay, nesterov=nesterov))
