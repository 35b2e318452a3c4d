"""Self-modifying Titans (Hope §8.1-8.2, eqs. 83-93) as a streaming NNX mixer.

Per head (``d_h = d_model / heads``), six residual-MLP memories (eq. 89) -- for ``k``, ``v``,
``q`` (adaptive only with ``adaptive_q``), ``η``, ``α`` and the main ``memory`` -- read the
input and generate their own targets (eqs. 83-85, 90):

    k_t = l2(silu(conv(M_k(x_t))))      v_t = silu(conv(M_v(x_t)))      q_t = l2(silu(conv(x_t W_q)))
    η_t = softplus(M_η(x_t)) · s_η      α_t = sigmoid(M_α(x_t))         (one scalar per head)
    v̂_□,t = M_□(v_t)                    o_t = M_memory(q_t)
    M_□ <- M_□ (α_t I - η_t k_t k_tᵀ) - η_t ∇L(M_□; k_t, v̂_□,t)   with inner momentum   (eq. 88)

Chunk-wise semantics (eq. 90 with the causal reading of PAPER.md §8 item 2): every read, target
and gradient of a token uses the memory state at the previous boundary of that memory's chunk,
``chunk_memory`` tokens for ``M_memory`` and ``chunk_other`` tokens for the others (two
frequencies; ``chunk_other`` divides ``chunk_memory``). The projection memories never read the
main memory, so a call runs them first, over every sub-chunk (a scan over the main memory's
chunks, each checkpointed, of scans over their sub-chunks); there the learning
projection memories of one output width (``k``, ``v``, ``q``; ``η``, ``α``) run as one level with
their heads side by side, so a sub-chunk reads and steps each group once (the cache keeps them
by name). They are read only at their boundary, so each sub-chunk computes only their end state
(:func:`nlj.core.chunked.chunk_boundary_end`). The main memory then runs as the outer level of
:func:`nlj.core.run_nested` on their outputs, reading its own targets at each chunk's boundary
state (the same values as nesting the projection scans inside the main memory's chunks).

The main memory is read at its chunk boundary by default (eq. 90 literally, DESIGN.md §4);
``memory_read="before"`` reads ``M_{t-1}`` (eq. 94) and ``"after"`` reads ``M_t``, both with the
within-chunk per-token states (the dual form).

Switches (PAPER.md §8, Table 6): ``adaptive_q`` (default False: q is the one static projection,
§8 item 1), ``adaptive_k``/``adaptive_v`` (False: the memory keeps its meta-learned initial state,
i.e. a static projection), ``dgd`` (False: plain GD), ``momentum``, ``weight_decay`` (False:
α = 1), ``stop_grad_targets`` (§8 item 9; off by default: ``v_t`` reaches the output only
through the targets ``v̂``, so stopping their gradient would leave ``M_v`` and its conv without
any outer gradient). The DGD decay ``(α I - η k kᵀ)`` applies to each
memory's input-side weight (§8 item 6) with ``c = s = η`` as printed in eq. 88.

Speed/memory, same values: ``projection_checkpoint`` (``"chunk"``, default: the backward keeps
the projection memories' states once per ``chunk_memory`` chunk; ``"sub_chunk"``: once per
sub-chunk). On an H100 (BENCHMARKS.md, ninth session) the layer's forward+backward took 209 /
313 ms with ``"chunk"`` and 152 / 231 ms with ``"sub_chunk"`` at the ``small`` / ``760m``
presets (8×2048 / 4×2048 tokens), with 1.6 / 3.4 GB and 4.1 / 8.9 GB of temporaries.

Streaming: the cache holds every memory's :class:`nlj.core.LevelState`, the conv tails and the
position inside the current ``chunk_memory`` chunk (static, so a call splits into a token-level
head, whole chunks and a token-level tail); one call equals pieces of any lengths.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nlj.core import L2, Level, LevelInputs, LevelState, MLPMemory, Rule, run_nested
from nlj.layers.common import GatedRMSNorm, ShortConv, dense, l2_normalize

__all__ = ["SelfModConfig", "SelfModCache", "SelfModifyingTitans", "CHECKPOINTS"]

CHECKPOINTS = ("chunk", "sub_chunk")


@dataclasses.dataclass(frozen=True)
class SelfModConfig:
  """Hyperparameters of a self-modifying Titans mixer (defaults: PAPER.md §5.4, §7, §8)."""

  d_model: int
  heads: int
  chunk_memory: int = 64
  chunk_other: int = 16
  hidden_mult: float = 2.0
  activation: str = "silu"
  conv: int = 4
  adaptive_q: bool = False
  adaptive_k: bool = True
  adaptive_v: bool = True
  dgd: bool = True
  momentum: bool = True
  beta: float = 0.9
  weight_decay: bool = True
  eta_scale: float = 1e-3
  stop_grad_targets: bool = False
  memory_read: str = "boundary"
  projection_checkpoint: str = "chunk"
  impl: str = "auto"

  def __post_init__(self):
    if self.d_model % self.heads:
      raise ValueError(f"SelfModConfig.heads={self.heads} must divide d_model={self.d_model}")
    for name in ("chunk_memory", "chunk_other", "conv"):
      if getattr(self, name) < 1:
        raise ValueError(f"SelfModConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.chunk_memory % self.chunk_other:
      raise ValueError(f"SelfModConfig.chunk_other={self.chunk_other} must divide "
                       f"chunk_memory={self.chunk_memory} (levels nest by frequency)")
    if self.memory_read not in ("boundary", "before", "after"):
      raise ValueError("SelfModConfig.memory_read must be 'boundary', 'before' or 'after', "
                       f"got {self.memory_read!r}")
    if self.projection_checkpoint not in CHECKPOINTS:
      raise ValueError(f"SelfModConfig.projection_checkpoint must be one of {CHECKPOINTS}, "
                       f"got {self.projection_checkpoint!r}")
    if self.eta_scale <= 0:
      raise ValueError(f"SelfModConfig.eta_scale must be > 0, got {self.eta_scale}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.heads


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SelfModCache:
  """Carried state: ``levels`` (name -> LevelState), ``conv`` (name -> tail), static ``phase``."""

  levels: dict
  conv: dict
  phase: int = dataclasses.field(metadata={"static": True})


class SelfModifyingTitans(nnx.Module):
  """The self-modifying Titans token mixer (see the module docstring)."""

  def __init__(self, config: SelfModConfig, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    c = self.config = config
    dh, hidden = c.head_dim, max(1, int(round(c.hidden_mult * c.head_dim)))
    rule = Rule("dgd" if c.dgd else "gd", momentum=c.momentum, dgd_variant="plain")
    # The projection memories step one sub-chunk at a time in scans checkpointed per main-memory
    # chunk (SelfModifyingTitans._chunks): a checkpoint of their own would only recompute.
    make = lambda d_out, chunk, read="boundary", remat=False: Level(
        MLPMemory(dh, d_out, hidden, 2, c.activation), L2(), rule, chunk, "boundary", read,
        c.heads, beta=c.beta, remat=remat)
    levels = {"k": make(dh, c.chunk_other), "v": make(dh, c.chunk_other),
              "eta": make(1, c.chunk_other), "alpha": make(1, c.chunk_other),
              "memory": make(dh, c.chunk_memory, c.memory_read, remat=True)}
    if c.adaptive_q:
      levels["q"] = make(dh, c.chunk_other)
    adaptive = {"k": c.adaptive_k, "v": c.adaptive_v, "q": True, "eta": True,
                "alpha": c.weight_decay, "memory": True}
    # Static structure as tuples: NNX graph definitions must hash.
    self._levels = tuple(levels.items())
    self._learning = tuple(n for n in levels if adaptive[n] and n != "memory") + ("memory",)
    # Learning projection memories of one output width run as one level over their heads side
    # by side (k, v and q; η and α), so a sub-chunk reads and steps each group once.
    by_width: dict[int, list[str]] = {}
    for n in self._learning[:-1]:
      by_width.setdefault(levels[n].memory.d_out, []).append(n)
    self._groups = tuple((tuple(names), dataclasses.replace(levels[names[0]],
                                                            heads=c.heads * len(names)))
                         for names in by_width.values())
    self.init_params = nnx.Dict({name: nnx.Param(lv.init(rngs.params(), param_dtype))
                                 for name, lv in self._levels})
    if not c.adaptive_q:
      self.w_q = dense(c.d_model, c.d_model, rngs, dtype, param_dtype)
    self.convs = nnx.Dict({n: ShortConv(c.d_model, c.conv, rngs, param_dtype) for n in "qkv"})
    self.w_gate = dense(c.d_model, c.d_model, rngs, dtype, param_dtype)
    self.out_norm = GatedRMSNorm(dh, param_dtype=param_dtype)
    self.w_out = dense(c.d_model, c.d_model, rngs, dtype, param_dtype)
    self.dtype = dtype
    # the short convs and their caches run in the memory states' dtype (Level.init_state): at
    # least float32, float64 with float64 parameters
    self.state_dtype = jnp.promote_types(param_dtype, jnp.float32)

  # --------------------------------------------------------------------------------- cache

  @property
  def levels(self) -> dict[str, Level]:
    """Every memory's :class:`Level` by name."""
    return dict(self._levels)

  @property
  def groups(self) -> dict[tuple[str, ...], Level]:
    """The levels the learning projection memories run as: names -> one level over their heads
    side by side."""
    return dict(self._groups)

  def init_cache(self, batch: int, max_len: int | None = None) -> SelfModCache:
    levels = {n: self.levels[n].init_state(self.init_params[n].get_value(), batch)
              for n in self._learning}
    conv = {n: self.convs[n].init_cache(batch, self.state_dtype) for n in "qkv"}
    return SelfModCache(levels, conv, 0)

  # ---------------------------------------------------------------------------- the pieces

  def _read(self, level: Level, params: Any, z: jax.Array) -> jax.Array:
    return level.apply(params, z.astype(jax.tree.leaves(params)[0].dtype))

  def _reads(self, levels: dict, names: tuple[str, ...], z: jax.Array) -> dict:
    """``{name: M_name(z)}`` for ``z [B, T, H, d_h]``, each memory at its boundary (anchor)
    state, or its static initial state when it does not learn. ``levels`` maps names, or group
    names (tuples, :meth:`_grouped`), to states; a group is read in one call over its heads."""
    out = {}
    for key, state in levels.items():
      members = key if isinstance(key, tuple) else (key,)
      if not set(members) & set(names):
        continue
      level = self._group_level(key)
      zz = jnp.concatenate([z] * len(members), axis=2) if len(members) > 1 else z
      out.update(zip(members, jnp.split(self._read(level, state.anchor, zz), len(members), 2)))
    for name in names:
      if name not in out:
        params = jax.tree.map(lambda p: jnp.broadcast_to(p[None], (z.shape[0],) + p.shape),
                              self.init_params[name].get_value())
        out[name] = self._read(self.levels[name], params, z)
    return out

  def _group_level(self, key) -> Level:
    if isinstance(key, tuple):
      return dict(self._groups)[key]
    return self.levels[key]

  def _grouped(self, levels: dict) -> dict:
    """Per-name projection-memory states -> per-group states (heads side by side)."""
    cat = lambda *xs: jnp.concatenate(xs, axis=1)
    return {names: LevelState(*(jax.tree.map(cat, *(getattr(levels[n], f) for n in names))
                                for f in ("memory", "momentum", "anchor")),
                              levels[names[0]].phase)
            for names, _ in self._groups}

  def _ungrouped(self, groups: dict) -> dict:
    """Inverse of :meth:`_grouped`."""
    out = {}
    for names, state in groups.items():
      for i, name in enumerate(names):
        part = lambda x, i=i, n=len(names): jnp.split(x, n, axis=1)[i]
        out[name] = LevelState(*(jax.tree.map(part, getattr(state, f))
                                 for f in ("memory", "momentum", "anchor")), state.phase)
    return out

  def _project(self, levels: dict, conv: dict, x: jax.Array):
    """Keys, values, queries, η, α and all targets of a span read at the boundary states.

    Args:
      levels: name (or group, :meth:`_grouped`) -> LevelState; anchors are the boundary states.
      conv: name -> conv tail.
      x: ``[B, T, d_model]`` (normalised block input).

    Returns:
      ``(conv, k, v, q, eta, alpha, targets)``; ``k, v, q [B, T, H, d_h]``,
      ``eta, alpha [B, T, H]``, ``targets`` name -> ``v̂ [B, T, H, d_out]``.
    """
    c = self.config
    b, t, _ = x.shape
    heads = lambda z: z.reshape(b, t, c.heads, c.head_dim)
    flat = lambda z: z.reshape(b, t, c.d_model)
    xh = heads(x)  # each read casts to its memory's dtype
    names = ("q",) * c.adaptive_q + ("k", "v", "eta") + ("alpha",) * c.weight_decay
    read = self._reads(levels, names, xh)
    raw = {"q": flat(read["q"]) if c.adaptive_q else self.w_q(x),
           "k": flat(read["k"]), "v": flat(read["v"])}
    out = {}
    for n in "qkv":
      y, conv[n] = self.convs[n](raw[n].astype(self.state_dtype), conv[n])
      out[n] = heads(jax.nn.silu(y))
    k, q, v = l2_normalize(out["k"]), l2_normalize(out["q"]), out["v"]
    eta = jax.nn.softplus(read["eta"][..., 0]) * c.eta_scale
    alpha = jax.nn.sigmoid(read["alpha"][..., 0]) if c.weight_decay else None
    sg = jax.lax.stop_gradient if c.stop_grad_targets else (lambda z: z)
    learning = [n for key in levels for n in (key if isinstance(key, tuple) else (key,))]
    targets = {n: sg(t) for n, t in self._reads(levels, tuple(learning), v).items()}
    return conv, k, v, q, eta, alpha, targets

  def _output(self, o: jax.Array, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    y = self.out_norm(o.astype(x.dtype), self.w_gate(x))
    return self.w_out(y.reshape(b, t, self.config.d_model))

  # ------------------------------------------------------------------------------- paths

  def _tokens(self, cache: SelfModCache, x: jax.Array, impl: str = "reference"):
    """Token by token (the eq. 90 reference; also partial chunks of a streaming call)."""
    if x.shape[1] == 0:
      return cache, jnp.zeros(x.shape[:2] + (self.config.heads, self.config.head_dim))

    def step(carry, xt):
      levels, conv = carry
      conv, k, _, q, eta, alpha, targets = self._project(levels, conv, xt[:, None])
      new, o = {}, None
      for n in levels:
        read_q = q if n == "memory" else None
        new[n], y = self.levels[n].run(levels[n], LevelInputs(k, targets[n], read_q, eta, alpha),
                                       impl=impl)
        o = y if n == "memory" else o
      return (new, conv), o[:, 0]

    (levels, conv), o = jax.lax.scan(step, (cache.levels, cache.conv), jnp.swapaxes(x, 0, 1))
    return SelfModCache(levels, conv, cache.phase), jnp.swapaxes(o, 0, 1)

  def _chunks(self, cache: SelfModCache, x: jax.Array):
    """Whole ``chunk_memory`` chunks in two passes. The projection memories never read the main
    memory, so they first run over every ``chunk_other`` sub-chunk, checkpointed per
    ``chunk_memory`` chunk (the backward keeps one carry per chunk) or, with
    ``projection_checkpoint="sub_chunk"``, per sub-chunk in one flat scan (one carry per
    sub-chunk: more memory, fewer loop-buffer copies on a GPU); the main memory then runs as
    the outer level of :func:`nlj.core.run_nested`, whose inner step reads its targets
    ``v̂ = M_memory(v)`` at the chunk's frozen boundary state."""
    c = self.config
    if x.shape[1] == 0:
      return cache, jnp.zeros(x.shape[:2] + (c.heads, c.head_dim))
    b, t, _ = x.shape
    per = c.chunk_memory // c.chunk_other

    start = self._grouped(cache.levels)
    # At a sub-chunk boundary each projection memory's anchor is its memory, so the scans carry
    # one copy (XLA copies a loop carry that holds the same array twice, at every step).
    at_boundary = lambda weights: {names: LevelState(m, mom, m, start[names].phase)
                                   for names, (m, mom) in weights.items()}
    weights_of = lambda groups: {names: (st.memory, st.momentum) for names, st in groups.items()}

    def sub_step(carry, xs):
      weights, conv = carry
      groups = at_boundary(weights)
      conv, k, v, q, eta, alpha, targets = self._project(groups, conv, xs)
      new = {}
      for names, level in self._groups:
        tile = lambda z: None if z is None else jnp.concatenate([z] * len(names), axis=2)
        inputs = LevelInputs(tile(k), jnp.concatenate([targets[n] for n in names], axis=2),
                             None, tile(eta), tile(alpha))
        new[names] = level.step(groups[names], inputs, impl=c.impl)[0]
      return (weights_of(new), conv), (q, k, v, eta, alpha)

    carry = (weights_of(start), cache.conv)
    if c.projection_checkpoint == "sub_chunk":
      sub = jnp.swapaxes(x.reshape(b, t // c.chunk_other, c.chunk_other, -1), 0, 1)
      (weights, conv), projected = jax.lax.scan(jax.checkpoint(sub_step), carry, sub)
      projected = jax.tree.map(lambda z: z.reshape((-1, per) + z.shape[1:]), projected)
    else:
      chunk_step = jax.checkpoint(lambda carry, xs: jax.lax.scan(sub_step, carry, xs))
      sub = x.reshape(b, t // c.chunk_memory, per, c.chunk_other, -1).transpose(1, 2, 0, 3, 4)
      (weights, conv), projected = jax.lax.scan(chunk_step, carry, sub)
    merge = lambda z: None if z is None else jnp.moveaxis(z, 2, 0).reshape((b, t) + z.shape[4:])
    q, k, v, eta, alpha = (merge(z) for z in projected)
    sg = jax.lax.stop_gradient if c.stop_grad_targets else (lambda z: z)

    def inner(memory, carry, chunk):
      q, k, v, eta, alpha = chunk
      v_hat = sg(self._read(self.levels["memory"], memory, v))
      return carry, None, LevelInputs(k, v_hat, q, eta, alpha)

    (memory_state, _), (_, o) = run_nested(self.levels["memory"], cache.levels["memory"],
                                           inner, (), (q, k, v, eta, alpha), impl=c.impl)
    groups = self._ungrouped(at_boundary(weights))
    return SelfModCache(dict(groups, memory=memory_state), conv, cache.phase), o

  def __call__(self, x: jax.Array, cache: SelfModCache | None = None,
               reference: bool = False) -> tuple[jax.Array, SelfModCache]:
    """``x [batch, seq, d_model] -> (y [batch, seq, d_model], cache)``.

    ``reference=True`` runs every token through the token-by-token path (the oracle).
    """
    c = self.config
    if cache is None:
      cache = self.init_cache(x.shape[0])
    t = x.shape[1]
    head = t if reference else min(t, (c.chunk_memory - cache.phase) % c.chunk_memory)
    body = (t - head) // c.chunk_memory * c.chunk_memory
    impl = "reference" if reference else c.impl
    cache, o_head = self._tokens(cache, x[:, :head], impl)
    cache, o_body = self._chunks(cache, x[:, head:head + body])
    cache, o_tail = self._tokens(cache, x[:, head + body:], impl)
    o = jnp.concatenate([o_head, o_body, o_tail], axis=1)
    new_cache = SelfModCache(cache.levels, cache.conv, (cache.phase + t) % c.chunk_memory)
    return self._output(o, x), new_cache

