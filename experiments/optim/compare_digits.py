"""``optim/compare_digits``: AdamW vs Muon vs M3 vs DMGD on a small ViT over 8x8 digits.

A CPU-sized stand-in for the paper's ImageNet-21K ViT comparison (§9.7, Fig. 11) and its
efficiency plot (Fig. 12): the same tiny pre-norm ViT (patch 2 -> 16 tokens, width 32, 2 blocks,
4 heads, mean pooling) is trained on scikit-learn's ``load_digits`` (1797 images, a fixed 80/20
split) for the same number of steps with each optimizer. Recorded: train-loss curves, test
loss/accuracy, the median wall time of a train step (jitted forward + backward, then the jitted
update) and of the optimizer update alone, and M3's overhead relative to Muon.

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
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nlj import optim
from nlj_experiments import register
from nlj_experiments.optim import _io

OPTIMIZERS = ("adamw", "muon", "m3", "dmgd")


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


def make_optimizer(name: str, cfg: Config) -> optax.GradientTransformation:
  if name == "adamw":
    return optax.adamw(cfg.adamw_lr, weight_decay=cfg.weight_decay)
  if name == "muon":
    return optim.muon(cfg.muon_lr, adam_learning_rate=cfg.aux_adam_lr)
  if name == "m3":
    return optim.m3(cfg.m3_lr, cfg.m3_frequency, mode=cfg.m3_mode, alpha=cfg.m3_alpha,
                    rms_normalize=cfg.m3_rms_normalize, adam_learning_rate=cfg.aux_adam_lr)
  if name == "dmgd":
    return optim.dmgd(cfg.dmgd_lr, 0.9)
  raise ValueError(f"compare_digits: unknown optimizer {name!r}; known: {OPTIMIZERS}")


def _median_time(fn, n: int) -> float:
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


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


def train_one(name: str, cfg: Config, data, fns=None) -> dict:
  """Trains the ViT with one optimizer; returns curves, test metrics and median timings.

  A train step is ``grad_fn`` (shared, jitted) followed by ``update`` (jitted per optimizer:
  ``tx.update`` + ``apply_updates``); ``step_time_ms`` is the median of the pair, and
  ``update_time_ms`` of the update alone, over ``timing_steps`` calls on a fixed batch.
  """
  (xtr, ytr), test = data
  grad_fn, evaluate = fns or make_fns(cfg, test)
  params = init_vit(jax.random.PRNGKey(cfg.seed), cfg)
  tx = make_optimizer(name, cfg)
  state = tx.init(params)

  @jax.jit
  def update(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  rng = np.random.default_rng(cfg.seed + 1)
  curve, evals = [], []
  for step in range(1, cfg.steps + 1):
    idx = rng.choice(len(xtr), cfg.batch_size, replace=False)
    loss, g = grad_fn(params, xtr[idx], ytr[idx])
    params, state = update(g, state, params)
    curve.append(float(loss))
    if step % cfg.eval_every == 0 or step == cfg.steps:
      tl, ta = evaluate(params)
      evals.append({"step": step, "test_loss": float(tl), "test_acc": float(ta)})

  xb, yb = xtr[:cfg.batch_size], ytr[:cfg.batch_size]
  _, grads = grad_fn(params, xb, yb)
  step_s = _median_time(lambda: update(grad_fn(params, xb, yb)[1], state, params)[0],
                        cfg.timing_steps)
  update_s = _median_time(lambda: update(grads, state, params)[0], cfg.timing_steps)
  tail = curve[-min(20, len(curve)):]
  return {
      "train_loss": curve,
      "final_train_loss_avg20": float(np.mean(tail)),
      "evals": evals,
      "final_test_loss": evals[-1]["test_loss"],
      "final_test_acc": evals[-1]["test_acc"],
      "step_time_ms": 1e3 * step_s,
      "update_time_ms": 1e3 * update_s,
  }


def run(config: Config, workdir: str) -> dict:
  """Trains the ViT with each optimizer; writes ``compare_digits.json`` and ``.png``."""
  for name in config.optimizers:
    if name not in OPTIMIZERS:
      raise ValueError(f"compare_digits: unknown optimizer {name!r}; known: {OPTIMIZERS}")
  data = load_data(config.seed)
  fns = make_fns(config, data[1])
  results = {name: train_one(name, config, data, fns) for name in config.optimizers}
  summary = {n: {k: v for k, v in r.items() if k not in ("train_loss", "evals")}
             for n, r in results.items()}
  ratios = {}
  if "m3" in results and "muon" in results:
    ratios = {
        "m3_over_muon_step_time": results["m3"]["step_time_ms"] / results["muon"]["step_time_ms"],
        "m3_over_muon_update_time":
            results["m3"]["update_time_ms"] / results["muon"]["update_time_ms"],
    }
  out = {"config": dataclasses.asdict(config), "device": str(jax.devices()[0]),
         "summary": summary, "ratios": ratios, "curves": results}

  plt = _io.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for n, r in results.items():
    c = np.asarray(r["train_loss"])
    k = max(1, min(10, len(c) // 5))
    smooth = np.convolve(c, np.ones(k) / k, mode="valid")
    axes[0].plot(np.arange(k, len(c) + 1), smooth, label=n)
    axes[1].plot([e["step"] for e in r["evals"]], [e["test_loss"] for e in r["evals"]], "o-",
                 label=n)
  axes[0].set(title="train loss (moving avg)", xlabel="step", yscale="log")
  axes[1].set(title="test loss", xlabel="step", yscale="log")
  names = list(results)
  axes[2].bar(np.arange(len(names)) - 0.2, [results[n]["step_time_ms"] for n in names], 0.4,
              label="train step")
  axes[2].bar(np.arange(len(names)) + 0.2, [results[n]["update_time_ms"] for n in names], 0.4,
              label="update only")
  axes[2].set(title=f"median time (ms), {out['device']}", xticks=np.arange(len(names)),
              xticklabels=names)
  for ax in axes:
    ax.legend()
  fig.tight_layout()
  os.makedirs(workdir, exist_ok=True)
  fig.savefig(os.path.join(workdir, "compare_digits.png"), dpi=100)
  plt.close(fig)
  _io.write_json(workdir, "compare_digits.json", out)
  return {"summary": summary, "ratios": ratios}


register("optim/compare_digits",
         "AdamW vs Muon vs M3 vs DMGD training a small ViT on 8x8 digits (§9.7)", Config())(run)
