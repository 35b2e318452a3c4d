"""``demo/nested_lm``: a tiny two-level nested language model trained on the embedded corpus.

Per layer, two levels nest by frequency (:func:`nlj.core.run_nested`):

* slow level -- a residual-MLP key memory ``M_k`` per head, trained in context by DGD with
  momentum on the L2 objective ``||M_k(x) - v||²`` (eq. 80's adaptive projection), updated once
  every ``slow_chunk`` tokens; its meta-learned initial state is trained by the outer loop;
* fast level -- a DeltaNet memory per head, written every token with keys ``M_k(x)``.

The outer level (AdamW on all initial states and projections) minimises next-token loss on
byte-level text of the offline-mix corpus, and the run prints validation loss and bits per byte
before and after training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nlj.core import L2, Level, LevelInputs, MLPMemory, Rule, deltanet, run_nested
from nlj.data import PackedBatches, get_tokenizer, load_corpus
from nlj_experiments import register


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  steps: int = 300
  batch_size: int = 16
  seq_len: int = 128
  d_model: int = 64
  heads: int = 4
  slow_chunk: int = 32
  fast_chunk: int = 16
  learning_rate: float = 3e-3
  eval_batches: int = 8
  seed: int = 0
  tokenizer: str = "bytes"
  log_every: int = 50


class NestedLM:
  """Embedding -> [two-level nested mixer + MLP] -> tied LM head (pure functions of params)."""

  def __init__(self, cfg: DemoConfig, vocab: int):
    if cfg.d_model % cfg.heads:
      raise ValueError(f"d_model={cfg.d_model} must be divisible by heads={cfg.heads}")
    if cfg.seq_len % cfg.slow_chunk:
      raise ValueError(f"seq_len={cfg.seq_len} must be a multiple of slow_chunk={cfg.slow_chunk}")
    self.cfg, self.vocab, self.dh = cfg, vocab, cfg.d_model // cfg.heads
    self.slow = Level(MLPMemory(self.dh, self.dh, hidden=2 * self.dh), L2(),
                      Rule("dgd", momentum=True), chunk=cfg.slow_chunk, heads=cfg.heads,
                      eta=0.01, beta=0.5)
    self.fast = deltanet(self.dh, self.dh, heads=cfg.heads, chunk=cfg.fast_chunk)

  def init(self, key: jax.Array) -> dict:
    d, ks = self.cfg.d_model, jax.random.split(key, 6)
    dense = lambda k, shape: jax.random.normal(k, shape) / np.sqrt(shape[0])
    return {
        "embed": 0.02 * jax.random.normal(ks[0], (self.vocab, d)),
        "proj": dense(ks[1], (d, 3 * d + self.cfg.heads)),
        "out": dense(ks[2], (d, d)) * 0.5,
        "mlp_in": dense(ks[3], (d, 4 * d)),
        "mlp_out": dense(ks[4], (4 * d, d)) * 0.5,
        "slow_init": self.slow.init(ks[5]),
        "fast_init": self.fast.init(ks[5]),
    }

  def __call__(self, params: dict, tokens: jax.Array) -> jax.Array:
    """``tokens [batch, seq] int32 -> logits [batch, seq, vocab] float32``."""
    cfg, b, t = self.cfg, tokens.shape[0], tokens.shape[1]
    norm = lambda x: x * jax.lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6)
    unit = lambda x: x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
    x = params["embed"][tokens]
    p = norm(x) @ params["proj"]
    heads = lambda z: z.reshape(b, t, cfg.heads, self.dh)
    xk, v, q = (heads(p[..., i * cfg.d_model:(i + 1) * cfg.d_model]) for i in range(3))
    beta = jax.nn.sigmoid(p[..., 3 * cfg.d_model:])

    def inner(slow_memory, fast_state, chunk):
      xk_c, v_c, q_c, beta_c = chunk
      k = unit(self.slow.apply(slow_memory, unit(xk_c)))
      fast_state, y = self.fast.run(fast_state, LevelInputs(k, v_c, unit(q_c), beta_c),
                                    aligned=True)
      return fast_state, y, LevelInputs(unit(xk_c), v_c)

    _, y = run_nested(self.slow, self.slow.init_state(params["slow_init"], b), inner,
                      self.fast.init_state(params["fast_init"], b), (xk, v, q, beta))
    x = x + y.reshape(b, t, cfg.d_model) @ params["out"]
    x = x + jax.nn.gelu(norm(x) @ params["mlp_in"]) @ params["mlp_out"]
    return (norm(x) @ params["embed"].T).astype(jnp.float32)


def _loss(model: NestedLM, params: dict, batch: jax.Array) -> jax.Array:
  logits = model(params, batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def run(cfg: DemoConfig, workdir: str) -> dict:
  """Train, evaluate and write ``results.json`` and ``metrics.jsonl`` into ``workdir``."""
  os.makedirs(workdir, exist_ok=True)
  corpus = load_corpus("offline-mix", cfg.tokenizer)
  vocab = get_tokenizer(cfg.tokenizer).vocab_size
  model = NestedLM(cfg, vocab)
  params = model.init(jax.random.PRNGKey(cfg.seed))
  optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, max(1, cfg.steps // 20), max(2, cfg.steps)), weight_decay=0.01)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda p: _loss(model, p, batch))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  eval_loss = jax.jit(lambda p, batch: _loss(model, p, batch))

  def evaluate(params) -> float:
    batches = PackedBatches(corpus.validation, cfg.batch_size, cfg.seq_len, seed=1234)
    losses = [float(eval_loss(params, jnp.asarray(b))) for _, b in zip(range(cfg.eval_batches),
                                                                        batches)]
    return float(np.mean(losses))

  initial = evaluate(params)
  train = PackedBatches(corpus.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
  start, metrics_path = time.time(), os.path.join(workdir, "metrics.jsonl")
  with open(metrics_path, "w") as metrics:
    for step, batch in zip(range(1, cfg.steps + 1), train):
      params, opt_state, loss = train_step(params, opt_state, jnp.asarray(batch))
      if step % cfg.log_every == 0 or step == cfg.steps:
        loss = float(loss)
        rate = step * cfg.batch_size * cfg.seq_len / (time.time() - start)
        metrics.write(json.dumps({"step": step, "loss": loss, "tokens_per_s": rate}) + "\n")
        print(f"step {step:5d}  train loss {loss:.4f}  {rate:,.0f} tokens/s", flush=True)
  final = evaluate(params)
  bits = lambda nats: nats / np.log(2)
  results = {"experiment": "demo/nested_lm", "config": dataclasses.asdict(cfg),
             "val_loss_initial": initial, "val_loss_final": final,
             "val_bits_per_token_final": bits(final), "train_seconds": time.time() - start}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(f"validation loss {initial:.4f} -> {final:.4f} nats/token "
        f"({bits(final):.3f} bits/token, tokenizer={cfg.tokenizer})")
  return results


register("demo/nested_lm", "tiny two-level nested LM (slow MLP key memory around a fast "
         "DeltaNet) on the embedded corpus, byte tokens, CPU", DemoConfig())(run)
