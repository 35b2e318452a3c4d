r"""M3: Multi-scale Momentum Muon (§7.2, eq. 75, Algorithm 1).

"M3 = Adam + Muon + CMS": Adam's memory form (eq. 102) whose momentum is replaced by a 2-level
continuum memory — a fast momentum :math:`M^{(1)}` updated every step and a slow momentum
:math:`M^{(2)}` updated once every ``f`` steps with the gradients of those ``f`` steps — each
read through Newton–Schulz, aggregated, and divided by the second moment. For a 2-D leaf at step
:math:`t` (1-based):

.. math::
  M^{(1)}_t &= M^{(1)}_{t-1} + \beta_1 g_t, \qquad V_t = V_{t-1} + \beta_2 g_t^2
      && \text{(lines 7–8)}\\
  O^{(1)}_t &= \mathrm{NS}_T(M^{(1)}_t) && \text{(line 9)}\\
  \Delta_t &= -\eta\,(O^{(1)}_t + \alpha\,O^{(2)})/(\sqrt{V_t} + \epsilon) && \text{(line 10)}\\
  \text{if } t \equiv 0 \ (\mathrm{mod}\ f):\ \ M^{(2)} &\leftarrow M^{(2)} + \beta_3
      \textstyle\sum_{i=t-f+1}^{t} g_i,\quad O^{(2)} \leftarrow \mathrm{NS}_T(M^{(2)})
      && \text{(lines 3–4, for the next chunk)}

So steps ``1..f`` use :math:`O^{(2)} = 0`, steps ``f+1..2f`` use the slow memory built from
steps ``1..f``, and so on: exactly the ``f`` most recent gradients per slow update
(PAPER.md §8 item 13). :math:`O^{(2)}` is cached in the state; Newton–Schulz on the slow memory
runs only on slow steps (``lax.cond``).

``mode`` (PAPER.md §8 item 14):

* ``"literal"``: the box as printed, plain sums (AdaGrad-like, no bias correction).
* ``"ema"`` (**default of** :func:`m3`): :math:`M^{(1)} \leftarrow \beta_1 M^{(1)} + (1-\beta_1)g`,
  :math:`V \leftarrow \beta_2 V + (1-\beta_2)g^2` with Adam's bias correction
  :math:`\hat V = V/(1-\beta_2^t)`, and
  :math:`M^{(2)} \leftarrow \beta_3 M^{(2)} + (1-\beta_3)\,\tfrac1f\sum g`. Bias-correcting the
  momenta would be a no-op: Newton–Schulz normalises its input by the Frobenius norm.

Newton–Schulz and the slow memory apply only to 2-D leaves (:func:`scale_by_m3` requires them);
:func:`m3` routes every other leaf to AdamW with ``optax.partition``. ``rms_normalize`` (off by
default; not in the paper, peer practice) rescales each leaf's M3 direction to unit RMS, which
keeps the step size independent of the gradient scale (the raw box's ``NS(·)/√V`` is not).

References:
  Behrouz et al., Nested Learning, §7.2, eq. 75, Algorithm 1, https://arxiv.org/abs/2512.24695
  Pagliardini et al., The AdEMAMix Optimizer, https://arxiv.org/abs/2409.03137
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nlj.optim import _utils
from nlj.optim.muon import matrices_with_adamw
from nlj.optim.newton_schulz import NS_COEFFS, newton_schulz

__all__ = ["M3State", "scale_by_m3", "m3"]

_MODES = ("literal", "ema")


class M3State(NamedTuple):
  """State of :func:`scale_by_m3`; every tree has the parameters' shapes.

  Attributes:
    count: ``[]`` int32, number of updates so far.
    m1: fast momentum :math:`M^{(1)}`.
    m2: slow momentum :math:`M^{(2)}` (changes only on steps that are multiples of ``f``).
    o2: cached :math:`\\mathrm{NS}(M^{(2)})`.
    v: second moment :math:`V`.
    gsum: sum of the raw gradients since the last slow update.
  """

  count: jax.Array
  m1: optax.Updates
  m2: optax.Updates
  o2: optax.Updates
  v: optax.Updates
  gsum: optax.Updates


def scale_by_m3(
    frequency: int = 10,
    *,
    mode: str = "ema",
    beta1: float = 0.9,
    beta2: float = 0.999,
    beta3: float = 0.9,
    alpha: float = 0.5,
    eps: float = 1e-8,
    ns_steps: int = 5,
    ns_coeffs: tuple[float, float, float] = NS_COEFFS,
    rms_normalize: bool = False,
) -> optax.GradientTransformation:
  """M3 direction ``(O1 + α O2) / (√V + ε)`` for 2-D leaves (Algorithm 1); no learning rate.

  Args:
    frequency: ``f >= 1``, the slow momentum's update period in steps.
    mode: ``"literal"`` (plain sums, as the box) or ``"ema"`` (EMAs, bias-corrected ``V``).
    beta1: fast-momentum factor, in ``[0, 1]`` (``"ema"`` needs ``< 1``).
    beta2: second-moment factor, in ``(0, 1]`` (``"ema"`` needs ``< 1``).
    beta3: slow-momentum factor, in ``[0, 1]`` (``"ema"`` needs ``< 1``).
    alpha: weight ``α >= 0`` of the slow momentum in the aggregation.
    eps: ``ε > 0`` added to ``√V``.
    ns_steps: Newton–Schulz steps ``T >= 1``.
    ns_coeffs: quintic Newton–Schulz coefficients.
    rms_normalize: rescale each leaf's direction to unit RMS (not in the paper).

  Returns:
    An ``optax.GradientTransformation``; every leaf must be 2-D.
  """
  fn = "scale_by_m3"
  _utils.check_int(fn, "frequency", frequency, low=1)
  _utils.check_choice(fn, "mode", mode, _MODES)
  ema = mode == "ema"
  for name, b in (("beta1", beta1), ("beta2", beta2), ("beta3", beta3)):
    _utils.check_range(fn, name, b, low=0.0, high=1.0, low_inclusive=name != "beta2",
                       high_inclusive=not ema)
  _utils.check_range(fn, "alpha", alpha, low=0.0)
  _utils.check_range(fn, "eps", eps, low=0.0, low_inclusive=False)
  _utils.check_int(fn, "ns_steps", ns_steps, low=1)
  ns = lambda x: newton_schulz(x, ns_steps, ns_coeffs)

  def init_fn(params):
    for leaf in jax.tree.leaves(params):
      if jnp.ndim(leaf) != 2:
        raise ValueError(f"{fn}: every leaf must be 2-D (use m3() to route the others to "
                         f"AdamW); got shape {jnp.shape(leaf)}")
    z = lambda: _utils.zeros_like(params, jnp.float32)
    return M3State(count=jnp.zeros([], jnp.int32), m1=z(), m2=z(), o2=z(), v=z(), gsum=z())

  # Slow level (lines 3-4). Defined once so eager calls reuse the traced branches of lax.cond.
  def slow(args):
    m2, _, gs = args
    if ema:
      m2 = jax.tree.map(lambda m, s: beta3 * m + (1 - beta3) * s / frequency, m2, gs)
    else:
      m2 = jax.tree.map(lambda m, s: m + beta3 * s, m2, gs)
    return m2, jax.tree.map(ns, m2), jax.tree.map(jnp.zeros_like, gs)

  def keep(args):
    return args

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    g = jax.tree.map(lambda u: u.astype(jnp.float32), updates)
    if ema:
      m1 = jax.tree.map(lambda m, x: beta1 * m + (1 - beta1) * x, state.m1, g)
      v = jax.tree.map(lambda s, x: beta2 * s + (1 - beta2) * x * x, state.v, g)
      v_hat = optax.tree.bias_correction(v, beta2, count)
    else:
      m1 = jax.tree.map(lambda m, x: m + beta1 * x, state.m1, g)
      v = jax.tree.map(lambda s, x: s + beta2 * x * x, state.v, g)
      v_hat = v
    gsum = jax.tree.map(jnp.add, state.gsum, g)

    def direction(m, o2, vh, u):
      d = (ns(m) + alpha * o2) / (jnp.sqrt(vh) + eps)
      if rms_normalize:
        rms = jnp.sqrt(jnp.mean(jnp.square(d)))
        d = d / jnp.where(rms > 0, rms, 1.0)
      return d.astype(u.dtype)

    out = jax.tree.map(direction, m1, state.o2, v_hat, updates)
    m2, o2, gsum = jax.lax.cond(count % frequency == 0, slow, keep, (state.m2, state.o2, gsum))
    return out, M3State(count=count, m1=m1, m2=m2, o2=o2, v=v, gsum=gsum)

  return optax.GradientTransformation(init_fn, update_fn)


def m3(
    learning_rate: _utils.ScalarOrSchedule,
    frequency: int = 10,
    *,
    mode: str = "ema",
    beta1: float = 0.9,
    beta2: float = 0.999,
    beta3: float = 0.9,
    alpha: float = 0.5,
    eps: float = 1e-8,
    ns_steps: int = 5,
    rms_normalize: bool = False,
    weight_decay: float = 0.0,
    adam_learning_rate: _utils.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """M3 on 2-D leaves, AdamW on the others: ``W ← W - η (O1 + α O2)/(√V + ε)``.

  Args:
    learning_rate: η, a float ``>= 0`` or an ``optax.Schedule``.
    frequency: slow-momentum period ``f >= 1``.
    mode: ``"ema"`` (default, stable) or ``"literal"`` (the box's plain sums).
    beta1: fast momentum factor.
    beta2: second-moment factor.
    beta3: slow momentum factor.
    alpha: weight of the slow momentum.
    eps: ε of the denominator.
    ns_steps: Newton–Schulz steps.
    rms_normalize: rescale each matrix direction to unit RMS (not in the paper).
    weight_decay: decoupled weight decay on the M3 branch (multiplied by η).
    adam_learning_rate: learning rate for non-2-D leaves (AdamW); defaults to ``learning_rate``.
    adam_b1: AdamW ``b1``.
    adam_b2: AdamW ``b2``.
    adam_weight_decay: AdamW weight decay.

  Returns:
    An ``optax.GradientTransformation`` (a partition over ``"m3"`` / ``"adam"`` leaves).
  """
  return matrices_with_adamw(
      "m3", scale_by_m3(frequency, mode=mode, beta1=beta1, beta2=beta2, beta3=beta3,
                        alpha=alpha, eps=eps, ns_steps=ns_steps, rms_normalize=rms_normalize),
      learning_rate, weight_decay, adam_learning_rate,
      dict(b1=adam_b1, b2=adam_b2, weight_decay=adam_weight_decay))
