"""Chunk-parallel form of a level (pure JAX).

The sequence is cut into chunks of ``level.chunk`` tokens aligned with the state's ``phase`` (the
first chunk may continue one begun by an earlier call; padding tokens are masked no-ops), and a
``lax.scan`` runs over chunks, each step ``jax.checkpoint``-ed when ``level.remat``:

* ``boundary`` chunks (:func:`chunk_boundary`): all gradients at the anchor in parallel, then
  momentum and state as linear recurrences solved by a parallel scan
  (:mod:`nlj.core.recurrence`), giving every per-token state for the read-out.
* ``exact`` chunks of a matrix memory with a ``dot`` or ``l2`` objective and no momentum or
  orthogonalisation (:func:`chunk_exact_ut`): the WY/UT form of the (gated) delta rule, where
  ``W_t = α_t W_{t-1} - b_t (W_{t-1} k_t) k_tᵀ + s_t v_t k_tᵀ`` is solved for the whole chunk with
  one unit-lower-triangular system (DeltaNet, Gated DeltaNet; ``b = c + s`` for ``l2``,
  ``b = c + α s`` with ``grad_at_retained``, ``b = c`` for ``dot``).
* other ``exact`` chunks (a non-linear gradient in the state: MLP memories, ``lp``/``huber``,
  momentum, Newton-Schulz): token by token inside the chunk (:func:`chunk_exact_scan`); they are
  sequential by definition.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nlj.core.level import Level, LevelInputs, LevelState
from nlj.core.memories import MatrixMemory
from nlj.core.objectives import memory_grad
from nlj.core.recurrence import matrix_recurrence, scalar_recurrence
from nlj.core.update import masked_scalars, write_token

__all__ = ["run_chunked", "chunk_layout", "chunk_boundary", "chunk_exact_ut", "chunk_exact_scan",
           "uses_ut"]

_last = lambda tree: jax.tree.map(lambda x: x[-1], tree)


def uses_ut(level: Level) -> bool:
  """Whether ``exact`` chunks of ``level`` take the WY/UT delta-rule form."""
  rule = level.rule
  return (isinstance(level.memory, MatrixMemory) and level.objective.name in ("dot", "l2")
          and not (rule.momentum or rule.orthogonalize or rule.stop_grad_writes))


def _read(level: Level, memory: Any, seq: Any, anchor: Any, q: jax.Array | None):
  """Per-token read-outs ``[C, d_out]`` from the per-token states ``seq`` (leading ``[C]``)."""
  if q is None:
    return None
  if level.read == "boundary":
    return level.read_out(anchor, q)
  if level.read == "before":
    seq = jax.tree.map(lambda m, s: jnp.concatenate([m[None], s[:-1]]), memory, seq)
  return jax.vmap(level.read_out)(seq, q)


def chunk_boundary(level: Level, memory, momentum, anchor, k, v, q, eta, alpha, beta, mask):
  """One head, one chunk, gradients at the anchor (Titans/TTT mini-batch GD, Hope eq. 90).

  Args:
    level: the level.
    memory, momentum, anchor: one head's state (momentum None without momentum).
    k: ``[C, d_in]``; v: ``[C, d_out]``; q: ``[C, d_in]`` or None.
    eta, alpha, beta, mask: ``[C]``.

  Returns:
    ``(memory, momentum, y [C, d_out] or None)`` after the chunk.
  """
  rule = level.rule
  grads = jax.vmap(lambda kk, vv: memory_grad(level.memory, level.objective, anchor, kk, vv))(k, v)
  c, s, alpha, beta = jax.vmap(lambda *a: masked_scalars(level, *a))(k, eta, alpha, beta, mask)
  masked = lambda tree: jax.tree.map(lambda x: x * mask.reshape((-1,) + (1,) * (x.ndim - 1)), tree)
  direction = jax.vmap(rule.direction)(masked(grads), s)
  if rule.momentum:
    direction = jax.tree.map(lambda d, m: scalar_recurrence(beta, d, m), direction, momentum)
    momentum = _last(direction)
  increments = masked(jax.vmap(rule.write)(direction, s))

  def leaf(w, inc, is_key_input):
    if is_key_input and rule.step == "dgd":
      eye = jnp.eye(w.shape[-1], dtype=w.dtype)
      transition = alpha[:, None, None] * eye - c[:, None, None] * (k[:, :, None] * k[:, None, :])
      return matrix_recurrence(transition, inc, w)
    return scalar_recurrence(alpha, inc, w)

  seq = jax.tree.map(leaf, memory, increments, level.memory.key_inputs())
  return _last(seq), momentum, _read(level, memory, seq, anchor, q)


def chunk_exact_ut(level: Level, memory, momentum, anchor, k, v, q, eta, alpha, beta, mask):
  """One head, one chunk of the (gated) delta rule in WY/UT form (same arguments as above).

  With ``γ_t = Π_{j<=t} α_j`` inside the chunk, ``W_t = γ_t W_0 + Σ_{i<=t} (γ_t/γ_i) w_i k_iᵀ``,
  and the pseudo-values ``w [C, d_out]`` solve
  ``(I + diag(b) L) w = s ⊙ v - (b γ_{t-1}) ⊙ (K W_0ᵀ)`` with
  ``L_{ti} = (γ_{t-1}/γ_i) k_t·k_i`` for ``i < t``.
  """
  w0 = memory["w"]
  c, s, alpha, _ = jax.vmap(lambda *a: masked_scalars(level, *a))(k, eta, alpha, beta, mask)
  if level.objective.name == "l2":
    b = c + (alpha * s if level.rule.grad_at_retained else s)
  else:
    b = c
  log_g = jnp.cumsum(jnp.log(jnp.maximum(alpha, jnp.finfo(alpha.dtype).tiny)))  # α = 0 resets
  log_prev = jnp.concatenate([jnp.zeros((1,), log_g.dtype), log_g[:-1]])
  idx = jnp.arange(k.shape[0])

  def ratios(log_t, strict):
    keep = idx[:, None] > idx[None, :] if strict else idx[:, None] >= idx[None, :]
    diff = jnp.where(keep, log_t[:, None] - log_g[None, :], 0.0)
    return jnp.where(keep, jnp.exp(diff), 0.0)

  lower = ratios(log_prev, True) * (k @ k.T)
  rhs = s[:, None] * v - (b * jnp.exp(log_prev))[:, None] * (k @ w0.T)
  system = jnp.eye(k.shape[0], dtype=k.dtype) + b[:, None] * lower
  w = jax.scipy.linalg.solve_triangular(system, rhs, lower=True, unit_diagonal=True)
  w_end = jnp.exp(log_g[-1]) * w0 + (w * jnp.exp(log_g[-1] - log_g)[:, None]).T @ k
  y = None
  if q is not None:
    if level.read == "boundary":
      y = level.read_out(anchor, q)
    else:
      log_t, strict = (log_g, False) if level.read == "after" else (log_prev, True)
      y = jnp.exp(log_t)[:, None] * (q @ w0.T) + (ratios(log_t, strict) * (q @ k.T)) @ w
  return {"w": w_end}, momentum, y


def chunk_exact_scan(level: Level, memory, momentum, anchor, k, v, q, eta, alpha, beta, mask):
  """One head, one chunk of online GD, token by token (same arguments as above)."""
  has_q = q is not None

  def step(carry, tok):
    mem, mom = carry
    qt, rest = tok[0], tok[1:]
    new_mem, new_mom = write_token(level, mem, mom, mem, rest)
    if not has_q:
      return (new_mem, new_mom), None
    read_params = {"after": new_mem, "before": mem, "boundary": anchor}[level.read]
    return (new_mem, new_mom), level.read_out(read_params, qt)

  toks = (q if has_q else k, k, v, eta, alpha, beta, mask)
  (memory, momentum), y = jax.lax.scan(step, (memory, momentum), toks)
  return memory, momentum, y


def chunk_layout(size: int, seq: int, phase, aligned: bool) -> tuple[int, object]:
  """``(chunks, phase)`` that cover ``seq`` tokens starting ``phase`` tokens into a chunk.

  ``aligned`` promises ``phase == 0`` and ``seq % size == 0`` (exactly ``seq / size`` chunks);
  otherwise ``ceil((seq + size - 1) / size)`` static chunks cover any (possibly traced) phase.
  """
  if aligned:
    return seq // size, 0
  return -(-(seq + size - 1) // size), phase


def _chunk_fn(level: Level):
  if level.semantics == "boundary":
    return chunk_boundary
  return chunk_exact_ut if uses_ut(level) else chunk_exact_scan


def run_chunked(level: Level, state: LevelState, inputs: LevelInputs, aligned: bool = False
                ) -> tuple[LevelState, jax.Array | None]:
  """Run ``level`` chunk by chunk (see :meth:`nlj.core.Level.run` for shapes).

  ``aligned=True`` promises ``state.phase == 0`` and ``seq % chunk == 0`` and skips the padding
  chunk that an arbitrary phase needs.
  """
  size = level.chunk
  b, t, h, _ = inputs.k.shape
  n, phase = chunk_layout(size, t, state.phase, aligned)
  has_q = inputs.q is not None

  def to_chunks(x):  # [b, t, h, ...] -> [n, b, h, size, ...], shifted right by phase
    padded = jnp.zeros((b, n * size) + x.shape[2:], x.dtype)
    padded = jax.lax.dynamic_update_slice_in_dim(padded, x, phase, axis=1)
    padded = padded.reshape((b, n, size) + x.shape[2:])
    return jnp.transpose(padded, (1, 0, 3, 2) + tuple(range(4, padded.ndim)))

  fields = (inputs.k, inputs.v, inputs.q, inputs.eta, inputs.alpha, inputs.beta)
  chunks = tuple(None if x is None else to_chunks(x) for x in fields)
  pos = jnp.arange(n * size)
  mask = ((pos >= phase) & (pos < phase + t)).astype(inputs.k.dtype).reshape(n, size)
  complete = (jnp.arange(1, n + 1) * size) <= phase + t

  per_head = _chunk_fn(level)
  q_axis = 0 if has_q else None
  in_axes = (0, 0, 0, 0, 0, q_axis, 0, 0, 0, None)
  batched = jax.vmap(jax.vmap(lambda *a: per_head(level, *a), in_axes), in_axes)

  def body(carry, xs):
    memory, momentum, anchor = carry
    (k, v, q, eta, alpha, beta), mask_c, complete_c = xs
    memory, momentum, y = batched(memory, momentum, anchor, k, v, q, eta, alpha, beta, mask_c)
    anchor = jax.tree.map(lambda m, a: jnp.where(complete_c, m, a), memory, anchor)
    return (memory, momentum, anchor), y

  if level.remat:
    body = jax.checkpoint(body)
  carry = (state.memory, state.momentum, state.anchor)
  (memory, momentum, anchor), ys = jax.lax.scan(body, carry, (chunks, mask, complete))
  new_phase = jnp.asarray((phase + t) % size, jnp.int32)
  new_state = LevelState(memory, momentum, anchor, new_phase)
  if not has_q:
    return new_state, None
  ys = jnp.transpose(ys, (1, 0, 3, 2, 4)).reshape((b, n * size, h) + ys.shape[4:])
  return new_state, jax.lax.dynamic_slice_in_dim(ys, phase, t, axis=1)
