"""Chunk-parallel form of a level (pure JAX).

The sequence is cut into chunks of ``level.chunk`` tokens aligned with the state's ``phase`` (the
first chunk may continue one begun by an earlier call; padding tokens are masked no-ops), and a
``lax.scan`` runs over chunks, each step ``jax.checkpoint``-ed when ``level.remat``:

* ``boundary`` chunks (:func:`chunk_boundary`): all gradients at the anchor in parallel, then
  momentum and state as linear recurrences solved by a parallel scan
  (:mod:`nlj.core.recurrence`), giving every per-token state for the read-out. Where no
  per-token state is read (a read at the anchor, GD without Newton-Schulz: CMS levels, unread
  levels), :func:`chunk_boundary_end` gives the end state as weighted sums of the gradients,
  each one VJP of the chunk, with memory independent of the chunk length.
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
from nlj.core.triangular import INVERSES
from nlj.core.update import masked_scalars, write_token

__all__ = ["run_chunked", "chunk_layout", "chunk_boundary", "chunk_boundary_end",
           "chunk_exact_ut", "chunk_exact_scan", "reads_end_state_only", "uses_ut"]

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


def _weighted_grad(level: Level, anchor: Any, k: jax.Array, v: jax.Array,
                   weights: jax.Array) -> Any:
  """``Σ_t weights_t ∇L(M_anchor(k_t), v_t)`` as one VJP of the chunk's batched forward, so no
  per-token gradient is ever materialised (``k [C, d_in]``, ``v [C, d_out]``, ``weights [C]``)."""
  y, vjp = jax.vjp(lambda p: jax.vmap(lambda kk: level.memory.apply(p, kk))(k), anchor)
  dldy = jax.vmap(level.objective.output_grad)(y, v)
  return vjp(weights[:, None].astype(dldy.dtype) * dldy)[0]


def reads_end_state_only(level: Level, has_q: bool) -> bool:
  """Whether a ``boundary`` chunk needs only its end state (no per-token states): the read is
  at the anchor (or there is none) and the update is linear in the gradients (GD, or DGD on a
  memory with :meth:`~nlj.core.memories.Memory.key_input_cotangents`; no Newton-Schulz), so
  the end state is a weighted sum of them (:func:`chunk_boundary_end`)."""
  rule = level.rule
  linear = rule.step == "gd" or hasattr(level.memory, "key_input_cotangents")
  return (not has_q or level.read == "boundary") and linear and not rule.orthogonalize


@jax.custom_jvp
def _span_products(x: jax.Array) -> jax.Array:
  """``R[p, l] = Π_{p <= j < l} x_j`` for ``0 <= p, l <= C`` (``x [C]``; 1 where ``l <= p``),
  as masked cumulative products.

  Its derivative is the exact product rule, ``Ṙ[p, l] = Σ_{p <= j < l} R[p, j] ẋ_j R[j + 1, l]``
  (one ``(C + 1) × C × (C + 1)`` product, also where a factor is 0, a reset), rather than
  autodiff through the cumulative product, whose transpose XLA builds from dozens of small
  pads and fuses badly on a GPU.
  """
  size = x.shape[0]
  factors = jnp.where(jnp.arange(size)[None, :] >= jnp.arange(size + 1)[:, None], x[None, :], 1)
  ones = jnp.ones((size + 1, 1), x.dtype)
  return jnp.concatenate([ones, jnp.cumprod(factors, axis=1)], axis=1)


@_span_products.defjvp
def _span_products_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  r = _span_products(x)
  size = x.shape[0]
  j, pos = jnp.arange(size), jnp.arange(size + 1)
  before = jnp.where(pos[:, None] <= j[None, :], r[:, :size], 0)  # R[p, j], p <= j
  after = jnp.where(pos[None, :] > j[:, None], r[1:, :], 0)  # R[j + 1, l], l > j
  return r, jnp.matmul(before * dx[None, :], after, precision=jax.lax.Precision.HIGHEST)


def _write_weights(ra: jax.Array, rb: jax.Array, mask: jax.Array) -> jax.Array:
  """``H [C + 1, C + 1]``: how much of what enters the momentum at position ``p`` reaches the
  state, decayed by retention only, up to just before token ``l`` (``l = C``: the chunk end).

  Position ``p = 0`` is the carried momentum and ``p = i + 1`` token ``i``'s increment:
  ``H[p, l] = Σ_{p-1 <= t < l} mask_t (Π_{p <= j <= t} β_j) (Π_{t < j < l} α_j)``, where
  ``ra = _span_products(α)`` and ``rb = _span_products(β)`` (β = 0 without momentum, so each
  increment enters once). ``H[i + 1, C]`` is the ``a_i`` of :func:`chunk_boundary_end`.
  """
  size = mask.shape[0]
  t, pos = jnp.arange(size), jnp.arange(size + 1)
  entered = jnp.where(t[None, :] + 1 >= pos[:, None], rb[:, 1:], 0) * mask[None, :]
  decayed = jnp.where(pos[None, :] > t[:, None], ra[1:, :], 0)
  return jnp.matmul(entered, decayed, precision=jax.lax.Precision.HIGHEST)


def _key_decay(level: Level, memory, momentum, anchor, k, v, c, s, ra, weights, sg):
  """What the ``- c_t k_t k_tᵀ`` part of DGD's decay adds to each key-input weight's end state.

  For such a weight ``W [m, d_in]``, with ``g_t = Π_{j>t} α_j``, ``N = (I + A)⁻¹`` for the
  strictly lower ``A_{jl} = c_j (Π_{l<i<j} α_i) k_j·k_l``, and ``R = Nᵀ diag(g) K [C, d_in]``,
  it is ``-E R`` with ``E [m, C]`` = ``(W_0 Kᵀ) diag(c ⊙ H[0 (start), :])`` (the chunk's start
  state) + ``(S_0 Kᵀ) diag(c ⊙ H[0, :])`` (the carried momentum) ``- Δᵀ diag(s)
  ((K Kᵀ) ⊙ c ⊙ H[1:, :])`` (token ``i``'s increment ``-s_i δ_i k_iᵀ``; ``δ`` from
  :meth:`~nlj.core.memories.Memory.key_input_cotangents`), ``H`` from :func:`_write_weights`.
  A trailing block of ``N`` inverts the trailing block of ``I + A``, so one inverse serves every
  start position; it is the products-only blocked inverse (:mod:`nlj.core.triangular`), which
  stays in matrix-unit work on a GPU (a batched triangular solve is a cuBLAS call with a
  device-to-device copy per call that breaks XLA's command buffers).
  """
  size = k.shape[0]
  t = jnp.arange(size)
  g = ra[1:, size]
  lower = jnp.where(t[:, None] > t[None, :], c[:, None] * ra[1:, :size].T * (k @ k.T), 0)
  right = INVERSES["blocked"](lower).T @ (g[:, None] * k)
  point, keys = sg(anchor), sg(k)
  y = level.memory.apply(point, keys)
  dldy = jax.vmap(level.objective.output_grad)(y, sg(v))
  written = sg(s)[:, None] * (keys @ k.T) * (c * weights[1:, :size])
  flat, tree = jax.tree.flatten(memory)
  is_key = tree.flatten_up_to(level.memory.key_inputs())
  deltas = tree.flatten_up_to(level.memory.key_input_cotangents(point, keys, dldy))
  carried = tree.flatten_up_to(momentum) if momentum is not None else [None] * len(flat)
  out = []
  for w, key_input, delta, m in zip(flat, is_key, deltas, carried):
    if not key_input:
      out.append(jnp.zeros_like(w))
      continue
    e = (w @ k.T) * (c * ra[0, :size]) - delta.T @ written
    if m is not None:
      e = e + (sg(m) @ k.T) * (c * weights[0, :size])
    out.append(-e @ right)
  return jax.tree.unflatten(tree, out)


def _scaled(scalar: jax.Array, tree: Any) -> Any:
  """``scalar * tree`` with the scalar behind an optimisation barrier. In the backward its
  cotangent, a reduction over whole weights, then stays its own fusion: XLA otherwise fuses it
  into the small coefficient matrices' cotangents, a GPU kernel of a few hundred thread blocks
  that took 15% of the self-modifying Titans layer's backward (BENCHMARKS.md)."""
  scalar = jax.lax.optimization_barrier(scalar)
  return jax.tree.map(lambda w: scalar * w, tree)


def chunk_boundary_end(level: Level, memory, momentum, anchor, k, v, q, eta, alpha, beta, mask):
  """:func:`chunk_boundary` for levels where :func:`reads_end_state_only` holds, in memory
  independent of the chunk length (same arguments and results).

  With ``r_t = Π_{j>t} α_j`` (0 for padding tokens, which write nothing) and directions
  ``u_t = -s_t g_t`` (``g_t`` the gradient at the anchor), GD gives ``W_C = γ_C W_0 + Σ_t r_t
  d_t`` where the momentum ``d_t = β_t d_{t-1} + u_t`` (``d_t = u_t`` without momentum).
  Unrolled: ``W_C = γ_C W_0 + β_0 a_0 M_0 + Σ_i a_i u_i`` and ``M_C = P_C M_0 + Σ_i e_i u_i``
  with ``a_i = Σ_{t>=i} r_t Π_{i<j<=t} β_j``, ``e_i = Π_{j>i} β_j`` and ``P_C = Π_j β_j``; each
  ``Σ_i w_i u_i`` is one VJP (:func:`_weighted_grad`). DGD's key decay ``- c k kᵀ`` adds a
  closed-form term to the key-input weights (:func:`_key_decay`): one ``C × C`` triangular
  inverse, no per-token state or gradient.
  """
  rule = level.rule
  c, s, alpha, beta = jax.vmap(lambda *a: masked_scalars(level, *a))(k, eta, alpha, beta, mask)
  size = k.shape[0]
  # stop_grad_writes: the increments carry no gradient, their decays still do
  sg = jax.lax.stop_gradient if rule.stop_grad_writes else (lambda x: x)
  ra = _span_products(alpha)
  rb = _span_products(sg(beta) if rule.momentum else jnp.zeros_like(beta))
  weights = _write_weights(ra, rb, mask)
  into_w = _weighted_grad(level, sg(anchor), sg(k), sg(v), -sg(s) * weights[1:, size])
  new_memory = jax.tree.map(jnp.add, _scaled(ra[0, size], memory), into_w)
  if rule.step == "dgd":
    decay = _key_decay(level, memory, momentum, anchor, k, v, c, s, ra, weights, sg)
    new_memory = jax.tree.map(jnp.add, new_memory, decay)
  if rule.momentum:
    e = _span_products(beta)[1:, size]  # Π_{t < j < C} β_j
    into_m = _weighted_grad(level, anchor, k, v, -s * e)
    new_memory = jax.tree.map(jnp.add, new_memory, _scaled(weights[0, size], sg(momentum)))
    momentum = jax.tree.map(jnp.add, _scaled(e[0] * beta[0], momentum), into_m)
  return new_memory, momentum, _read(level, memory, None, anchor, q)


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
  a static (Python int) phase gets exactly ``ceil((phase + seq) / size)`` chunks; otherwise
  ``ceil((seq + size - 1) / size)`` static chunks cover any traced phase.
  """
  if aligned:
    return seq // size, 0
  if isinstance(phase, int):
    return -(-(phase + seq) // size), phase
  return -(-(seq + size - 1) // size), phase


def _chunk_fn(level: Level, has_q: bool):
  if level.semantics == "boundary":
    return chunk_boundary_end if reads_end_state_only(level, has_q) else chunk_boundary
  return chunk_exact_ut if uses_ut(level) else chunk_exact_scan


def run_chunked(level: Level, state: LevelState, inputs: LevelInputs, aligned: bool = False
                ) -> tuple[LevelState, jax.Array | None]:
  """Run ``level`` chunk by chunk (see :meth:`nlj.core.Level.run` for shapes).

  ``aligned=True`` promises ``state.phase == 0`` (so the anchor is the memory, as every state at
  a chunk boundary has it) and ``seq % chunk == 0``, and skips the padding chunk that an
  arbitrary phase needs.
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

  per_head = _chunk_fn(level, has_q)
  q_axis = 0 if has_q else None
  in_axes = (0, 0, 0, 0, 0, q_axis, 0, 0, 0, None)
  batched = jax.vmap(jax.vmap(lambda *a: per_head(level, *a), in_axes), in_axes)

  def body(carry, xs):
    # aligned: every chunk starts on a boundary, where the anchor is the memory, so the carry
    # holds the memory once (a carry holding one array twice is copied every step) and needs no
    # select
    memory, momentum, anchor = (*carry, carry[0]) if aligned else carry
    (k, v, q, eta, alpha, beta), mask_c, complete_c = xs
    memory, momentum, y = batched(memory, momentum, anchor, k, v, q, eta, alpha, beta, mask_c)
    if aligned:
      return (memory, momentum), y
    anchor = jax.tree.map(lambda m, a: jnp.where(complete_c, m, a), memory, anchor)
    return (memory, momentum, anchor), y

  if level.remat:
    body = jax.checkpoint(body)
  carry = (state.memory, state.momentum) + (() if aligned else (state.anchor,))
  carry, ys = jax.lax.scan(body, carry, (chunks, mask, complete))
  memory, momentum, anchor = (*carry, carry[0]) if aligned else carry
  new_phase = jnp.asarray((phase + t) % size, jnp.int32)
  new_state = LevelState(memory, momentum, anchor, new_phase)
  if not has_q:
    return new_state, None
  ys = jnp.transpose(ys, (1, 0, 3, 2, 4)).reshape((b, n * size, h) + ys.shape[4:])
  return new_state, jax.lax.dynamic_slice_in_dim(ys, phase, t, axis=1)
