"""Continuum Memory System (Hope §7.1, eqs. 70-74) as a streaming NNX module.

A chain of MLP levels ``MLP^(1) .. MLP^(k)`` with chunk sizes ``C^(ℓ)``: level ℓ's parameters are
frozen inside each of its chunks (all tokens of a chunk run in parallel with the same weights)
and take one in-context step at the end of the chunk with the accumulated error of its tokens
(eq. 71, ``C`` terms, PAPER.md §8 item 13)::

    θ^(ℓ) <- θ^(ℓ) - η^(ℓ) Σ_{t in chunk} ∇_θ ℓ^(ℓ)(θ^(ℓ); t),    η^(ℓ) = lr^(ℓ) / C^(ℓ)

(per-token rates ``lr / C``: ``lr`` is the step on the chunk's mean error, so one learning rate
is stable for chunks of 16 and of 2048 tokens alike)

Each level is a :class:`nlj.core.Level` over a 2-layer MLP memory (``read="boundary"``, GD,
``heads=1``), so chunking, streaming with partial chunks and gradients through the updates
come from the core. The error signal ``ℓ^(ℓ)`` (``signal``):

* ``"local"`` -- a cheap associative objective per level: the level learns to map its input at
  ``t - 1`` to its input at ``t`` (``½||MLP(z_{t-1}) - z_t||²``, both already seen, so causal).
  Cost: one extra forward/VJP of the level per token, no extra model pass.
* ``"ntp"`` -- the faithful signal of eq. 71: the next-token loss of the chunk just seen,
  differentiated through the whole model (PAPER.md §8 item 11a). The module only reads; the
  model-level driver :func:`nlj.models.ntp.forward_with_ntp_updates` runs the sequence chunk by
  chunk, takes the gradient of each chunk's loss w.r.t. every level's output (the teach signal
  ``δ_t``) and writes ``θ <- θ - η Σ_t VJP(δ_t)`` (a dot-product objective with target
  ``-δ``). Cost: one extra backward of the model per smallest CMS chunk, and second-order terms
  in the outer gradient.

Variants (``variant``): ``"sequential"`` (eq. 73: ``y = MLP^(k)(..MLP^(1)(x))``, the form inside
Hope), ``"nested"`` (eq. 72: like sequential, and each level is re-initialised to its
meta-learned initial state every time the next slower level's chunk ends), ``"independent"``
(eq. 74: levels read the same input, aggregated by a learned softmax-weighted sum).
Levels after the first add their input back (``residual_levels``), so a one-level CMS is exactly
an MLP; with ``lr = 0`` (or a chunk longer than any sequence) CMS is a plain MLP stack.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nlj.core import DotProduct, L2, Level, LevelInputs, LevelState, MLPMemory, Rule

__all__ = ["CMSConfig", "CMSCache", "ContinuumMemory"]

VARIANTS = ("sequential", "nested", "independent")
SIGNALS = ("local", "ntp")


@dataclasses.dataclass(frozen=True)
class CMSConfig:
  """CMS hyperparameters; ``chunks[i]`` and ``lrs[i]`` belong to the i-th level applied."""

  d_model: int
  chunks: tuple[int, ...] = (16, 256, 2048)
  lrs: tuple[float, ...] = (1e-3, 1e-3, 1e-3)
  hidden_mult: float = 4.0
  activation: str = "gelu"
  variant: str = "sequential"
  signal: str = "local"
  residual_levels: bool = True

  def __post_init__(self):
    if not self.chunks:
      raise ValueError("CMSConfig.chunks must name at least one level")
    if len(self.lrs) != len(self.chunks):
      raise ValueError(f"CMSConfig.lrs has {len(self.lrs)} entries but chunks has "
                       f"{len(self.chunks)}; give one learning rate per level")
    if any(c < 1 for c in self.chunks):
      raise ValueError(f"CMSConfig.chunks must be positive, got {self.chunks}")
    if any(lr < 0 for lr in self.lrs):
      raise ValueError(f"CMSConfig.lrs must be >= 0, got {self.lrs}")
    ordered = sorted(set(self.chunks))
    for small, big in zip(ordered[:-1], ordered[1:]):
      if big % small:
        raise ValueError(f"CMSConfig.chunks must nest (each divides the next larger): {small} "
                         f"does not divide {big} in {self.chunks}")
    if self.variant not in VARIANTS:
      raise ValueError(f"CMSConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
    if self.signal not in SIGNALS:
      raise ValueError(f"CMSConfig.signal must be one of {SIGNALS}, got {self.signal!r}")

  @property
  def reset_cycle(self) -> int:
    """Period of the nested variant's restarts (1 for the other variants: nothing to track)."""
    return max(self.chunks) if self.variant == "nested" else 1

  def reset_period(self, i: int) -> int | None:
    """Nested variant: level i restarts every chunk of its next slower level (None: never)."""
    slower = [c for c in self.chunks if c > self.chunks[i]]
    return min(slower) if self.variant == "nested" and slower else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CMSCache:
  """Carried state of a CMS.

  Attributes:
    levels: one :class:`LevelState` per level (fast weights ``[batch, 1, ...]``, anchors).
    prev: each level's last input ``[batch, d_model]`` (the key of the next local pair).
    inputs: ``"ntp"`` only -- each level's inputs of the last call ``[batch, seq, d_model]``.
    probes: ``"ntp"`` only -- additive probes on each level's output (the driver's handle on
      the teach signal), or None.
    pos: tokens seen modulo :attr:`CMSConfig.reset_cycle` (static; always 0 unless nested).
  """

  levels: tuple
  prev: tuple
  inputs: tuple | None
  probes: tuple | None
  pos: int = dataclasses.field(metadata={"static": True})


class ContinuumMemory(nnx.Module):
  """The CMS MLP chain (see the module docstring): ``x [B, T, d] -> y [B, T, d]``."""

  def __init__(self, config: CMSConfig, rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
    c = self.config = config
    hidden = max(1, int(round(c.hidden_mult * c.d_model)))
    objective = L2() if c.signal == "local" else DotProduct()
    self.levels = tuple(
        Level(MLPMemory(c.d_model, c.d_model, hidden, 2, c.activation,
                        residual=c.residual_levels and i > 0 and c.variant != "independent"),
              objective, Rule("gd"), chunk, "boundary", "boundary", 1, eta=lr / chunk)
        for i, (chunk, lr) in enumerate(zip(c.chunks, c.lrs)))
    self.init_params = nnx.List([nnx.Param(lv.init(rngs.params(), param_dtype))
                                 for lv in self.levels])
    if c.variant == "independent":
      self.mix_logits = nnx.Param(jnp.zeros((len(c.chunks),), param_dtype))

  def init_cache(self, batch: int, max_len: int | None = None) -> CMSCache:
    levels = tuple(lv.init_state(p.get_value(), batch) for lv, p in zip(self.levels,
                                                                         self.init_params))
    dtype = jax.tree.leaves(levels)[0].dtype
    prev = tuple(jnp.zeros((batch, self.config.d_model), dtype) for _ in self.levels)
    return CMSCache(levels, prev, None, None, 0)

  def load_mlp(self, index: int, w_in: jax.Array, w_out: jax.Array) -> None:
    """Initialise level ``index`` from pre-trained MLP weights (§7.3).

    Args:
      index: level position.
      w_in: ``[hidden, d_model]`` input-side weight.
      w_out: ``[d_model, hidden]`` output-side weight.
    """
    current = self.init_params[index].get_value()
    shapes = tuple(w.shape[1:] for w in current["layers"])
    if (w_in.shape, w_out.shape) != shapes:
      raise ValueError(f"load_mlp({index}): expected w_in {shapes[0]} and w_out {shapes[1]}, "
                       f"got {w_in.shape} and {w_out.shape}")
    layers = (w_in[None].astype(current["layers"][0].dtype),
              w_out[None].astype(current["layers"][1].dtype))
    self.init_params[index].set_value(dict(current, layers=layers))

  # ----------------------------------------------------------------------------------- run

  def _run_level(self, i: int, state: LevelState, prev: jax.Array, z: jax.Array, pos: int,
                 fresh: bool) -> tuple[LevelState, jax.Array, jax.Array]:
    """Level i over ``z [B, T, d]``: read at the boundary state, and (local) learn; ``fresh``:
    ``state`` is the level's initial state (phase 0)."""
    level, c = self.levels[i], self.config
    zh = z[:, :, None]
    if c.signal == "ntp":
      return state, level.apply(state.anchor, zh)[:, :, 0], z[:, -1]
    keys = jnp.concatenate([prev[:, None, None], zh[:, :-1]], axis=1)
    period, t = c.reset_period(i), z.shape[1]
    cuts = [0] + ([s for s in range(1, t) if (pos + s) % period == 0] if period else []) + [t]
    ys = []
    for start, stop in zip(cuts[:-1], cuts[1:]):
      if start > 0 or (period and pos % period == 0):  # a no-op at position 0
        state, fresh = self._reset(i, z.shape[0]), True
      if fresh:  # a static phase 0: exactly the chunks the tokens fill, no padding chunk
        state = state._replace(phase=0)
      inputs = LevelInputs(keys[:, start:stop], zh[:, start:stop], zh[:, start:stop])
      state, y = level.run(state, inputs, aligned=fresh and (stop - start) % level.chunk == 0)
      ys.append(y)
    return state, jnp.concatenate(ys, axis=1)[:, :, 0], z[:, -1]

  def _reset(self, i: int, batch: int) -> LevelState:
    return self.levels[i].init_state(self.init_params[i].get_value(), batch)

  def __call__(self, x: jax.Array, cache: CMSCache | None = None
               ) -> tuple[jax.Array, CMSCache]:
    """``x [batch, seq, d_model] -> (y [batch, seq, d_model], cache)``."""
    c = self.config
    fresh = cache is None
    if fresh:
      cache = self.init_cache(x.shape[0])
    levels, prevs, inputs, outs = [], [], [], []
    z = x
    for i in range(len(self.levels)):
      level_in = x if c.variant == "independent" else z
      state, y, prev = self._run_level(i, cache.levels[i], cache.prev[i], level_in, cache.pos,
                                       fresh)
      if cache.probes is not None:
        y = y + cache.probes[i]
      levels.append(state)
      prevs.append(prev)
      inputs.append(level_in)
      outs.append(y)
      z = y.astype(x.dtype)
    if c.variant == "independent":
      weights = jax.nn.softmax(self.mix_logits.get_value())
      z = sum(w * o for w, o in zip(weights, outs)).astype(x.dtype)
    new = CMSCache(tuple(levels), tuple(prevs), tuple(inputs) if c.signal == "ntp" else None,
                   None, (cache.pos + x.shape[1]) % c.reset_cycle)
    return z, new

  def write(self, cache: CMSCache, deltas: tuple[jax.Array, ...]) -> CMSCache:
    """``"ntp"``: write teach signals ``δ [B, T, d]`` (one per level) for the last call's inputs.

    ``θ^(ℓ) <- θ^(ℓ) - η^(ℓ) Σ_t ∇_θ <MLP(z_t), δ_t>`` at each level's chunk boundaries; in the
    nested variant a level restarts when its reset period ends with the span, and a span may not
    cross a reset boundary inside it.
    """
    c = self.config
    if c.signal != "ntp" or cache.inputs is None:
      raise ValueError("ContinuumMemory.write needs signal='ntp' and a cache from a forward call")
    levels = []
    for i, (level, state, z, delta) in enumerate(zip(self.levels, cache.levels, cache.inputs,
                                                      deltas)):
      state = level.run(state, LevelInputs(z[:, :, None], -delta[:, :, None]))[0]
      period, t = c.reset_period(i), z.shape[1]
      if period:
        start = (cache.pos - t) % c.reset_cycle
        if any((start + s) % period == 0 for s in range(1, t)):
          raise ValueError(f"ContinuumMemory.write: a span of {t} tokens from position {start} "
                           f"crosses level {i}'s reset period {period}; write per smallest chunk")
        if cache.pos % period == 0:
          state = self._reset(i, z.shape[0])
      levels.append(state)
    return dataclasses.replace(cache, levels=tuple(levels), inputs=None)
