"""Memory architectures: what a level stores and how it is read.

A memory is an associative map ``M: keys -> values`` (Definition 1, eq. 6) with parameters
``params`` (a pytree of 2-D weight matrices). The two architectures of the paper:

* :class:`MatrixMemory` -- a linear map ``y = W k`` with ``W [d_out, d_in]`` (eqs. 15-16, 64).
* :class:`MLPMemory` -- the residual MLP of eq. 89, ``y = k + W_1 σ(W_2 k)``, generalised to
  ``L >= 1`` weight matrices and to a skip projection when ``d_in != d_out``.

Weights use the column-vector convention of the paper (``W x``), so the gradient of a linear
layer is the outer product ``dL/dy ⊗ x`` (PAPER.md §2 shape conventions). A memory marks which
of its weights take the key as their input (:meth:`key_inputs`): delta gradient descent applies
its data-dependent decay ``(α I - η k kᵀ)`` to exactly those weights (PAPER.md §8 item 6).

Multi-head memories are a leading ``[heads]`` axis on every weight; :class:`nlj.core.Level`
maps a per-head memory over heads and batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

__all__ = ["Memory", "MatrixMemory", "MLPMemory", "ACTIVATIONS"]

Params = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


class Memory(Protocol):
  """Interface of a memory architecture (one head, no batch axis)."""

  d_in: int
  d_out: int

  def init(self, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Initial parameters (the meta-learned initial state ``M_0``)."""

  def apply(self, params: Params, x: jax.Array) -> jax.Array:
    """Read-out ``M(x)``: ``x [..., d_in] -> [..., d_out]``."""

  def key_inputs(self) -> Params:
    """Pytree of bools shaped like ``params``: True where a weight's input is the key."""

  def linear_grad(self, params: Params, k: jax.Array, dldy: jax.Array) -> Params | None:
    """Closed-form ``∇_params L`` from ``dL/dy [d_out]`` when the map is linear, else None."""

  def key_input_cotangents(self, params: Params, x: jax.Array, dldy: jax.Array) -> Params:
    """Cotangents ``δ`` of the outputs ``W x`` of the key-input weights.

    A key-input weight's gradient is the outer product ``δ xᵀ``, so a sum of such gradients
    right-multiplied by per-token matrices needs only ``δ`` (the end-state form of delta
    gradient descent, :func:`nlj.core.chunked.chunk_boundary_end`).

    Args:
      params: one head's parameters.
      x: inputs ``[C, d_in]``.
      dldy: ``∂L/∂y [C, d_out]`` at ``y = M(x)``.

    Returns:
      A pytree shaped like ``params``: ``δ [C, rows of W]`` at every key-input weight, None
      elsewhere.
    """


def _check_positive(name: str, value: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _normal(key: jax.Array, shape: tuple[int, int], scale: float, dtype: Any) -> jax.Array:
  return (scale / math.sqrt(shape[1])) * jax.random.normal(key, shape, dtype)


@dataclasses.dataclass(frozen=True)
class MatrixMemory:
  """Linear memory ``y = W k`` with ``W [d_out, d_in]`` (eqs. 15-16).

  Attributes:
    d_in: key dimension.
    d_out: value dimension.
    init_scale: std of the initial state is ``init_scale / sqrt(d_in)``; 0 gives the zero
      state of linear attention and DeltaNet.
  """

  d_in: int
  d_out: int
  init_scale: float = 0.0

  def __post_init__(self):
    _check_positive("MatrixMemory.d_in", self.d_in)
    _check_positive("MatrixMemory.d_out", self.d_out)

  def init(self, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    return {"w": _normal(key, (self.d_out, self.d_in), self.init_scale, dtype)}

  def apply(self, params: Params, x: jax.Array) -> jax.Array:
    return x @ params["w"].T

  def key_inputs(self) -> Params:
    return {"w": True}

  def linear_grad(self, params: Params, k: jax.Array, dldy: jax.Array) -> Params:
    """``∇_W L = (dL/dy) kᵀ`` (eq. 8): ``k [d_in]``, ``dldy [d_out]`` -> ``[d_out, d_in]``."""
    return {"w": jnp.outer(dldy, k)}

  def key_input_cotangents(self, params: Params, x: jax.Array, dldy: jax.Array) -> Params:
    """``δ = dL/dy`` (see :meth:`Memory.key_input_cotangents`)."""
    return {"w": dldy}


@dataclasses.dataclass(frozen=True)
class MLPMemory:
  """Residual MLP memory ``y = skip(k) + W_L σ(... σ(W_1 k))`` (eq. 89 for ``layers=2``).

  Eq. 89 writes the two-layer case as ``(·) + W_1 σ(W_2 (·))``: ``params["layers"][0]`` is the
  paper's input-side ``W_2 [hidden, d_in]`` and ``params["layers"][-1]`` its output-side
  ``W_1 [d_out, hidden]``. With ``layers=1`` the memory is ``skip(k) + W k``.

  Attributes:
    d_in: key dimension.
    d_out: value dimension.
    hidden: width of the hidden layers.
    layers: number of weight matrices ``L >= 1``.
    activation: one of :data:`ACTIVATIONS`.
    residual: add the identity (``d_in == d_out``) or a learned skip projection
      ``params["skip"] [d_out, d_in]`` (``d_in != d_out``).
    init_scale: std of each weight is ``init_scale / sqrt(fan_in)``.
  """

  d_in: int
  d_out: int
  hidden: int
  layers: int = 2
  activation: str = "silu"
  residual: bool = True
  init_scale: float = 1.0

  def __post_init__(self):
    for name in ("d_in", "d_out", "hidden", "layers"):
      _check_positive(f"MLPMemory.{name}", getattr(self, name))
    if self.activation not in ACTIVATIONS:
      raise ValueError(
          f"MLPMemory.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")

  @property
  def _shapes(self) -> list[tuple[int, int]]:
    dims = [self.d_in] + [self.hidden] * (self.layers - 1) + [self.d_out]
    return [(dims[i + 1], dims[i]) for i in range(self.layers)]

  @property
  def _has_skip(self) -> bool:
    return self.residual and self.d_in != self.d_out

  def init(self, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    keys = jax.random.split(key, self.layers + 1)
    params = {"layers": tuple(
        _normal(kk, shape, self.init_scale, dtype) for kk, shape in zip(keys, self._shapes))}
    if self._has_skip:
      params["skip"] = _normal(keys[-1], (self.d_out, self.d_in), 1.0, dtype)
    return params

  def apply(self, params: Params, x: jax.Array) -> jax.Array:
    return self._forward(params, x)

  def _forward(self, params: Params, x: jax.Array, taps: dict | None = None) -> jax.Array:
    """The read-out with ``taps`` added to the outputs of the key-input weights (the first
    layer and the skip projection); their cotangents are :meth:`key_input_cotangents`."""
    add_tap = lambda z, name: z if taps is None else z + taps[name]
    act = ACTIVATIONS[self.activation]
    h = x
    for i, w in enumerate(params["layers"]):
      h = add_tap(h @ w.T, "first") if i == 0 else h @ w.T
      if i < self.layers - 1:
        h = act(h)
    if self._has_skip:
      return h + add_tap(x @ params["skip"].T, "skip")
    return h + x if self.residual else h

  def key_inputs(self) -> Params:
    mask = {"layers": tuple(i == 0 for i in range(self.layers))}
    if self._has_skip:
      mask["skip"] = True
    return mask

  def linear_grad(self, params: Params, k: jax.Array, dldy: jax.Array) -> None:
    return None

  def key_input_cotangents(self, params: Params, x: jax.Array, dldy: jax.Array) -> Params:
    """``δ`` of the first layer (pre-activation) and of the skip projection (see
    :meth:`Memory.key_input_cotangents`), as one VJP with respect to zero taps."""
    taps = {"first": jnp.zeros(x.shape[:-1] + (params["layers"][0].shape[0],), dldy.dtype)}
    if self._has_skip:
      taps["skip"] = jnp.zeros(dldy.shape, dldy.dtype)
    cot = jax.vjp(lambda t: self._forward(params, x, t), taps)[1](dldy)[0]
    out = {"layers": (cot["first"],) + (None,) * (self.layers - 1)}
    if self._has_skip:
      out["skip"] = cot["skip"]
    return out
