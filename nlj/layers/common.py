"""Building blocks shared by the mixers: norms, gated output, SwiGLU, causal short conv."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["RMSNorm", "GatedRMSNorm", "SwiGLU", "ShortConv", "l2_normalize", "dense"]


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """``x / ||x||`` over the last axis, safe (and differentiable) at zero."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def dense(d_in: int, d_out: int, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32,
          scale: float = 1.0) -> nnx.Linear:
  """Bias-free linear layer with ``N(0, scale² / d_in)`` weights."""
  init = nnx.initializers.variance_scaling(scale**2, "fan_in", "normal")
  return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale`` over the last axis, computed in at least float32."""

  def __init__(self, dim: int, eps: float = 1e-6, param_dtype: Any = jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale.get_value()).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
  """Output norm and gate of Titans §4.4 / Gated DeltaNet: ``RMSNorm(y) ⊙ silu(gate)``.

  ``y [..., heads, head_dim]`` is normalised per head; ``gate [..., heads * head_dim]``.
  """

  def __init__(self, head_dim: int, eps: float = 1e-6, param_dtype: Any = jnp.float32):
    self.norm = RMSNorm(head_dim, eps, param_dtype)

  def __call__(self, y: jax.Array, gate: jax.Array) -> jax.Array:
    out = self.norm(y).reshape(gate.shape)
    return out * jax.nn.silu(gate)


class SwiGLU(nnx.Module):
  """``W_down (silu(W_gate x) ⊙ W_up x)`` (Llama MLP)."""

  def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    self.gate = dense(dim, hidden, rngs, dtype, param_dtype)
    self.up = dense(dim, hidden, rngs, dtype, param_dtype)
    self.down = dense(hidden, dim, rngs, dtype, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class ShortConv(nnx.Module):
  """Causal depthwise convolution of width ``kernel`` with a streaming cache.

  The cache holds the last ``kernel - 1`` inputs ``[batch, kernel - 1, dim]`` (zeros at the
  start of a sequence), so pieces of any lengths give the one-call result.
  """

  def __init__(self, dim: int, kernel: int, rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
    if kernel < 1:
      raise ValueError(f"ShortConv.kernel must be >= 1, got {kernel}")
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=1)
    self.weight = nnx.Param(init(rngs.params(), (kernel, dim), param_dtype))
    self.kernel, self.dim = kernel, dim

  def init_cache(self, batch: int, dtype: Any = jnp.float32) -> jax.Array:
    return jnp.zeros((batch, self.kernel - 1, self.dim), dtype)

  def __call__(self, x: jax.Array, cache: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """``x [batch, seq, dim] -> (y [batch, seq, dim], cache)``."""
    if cache is None:
      cache = self.init_cache(x.shape[0], x.dtype)
    full = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    w = self.weight.get_value().astype(x.dtype)
    seq = x.shape[1]
    y = sum(full[:, i:i + seq] * w[i] for i in range(self.kernel))
    return y, full[:, full.shape[1] - (self.kernel - 1):]
