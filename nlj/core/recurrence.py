"""Linear recurrences over a chunk, solved with a parallel (associative) scan.

Inside a chunk of a ``boundary`` level every gradient is known up front, so momentum and the
state itself follow first-order linear recurrences (Titans §3.2, "parallelizable dual form"):

* scalar decay   ``h_t = a_t h_{t-1} + b_t``       (momentum ``S``, retention ``α M``)
* matrix decay   ``h_t = h_{t-1} A_t + b_t``      (DGD: ``A_t = α_t I - c_t k_t k_tᵀ``)

Both return every intermediate ``h_1..h_C`` (the per-token states the read-out needs).
"""

from __future__ import annotations

import jax

__all__ = ["scalar_recurrence", "matrix_recurrence"]


def scalar_recurrence(a: jax.Array, b: jax.Array, h0: jax.Array) -> jax.Array:
  """All ``h_t = a_t h_{t-1} + b_t``.

  Args:
    a: ``[C]`` decays.
    b: ``[C, *shape]`` inputs.
    h0: ``[*shape]`` initial value.

  Returns:
    ``[C, *shape]``: ``h_1 .. h_C``.
  """

  def combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, _bcast(a2, b1) * b1 + b2

  acc_a, acc_b = jax.lax.associative_scan(combine, (a, b))
  return _bcast(acc_a, b) * h0[None] + acc_b


def matrix_recurrence(A: jax.Array, b: jax.Array, h0: jax.Array) -> jax.Array:
  """All ``h_t = h_{t-1} A_t + b_t`` (right multiplication).

  Args:
    A: ``[C, n, n]`` transition matrices.
    b: ``[C, m, n]`` inputs.
    h0: ``[m, n]`` initial value.

  Returns:
    ``[C, m, n]``: ``h_1 .. h_C``.
  """

  def combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 @ a2, b1 @ a2 + b2

  acc_a, acc_b = jax.lax.associative_scan(combine, (A, b))
  return h0[None] @ acc_a + acc_b


def _bcast(a: jax.Array, like: jax.Array) -> jax.Array:
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))
