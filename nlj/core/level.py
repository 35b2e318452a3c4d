"""A level: memory + objective + rule + chunk size, run over a sequence.

A level is the NL unit of Definition 3: a memory trained in context by its own gradient steps
on its own objective, once per token, with gradients taken at an *anchor* state fixed for a
whole chunk of ``chunk`` tokens:

* ``semantics="boundary"`` -- mini-batch GD (Titans/TTT, Hope eq. 90): every gradient of a chunk
  is taken at the state of the previous chunk boundary (PAPER.md §8 item 2), so the gradients of
  a chunk are computed in parallel and the within-chunk recurrences are linear.
* ``semantics="exact"`` -- online GD: token ``t``'s gradient is taken at ``M_{t-1}``
  (DeltaNet, Gated DeltaNet); the chunk only shapes the computation (WY/UT form).

Read-outs ``y_t = M(q_t)`` use ``read="after"`` (``M_t``, linear attention and DeltaNet),
``"before"`` (``M_{t-1}``, Hope eq. 83) or ``"boundary"`` (the anchor, eq. 90 literally).

Per-token scalars ``η`` (step), ``α`` (retention) and ``β`` (momentum) are data dependent
(``[batch, seq, heads]``) or default to the level's constants. Memory states have a batch axis
(one fast state per sequence) and are kept in at least float32.

Sequence lengths need not be multiples of ``chunk``: the state carries the anchor and the
position inside the current chunk (``phase``), so running a sequence in one call equals running
it in pieces of any lengths with the carried state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nlj.core.memories import Memory
from nlj.core.objectives import L2, Objective
from nlj.core.rules import Rule

__all__ = ["Level", "LevelInputs", "LevelState"]

SEMANTICS = ("boundary", "exact")
READS = ("after", "before", "boundary")


class LevelInputs(NamedTuple):
  """The context flow of a level.

  Attributes:
    k: keys ``[batch, seq, heads, d_in]``.
    v: targets ``[batch, seq, heads, d_out]``.
    q: queries ``[batch, seq, heads, d_in]``, or None for a level that is only written.
    eta: steps ``[batch, seq, heads]`` or None (the level's ``eta``).
    alpha: retention gates ``[batch, seq, heads]`` in [0, 1], or None (the level's ``alpha``).
    beta: momentum factors ``[batch, seq, heads]``, or None (the level's ``beta``).
  """

  k: jax.Array
  v: jax.Array
  q: jax.Array | None = None
  eta: jax.Array | None = None
  alpha: jax.Array | None = None
  beta: jax.Array | None = None


class LevelState(NamedTuple):
  """Fast state of a level; every array has a leading ``[batch, heads]``.

  Attributes:
    memory: current memory parameters ``M_t``.
    momentum: momentum ``S_t`` shaped like ``memory``, or None without momentum.
    anchor: the state at the last chunk boundary (where gradients are taken).
    phase: int32 scalar, tokens seen since the last chunk boundary (``0 <= phase < chunk``).
  """

  memory: Any
  momentum: Any
  anchor: Any
  phase: jax.Array


@dataclasses.dataclass(frozen=True)
class Level:
  """Memory + objective + rule + chunk (see the module docstring).

  Attributes:
    memory: per-head memory architecture.
    objective: internal objective.
    rule: inner optimizer.
    chunk: update period in tokens: gradients are anchored at every ``chunk``-th state.
    semantics: ``"boundary"`` or ``"exact"``.
    read: ``"after"``, ``"before"`` or ``"boundary"``.
    heads: number of independent per-head memories.
    eta, alpha, beta: defaults of the per-token scalars.
    remat: ``jax.checkpoint`` each chunk (bounds activation memory of the outer backward).
  """

  memory: Memory
  objective: Objective = L2()
  rule: Rule = Rule()
  chunk: int = 1
  semantics: str = "boundary"
  read: str = "after"
  heads: int = 1
  eta: float = 1.0
  alpha: float = 1.0
  beta: float = 0.9
  remat: bool = True

  def __post_init__(self):
    if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 1:
      raise ValueError(f"Level.chunk must be a positive int, got {self.chunk!r}")
    if self.semantics not in SEMANTICS:
      raise ValueError(f"Level.semantics must be one of {SEMANTICS}, got {self.semantics!r}")
    if self.read not in READS:
      raise ValueError(f"Level.read must be one of {READS}, got {self.read!r}")
    if not isinstance(self.heads, int) or self.heads < 1:
      raise ValueError(f"Level.heads must be a positive int, got {self.heads!r}")
    if self.rule.grad_at_retained and self.semantics != "exact":
      raise ValueError("Rule.grad_at_retained needs Level.semantics='exact' (the gradient point "
                       "of a 'boundary' level is its anchor)")
    for name in ("loss", "output_grad"):
      if not callable(getattr(self.objective, name, None)):
        raise ValueError(f"Level.objective must define {name}(y, v); got {self.objective!r}")

  # ----------------------------------------------------------------------------- states

  def init(self, key: jax.Array, dtype: Any = jnp.float32) -> Any:
    """Meta-learned initial memory parameters, one memory per head (leading ``[heads]``)."""
    return jax.vmap(lambda kk: self.memory.init(kk, dtype))(jax.random.split(key, self.heads))

  def init_state(self, params: Any, batch: int) -> LevelState:
    """The state at position 0: ``params [heads, ...]`` broadcast to ``[batch, heads, ...]``.

    States are kept in float32 (float64 stays float64); gradients flow back into ``params``.
    """
    if not isinstance(batch, int) or batch < 1:
      raise ValueError(f"batch must be a positive int, got {batch!r}")
    for leaf in jax.tree.leaves(params):
      if leaf.shape[0] != self.heads:
        raise ValueError(f"params leaves need a leading heads axis of {self.heads}, got {leaf.shape}")

    def expand(p):
      p = p.astype(jnp.promote_types(p.dtype, jnp.float32))
      return jnp.broadcast_to(p[None], (batch,) + p.shape)

    memory = jax.tree.map(expand, params)
    momentum = jax.tree.map(jnp.zeros_like, memory) if self.rule.momentum else None
    return LevelState(memory, momentum, memory, jnp.zeros((), jnp.int32))

  # ---------------------------------------------------------------------------- running

  def run(self, state: LevelState, inputs: LevelInputs, impl: str = "auto",
          aligned: bool = False) -> tuple[LevelState, jax.Array | None]:
    """Run the level over ``inputs`` from ``state``.

    Args:
      state: from :meth:`init_state` or a previous call.
      inputs: keys, targets, queries and per-token scalars (``[batch, seq, heads, ...]``).
      impl: ``"reference"`` (token-by-token oracle), ``"chunked"`` (chunk-parallel JAX),
        ``"pallas"`` (a registered kernel) or ``"auto"`` (a kernel on GPU/TPU when one covers
        this level, else ``"chunked"``).
      aligned: promise that ``state`` is at a chunk boundary (``phase == 0``, checked when the
        phase is concrete, where the anchor is the memory) and ``seq % chunk == 0``; saves the
        padding chunk that an arbitrary phase needs and the anchor's separate carry. Results
        are identical either way.

    Returns:
      ``(state, y)`` with ``y [batch, seq, heads, d_out]`` (None when ``inputs.q`` is None).
    """
    from nlj.core.dispatch import resolve  # local: dispatch imports the implementations

    inputs = self.check_inputs(state, inputs)
    if aligned:
      self._check_aligned(state, inputs.k.shape[1])
    return resolve(self, impl)(self, state, inputs, aligned=aligned)

  def step(self, state: LevelState, inputs: LevelInputs, impl: str = "auto"
           ) -> tuple[LevelState, jax.Array | None]:
    """Advance by exactly one chunk (``seq == chunk``) from a chunk boundary."""
    if inputs.k.ndim == 4 and inputs.k.shape[1] != self.chunk:
      raise ValueError(f"Level.step takes one chunk: inputs seq must be {self.chunk}, "
                       f"got {inputs.k.shape[1]}")
    return self.run(state, inputs, impl, aligned=True)

  def apply(self, memory: Any, x: jax.Array) -> jax.Array:
    """Read per-sample, per-head memories: ``memory [batch, heads, ...]``,
    ``x [batch, seq, heads, d_in] -> [batch, seq, heads, d_out]``."""
    per_head = lambda p, xh: self.read_out(p, xh)  # xh [seq, d_in]
    return jax.vmap(jax.vmap(per_head, (0, 1), 1), (0, 0), 0)(memory, x)

  def _check_aligned(self, state: LevelState, seq: int) -> None:
    if seq % self.chunk:
      raise ValueError(f"aligned=True needs seq % Level.chunk == 0, got seq={seq}, "
                       f"chunk={self.chunk}")
    if not isinstance(state.phase, jax.core.Tracer) and int(state.phase) != 0:
      raise ValueError(f"aligned=True needs a state at a chunk boundary, got phase={int(state.phase)}")

  def check_inputs(self, state: LevelState, inputs: LevelInputs) -> LevelInputs:
    """Validate shapes (errors name the field) and fill per-token scalar defaults."""
    k, v = inputs.k, inputs.v
    if k.ndim != 4:
      raise ValueError(f"inputs.k must be [batch, seq, heads, d_in], got shape {k.shape}")
    b, t, h, d_in = k.shape
    if h != self.heads:
      raise ValueError(f"inputs.k has {h} heads but Level.heads is {self.heads}")
    if d_in != self.memory.d_in:
      raise ValueError(f"inputs.k last dim {d_in} != memory.d_in {self.memory.d_in}")
    if v.shape != (b, t, h, self.memory.d_out):
      raise ValueError(
          f"inputs.v must be {(b, t, h, self.memory.d_out)} [batch, seq, heads, d_out], got {v.shape}")
    if inputs.q is not None and inputs.q.shape != k.shape:
      raise ValueError(f"inputs.q must match inputs.k's shape {k.shape}, got {inputs.q.shape}")
    batch = jax.tree.leaves(state.memory)[0].shape[0]
    if batch != b:
      raise ValueError(f"state has batch {batch} but inputs have batch {b}")
    dtype = jax.tree.leaves(state.memory)[0].dtype
    filled = {}
    for name in ("eta", "alpha", "beta"):
      x = getattr(inputs, name)
      if x is None:
        x = jnp.full((b, t, h), getattr(self, name), dtype)
      elif x.shape != (b, t, h):
        raise ValueError(f"inputs.{name} must be [batch, seq, heads] = {(b, t, h)}, got {x.shape}")
      filled[name] = x.astype(dtype)
    cast = lambda x: None if x is None else x.astype(dtype)
    return LevelInputs(cast(k), cast(v), cast(inputs.q), **filled)

  def read_out(self, params: Any, q: jax.Array) -> jax.Array:
    """``M(q)`` for one head: ``q [..., d_in] -> [..., d_out]``."""
    return self.memory.apply(params, q)
