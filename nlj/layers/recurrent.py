"""Recurrent baselines as token mixers: linear attention, DeltaNet and Gated DeltaNet.

The three share one front end and one back end, and differ only in their memory rule
(``nlj.core.compositions``), i.e. in the level each head runs:

* projections ``q, k, v = x W_q, x W_k, x W_v``, each followed by a causal depthwise
  :class:`~nlj.layers.common.ShortConv` of width 4 and SiLU (Titans §4.4; DeltaNet);
* ``q`` and ``k`` L2-normalised per head (PAPER.md §3.7, Hope §8.3);
* one matrix memory per head, ``d_k = d_v = d_model / heads``, zero initial state, run by
  :meth:`nlj.core.Level.run` with ``impl=`` (reference, chunked or a kernel):

  ===================  =====================================================  ===========
  mixer                memory update (one head, one token)                    step / gate
  ===================  =====================================================  ===========
  ``LinearAttention``  ``M_t = M_{t-1} + v_t k_tᵀ`` (eq. 15)                  --
  ``DeltaNet``         ``M_t = M_{t-1} - β_t (M_{t-1} k_t - v_t) k_tᵀ``        ``β_t``
  ``GatedDeltaNet``    ``M_t = α_t M_{t-1} (I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ``  ``β_t, α_t``
  ===================  =====================================================  ===========

  with the read-out ``o_t = M_t q_t``. The writing strength is ``β_t = sigmoid(x_t W_β)`` per
  head (DeltaNet, Yang et al. 2024, arXiv 2406.06484), passed to the level as its step ``eta``.
  Gated DeltaNet's decay (Yang et al. 2025, arXiv 2412.06464, following Mamba-2) is
  ``α_t = exp(-exp(A_log) · softplus(x_t W_α + dt_bias))`` per head, in (0, 1): ``A = exp(A_log)``
  is initialised uniformly in [1, 16] and ``softplus(dt_bias)`` log-uniformly in [0.001, 0.1],
  so the initial decays spread over roughly [0.2, 0.999];
* output ``y = (GatedRMSNorm(o, x W_g)) W_o``: per-head RMSNorm of ``o`` times ``silu(x W_g)``.

Linear attention's feature map is the same SiLU-conv + L2 normalisation of ``q`` and ``k``
(an identity map on unit vectors) without the ``Σ φ(k)`` denominator: the per-head output
RMSNorm takes its place (TransNormer, Qin et al. 2022, arXiv 2210.10340), which keeps the three
mixers an ablation of the memory rule alone. Linear attention has no ``β``: every token is
written with unit strength.

The cache is ``{"conv": (q, k, v) conv tails [batch, 3, d_model], "memory": LevelState}``;
memory states and the per-token gates are float32 (float64 under float64 parameters or compute)
whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nlj.core import Level, LevelInputs, deltanet, gated_deltanet, linear_attention
from nlj.core.dispatch import IMPLS
from nlj.layers.common import GatedRMSNorm, ShortConv, dense, l2_normalize
from nlj.models.registry import register_family

if TYPE_CHECKING:
  from nlj.models.configs import ModelConfig

__all__ = ["LinearAttention", "DeltaNet", "GatedDeltaNet"]

Cache = dict[str, Any]


class _RecurrentMixer(nnx.Module):
  """Shared projections, convs, per-head matrix memory and gated output (module docstring).

  Subclasses set ``composition`` (an ``nlj.core.compositions`` factory) and override
  :meth:`scalars` to supply the per-token step and decay.
  """

  composition: Callable[..., Level]

  def __init__(self, d_model: int, heads: int, rngs: nnx.Rngs, *, chunk: int = 64,
               conv_width: int = 4, impl: str = "auto", dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    """Args:
      d_model: model width.
      heads: number of memory heads; must divide ``d_model``.
      rngs: parameter initialisation.
      chunk: chunk size of the chunk-parallel form (any value gives the same function).
      conv_width: width of the causal short convolutions.
      impl: ``"reference"``, ``"chunked"``, ``"pallas"`` or ``"auto"`` (see ``Level.run``).
      dtype: compute dtype of projections and convs (memory states stay float32).
      param_dtype: parameter dtype.
    """
    name = type(self).__name__
    if not isinstance(heads, int) or heads < 1 or d_model % heads:
      raise ValueError(f"{name}.heads must be a positive divisor of d_model={d_model}, "
                       f"got {heads!r}")
    if impl not in IMPLS:
      raise ValueError(f"{name}.impl must be one of {IMPLS}, got {impl!r}")
    self.d_model, self.heads, self.head_dim = d_model, heads, d_model // heads
    self.impl, self.dtype, self.param_dtype = impl, jnp.dtype(dtype), jnp.dtype(param_dtype)
    self.state_dtype = jnp.promote_types(jnp.promote_types(self.dtype, self.param_dtype),
                                         jnp.float32)
    self.level = type(self).composition(self.head_dim, self.head_dim, heads=heads, chunk=chunk)
    proj = lambda: dense(d_model, d_model, rngs, self.dtype, param_dtype)
    self.q_proj, self.k_proj, self.v_proj, self.g_proj = proj(), proj(), proj(), proj()
    conv = lambda: ShortConv(d_model, conv_width, rngs, param_dtype)
    self.q_conv, self.k_conv, self.v_conv = conv(), conv(), conv()
    self.out_norm = GatedRMSNorm(self.head_dim, param_dtype=param_dtype)
    self.out_proj = dense(d_model, d_model, rngs, self.dtype, param_dtype)

  def init_cache(self, batch: int, max_len: int | None = None) -> Cache:
    """A fresh sequence's cache; ``max_len`` is unused (the state has a fixed size)."""
    convs = tuple(c.init_cache(batch, self.dtype) for c in (self.q_conv, self.k_conv, self.v_conv))
    zeros = self.level.init(jax.random.key(0), self.state_dtype)  # init_scale 0: M_0 = 0
    memory = self.level.init_state(zeros, batch)
    return {"conv": convs, "memory": memory}

  def scalars(self, x: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
    """Per-token step and decay ``(η, α)``, each ``[batch, seq, heads]`` or None (constant 1)."""
    return None, None

  def __call__(self, x: jax.Array, cache: Cache | None = None) -> tuple[jax.Array, Cache]:
    """``x [batch, seq, d_model] -> (y [batch, seq, d_model], cache)``."""
    b, t, d = x.shape
    if d != self.d_model:
      raise ValueError(f"{type(self).__name__} expects x[..., {self.d_model}], got shape {x.shape}")
    aligned = cache is None and t % self.level.chunk == 0  # whole chunks from a fresh state
    if cache is None:
      cache = self.init_cache(b)
    x = x.astype(self.dtype)
    heads = lambda z: z.reshape(b, t, self.heads, self.head_dim)
    convs, tails = [], []
    for proj, conv, tail in zip((self.q_proj, self.k_proj, self.v_proj),
                                (self.q_conv, self.k_conv, self.v_conv), cache["conv"]):
      z, tail = conv(proj(x), tail)
      convs.append(heads(jax.nn.silu(z.astype(self.state_dtype))))
      tails.append(tail)
    q, k, v = convs
    eta, alpha = self.scalars(x)
    inputs = LevelInputs(l2_normalize(k), v, l2_normalize(q), eta=eta, alpha=alpha)
    memory, o = self.level.run(cache["memory"], inputs, impl=self.impl, aligned=aligned)
    y = self.out_norm(o, self.g_proj(x))
    return self.out_proj(y).astype(self.dtype), {"conv": tuple(tails), "memory": memory}


class LinearAttention(_RecurrentMixer):
  """Linear attention ``M_t = M_{t-1} + v_t k_tᵀ``, ``o_t = M_t q_t`` (eqs. 14-18)."""

  composition = staticmethod(linear_attention)


class DeltaNet(_RecurrentMixer):
  """DeltaNet: the delta rule with a per-head writing strength ``β_t = sigmoid(x_t W_β)``."""

  composition = staticmethod(deltanet)

  def __init__(self, d_model: int, heads: int, rngs: nnx.Rngs, **kwargs: Any):
    super().__init__(d_model, heads, rngs, **kwargs)
    self.beta_proj = dense(d_model, heads, rngs, self.dtype, self.param_dtype)

  def scalars(self, x: jax.Array) -> tuple[jax.Array, None]:
    """``β [batch, seq, heads]`` in (0, 1), no decay."""
    return jax.nn.sigmoid(self.beta_proj(x).astype(self.state_dtype)), None


class GatedDeltaNet(DeltaNet):
  """Gated DeltaNet: DeltaNet with the Mamba-2 style decay ``α_t`` of the module docstring."""

  composition = staticmethod(gated_deltanet)

  def __init__(self, d_model: int, heads: int, rngs: nnx.Rngs, **kwargs: Any):
    super().__init__(d_model, heads, rngs, **kwargs)
    self.alpha_proj = dense(d_model, heads, rngs, self.dtype, self.param_dtype)
    a = jax.random.uniform(rngs.params(), (heads,), jnp.float32, 1.0, 16.0)
    self.A_log = nnx.Param(jnp.log(a).astype(self.param_dtype))
    log_dt = jax.random.uniform(rngs.params(), (heads,), jnp.float32, math.log(1e-3),
                                math.log(1e-1))
    dt = jnp.exp(log_dt)
    self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(self.param_dtype))

  def decay(self, x: jax.Array) -> jax.Array:
    """``α = exp(-exp(A_log) softplus(x W_α + dt_bias)) [batch, seq, heads]`` in (0, 1)."""
    f = lambda z: z.astype(self.state_dtype)
    dt = jax.nn.softplus(f(self.alpha_proj(x)) + f(self.dt_bias[...]))
    return jnp.exp(-jnp.exp(f(self.A_log[...])) * dt)

  def scalars(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(β, α)``, each ``[batch, seq, heads]``."""
    return super().scalars(x)[0], self.decay(x)


def _factory(cls: type[_RecurrentMixer]) -> Callable[..., _RecurrentMixer]:
  """``make_mixer(config, layer, rngs)`` for the model registry."""

  def make_mixer(config: ModelConfig, layer: int, rngs: nnx.Rngs) -> _RecurrentMixer:
    return cls(config.d_model, config.heads, rngs, chunk=config.chunk,
               conv_width=config.conv_width, impl=config.impl, dtype=config.dtype,
               param_dtype=config.param_dtype)

  return make_mixer


register_family("linear_attention", _factory(LinearAttention))
register_family("deltanet", _factory(DeltaNet))
register_family("gated_deltanet", _factory(GatedDeltaNet))
