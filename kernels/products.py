"""The 2-D product every kernel body uses (Triton, Mosaic and interpret mode alike)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["dot"]


def dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False, *,
        precision: Any = None, dtype: Any = None) -> jax.Array:
  """``a @ b`` with operands optionally transposed (and cast to ``dtype`` if given), accumulated
  in at least float32; ``precision`` None follows ``jax_default_matmul_precision``."""
  if dtype is not None:
    a, b = a.astype(dtype), b.astype(dtype)
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  out = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=out)
