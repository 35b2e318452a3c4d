"""``optim/compare_digits``: AdamW vs Muon vs M3 vs DMGD on a small ViT over 8x8 digits.

A CPU-sized stand-in for the paper's ImageNet-21K ViT comparison (§9.7, Fig. 11) and its
efficiency plot (Fig. 12): the same tiny pre-norm ViT (patch 2 -> 16 tokens, width 32, 2 blocks,
4 heads, mean pooling) is trained on scikit-learn's ``load_digits`` (1797 images, a fixed 80/20
split) for the same number of steps with each optimizer. Recorded: train-loss curves, test
loss/accuracy (also at step 0), the median wall time of a train step (jitted forward + backward,
then the jitted update) -- over the training steps after the first two, and again over
``timing_steps`` rounds interleaved across optimizers -- and of the optimizer update alone
(``10 * timing_steps`` interleaved rounds; median and mean), and M3's overhead relative to
Muon. The training loop, optimizer construction and plot are shared with ``optim/compare_lm``
(:mod:`._compare`).

Muon and M3 use :func:`nlj.optim.muon` / :func:`nlj.optim.m3`, i.e. Newton–Schulz on every 2-D
kernel (patch embedding and head included) and AdamW on biases, norms and the ``[1, T, d]``
positional embedding. Learning rates are the defaults of :class:`Config`, each picked from a
2–4 point sweep at seed 0 and 400 steps (AdamW {3e-3, 1e-2}; Muon {0.01, 0.02, 0.05}; M3 with
``rms_normalize`` {1e-3, 3e-3, 1e-2}, without {1e-4, 3e-4, 1e-3}; DMGD {0.05, 0.1, 0.2}); no
per-seed tuning. M3 runs in ``"ema"`` mode with unit-RMS matrix directions (the raw box's
``NS(·)/√V`` scale follows the gradient scale and trained worse at every learning rate tried).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nlj_experiments import register
from nlj_experiments.optim import _compare, _io
from nlj_experiments.optim._compare import OPTIMIZERS


@dataclasses.dataclass(frozen=True)
class Config:
  steps: int = 400
  batch_size: int = 64
  patch: int = 2
  width: int = 32
  depth: int = 2
  heads: int = 4
  mlp_ratio: int = 2
  seed: int = 0
  eval_every: int = 50
  timing_steps: int = 50
  optimizers: tuple[str, ...] = OPTIMIZERS
  adamw_lr: float = 3e-3
  weight_decay: float = 1e-4
  muon_lr: float = 0.01
  m3_lr: float = 1e-3
  m3_frequency: int = 10
  m3_alpha: float = 0.5
  m3_mode: str = "ema"
  m3_rms_normalize: bool = True
  dmgd_lr: float = 0.05
  aux_adam_lr: float = 3e-3


def load_data(seed: int):
  """Digits as ``[N, 8, 8]`` float32 in [0, 1] and int labels, split 80/20 with ``seed``."""
  from sklearn.datasets import load_digits

  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  n_train = int(0.8 * len(x))
  tr, te = perm[:n_train], perm[n_train:]
  return (x[tr], y[tr]), (x[te], y[te])


def init_vit(key: jax.Array, cfg: Config) -> dict:
  n_tok = (8 // cfg.patch)**2
  d, h = cfg.width, cfg.width * cfg.mlp_ratio
  ks = iter(jax.random.split(key, 4 + 4 * cfg.depth))
  dense = lambda k, i, o: jax.random.normal(k, (i, o), jnp.float32) / np.sqrt(i)
  params = {
      "embed": {"kernel": dense(next(ks), cfg.patch**2, d), "bias": jnp.zeros(d)},
      "pos": 0.02 * jax.random.normal(next(ks), (1, n_tok, d)),
      "head": {"kernel": dense(next(ks), d, 10) * 0.1, "bias": jnp.zeros(10)},
      "norm": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
      "blocks": [],
  }
  for _ in range(cfg.depth):
    params["blocks"].append({
        "norm1": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        "qkv": {"kernel": dense(next(ks), d, 3 * d), "bias": jnp.zeros(3 * d)},
        "proj": {"kernel": dense(next(ks), d, d) * 0.5, "bias": jnp.zeros(d)},
        "norm2": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        "fc1": {"kernel": dense(next(ks), d, h), "bias": jnp.zeros(h)},
        "fc2": {"kernel": dense(next(ks), h, d) * 0.5, "bias": jnp.zeros(d)},
    })
  return params


def _ln(p, x):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _dense(p, x):
  return x @ p["kernel"] + p["bias"]


def vit_apply(params: dict, images: jax.Array, cfg: Config) -> jax.Array:
  """Logits ``[B, 10]`` for images ``[B, 8, 8]``."""
  b, p = images.shape[0], cfg.patch
  x = images.reshape(b, 8 // p, p, 8 // p, p).transpose(0, 1, 3, 2, 4).reshape(b, -1, p * p)
  x = _dense(params["embed"], x) + params["pos"]
  nh, d = cfg.heads, cfg.width
  for blk in params["blocks"]:
    q, k, v = jnp.split(_dense(blk["qkv"], _ln(blk["norm1"], x)), 3, axis=-1)
    split = lambda t: t.reshape(b, -1, nh, d // nh)
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(d // nh))
    o = jnp.einsum("bhqk,bkhd->bqhd", att, split(v)).reshape(b, -1, d)
    x = x + _dense(blk["proj"], o)
    x = x + _dense(blk["fc2"], jax.nn.gelu(_dense(blk["fc1"], _ln(blk["norm2"], x))))
  return _dense(params["head"], _ln(params["norm"], x).mean(1))


def make_fns(cfg: Config, test_data):
  """Jitted functions shared by every optimizer (compiled once): loss+grad and evaluation."""
  xte, yte = test_data

  def loss_fn(p, x, y):
    logits = vit_apply(p, x, cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  grad_fn = jax.jit(jax.value_and_grad(lambda p, x, y: loss_fn(p, x, y)[0]))

  @jax.jit
  def evaluate(p):
    loss, logits = loss_fn(p, xte, yte)
    return loss, jnp.mean(jnp.argmax(logits, -1) == yte)

  return grad_fn, evaluate


def train_one(name: str, cfg: Config, data, fns=None) -> tuple[dict, dict]:
  """Trains the ViT with one optimizer (:func:`_compare.train`): ``(result, timers)``."""
  (xtr, ytr), test = data
  grad_fn, evaluate = fns or make_fns(cfg, test)
  rng = np.random.default_rng(cfg.seed + 1)

  def batches():
    while True:
      idx = rng.choice(len(xtr), cfg.batch_size, replace=False)
      yield xtr[idx], ytr[idx]

  def metrics(p):
    tl, ta = evaluate(p)
    return {"test_loss": float(tl), "test_acc": float(ta)}

  r, timers = _compare.train(_compare.make_optimizer(name, cfg),
                             init_vit(jax.random.PRNGKey(cfg.seed), cfg), grad_fn, batches(),
                             cfg.steps, metrics, cfg.eval_every)
  return {**r, "final_test_loss": r["evals"][-1]["test_loss"],
          "final_test_acc": r["evals"][-1]["test_acc"]}, timers


def run(config: Config, workdir: str) -> dict:
  """Trains the ViT with each optimizer; writes ``compare_digits.json`` and ``.png``."""
  _compare.check_names(config.optimizers, "compare_digits")
  data = load_data(config.seed)
  fns = make_fns(config, data[1])
  results = _compare.train_all(config.optimizers,
                               lambda name: train_one(name, config, data, fns),
                               config.timing_steps)
  summary, ratios = _compare.summarize(results)
  device = str(jax.devices()[0])
  os.makedirs(workdir, exist_ok=True)
  _compare.plot(results, os.path.join(workdir, "compare_digits.png"), eval_key="test_loss",
                eval_title="test loss", device=device)
  _io.write_json(workdir, "compare_digits.json",
                 {"config": dataclasses.asdict(config), "device": device, "summary": summary,
                  "ratios": ratios, "curves": results})
  return {"summary": summary, "ratios": ratios}


register("optim/compare_digits",
         "AdamW vs Muon vs M3 vs DMGD training a small ViT on 8x8 digits (§9.7)", Config())(run)
