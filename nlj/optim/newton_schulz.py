r"""Newton–Schulz orthogonalisation: the inner "orthogonality memory" of Muon and M3.

Eqs. 43–44 of Nested Learning read Newton–Schulz as gradient descent on the orthogonality
objective :math:`\tilde L(O; g) = \|O^\top O - I\|_F^2` (plus a proximity term to ``g``),
started at :math:`O_0 = g`. One cubic step is

.. math::
  O_{i+1} = O_i - \zeta\,(O_i - g + 2 O_i (O_i^\top O_i - I)) ,

and Muon's production form (used here) is the quintic iteration

.. math::
  X \leftarrow a X + (b A + c A^2) X,\quad A = X X^\top,\quad (a, b, c) = (3.4445, -4.7750, 2.0315),

run for 5 steps on :math:`X_0 = g / (\|g\|_F + \epsilon)`, transposed so that rows ≤ cols.
The result is approximately :math:`U V^\top` for :math:`g = U \Sigma V^\top` (singular values
land roughly in ``[0.7, 1.2]`` rather than exactly at 1). It matches
``optax.contrib._muon.orthogonalize_via_newton_schulz`` with ``preconditioning="frobenius"``.

References:
  Behrouz et al., Nested Learning, eqs. 42–44, https://arxiv.org/abs/2512.24695
  Jordan, Muon, https://kellerjordan.github.io/posts/muon/
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["NS_COEFFS", "newton_schulz"]

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    x: jax.Array,
    steps: int = 5,
    coeffs: tuple[float, float, float] = NS_COEFFS,
    eps: float = 1e-8,
) -> jax.Array:
  """Quintic Newton–Schulz orthogonalisation of one matrix (eqs. 42–44).

  Args:
    x: ``[m, n]`` matrix.
    steps: number of iterations (Python int, unrolled).
    coeffs: ``(a, b, c)`` of ``a X + b (X Xᵀ) X + c (X Xᵀ)² X``.
    eps: added to the Frobenius norm before normalising, so a zero input gives zero.

  Returns:
    ``[m, n]`` approximately semi-orthogonal matrix with ``x``'s dtype; exactly zero for ``x = 0``.
  """
  if x.ndim != 2:
    raise ValueError(f"newton_schulz: x must be a 2-D matrix; got shape {x.shape}")
  a, b, c = coeffs
  transpose = x.shape[0] > x.shape[1]
  y = x.T if transpose else x
  y = y / (jnp.linalg.norm(y) + eps)
  for _ in range(steps):
    s = y @ y.T
    y = a * y + (b * s + c * (s @ s)) @ y
  return y.T if transpose else y
