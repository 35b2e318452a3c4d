"""Stage 2 of the op: the recurrence over chunks as Pallas kernels (forward and backward).

One program per ``(batch, head)`` carries its MLP weights (and momenta) in float32 (float64 in
tests) through a ``fori_loop`` over the chunks; each chunk is
:func:`nlj_kernels.mlp_memory.chunk.chunk_update` on the fields of
:mod:`nlj_kernels.mlp_memory.prepare`. The first chunk takes its gradients at the carried anchor,
every later one at the weights it starts from. The anchor output is aliased to the anchor input
and overwritten once, at the end of the last complete chunk (flag ``last``), so it is the state
at the last chunk boundary, or the input anchor when no chunk completes.

The backward kernel walks the chunks in reverse from the weights (and momenta) the forward
stored at each chunk start, carrying their cotangents; each chunk's gradients are ``jax.vjp`` of
the same ``chunk_update`` evaluated inside the kernel (the chunk's forward is recomputed), so the
backward is a Pallas kernel too and no autodiff runs through ``pallas_call``.

The same kernel bodies lower through Triton on GPU (``backend="triton"``) or Mosaic on TPU
(``backend="tpu"``: per-chunk scalars and the ``last`` flags stay whole in SMEM, Mosaic's home
for scalars; the forward grid is parallel, the backward's sequential, since every program writes
its scalar cotangents into the same SMEM arrays). ``interpret=True`` runs either on any device
(the CPU in CI). The TPU form is tested in interpret mode and by lowering to Mosaic; it has not
run on a TPU.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from nlj_kernels.backends import compiler_params

from nlj_kernels.mlp_memory.chunk import chunk_update
from nlj_kernels.mlp_memory.contract import OpConfig

__all__ = ["forward", "backward"]

Weights = tuple  # of [B, H, d_out_l, d_in_l] arrays (layers, then the skip)


def _spec(x, backend: str) -> pl.BlockSpec:
  """An array ``[B, H, ...]`` (a field, a weight, per-chunk weights): the program's ``[...]``;
  on TPU, per-chunk scalars ``[B, H, N]`` stay whole in SMEM (Mosaic reads scalars from there).
  """
  rest = x.shape[2:]
  if backend == "tpu" and len(rest) == 1:
    return pl.BlockSpec(memory_space=pltpu.SMEM)
  return pl.BlockSpec((None, None) + rest, lambda b, h: (b, h) + (0,) * len(rest))


def _per_chunk(w, n: int) -> jax.ShapeDtypeStruct:
  """The shape of ``n`` copies of a weight ``[B, H, o, i]``: ``[B, H, n, o, i]``."""
  return jax.ShapeDtypeStruct(w.shape[:2] + (n,) + w.shape[2:], w.dtype)


def _flag_spec(n: int, backend: str) -> pl.BlockSpec:
  if backend == "tpu":
    return pl.BlockSpec(memory_space=pltpu.SMEM)
  return pl.BlockSpec((n,), lambda b, h: (0,))


def _whole(fields: dict[str, jax.Array], backend: str) -> frozenset[str]:
  """The fields :func:`_spec` keeps whole in SMEM (per-chunk scalars on TPU)."""
  return frozenset(name for name, x in fields.items() if backend == "tpu" and x.ndim == 3)


def _chunk_access(whole: frozenset[str]):
  """``(read(name, ref, c), write(name, ref, c, x))`` of chunk ``c`` of a field: its block, or
  for a field in ``whole`` (a ``[B, H, N]`` SMEM array) the scalar at this program's
  (batch, head). Call at the kernel's top level (program ids are not available inside loop
  bodies in interpret mode)."""
  b, h = pl.program_id(0), pl.program_id(1)
  index = lambda name, c: (b, h, c) if name in whole else c

  def write(name, ref, c, x):
    ref[index(name, c)] = x.astype(ref.dtype)
  return lambda name, ref, c: ref[index(name, c)], write


class _Refs:
  """Consume a kernel's flat ref list by groups."""

  def __init__(self, refs):
    self._refs = list(refs)

  def take(self, count: int) -> list:
    out, self._refs = self._refs[:count], self._refs[count:]
    return out

  def one(self):
    return self.take(1)[0]

  def maybe(self, present: bool, count: int) -> list | None:
    return self.take(count) if present else None


def _load(refs: list | None, c=None) -> list | None:
  if refs is None:
    return None
  return [r[...] if c is None else r[c] for r in refs]


def _store(refs: list | None, values: list | None, c=None) -> None:
  for r, x in zip(refs or (), values or ()):
    if c is None:
      r[...] = x.astype(r.dtype)
    else:
      r[c] = x.astype(r.dtype)


def _forward_kernel(*refs, config: OpConfig, names: tuple, n: int, precision: Any, save: bool,
                    whole: frozenset[str]):
  nw, mom, reads = config.weights, config.momentum, "q" in names
  it = _Refs(refs)
  fields = dict(zip(names, it.take(len(names))))
  mem0, mom0, anchor0 = it.take(nw), it.maybe(mom, nw), it.take(nw)
  last = it.one()
  y_ref = it.one() if reads else None
  mem_out, mom_out, anchor_out = it.take(nw), it.maybe(mom, nw), it.take(nw)
  saved, msaved = it.maybe(save, nw), it.maybe(save and mom, nw)
  read, _ = _chunk_access(whole)

  def chunk(c, memory, momentum, anchor):
    if save:
      _store(saved, memory, c)
      _store(msaved, momentum, c)
    f = {name: read(name, ref, c) for name, ref in fields.items()}
    y, memory, momentum = chunk_update(config, memory, momentum, anchor, f, precision)
    if reads:
      y_ref[c] = y.astype(y_ref.dtype)

    @pl.when(last[c] > 0)
    def _():
      _store(anchor_out, memory)

    return memory, momentum

  memory, momentum = chunk(0, _load(mem0), _load(mom0), _load(anchor0))
  memory, momentum = jax.lax.fori_loop(
      1, n, lambda c, carry: chunk(c, carry[0], carry[1], carry[0]), (memory, momentum))
  _store(mem_out, memory)
  _store(mom_out, momentum)


@functools.partial(jax.jit, static_argnames=("config", "precision", "num_warps", "save",
                                             "interpret", "backend"))
def forward(fields: dict[str, jax.Array], memory: Weights, momentum: Weights | None,
            anchor: Weights, last: jax.Array, *, config: OpConfig, precision: Any,
            num_warps: int, save: bool = False, interpret: bool = False,
            backend: str = "triton"):
  """Run every chunk.

  Args:
    fields: :func:`nlj_kernels.mlp_memory.prepare.prepare`'s fields ``[B, H, N, ...]``.
    memory, momentum, anchor: per-weight ``[B, H, d_out_l, d_in_l]`` at the first chunk start
      (float32; float64 in tests); momentum None without momentum.
    last: ``[N]``, 1 at the last complete chunk, else 0.
    config: the op; precision: of every product; num_warps: Triton warps per program.
    save: also return every chunk's starting weights (and momenta), for the backward.
    interpret: run in interpret mode.

  Returns:
    ``(y [B, H, N, C, d_out] or None, memory, momentum, anchor, saved, msaved)``; the saved
    per-chunk weights are ``[B, H, N, d_out_l, d_in_l]`` (None unless ``save``).
  """
  names = tuple(fields)
  mom, reads = momentum is not None, "q" in fields
  batch, heads, n, size = fields["k"].shape[:4]
  d_out = fields["v"].shape[-1]
  weights = list(memory) + list(momentum or ()) + list(anchor)
  spec = lambda x: _spec(x, backend)
  in_specs = [spec(x) for x in list(fields.values()) + weights] + [_flag_spec(n, backend)]
  out_shape = [jax.ShapeDtypeStruct((batch, heads, n, size, d_out), fields["v"].dtype)
               ] if reads else []
  out_shape += [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights]
  if save:
    out_shape += [_per_chunk(w, n) for w in list(memory) + list(momentum or ())]
  nw = len(memory)
  first_anchor_in = len(fields) + len(weights) - nw
  first_anchor_out = int(reads) + len(weights) - nw
  aliases = {first_anchor_in + i: first_anchor_out + i for i in range(nw)}
  kernel = functools.partial(_forward_kernel, config=config, names=names, n=n,
                             precision=precision, save=save, whole=_whole(fields, backend))
  call = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(batch, heads), in_specs=in_specs,
      out_specs=[spec(o) for o in out_shape], input_output_aliases=aliases,
      compiler_params=compiler_params(backend, num_warps, 2), interpret=interpret,
      name="mlp_memory_fwd")
  outs = list(call(*fields.values(), *weights, last))
  y = outs.pop(0) if reads else None
  take = lambda present: tuple(outs.pop(0) for _ in range(nw)) if present else None
  new_memory, new_momentum, new_anchor = take(True), take(mom), take(True)
  return y, new_memory, new_momentum, new_anchor, take(save), take(save and mom)


def _backward_kernel(*refs, config: OpConfig, names: tuple, n: int, precision: Any,
                     whole: frozenset[str]):
  nw, mom, reads = config.weights, config.momentum, "q" in names
  it = _Refs(refs)
  fields = dict(zip(names, it.take(len(names))))
  saved, msaved, anchor0 = it.take(nw), it.maybe(mom, nw), it.take(nw)
  last = it.one()
  dy_ref = it.one() if reads else None
  dmem_end, dmom_end, danchor_end = it.take(nw), it.maybe(mom, nw), it.take(nw)
  dfields = dict(zip(names, it.take(len(names))))
  dmem_out, dmom_out, danchor_out = it.take(nw), it.maybe(mom, nw), it.take(nw)
  danchor = _load(danchor_end)
  read, write = _chunk_access(whole)

  def chunk(c, dmem, dmom, anchor):
    """Cotangents at chunk ``c``'s start (and of ``anchor``; None: the anchor is the start)."""
    memory, momentum = _load(saved, c), _load(msaved, c)
    f = {name: read(name, ref, c) for name, ref in fields.items()}
    dmem = [d + last[c] * da for d, da in zip(dmem, danchor)]
    cot = (dy_ref[c] if reads else None, dmem, dmom)
    if anchor is None:
      fn = lambda m, s, ff: chunk_update(config, m, s, m, ff, precision)
      dmem, dmom, df = jax.vjp(fn, memory, momentum, f)[1](cot)
      da = None
    else:
      fn = lambda m, s, a, ff: chunk_update(config, m, s, a, ff, precision)
      dmem, dmom, da, df = jax.vjp(fn, memory, momentum, anchor, f)[1](cot)
    for name, ref in dfields.items():
      write(name, ref, c, df[name])
    return dmem, dmom, da

  def body(i, carry):
    return chunk(n - 1 - i, carry[0], carry[1], None)[:2]

  dmem, dmom = jax.lax.fori_loop(0, n - 1, body, (_load(dmem_end), _load(dmom_end)))
  dmem, dmom, da = chunk(0, dmem, dmom, _load(anchor0))
  _store(dmem_out, dmem)
  _store(dmom_out, dmom)
  _store(danchor_out, da)


@functools.partial(jax.jit, static_argnames=("config", "precision", "num_warps", "interpret",
                                             "backend"))
def backward(fields: dict[str, jax.Array], saved: Weights, msaved: Weights | None,
             anchor: Weights, last: jax.Array, dy: jax.Array | None, dmemory: Weights,
             dmomentum: Weights | None, danchor: Weights, *, config: OpConfig, precision: Any,
             num_warps: int, interpret: bool = False, backend: str = "triton"):
  """Cotangents of :func:`forward`'s inputs from those of its outputs.

  Args:
    fields, anchor, last: as for :func:`forward`.
    saved, msaved: the forward's per-chunk starting weights and momenta ``[B, H, N, o, i]``.
    dy: ``[B, H, N, C, d_out]`` (None for an unread level); dmemory, dmomentum, danchor: of the
      outputs, per weight ``[B, H, o, i]``.

  Returns:
    ``(dfields, dmemory, dmomentum, danchor)`` for the first chunk's inputs. The anchor's
    cotangent excludes the output anchor's when no chunk completes (the caller adds it).
  """
  names = tuple(fields)
  mom, reads = msaved is not None, dy is not None
  batch, heads, n = fields["k"].shape[:3]
  per_chunk = list(saved) + list(msaved or ())
  ends = list(dmemory) + list(dmomentum or ()) + list(danchor)
  spec = lambda x: _spec(x, backend)
  in_specs = [spec(x) for x in list(fields.values()) + per_chunk + list(anchor)]
  in_specs += [_flag_spec(n, backend)] + [spec(x) for x in ([dy] if reads else []) + ends]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in list(fields.values()) + ends]
  kernel = functools.partial(_backward_kernel, config=config, names=names, n=n,
                             precision=precision, whole=_whole(fields, backend))
  args = list(fields.values()) + per_chunk + list(anchor) + [last] + ([dy] if reads else [])
  call = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(batch, heads), in_specs=in_specs,
      out_specs=[spec(o) for o in out_shape],
      compiler_params=compiler_params(backend, num_warps, 2, parallel=False),
      interpret=interpret, name="mlp_memory_bwd")
  outs = list(call(*args, *ends))
  dfields = dict(zip(names, outs[:len(names)]))
  outs = outs[len(names):]
  nw = len(saved)
  take = lambda present: tuple(outs.pop(0) for _ in range(nw)) if present else None
  return dfields, take(True), take(mom), take(True)
