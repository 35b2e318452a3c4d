r"""Adam and AdaGrad as optimal associative memories (App. B, eqs. 100–111).

App. B shows that the optimum of the element-wise memory objective (eq. 101)

.. math::
  \tilde L_t = \sum_{i\le t} \|m \odot g_i - P\|_2^2 + \lambda\|m\|_F^2

is, in closed form (eq. 102),

.. math::
  m^* = (H + \lambda)^{-1} \odot \tilde M \odot P,\qquad
  \tilde M = \textstyle\sum_i \beta_1 g_i,\qquad H = \textstyle\sum_i \beta_2 g_i^2 ,

and that the value choice :math:`P = H^{1/2}/\sqrt{\beta_2}` with :math:`\lambda \to 0` gives
:math:`W \leftarrow W - \frac{\eta}{\sqrt{\beta_2}}\frac{\tilde M}{H^{1/2} + \epsilon}` (eq. 105,
"Adam"), while :math:`P = H/\beta_2` gives momentum GD (eq. 104).

This module computes the update *from the memory form*: three accumulators, each written with a
forget gate ``a`` (retention) and a write strength ``c`` —

.. math::
  M \leftarrow a_1 M + c_1 g,\qquad H \leftarrow a_2 H + c_2 g^2,

then normalised by their total write weight when ``normalize=True`` (that *is* Adam's bias
correction: :math:`\sum_{i\le t} c\,a^{t-i} = 1 - \beta^t` for ``a = β, c = 1 - β``), and read out
as the optimal memory :math:`m^* = \hat M \odot P/(\hat H + \lambda)`:

* ``value="sqrt"`` (:math:`P = \hat H^{1/2}`, λ → 0, stabilised as printed in eq. 105):
  :math:`m^* = \hat M / (\sqrt{\hat H + \epsilon_{root}} + \epsilon)`.
* ``value="identity"`` (:math:`P = \hat H`, eq. 104): :math:`m^* = \hat M \hat H/(\hat H+\lambda)`,
  i.e. momentum when λ = 0.

**Mapping to the known optimizers (tested to float tolerance):**

* ``optax.adam(η, b1, b2, eps)`` = memory form with the EMA reparametrisation
  ``a1 = b1, c1 = 1 - b1, a2 = b2, c2 = 1 - b2`` (eq. 102's plain sums with a forget gate), bias
  correction = normalising by the write weight, ``value="sqrt"`` (:func:`adam_memory`). The
  ``1/√β2`` of eq. 105 cancels once ``H`` is normalised.
* ``optax.adagrad(η, initial_accumulator_value, eps)`` = ``a1 = 0, c1 = 1`` (no momentum),
  ``a2 = c2 = 1`` (plain sum), ``H_0 = initial_accumulator_value``, no normalisation,
  ``ε_root = eps, ε = 0`` (:func:`adagrad_memory`).
* ``mode="sum"`` of :func:`adam_memory` is eq. 105 literally: plain sums with write strengths
  ``β1, β2`` and the ``1/√β2`` factor (AdaGrad with summed momentum).

Not implemented: the outer-product (full-matrix) memory of eqs. 106–111, whose ``H`` is
``D×D`` for a leaf of ``D`` entries.

References:
  Behrouz et al., Nested Learning, App. B, eqs. 100–111, https://arxiv.org/abs/2512.24695
  Kingma & Ba, Adam, https://arxiv.org/abs/1412.6980
  Duchi et al., Adaptive Subgradient Methods (AdaGrad), JMLR 2011.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nlj.optim import _utils

__all__ = ["MemoryPreconditionerState", "scale_by_memory_preconditioner", "adam_memory",
           "adagrad_memory"]

_VALUES = ("sqrt", "identity")
_MODES = ("ema", "sum")


class MemoryPreconditionerState(NamedTuple):
  """State of :func:`scale_by_memory_preconditioner`.

  Attributes:
    count: ``[]`` int32, number of updates so far.
    m: first-moment memory ``M`` (each parameter's shape).
    h: second-moment memory ``H`` (each parameter's shape).
    m_weight: ``[]`` float32, total write weight of ``M`` so far (``Σ c1 a1^{t-i}``).
    h_weight: ``[]`` float32, total write weight of ``H`` so far.
  """

  count: jax.Array
  m: optax.Updates
  h: optax.Updates
  m_weight: jax.Array
  h_weight: jax.Array


def scale_by_memory_preconditioner(
    *,
    m_forget: float,
    m_write: float,
    h_forget: float,
    h_write: float,
    normalize: bool,
    value: str = "sqrt",
    eps: float = 1e-8,
    eps_root: float = 0.0,
    ridge: float = 0.0,
    initial_h: float = 0.0,
    scale: float = 1.0,
) -> optax.GradientTransformation:
  """Optimal element-wise memory ``m* = M̂ ⊙ P / (Ĥ + λ)`` (eqs. 101–105); no learning rate.

  Args:
    m_forget: retention ``a1 ∈ [0, 1]`` of ``M``.
    m_write: write strength ``c1 >= 0`` of ``M``.
    h_forget: retention ``a2 ∈ [0, 1]`` of ``H``.
    h_write: write strength ``c2 >= 0`` of ``H``.
    normalize: divide ``M`` and ``H`` by their total write weights (Adam's bias correction).
    value: ``"sqrt"`` (``P = Ĥ^{1/2}``, Adam/AdaGrad) or ``"identity"`` (``P = Ĥ``, momentum).
    eps: ``ε >= 0`` added to ``√Ĥ`` (``value="sqrt"``).
    eps_root: ``ε_root >= 0`` added to ``Ĥ`` under the square root.
    ridge: λ ``>= 0`` of eq. 101 (``value="identity"`` only; ``"sqrt"`` uses the λ → 0 limit).
    initial_h: initial value ``>= 0`` of ``H`` (AdaGrad's ``initial_accumulator_value``).
    scale: constant factor on the read-out (eq. 105's ``1/√β2``).

  Returns:
    An ``optax.GradientTransformation``; updates have each parameter's shape, point downhill and
    are zero (never NaN) where ``M = 0``.
  """
  fn = "scale_by_memory_preconditioner"
  for name, v in (("m_forget", m_forget), ("h_forget", h_forget)):
    _utils.check_range(fn, name, v, low=0.0, high=1.0)
  for name, v in (("m_write", m_write), ("h_write", h_write), ("eps", eps),
                  ("eps_root", eps_root), ("ridge", ridge), ("initial_h", initial_h)):
    _utils.check_range(fn, name, v, low=0.0)
  _utils.check_choice(fn, "value", value, _VALUES)

  def init_fn(params):
    return MemoryPreconditionerState(
        count=jnp.zeros([], jnp.int32),
        m=_utils.zeros_like(params),
        h=optax.tree.full_like(params, initial_h),
        m_weight=jnp.zeros([], jnp.float32),
        h_weight=jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    m = jax.tree.map(lambda s, g: m_forget * s + m_write * g, state.m, updates)
    h = jax.tree.map(lambda s, g: h_forget * s + h_write * jnp.square(g), state.h, updates)
    m_weight = m_forget * state.m_weight + m_write
    h_weight = h_forget * state.h_weight + h_write
    if normalize:
      m_hat = jax.tree.map(lambda s: s / m_weight.astype(s.dtype), m)
      h_hat = jax.tree.map(lambda s: s / h_weight.astype(s.dtype), h)
    else:
      m_hat, h_hat = m, h

    def read(mm, hh):
      if value == "identity":  # P/(Ĥ + λ) with P = Ĥ; 1 at Ĥ = λ = 0 (the λ -> 0 limit)
        tot = hh + ridge
        return scale * mm * jnp.where(tot > 0, hh / jnp.where(tot > 0, tot, 1.0), 1.0)
      den = jnp.sqrt(hh + eps_root) + eps
      return scale * jnp.where(den > 0, mm / jnp.where(den > 0, den, 1.0), 0.0)

    out = jax.tree.map(read, m_hat, h_hat)
    return out, MemoryPreconditionerState(count=optax.safe_increment(state.count), m=m, h=h,
                                          m_weight=m_weight, h_weight=h_weight)

  return optax.GradientTransformation(init_fn, update_fn)


def adam_memory(
    learning_rate: _utils.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    mode: str = "ema",
) -> optax.GradientTransformation:
  """Adam written as the optimal associative memory of eq. 105.

  Args:
    learning_rate: η, a float ``>= 0`` or an ``optax.Schedule``.
    b1: β1 in ``[0, 1)`` (``"sum"``: write strength of ``M̃``).
    b2: β2 in ``(0, 1)`` (``"sum"``: write strength of ``H``).
    eps: ε added to ``√Ĥ``.
    eps_root: ε added to ``Ĥ`` under the root.
    mode: ``"ema"`` (default; equals ``optax.adam``) or ``"sum"`` (eq. 105 literally: plain sums,
      ``W ← W - η/√β2 · M̃/(H^{1/2} + ε)``).

  Returns:
    An ``optax.GradientTransformation``.
  """
  fn = "adam_memory"
  _utils.check_learning_rate(fn, learning_rate)
  _utils.check_choice(fn, "mode", mode, _MODES)
  _utils.check_range(fn, "b1", b1, low=0.0, high=1.0, high_inclusive=False)
  _utils.check_range(fn, "b2", b2, low=0.0, high=1.0, low_inclusive=False,
                     high_inclusive=False)
  if mode == "ema":
    inner = scale_by_memory_preconditioner(m_forget=b1, m_write=1 - b1, h_forget=b2,
                                           h_write=1 - b2, normalize=True, eps=eps,
                                           eps_root=eps_root)
  else:
    inner = scale_by_memory_preconditioner(m_forget=1.0, m_write=b1, h_forget=1.0, h_write=b2,
                                           normalize=False, eps=eps, eps_root=eps_root,
                                           scale=float(b2)**-0.5)
  return optax.chain(inner, optax.scale_by_learning_rate(learning_rate))


def adagrad_memory(
    learning_rate: _utils.ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
) -> optax.GradientTransformation:
  """AdaGrad written as the optimal associative memory (eqs. 102, 105 with plain sums).

  Args:
    learning_rate: η, a float ``>= 0`` or an ``optax.Schedule``.
    initial_accumulator_value: initial ``H`` (``>= 0``), as ``optax.adagrad``.
    eps: ε added to ``H`` under the square root, as ``optax.adagrad``.

  Returns:
    An ``optax.GradientTransformation`` equal to ``optax.adagrad`` with the same arguments.
  """
  _utils.check_learning_rate("adagrad_memory", learning_rate)
  inner = scale_by_memory_preconditioner(m_forget=0.0, m_write=1.0, h_forget=1.0, h_write=1.0,
                                         normalize=False, eps=0.0, eps_root=eps,
                                         initial_h=initial_accumulator_value)
  return optax.chain(inner, optax.scale_by_learning_rate(learning_rate))
