"""``T = (I + N)⁻¹`` of a chunk's strictly lower-triangular ``N [C, C]`` (the WY/UT forms of the
delta rule: the matrix-memory kernel's stage 1, DGD's end state in
:func:`nlj.core.chunked.chunk_boundary_end`), three ways, all with the inverse's own derivative
``dN = -Tᵀ dT Tᵀ`` (strictly lower part) instead of autodiff through the algorithm:

- ``solve``: a triangular solve against the identity (stable for any ``N``);
- ``blocked``: products only (:func:`blocked_inverse`), which batches into matrix-unit work;
- :func:`given_inverse`: a ``T`` computed elsewhere (the Pallas backward kernel re-uses the
  forward's).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["INVERSES", "blocked_inverse", "given_inverse", "inverse_named", "inverse_with_rule",
           "solve_inverse"]

_BLOCK = 16


def _iota_pair(size: int) -> tuple[jax.Array, jax.Array]:
  return (jax.lax.broadcasted_iota(jnp.int32, (size, size), 0),
          jax.lax.broadcasted_iota(jnp.int32, (size, size), 1))


def _neumann(x: jax.Array, terms: int) -> jax.Array:
  """``Σ_{j < terms} (-x)^j = (I - x)(I + x²)(I + x⁴)...`` for nilpotent ``x`` (``x^terms = 0``):
  the factors up to the first power of two ``>= terms``."""
  rows, cols = _iota_pair(x.shape[0])
  out, power, covered = (rows == cols).astype(x.dtype) - x, x, 2
  while covered < terms:
    power = jnp.dot(power, power)
    out = out + jnp.dot(out, power)
    covered *= 2
  return out


def blocked_inverse(n: jax.Array) -> jax.Array:
  """``(I + N)⁻¹`` of strictly lower-triangular ``N [C, C]`` with products only.

  The 16×16 diagonal blocks ``D = (I + N_d)⁻¹`` come from the exact nilpotent series (4 factors);
  the blocks then combine by block forward substitution, ``(I + N)⁻¹ = (I + D N_o)⁻¹ D`` with
  ``D N_o`` strictly block-lower (another exact series over ``C / 16`` block rows). Rounding grows
  with the series' terms: at worst ``~binom(15, 7) ε`` inside a block for nearly identical keys
  with steps near 1.
  """
  size = n.shape[0]
  block = min(_BLOCK, size)
  rows, cols = _iota_pair(size)
  same = rows // block == cols // block
  d = _neumann(jnp.where(same, n, 0.0), block)
  if size == block:
    return d
  x = jnp.dot(d, jnp.where(same, 0.0, n))
  return jnp.dot(_neumann(x, -(-size // block)), d)


def solve_inverse(n: jax.Array) -> jax.Array:
  """``(I + N)⁻¹`` by a triangular solve (stable for any ``N``)."""
  eye = jnp.eye(n.shape[-1], dtype=n.dtype)
  return jax.scipy.linalg.solve_triangular(eye + n, eye, lower=True, unit_diagonal=True)


def _cotangent(t: jax.Array, dt: jax.Array) -> jax.Array:
  """``dN = -Tᵀ dT Tᵀ`` on the strictly lower triangle (where ``N`` lives)."""
  rows, cols = _iota_pair(t.shape[0])
  return jnp.where(rows > cols, -jnp.dot(t.T, jnp.dot(dt, t.T)), 0.0)


def inverse_with_rule(inverse: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array],
                                                                             jax.Array]:
  """``inverse`` differentiated by the inverse's rule (no autodiff through its algorithm)."""

  @jax.custom_vjp
  def f(n: jax.Array) -> jax.Array:
    return inverse(n)

  def fwd(n):
    t = inverse(n)
    return t, t

  f.defvjp(fwd, lambda t, dt: (_cotangent(t, dt),))
  return f


@jax.custom_vjp
def given_inverse(n: jax.Array, t: jax.Array) -> jax.Array:
  """``t = (I + n)⁻¹`` already computed; differentiates (in ``n``) as the inverse does."""
  del n
  return t


given_inverse.defvjp(lambda n, t: (t, t), lambda t, dt: (_cotangent(t, dt), jnp.zeros_like(t)))

INVERSES = {"solve": inverse_with_rule(solve_inverse),
            "blocked": inverse_with_rule(blocked_inverse)}


def inverse_named(name: str) -> Callable[[jax.Array], jax.Array]:
  """The inverse of :data:`INVERSES` called ``name``, or a ValueError naming the choices."""
  if name not in INVERSES:
    raise ValueError(f"inverse must be one of {tuple(INVERSES)}, got {name!r}")
  return INVERSES[name]
