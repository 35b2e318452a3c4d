"""One head, one chunk of the op in dual form: the math both Pallas kernels run.

Given the weights ``W_0`` and momenta ``S_0`` at the chunk start, the anchor ``A`` (where the
chunk's gradients are taken) and the chunk's fields (:mod:`nlj_kernels.mlp_memory.prepare`):

1. forward of the MLP at the anchor for the chunk's ``C`` keys and backward of
   ``½ ||M(k) - v||²``: per-token errors ``δ_l [C, d_out_l]`` of every weight (``e = M(k) - v``
   for the last layer and the skip) and their inputs ``a_l [C, d_in_l]``, so that token ``t``'s
   gradient of weight ``l`` is ``δ_{l,t} a_{l,t}ᵀ``; ``u_l = -s ⊙ δ_l``;
2. the DGD pseudo-errors ``Z = -(Kw W_0ᵀ + Km S_0ᵀ + Mz U)`` of the key-input weights (without
   momentum their coefficients equal the ``u`` terms', so ``Z`` is added into ``U``);
3. the end state ``W_C = γ_C W_0 + m_C S_0 + (P_{C,·} ⊙ U)ᵀ A_in + (G_{C,·} ⊙ Z)ᵀ K`` and
   ``S_C = B_C S_0 + (E_{C,·} ⊙ U)ᵀ A_in``;
4. reads ``y_t = M_t(q_t)`` (or ``M_{t-1}``) layer by layer, each weight applied to the read's
   layer inputs ``R`` as ``γ ⊙ R W_0ᵀ + m ⊙ R S_0ᵀ + (P ∘ R A_inᵀ) U + (G ∘ R Kᵀ) Z``;
   ``boundary`` reads are the anchor's forward on ``q``.

Everything is dense ``[C, ·]`` products (``lax.dot_general`` with a float32-or-wider accumulator)
and element-wise ops, so the same function lowers inside a Triton kernel and, differentiated by
``jax.vjp``, gives the backward kernel's per-chunk gradients.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from nlj.core.memories import ACTIVATIONS
from nlj_kernels.mlp_memory.contract import OpConfig
from nlj_kernels.products import dot

__all__ = ["chunk_update"]

Weights = Sequence[jax.Array]  # the layers W_0 .. W_{L-1} [d_out_l, d_in_l], then the skip W_s


def _forward(config: OpConfig, weights: Weights, x: jax.Array, precision: Any):
  """The MLP on rows ``x [C, d_in]``: ``(y [C, d_out], layer inputs, pre-activations)``."""
  act = ACTIVATIONS[config.activation]
  inputs, pre, h = [], [], x
  for layer in range(config.layers):
    inputs.append(h)
    z = dot(h, weights[layer], trans_b=True, precision=precision)
    pre.append(z)
    h = act(z) if layer < config.layers - 1 else z
  if config.residual == "identity":
    h = h + x
  elif config.residual == "skip":
    h = h + dot(x, weights[-1], trans_b=True, precision=precision)
  return h, inputs, pre


def _errors(config: OpConfig, anchor: Weights, k: jax.Array, v: jax.Array, precision: Any):
  """Per-token errors ``δ`` of every weight and their inputs at the anchor (L2 objective)."""
  act = ACTIVATIONS[config.activation]
  y, inputs, pre = _forward(config, anchor, k, precision=precision)
  err = y - v
  deltas, d = [None] * config.layers, err
  for layer in reversed(range(config.layers)):
    deltas[layer] = d
    if layer:
      slope = jax.jvp(act, (pre[layer - 1],), (jnp.ones_like(pre[layer - 1]),))[1]
      d = dot(d, anchor[layer], precision=precision) * slope
  if config.residual == "skip":
    deltas.append(err)
    inputs.append(k)
  return deltas, inputs


def chunk_update(config: OpConfig, memory: Weights, momentum: Weights | None, anchor: Weights,
                 fields: dict[str, jax.Array], precision: Any
                 ) -> tuple[jax.Array | None, list[jax.Array], list[jax.Array] | None]:
  """One chunk of one head (see the module docstring).

  Args:
    config: the op.
    memory, momentum, anchor: per-weight ``[d_out_l, d_in_l]`` arrays (momentum None without).
    fields: this chunk's fields (``[C, ·]``, ``[C]``, ``[C, C]`` or scalars).
    precision: of every product (None: ``jax_default_matmul_precision``).

  Returns:
    ``(y [C, d_out] or None, memory, momentum)`` at the chunk end.
  """
  mom = config.momentum
  f = fields
  k, s = f["k"], f["s"][:, None]
  deltas, inputs = _errors(config, anchor, k, f["v"], precision=precision)
  key_input = lambda w: w == 0 or w == config.layers  # W_0 and the skip take the key
  terms = []  # per weight: (inputs, [(read coefficients, end coefficients, errors)])
  for w in range(config.weights):
    u = -s * deltas[w]
    if not (config.dgd and key_input(w)):
      terms.append((inputs[w], [("r_u", "u_last", u)]))
      continue
    neg_z = (dot(f["kw"], memory[w], trans_b=True, precision=precision)
             + dot(f["mz"], u, precision=precision))
    if mom:
      neg_z = neg_z + dot(f["km"], momentum[w], trans_b=True, precision=precision)
      terms.append((k, [("r_u", "u_last", u), ("r_z", "z_last", -neg_z)]))
    else:
      terms.append((k, [("r_u", "u_last", u - neg_z)]))

  new_memory, new_momentum = [], [] if mom else None
  for w, (a, parts) in enumerate(terms):
    new = f["gam_end"] * memory[w]
    if mom:
      new = new + f["m_end"] * momentum[w]
      u = parts[0][2]
      new_momentum.append(f["b_end"] * momentum[w]
                          + dot(f["b_last"][:, None] * u, a, trans_a=True, precision=precision))
    writes = sum(f[last][:, None] * err for _, last, err in parts)
    new_memory.append(new + dot(writes, a, trans_a=True, precision=precision))

  if "q" not in f:
    return None, new_memory, new_momentum
  if config.read == "boundary":
    return _forward(config, anchor, f["q"], precision=precision)[0], new_memory, new_momentum

  def read(w: int, r: jax.Array) -> jax.Array:
    """``W_t r_t`` (``W_{t-1} r_t`` for ``before``) of weight ``w`` for rows ``r [C, d_in_w]``."""
    a, parts = terms[w]
    out = f["r_gam"][:, None] * dot(r, memory[w], trans_b=True, precision=precision)
    if mom:
      out = out + f["r_m"][:, None] * dot(r, momentum[w], trans_b=True, precision=precision)
    gram = dot(r, a, trans_b=True, precision=precision)
    for coeff, _, err in parts:
      out = out + dot(f[coeff] * gram, err, precision=precision)
    return out

  act = ACTIVATIONS[config.activation]
  q = f["q"]
  h = q
  for layer in range(config.layers):
    h = read(layer, h)
    if layer < config.layers - 1:
      h = act(h)
  if config.residual == "identity":
    h = h + q
  elif config.residual == "skip":
    h = h + read(config.layers, q)
  return h, new_memory, new_momentum
