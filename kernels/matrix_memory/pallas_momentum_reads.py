"""The backward of the momentum read decays as a Pallas kernel, one program per chunk.

:func:`~nlj_kernels.matrix_memory.prepare.momentum_reads` forms, from a chunk's per-token
``last, log_read, log_g, log_b, mask``
(:class:`~nlj_kernels.matrix_memory.prepare.MomentumScalars`)::

    E_ji = exp(log_b_j - log_b_i) (i <= j) ;  R_tj = exp(log_read_t - log_g_j) (j <= t; j < t
    for strict reads) ;  Γ = R ⊙ mask_j
    decay = lastᵀ E ;  qm = Γ exp(log_b) ;  a = Γ E

The momentum tiles' backward kernel returns the cotangents ``q̄m, d̄ecay [C]`` and ``ā [C, C]``;
this kernel takes them back to the five scalars by hand-derived rules. With ``Γ̄ = ā Eᵀ +
q̄m exp(log_b)ᵀ`` and ``Ē = Γᵀ ā + last d̄ecayᵀ`` the rules need one ``[C, C]`` product,
``M = Rᵀ ā`` (``Γᵀ ā = mask ⊙ M``), and the forward's saved ``a``::

    rowsum(Γ̄ ⊙ Γ) = rowsum(ā ⊙ a) + q̄m ⊙ qm
    colsum(Γ̄ ⊙ R) = rowsum(E ⊙ M) + exp(log_b) ⊙ Rᵀ q̄m
    l̄ast = E d̄ecay ;  l̄og_read = rowsum(Γ̄ ⊙ Γ) ;  m̄ask = colsum(Γ̄ ⊙ R)
    l̄og_g = -mask ⊙ m̄ask
    Y = Ē ⊙ E ;  l̄og_b = rowsum Y - colsum Y + exp(log_b) ⊙ mask ⊙ Rᵀ q̄m

(anchor reads have ``qm = a = 0``: only the ``decay`` terms). ``jax.vjp`` of ``momentum_reads``
in XLA, which this replaces, ran the two ``[C, C]`` products of ``Γ̄`` and ``Ē`` as batched GEMMs
and the sums as separate reduction passes over ``[C, C]`` arrays in memory; here each chunk's
matrices stay in the program. On an H100 at 1×16384×16×128 (bf16) the kernel with both products
took 0.23 ms of device time, and Titans' forward+backward went from 3.24 to 3.13 ms of device
time (BENCHMARKS.md, thirteenth session); with one product it takes 0.17 ms (fourteenth).
Products follow ``jax_default_matmul_precision``, as the XLA products did; ``a`` comes in the
dtype the forward saved it in (bf16 for bf16 inputs, where the tiles' backward reads the same
rounded ``a``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nlj_kernels.backends import compiler_params
from nlj_kernels.matrix_memory.prepare import ReadForm
from nlj_kernels.matrix_memory.pallas_tiles import block_specs, ratio_block
from nlj_kernels.products import dot

__all__ = ["momentum_reads_backward", "READ_INPUTS"]

READ_INPUTS = ("last", "log_read", "log_g", "log_b", "mask")  # what momentum_reads reads


def _kernel(last_ref, log_read_ref, log_g_ref, log_b_ref, mask_ref, dqm_ref, ddecay_ref, da_ref,
            a_ref, *out_refs, form: ReadForm):
  wide = jnp.promote_types(last_ref.dtype, jnp.float32)
  load = lambda ref: ref[...].astype(wide)
  last, log_b, ddecay = load(last_ref), load(log_b_ref), load(ddecay_ref)
  e = ratio_block(log_b, log_b, diagonal=True, strict=False)  # E [j, i]
  d_last = jnp.sum(e * ddecay[None, :], axis=1)
  e_bar = last[:, None] * ddecay[None, :]
  zeros = jnp.zeros_like(last)
  d_read, d_g, d_mask, d_b = zeros, zeros, zeros, zeros
  if not form.reads_anchor:
    r = ratio_block(load(log_read_ref), load(log_g_ref), diagonal=True, strict=form.strict)
    mask, da, dqm, exp_b = load(mask_ref), load(da_ref), load(dqm_ref), jnp.exp(log_b)
    qm = jnp.sum(r * (mask * exp_b)[None, :], axis=1)
    d_read = jnp.sum(da * load(a_ref), axis=1) + dqm * qm
    rt_dqm = jnp.sum(r * dqm[:, None], axis=0)
    m = dot(r, da, trans_a=True)  # Rᵀ ā [j, i]
    d_mask = jnp.sum(e * m, axis=1) + exp_b * rt_dqm
    d_g = -mask * d_mask  # colsum(Γ̄ ⊙ Γ) = mask ⊙ colsum(Γ̄ ⊙ R), as Γ = R ⊙ mask_j
    d_b = exp_b * mask * rt_dqm
    e_bar = e_bar + mask[:, None] * m
  y = e_bar * e
  d_b = d_b + jnp.sum(y, axis=1) - jnp.sum(y, axis=0)
  for ref, x in zip(out_refs, (d_last, d_read, d_g, d_b, d_mask)):
    ref[...] = x.astype(ref.dtype)


@functools.partial(jax.jit, static_argnames=("form", "num_warps", "interpret", "backend"))
def momentum_reads_backward(form: ReadForm, reads: tuple[jax.Array, ...], dqm: jax.Array,
                            ddecay: jax.Array, da: jax.Array, a: jax.Array, *, num_warps: int = 4,
                            interpret: bool = False, backend: str = "triton"
                            ) -> tuple[jax.Array, ...]:
  """Cotangents of ``momentum_reads``' inputs (module docstring), every chunk in parallel.

  Args:
    form: the tiles' static shape (strict reads, anchor reads).
    reads: the scalars of :data:`READ_INPUTS`, each ``[B, H, N, C]``.
    dqm, ddecay: ``[B, H, N, C]``; da: ``[B, H, N, C, C]`` (zero above the diagonal).
    a: ``[B, H, N, C, C]``, the ``a`` the forward saved (any float dtype; unused for anchor
      reads).

  Returns:
    The cotangents of :data:`READ_INPUTS`, each ``[B, H, N, C]`` in the scalars' dtype.
  """
  batch, heads, n, size = reads[0].shape
  _, _, scalar, tile = block_specs(size, 1, 1)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in reads]
  return tuple(pl.pallas_call(
      functools.partial(_kernel, form=form), out_shape=out_shape, grid=(batch, heads, n),
      in_specs=[scalar] * (len(reads) + 2) + [tile(size)] * 2, out_specs=[scalar] * len(reads),
      compiler_params=compiler_params(backend, num_warps), interpret=interpret,
      name="matrix_memory_momentum_reads_bwd")(*reads, dqm, ddecay, da, a))
