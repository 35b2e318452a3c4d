"""The training loop of a preset decoder LM on the embedded corpus: thin Python around the steps.

``train(config, workdir)``:

1. builds the ``--mesh`` mesh, the preset ``PRESETS[(family, size)]`` and its train state directly
   in its shardings, and restores the newest checkpoint of ``workdir/checkpoints`` if there is
   one (parameters, optimizer state, step, key and the data iterator's position);
2. runs ``steps`` jitted train steps (compiled once: ``tests/train/test_compiles.py``), with the
   next batch placed on the devices while the current step runs; metrics stay on the devices
   and are fetched once every ``log_every`` steps (one host sync per log interval, made after
   the next step is queued, so the device does not idle while the host logs; at checkpoint
   steps before the save), then
   appended to ``metrics.jsonl`` as ``{"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu",
   "memory_bytes"}``, written as TensorBoard scalars ``train/<name>`` to an event file in
   ``workdir`` (``tensorboard --logdir runs``) and shown on stdout (``nlj.train.progress``: a bar
   with ETA on a terminal, one line per interval otherwise);
3. saves a checkpoint every ``checkpoint_every`` steps and at the end (asynchronously);
4. evaluates ``eval_batches`` validation batches (in stream order), writes ``val/loss`` and
   ``val/perplexity`` to TensorBoard and ``results.json`` (validation loss and perplexity, last
   logged train loss, and ``tokens_per_s`` over this invocation's steps, compilation included),
   and ``loss.png`` when matplotlib is importable.

Metrics of a log interval: ``loss`` averaged over it, ``lr`` and ``grad_norm`` of its last step,
``tokens_per_s`` its global tokens over its wall time (the first interval includes compilation),
``mfu`` the model FLOP utilisation ``6 * params * tokens_per_s / (peak_flops * device_count)``
(the ``6N`` FLOPs per token of a forward and backward pass, embeddings included and attention
or memory-update FLOPs left out; ``None`` without ``TrainConfig.peak_flops``), and
``memory_bytes`` the bytes in use on this process's first device (``None`` where the backend
does not report it, e.g. CPU). A resumed run truncates ``metrics.jsonl`` to its checkpoint and
marks the restart in a new event file, so TensorBoard drops the older events past it.

Files are written by process 0 only; every process runs the same loop on its slice of the
batch (``PackedBatches(process_index, process_count)``).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import math
import os
import time
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from nlj.core import IMPLS
from nlj.data import PackedBatches, get_tokenizer, load_corpus
from nlj.models import DTYPES, PRESETS, ModelConfig, count_params
from nlj.models.blocks import layer_families
from nlj.models.registry import check_options
from nlj.train.checkpoint import Checkpoints
from nlj.train.progress import Progress
from nlj.train.sharding import (create_train_state, jit_eval_step, jit_train_step, make_mesh,
                                shard_batch)
from nlj.train.step import adamw_cosine, make_eval_step, make_train_step
from nlj.train.tensorboard import EventWriter

__all__ = ["TrainConfig", "train", "prefetch", "model_config", "parse_model_options"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A language-model training run (every field is a ``--config.FIELD`` flag of ``launch.py``).

  Attributes:
    family: model family (``nlj.models.families()``).
    size: preset size (``nlj.models.SIZES``); the model is ``PRESETS[(family, size)]`` with
      ``dtype`` and ``remat`` below.
    steps: total optimizer steps (a resumed run continues up to this many).
    batch_size: global batch, in sequences (divisible by the mesh's ``data * fsdp``).
    seq_len: tokens per sequence.
    learning_rate: peak AdamW learning rate.
    warmup: linear warmup steps, then cosine decay to 10% at ``steps``.
    weight_decay: AdamW decoupled weight decay.
    grad_clip: gradient global-norm clip.
    tokenizer: ``nlj.data.get_tokenizer`` name; its vocabulary must fit the preset's.
    mesh: mesh spec, e.g. ``data:2,fsdp:4,tensor:1`` (``nlj.train.sharding``).
    checkpoint_every: save every this many steps (and at the last step).
    keep: number of checkpoints kept.
    seed: parameter initialisation and data order seed.
    eval_batches: validation batches averaged for the final validation loss.
    log_every: fetch and log metrics every this many steps.
    peak_flops: peak FLOP/s of one device (e.g. ``989e12`` for an H100's dense bf16) for the
      logged ``mfu``; None (the default, e.g. on CPU) logs ``mfu`` as null.
    dtype: the model's compute dtype (``nlj.models.DTYPES``; parameters and memory states stay
      float32).
    remat: recompute each block's forward in the backward pass (``ModelConfig.remat``).
    model_options: family options added to (or replacing) the preset's ``ModelConfig.options``
      as ``NAME=VALUE`` pairs separated by commas, e.g. ``eta_scale=0.01,momentum=false`` for
      the Table 6 ablations of ``hope``; values parse as bool (``true``/``false``), int, float,
      else str (:func:`parse_model_options`).
    impl: the memory levels' implementation (``ModelConfig.impl``: ``auto``, ``chunked``,
      ``pallas`` or ``reference``).
    matmul_precision: ``jax.default_matmul_precision`` for the whole run (every product that
      names no precision of its own follows it when traced, the kernels' included), e.g.
      ``BF16_BF16_F32`` (bfloat16 operands, float32 accumulation: what lets the MLP-memory
      kernel's backward fit an H100 at self-modifying Titans' ``small`` widths, with
      ``impl="pallas"``) or ``highest``; None keeps JAX's default.
  """

  family: str = "gated_deltanet"
  size: str = "tiny"
  steps: int = 200
  batch_size: int = 16
  seq_len: int = 128
  learning_rate: float = 3e-3
  warmup: int = 20
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  tokenizer: str = "bytes"
  mesh: str = "data:-1"
  checkpoint_every: int = 100
  keep: int = 3
  seed: int = 0
  eval_batches: int = 8
  log_every: int = 10
  peak_flops: float | None = None
  dtype: str = "float32"
  remat: bool = False
  model_options: str = ""
  impl: str = "auto"
  matmul_precision: str | None = None


def parse_model_options(text: str) -> tuple[tuple[str, Any], ...]:
  """``"eta_scale=0.01,momentum=false"`` -> ``(("eta_scale", 0.01), ("momentum", False))``."""
  options = []
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, sep, value = (part.strip() for part in item.partition("="))
    if not sep or not name or not value:
      raise ValueError(f"TrainConfig.model_options: {item!r} is not NAME=VALUE (in {text!r})")
    options.append((name, _option_value(value)))
  names = [name for name, _ in options]
  if len(set(names)) != len(names):
    raise ValueError(f"TrainConfig.model_options: repeated option name in {text!r}")
  return tuple(options)


def _option_value(text: str) -> Any:
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def model_config(config: TrainConfig) -> ModelConfig:
  """The preset of ``config`` with its ``dtype``, ``remat``, ``impl`` and ``model_options``."""
  preset = PRESETS[(config.family, config.size)]
  options = dict(preset.options) | dict(parse_model_options(config.model_options))
  return dataclasses.replace(preset, dtype=config.dtype, remat=config.remat, impl=config.impl,
                             options=tuple(options.items()))


def _check(config: TrainConfig) -> None:
  for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "keep", "eval_batches",
               "log_every"):
    value = getattr(config, name)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
  if (config.family, config.size) not in PRESETS:
    raise ValueError(f"TrainConfig.family={config.family!r}, size={config.size!r}: no such preset; "
                     f"families {sorted({f for f, _ in PRESETS})}, sizes "
                     f"{sorted({s for _, s in PRESETS})}")
  if not isinstance(config.warmup, int) or not 0 <= config.warmup < config.steps:
    raise ValueError(f"TrainConfig.warmup must be an int in [0, steps={config.steps}), got "
                     f"{config.warmup!r} (with launch.py --steps, also set --config.warmup)")
  if config.peak_flops is not None and not config.peak_flops > 0:
    raise ValueError(f"TrainConfig.peak_flops must be None or positive, got {config.peak_flops!r}")
  if config.dtype not in DTYPES:
    raise ValueError(f"TrainConfig.dtype must be one of {DTYPES}, got {config.dtype!r}")
  if not isinstance(config.remat, bool):
    raise ValueError(f"TrainConfig.remat must be a bool, got {config.remat!r}")
  if config.impl not in IMPLS:
    raise ValueError(f"TrainConfig.impl must be one of {IMPLS}, got {config.impl!r}")
  try:
    with jax.default_matmul_precision(config.matmul_precision):
      pass
  except ValueError as e:
    raise ValueError(f"TrainConfig.matmul_precision={config.matmul_precision!r}: {e}") from e
  if parse_model_options(config.model_options):
    model = model_config(config)
    try:  # options no family of the model reads
      check_options(model.options, layer_families(model))
    except ValueError as e:
      raise ValueError(f"TrainConfig.model_options={config.model_options!r}: {e}") from e


def prefetch(batches: PackedBatches, mesh: Mesh, count: int, size: int = 2
             ) -> Iterator[tuple[jax.Array, dict[str, int]]]:
  """``count`` sharded batches, each with the iterator position after it, ``size`` ahead.

  Device transfers are asynchronous, so the batches after the current one are on their way to
  the devices while the step that consumes the current one runs.
  """
  queue: collections.deque = collections.deque()

  def put() -> None:
    queue.append((shard_batch(next(batches), mesh), batches.state()))

  for _ in range(min(size, count)):
    put()
  for i in range(count):
    yield queue.popleft()
    if i + size < count:
      put()


def _read_metrics(path: str, up_to: int) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if r["step"] <= up_to]


def _memory_bytes() -> int | None:
  """Bytes in use on this process's first device, or None where the backend does not say."""
  stats = jax.local_devices()[0].memory_stats()
  return None if stats is None else stats.get("bytes_in_use")


def _plot(records: list[dict], path: str) -> None:
  if not records or importlib.util.find_spec("matplotlib") is None:
    return
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r["step"] for r in records], [r["loss"] for r in records])
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (nats/token)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def train(config: TrainConfig, workdir: str) -> dict:
  """Train (or resume) ``config`` in ``workdir``; returns the ``results.json`` dict."""
  _check(config)
  with jax.default_matmul_precision(config.matmul_precision):
    return _train(config, workdir)


def _train(config: TrainConfig, workdir: str) -> dict:
  model = model_config(config)
  vocab = get_tokenizer(config.tokenizer).vocab_size
  if vocab > model.vocab:
    raise ValueError(f"TrainConfig.tokenizer={config.tokenizer!r} has {vocab} ids, more than the "
                     f"{model.vocab} of preset ({config.family!r}, {config.size!r})")
  main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  corpus = load_corpus("offline-mix", config.tokenizer)
  mesh = make_mesh(config.mesh)
  if config.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ValueError(f"TrainConfig.batch_size={config.batch_size} must be divisible by data * fsdp "
                     f"of TrainConfig.mesh={config.mesh!r} ({dict(mesh.shape)})")
  optimizer, schedule = adamw_cosine(config.learning_rate, config.warmup, config.steps,
                                     config.weight_decay, config.grad_clip)
  graphdef, state, shardings = create_train_state(model, optimizer, config.seed, mesh)
  train_step = jit_train_step(make_train_step(graphdef, optimizer, schedule), shardings, mesh)
  eval_step = jit_eval_step(make_eval_step(graphdef), shardings, mesh)
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  batches = PackedBatches(corpus.train, config.batch_size, config.seq_len, config.seed, **hosts)
  checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), config.keep)
  if checkpoints.latest_step() is not None:
    state, position = checkpoints.restore(state, shardings)
    batches.restore(position)
  start = int(jax.device_get(state.step))
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  records = _read_metrics(metrics_path, start)  # drops lines logged after the checkpoint
  if main:
    with open(metrics_path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    events, progress = EventWriter(workdir), Progress(config.steps, start)
    events.restart(start + 1)
  pending, tick, run_start = [], time.perf_counter(), time.perf_counter()
  tokens = config.batch_size * config.seq_len
  params = count_params(model)

  def log(step: int, interval: list[dict]) -> None:
    """Fetch one log interval's metrics (the host's only sync) and write its record."""
    nonlocal tick
    fetched, now = jax.device_get(interval), time.perf_counter()
    tokens_per_s = len(fetched) * tokens / (now - tick)
    record = {"step": step, "loss": float(np.mean([m["loss"] for m in fetched])),
              "lr": float(fetched[-1]["learning_rate"]),
              "grad_norm": float(fetched[-1]["grad_norm"]), "tokens_per_s": tokens_per_s,
              "mfu": None if config.peak_flops is None else
                     6 * params * tokens_per_s / (config.peak_flops * jax.device_count()),
              "memory_bytes": _memory_bytes()}
    tick = now
    records.append(record)
    if main:
      with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
      events.scalars(step, {f"train/{k}": v for k, v in record.items()
                            if k != "step" and v is not None})
      progress.update(record)

  due = None  # a finished log interval, fetched once the next step is queued behind it
  for step, (batch, position) in enumerate(
      prefetch(batches, mesh, max(0, config.steps - start)), start + 1):
    state, metrics = train_step(state, batch)
    if due is not None:  # the device has this step to run while the host waits on the last
      log(*due)
      due = None
    pending.append(metrics)
    if step % config.log_every == 0 or step == config.steps:
      due, pending = (step, pending), []
    if step % config.checkpoint_every == 0 or step == config.steps:
      if due is not None:  # a checkpoint's metrics are on disk before it (saving syncs anyway)
        log(*due)
        due = None
      checkpoints.save(state, position)
  trained = max(0, config.steps - start)
  seconds = time.perf_counter() - run_start
  validation = PackedBatches(corpus.validation, config.batch_size, config.seq_len, seed=0,
                             shuffle=False, **hosts)
  losses = [eval_step(state.params, shard_batch(b, mesh))["loss"]
            for _, b in zip(range(config.eval_batches), validation)]
  val_loss = float(np.mean(jax.device_get(losses)))
  checkpoints.close()
  results = {"family": config.family, "size": config.size, "params": params,
             "steps": config.steps, "resumed_from_step": start, "mesh": dict(mesh.shape),
             "devices": jax.device_count(), "val_loss": val_loss,
             "val_perplexity": math.exp(val_loss),
             "train_loss": records[-1]["loss"] if records else None,
             "tokens_per_s": trained * tokens / seconds if trained else None,
             "config": dataclasses.asdict(config)}
  if main:
    progress.close()
    events.scalars(start + trained, {"val/loss": val_loss, "val/perplexity": math.exp(val_loss)})
    events.close()
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    _plot(records, os.path.join(workdir, "loss.png"))
    print(f"validation loss {val_loss:.4f} nats/token, perplexity {math.exp(val_loss):.2f} "
          f"(tokenizer={config.tokenizer})", flush=True)
  return results
