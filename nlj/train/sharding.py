"""A named device mesh from a flag, parameter shardings by a shape rule, and the sharded step.

The mesh has three axes, built from a spec string such as ``data:2,fsdp:4,tensor:1``
(``--mesh``): ``data`` replicates parameters and splits the batch, ``fsdp`` splits both the
batch and the parameters (ZeRO-3 style: XLA gathers a weight where it is used), ``tensor``
splits the head / hidden dimension of weights. An axis left out has size 1; one axis may be
``-1``, meaning every device the others leave.

Parameter rule (shapes and divisibility only, so it covers every family without per-layer
annotations):

* 0-D and 1-D parameters (norm scales, per-head gates): replicated;
* the token embedding ``[vocab, d_model]``: ``vocab`` over ``tensor``, ``d_model`` over ``fsdp``;
* any other parameter: of its last two axes ``(in, out)``, the one of size ``d_model`` (``in``
  when both are, the larger when neither is) goes over ``fsdp`` and the other over ``tensor``;
  leading axes (conv width, stacked heads) are replicated;
* a mesh axis that does not divide the array axis it is given is dropped (that axis replicated).

Optimizer moments follow their parameters (``optax.tree_map_params``); other optimizer state
(counts), the step and the key are replicated. Batches ``[batch, seq_len + 1]`` are split over
``(data, fsdp)`` on their first axis.

Example:
  mesh = make_mesh("data:2,fsdp:4")
  graphdef, state, shardings = create_train_state(config, optimizer, seed=0, mesh=mesh)
  step = jit_train_step(make_train_step(graphdef, optimizer, schedule), shardings, mesh)
  state, metrics = step(state, shard_batch(batch, mesh))
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nlj.models import ModelConfig, build_model
from nlj.train.step import TrainState, init_train_state, split_model

__all__ = ["MESH_AXES", "BATCH_AXES", "parse_mesh", "make_mesh", "param_spec",
           "state_shardings", "batch_sharding", "shard_batch", "threefry_as_gpu_kernel",
           "create_train_state", "jit_train_step", "jit_eval_step"]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def parse_mesh(spec: str, device_count: int) -> dict[str, int]:
  """Axis sizes ``{"data": d, "fsdp": f, "tensor": t}`` of ``spec`` for ``device_count`` devices.

  Raises:
    ValueError: naming ``--mesh`` and the device count, for an unknown or repeated axis, a size
      that is not a positive int (or one ``-1``), or sizes whose product is not the device count.
  """
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, value = part.partition(":")
    name = name.strip()
    if not sep or name not in MESH_AXES or name in sizes:
      raise ValueError(f"--mesh={spec!r}: expected comma-separated AXIS:SIZE with distinct axes "
                       f"from {MESH_AXES}, got {part!r}")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"--mesh={spec!r}: size of {name!r} must be an int, got {value!r}") from None
    if sizes[name] < 1 and sizes[name] != -1:
      raise ValueError(f"--mesh={spec!r}: size of {name!r} must be positive or -1, got {value!r}")
  fill = [n for n, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"--mesh={spec!r}: at most one axis may be -1, got {fill}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if device_count % known:
      raise ValueError(f"--mesh={spec!r}: the fixed axes ({known} devices) do not divide the "
                       f"device count {device_count}")
    sizes[fill[0]] = device_count // known
  total = math.prod(sizes.values())
  if total != device_count:
    raise ValueError(f"--mesh={spec!r}: axis sizes multiply to {total}, but there are "
                     f"{device_count} devices (jax.device_count()); use sizes whose product is "
                     f"{device_count}, or -1 for one axis")
  return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ``(data, fsdp, tensor)`` mesh of ``spec`` over ``devices`` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec, len(devices))
  shape = tuple(sizes[name] for name in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _fits(mesh: Mesh, axis: str, size: int) -> str | None:
  return axis if mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0 else None


def param_spec(path: tuple[Any, ...], shape: tuple[int, ...], mesh: Mesh, d_model: int) -> P:
  """The ``PartitionSpec`` of a parameter at tree ``path`` of ``shape`` (module docstring rule)."""
  if len(shape) < 2:
    return P()
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  if "embedding" in names and len(shape) == 2:
    return P(_fits(mesh, "tensor", shape[0]), _fits(mesh, "fsdp", shape[1]))
  n_in, n_out = shape[-2:]
  if n_in == d_model or (n_out != d_model and n_in >= n_out):
    last = (_fits(mesh, "fsdp", n_in), _fits(mesh, "tensor", n_out))
  else:
    last = (_fits(mesh, "tensor", n_in), _fits(mesh, "fsdp", n_out))
  return P(*([None] * (len(shape) - 2)), *last)


def state_shardings(abstract: TrainState, optimizer: optax.GradientTransformation, mesh: Mesh,
                    d_model: int) -> TrainState:
  """``NamedSharding`` s of every leaf of ``abstract`` (a ``TrainState`` of arrays or shapes)."""
  replicated = NamedSharding(mesh, P())
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(path, x.shape, mesh, d_model)),
      abstract.params)
  opt_state = optax.tree_map_params(optimizer, lambda _, s: s, abstract.opt_state, params,
                                    transform_non_params=lambda _: replicated)
  return TrainState(replicated, params, opt_state, replicated)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches ``[batch, seq_len + 1]`` split over ``(data, fsdp)`` on the batch axis."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def shard_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """The global batch array from this host's rows ``[batch / process_count, seq_len + 1]``.

  Raises:
    ValueError: the global batch is not divisible by ``data * fsdp``.
  """
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  global_rows = local_batch.shape[0] * jax.process_count()
  if global_rows % ways:
    raise ValueError(f"batch_size={global_rows} must be divisible by data * fsdp = {ways} of "
                     f"the mesh {dict(mesh.shape)}")
  return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(local_batch))


@contextlib.contextmanager
def threefry_as_gpu_kernel():
  """Within the block, JAX lowers threefry (``jax.random``) on a GPU to its CUDA kernel.

  The default GPU lowering unrolls threefry's 20 rounds into each parameter's HLO, and XLA's GPU
  compile of the 760m presets' init took over 170 s (it never finished inside a device call);
  with the kernel it takes 7.7 s (H100, 2026-11-26). The random bits are the same threefry2x32
  either way; other platforms ignore the flag. The previous setting is restored on exit.
  """
  name = "jax_threefry_gpu_kernel_lowering"
  before = getattr(jax.config, name)
  jax.config.update(name, True)
  try:
    yield
  finally:
    jax.config.update(name, before)


def create_train_state(config: ModelConfig, optimizer: optax.GradientTransformation, seed: int,
                       mesh: Mesh) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """Build the model and its train state directly into their shardings on ``mesh``.

  The model is built under ``jax.jit`` with ``out_shardings``, so no device ever holds the full
  unsharded parameters, and with :func:`threefry_as_gpu_kernel`.

  Returns:
    ``(graphdef, state, shardings)``: the static module structure, step-0 ``TrainState`` and the
    ``TrainState`` of its ``NamedSharding`` s.
  """

  def init(key: jax.Array) -> TrainState:
    _, params = split_model(build_model(config, nnx.Rngs(key)))
    return init_train_state(params, optimizer, seed)

  # The key is an argument, not a constant of the jitted init, so XLA cannot try to fold the
  # random initialisation into constants at compile time (jax-ml/jax#16647).
  key = jax.random.key(seed)
  graphdef, _ = split_model(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(seed))))
  shardings = state_shardings(jax.eval_shape(init, key), optimizer, mesh, config.d_model)
  with threefry_as_gpu_kernel():
    state = jax.jit(init, out_shardings=shardings)(key)
  return graphdef, state, shardings


def jit_train_step(train_step: Callable, shardings: TrainState, mesh: Mesh) -> Callable:
  """``jax.jit`` of ``train_step(state, batch)`` with explicit in/out shardings; donates state."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def jit_eval_step(eval_step: Callable, shardings: TrainState, mesh: Mesh) -> Callable:
  """``jax.jit`` of ``eval_step(params, batch)`` with the parameter and batch shardings."""
  return jax.jit(eval_step, in_shardings=(shardings.params, batch_sharding(mesh)),
                 out_shardings=NamedSharding(mesh, P()))
