r"""DGD: Delta Gradient Descent as an outer optimizer for linear layers (eqs. 54–57, 121).

Plain GD is a dot-product memory that treats each sample as independent of the current state
(eq. 55). DGD instead takes one proximal step on an :math:`L_2` regression objective (eq. 56),

.. math::
  W_{t+1} = \arg\min_W \tfrac12\|x_t W - u_t\|_2^2 + \tfrac1{2\eta}\|W - W_t\|_F^2,
  \qquad u_t = -\nabla_{y_t} L,

whose closed form (Sherman–Morrison) for a single input :math:`x_t \in \mathbb R^{d_{in}}` and a
kernel :math:`W \in \mathbb R^{d_{in}\times d_{out}}` (Flax layout, :math:`y = xW`) is eq. 57:

.. math::
  W_{t+1} = (I - \eta' x_t x_t^\top)\,W_t - \eta' \nabla_W L,\qquad
  \eta' = \frac{\eta}{1 + \eta\|x_t\|^2}.

(In the paper's column layout :math:`W x` this is :math:`W(I - \eta' x x^\top) - \eta'\nabla`.)
The decay is an adaptive weight decay along the current input direction: the delta rule
applied to backprop.

**Batches.** For inputs :math:`X \in \mathbb R^{B\times d_{in}}` (all leading axes of the input
are flattened into ``B``) and a mean-reduced loss, the same proximal step with the mean
objective :math:`\frac1{2B}\sum_b\|x_b W - u_b\|^2` is

.. math::
  W_{t+1} = (I + \eta C)^{-1}(W_t - \eta\nabla_W L),\qquad C = X^\top X / B,

computed exactly with the Woodbury identity (a ``B×B`` solve when ``B < d_in``, else a
``d_in×d_in`` solve). For ``B = 1`` it is eq. 57 exactly. This is an [A] extension: the paper
only states the single-sample form.

**Variant** ``"neurips"`` (NeurIPS camera-ready): :math:`W_{t+1} = (I - c\,C)W_t - \eta\nabla_W L`
with a fixed decay coefficient ``c = neurips_decay`` (1 as printed) and no :math:`\eta'`; it
assumes normalised inputs (``c‖x‖² ≤ 1``) and diverges otherwise.

**Inputs.** The layer inputs are an extra argument of ``update``:
``update(grads, state, params, layer_inputs=tree)`` where ``tree`` has the parameters'
structure and, per leaf, either ``None`` (no input: plain GD ``-η∇`` — biases, norms,
embeddings) or an array ``[..., d_in]`` whose last axis matches the kernel's ``input_axis``.
Kernels with more than two axes are reshaped to ``[d_in, -1]``. ``params`` is required.
Collect the inputs with e.g. Flax's ``sow`` / ``capture_intermediates``; they must be the
inputs of the same forward pass that produced ``grads``.

References:
  Behrouz et al., Nested Learning, §4.5, eqs. 54–57 and App. C, https://arxiv.org/abs/2512.24695
  Widrow & Hoff, Adaptive switching circuits (the delta rule), 1960.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nlj.optim import _utils

__all__ = ["DGDState", "dgd", "dgd_step"]

_VARIANTS = ("arxiv", "neurips")


class DGDState(NamedTuple):
  """State of :func:`dgd`.

  Attributes:
    count: ``[]`` int32, number of updates so far (drives learning-rate schedules).
  """

  count: jax.Array


def dgd_step(
    w: jax.Array,
    grad: jax.Array,
    x: jax.Array,
    lr: jax.Array | float,
    *,
    variant: str = "arxiv",
    neurips_decay: float = 1.0,
) -> jax.Array:
  """New weights of one DGD step for a ``[d_in, d_out]`` kernel.

  Args:
    w: ``[d_in, d_out]`` current weights.
    grad: ``[d_in, d_out]`` gradient of the (mean-reduced) loss.
    x: ``[d_in]`` one input, or ``[B, d_in]`` a batch of inputs.
    lr: η.
    variant: ``"arxiv"`` (eq. 57 with η', exact proximal step) or ``"neurips"``.
    neurips_decay: ``c`` of the NeurIPS variant.

  Returns:
    ``[d_in, d_out]`` updated weights ``W_{t+1}``.
  """
  x = jnp.atleast_2d(x).astype(w.dtype)
  b, d_in = x.shape
  lr = jnp.asarray(lr, w.dtype)
  if variant == "neurips":
    return w - (neurips_decay / b) * (x.T @ (x @ w)) - lr * grad
  z = w - lr * grad
  if b < d_in:
    # (I + (η/B) XᵀX)^{-1} z = z - (η/B) Xᵀ (I_B + (η/B) X Xᵀ)^{-1} X z   (Woodbury)
    k = jnp.eye(b, dtype=w.dtype) + (lr / b) * (x @ x.T)
    return z - (lr / b) * (x.T @ jnp.linalg.solve(k, x @ z))
  a = jnp.eye(d_in, dtype=w.dtype) + (lr / b) * (x.T @ x)
  return jnp.linalg.solve(a, z)


def dgd(
    learning_rate: _utils.ScalarOrSchedule,
    *,
    variant: str = "arxiv",
    neurips_decay: float = 1.0,
    input_axis: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """DGD (eq. 57) on leaves with layer inputs, plain GD on the others.

  Args:
    learning_rate: η, a float ``>= 0`` or an ``optax.Schedule``.
    variant: ``"arxiv"`` (default; eq. 57 with ``η' = η/(1+η‖x‖²)``) or ``"neurips"``
      (``W(I - c x xᵀ) - η∇``).
    neurips_decay: ``c >= 0`` for ``variant="neurips"``.
    input_axis: axis of a kernel that multiplies the input: 0 for Flax ``[d_in, d_out]``
      (default), 1 / -1 for ``[d_out, d_in]``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params,
    layer_inputs=...)`` returns ``W_{t+1} - W_t`` per leaf (so ``optax.apply_updates`` lands on
    the DGD weights). Without ``layer_inputs`` every leaf takes a plain GD step.
  """
  fn = "dgd"
  _utils.check_learning_rate(fn, learning_rate)
  _utils.check_choice(fn, "variant", variant, _VARIANTS)
  _utils.check_range(fn, "neurips_decay", neurips_decay, low=0.0)
  if input_axis not in (0, 1, -1):
    raise ValueError(f"{fn}: input_axis must be 0, 1 or -1; got {input_axis!r}")

  def init_fn(params):
    del params
    return DGDState(count=jnp.zeros([], jnp.int32))

  def leaf(g, p, x, lr):
    if x is None:
      return -lr.astype(g.dtype) * g
    if p.ndim < 2:
      raise ValueError(f"{fn}: layer_inputs given for a leaf of shape {p.shape}; DGD needs a "
                       "kernel with >= 2 axes (pass None for biases)")
    ax = input_axis % p.ndim
    if x.shape[-1] != p.shape[ax]:
      raise ValueError(f"{fn}: layer input last axis {x.shape[-1]} does not match the kernel's "
                       f"input axis {ax} of size {p.shape[ax]} (kernel shape {p.shape})")
    pm = jnp.moveaxis(p, ax, 0)
    gm = jnp.moveaxis(g, ax, 0)
    shape = pm.shape
    w2 = pm.reshape(shape[0], -1)
    new = dgd_step(w2, gm.reshape(shape[0], -1).astype(w2.dtype), x.reshape(-1, shape[0]), lr,
                   variant=variant, neurips_decay=neurips_decay)
    return jnp.moveaxis((new - w2).reshape(shape), 0, ax).astype(g.dtype)

  def update_fn(updates, state, params=None, *, layer_inputs: Any = None, **extra_args):
    del extra_args
    lr = _utils.value_at(learning_rate, state.count)
    if layer_inputs is None:
      out = jax.tree.map(lambda g: -lr.astype(g.dtype) * g, updates)
    else:
      if params is None:
        raise ValueError(f"{fn}: update() needs params when layer_inputs are given")
      treedef = jax.tree.structure(updates)
      xs = treedef.flatten_up_to(layer_inputs)
      out = treedef.unflatten([leaf(g, p, x, lr) for g, p, x in zip(
          treedef.flatten_up_to(updates), treedef.flatten_up_to(params), xs)])
    return out, DGDState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
