"""``optim/compare_lm``: AdamW vs Muon vs M3 vs DMGD training ``NestedLM`` on byte-level text.

The small-LM half of the paper's optimizer comparison (§9.7; M3's cost, Fig. 12) at CPU scale:
the ``demo/nested_lm`` model (:class:`nlj_experiments.demo.NestedLM`: byte embedding -> two-level
nested mixer, a slow residual-MLP key memory around a fast DeltaNet -> MLP -> tied head; 71k
parameters at the defaults) is trained on the embedded ``offline-mix`` corpus with byte tokens,
from the same initialisation (``seed``) on the same batch sequence, for the same number of steps,
once per optimizer. Recorded per optimizer: the train-loss curve, validation loss (nats per byte,
the mean over ``eval_batches`` fixed validation batches, as ``demo/nested_lm``) at step 0, every
``eval_every`` steps and at the end; the median and mean wall time of a train step (jitted
forward+backward shared by all optimizers, then a jitted per-optimizer update, blocked with
``block_until_ready``) over the training steps after the first two; after all training, the
median of a train step over ``timing_steps`` rounds and the median and mean of the optimizer
update alone over ``10 * timing_steps`` rounds, interleaved across the optimizers (robust to load
changes on a shared machine; the update's mean includes M3's slow step once every ``f``); and
M3/Muon ratios of each. Outputs ``compare_lm.json`` and ``compare_lm.png`` (shared loop,
optimizer construction and plot: :mod:`._compare`).

Which leaves Muon and M3 orthogonalise: the 2-D hidden weights ``proj [64, 196]``, ``out``,
``mlp_in``, ``mlp_out``. Everything else goes to the AdamW branch (``aux_adam_lr``, no weight
decay):

* the tied byte embedding / LM head ``embed [257, 64]`` when ``embed_to_adam`` (default; the usual
  Muon practice for embeddings and heads);
* the inner memories' meta-learned initial states ``slow_init`` (``[4, 32, 16]``, ``[4, 16, 32]``)
  and ``fast_init`` (``[4, 16, 16]``): 3-D, one small matrix per head. They are routed to AdamW
  like 1-D leaves (what :func:`nlj.optim.muon` / :func:`nlj.optim.m3` do with any non-2-D leaf),
  not reshaped: flattening the head axis into rows would orthogonalise unrelated heads jointly,
  and per-head Newton–Schulz on 16x16 initial states (7% of the parameters) is not what the
  paper's M3 is about.

Every learning rate follows the same schedule when ``warmup_cosine`` (default): linear warmup
over 5% of the steps, then cosine decay to 0 (``demo/nested_lm``'s AdamW schedule), applied to
each optimizer's peak rate and to the AdamW branch of Muon/M3. Weight decay: AdamW 0.01
(``demo/nested_lm``'s); none for Muon, M3 (either branch) and DMGD.

Learning rates (the defaults below, peak values) were picked by a one-seed sweep at the default
config (200 steps, batch 16, seq 128, seed 0) on final validation loss, measured on the same
validation batches that are reported (so the reported numbers are slightly optimistic, equally
for every optimizer); the grid was widened where the best value sat at its edge:

* AdamW {1e-3, 3e-3, 1e-2, **2e-2**, 5e-2 (diverged: NaN)};
* Muon, with ``aux_adam_lr`` = AdamW's best (0.02) {0.01, 0.02, **0.05**, 0.1};
* M3 (``"ema"`` mode with ``rms_normalize``, as ``compare_digits``; ``aux_adam_lr`` 0.02)
  {1e-3, 3e-3, **1e-2**, 3e-2};
* DMGD (α = 0.9) {0.03, 0.1, **0.2**, 0.3 (diverged: NaN)}.

Both AdamW's and DMGD's best rates sit next to a diverging one. The sweep's numbers are in
RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nlj.data import PackedBatches, get_tokenizer, load_corpus
from nlj_experiments import register
from nlj_experiments.demo import DemoConfig, NestedLM, _loss
from nlj_experiments.optim import _compare, _io
from nlj_experiments.optim._compare import OPTIMIZERS

_VALIDATION_SEED = 1234  # demo/nested_lm's validation batches


@dataclasses.dataclass(frozen=True)
class Config:
  # Model and data: the DemoConfig fields of the same names (demo/nested_lm's model).
  steps: int = 200
  batch_size: int = 16
  seq_len: int = 128
  d_model: int = 64
  heads: int = 4
  slow_chunk: int = 32
  fast_chunk: int = 16
  eval_batches: int = 8
  seed: int = 0
  # Comparison.
  eval_every: int = 50
  timing_steps: int = 20
  optimizers: tuple[str, ...] = OPTIMIZERS
  warmup_cosine: bool = True
  embed_to_adam: bool = True
  adamw_lr: float = 0.02
  weight_decay: float = 0.01
  muon_lr: float = 0.05
  m3_lr: float = 0.01
  m3_frequency: int = 10
  m3_alpha: float = 0.5
  m3_mode: str = "ema"
  m3_rms_normalize: bool = True
  dmgd_lr: float = 0.2
  aux_adam_lr: float = 0.02


def demo_config(cfg: Config) -> DemoConfig:
  """The :class:`DemoConfig` (byte tokens) with ``cfg``'s model and data fields."""
  names = {f.name for f in dataclasses.fields(DemoConfig)}
  return DemoConfig(tokenizer="bytes",
                    **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                       if f.name in names})


def schedule(cfg: Config):
  """Peak learning rate -> what every optimizer gets (see the module docstring)."""
  if not cfg.warmup_cosine:
    return None
  return lambda peak: optax.warmup_cosine_decay_schedule(
      0.0, peak, max(1, cfg.steps // 20), max(2, cfg.steps))


def _adam_leaves(params: dict) -> dict:
  """``True`` on the tied embedding (routed to AdamW for Muon/M3 when ``embed_to_adam``)."""
  return {k: jax.tree.map(lambda _: k == "embed", v) for k, v in params.items()}


class Setup:
  """Corpus, model, initial parameters and the jitted functions shared by every optimizer."""

  def __init__(self, cfg: Config):
    self.cfg, self.demo = cfg, demo_config(cfg)
    self.corpus = load_corpus("offline-mix", "bytes")
    self.model = NestedLM(self.demo, get_tokenizer("bytes").vocab_size)
    self.params = self.model.init(jax.random.PRNGKey(cfg.seed))
    self.grad_fn = jax.jit(jax.value_and_grad(lambda p, b: _loss(self.model, p, b)))
    self._eval_loss = jax.jit(lambda p, b: _loss(self.model, p, b))
    val = PackedBatches(self.corpus.validation, cfg.batch_size, cfg.seq_len,
                        seed=_VALIDATION_SEED)
    self.val = [jnp.asarray(b) for _, b in zip(range(cfg.eval_batches), val)]

  def evaluate(self, params) -> dict:
    loss = float(np.mean([float(self._eval_loss(params, b)) for b in self.val]))
    return {"val_loss": loss, "val_bits_per_byte": float(loss / np.log(2))}

  def batches(self):
    for b in PackedBatches(self.corpus.train, self.cfg.batch_size, self.cfg.seq_len,
                           seed=self.cfg.seed):
      yield (b,)


def train_one(name: str, cfg: Config, setup: Setup | None = None) -> tuple[dict, dict]:
  """Trains ``NestedLM`` with one optimizer: ``(result, timers)`` (:func:`_compare.train`)."""
  setup = setup or Setup(cfg)
  tx = _compare.make_optimizer(name, cfg, schedule=schedule(cfg),
                               adam_leaves=_adam_leaves if cfg.embed_to_adam else None)
  r, timers = _compare.train(tx, setup.params, setup.grad_fn, setup.batches(), cfg.steps,
                             setup.evaluate, cfg.eval_every)
  return {**r, "initial_val_loss": r["evals"][0]["val_loss"],
          "final_val_loss": r["evals"][-1]["val_loss"],
          "final_val_bits_per_byte": r["evals"][-1]["val_bits_per_byte"]}, timers


def _log(name: str, r: dict) -> None:
  print(f"{name:6s} val loss {r['initial_val_loss']:.4f} -> {r['final_val_loss']:.4f}  "
        f"train (avg of last 20) {r['final_train_loss_avg20']:.4f}  "
        f"step {r['step_time_ms']:.1f} ms", flush=True)


def run(config: Config, workdir: str) -> dict:
  """Trains ``NestedLM`` with each optimizer; writes ``compare_lm.json`` and ``.png``."""
  _compare.check_names(config.optimizers, "compare_lm")
  setup = Setup(config)
  results = _compare.train_all(config.optimizers, lambda name: train_one(name, config, setup),
                               config.timing_steps, _log)
  summary, ratios = _compare.summarize(results)
  print("interleaved medians (ms): " + ", ".join(
      f"{n} step {r['step_time_interleaved_ms']:.1f} / update {r['update_time_ms']:.2f} "
      f"(mean {r['update_time_mean_ms']:.2f})"
      for n, r in results.items()), flush=True)
  if ratios:
    print("M3/Muon: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()), flush=True)
  device = str(jax.devices()[0])
  os.makedirs(workdir, exist_ok=True)
  _compare.plot(results, os.path.join(workdir, "compare_lm.png"), eval_key="val_loss",
                eval_title="validation loss (nats/byte)", device=device, log_loss=False)
  _io.write_json(workdir, "compare_lm.json",
                 {"config": dataclasses.asdict(config), "device": device,
                  "num_params": int(sum(x.size for x in jax.tree.leaves(setup.params))),
                  "summary": summary, "ratios": ratios, "curves": results})
  return {"summary": summary, "ratios": ratios}


register("optim/compare_lm",
         "AdamW vs Muon vs M3 vs DMGD training the nested byte-level LM on offline-mix (§9.7)",
         Config())(run)
