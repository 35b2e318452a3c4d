"""Shared pieces of the optimizer comparisons (``compare_digits``, ``compare_lm``).

* :func:`make_optimizer` -- AdamW / Muon / M3 / DMGD by name from a config's flat fields.
* :func:`train` -- a timed training loop: a shared jitted ``grad_fn`` (compiled once for every
  optimizer) followed by a per-optimizer jitted ``update``; every step is blocked on
  (``jax.block_until_ready``) and timed.
* :func:`interleaved_times`, :func:`train_all` -- after training, the train step and the update
  alone are timed again round-robin over the optimizers, which is robust to load drift on a
  shared machine.
* :func:`summarize`, :func:`plot` -- the per-optimizer summary, the M3/Muon time ratios and the
  three-panel figure (train loss, evaluation loss, median times).

A config passed to :func:`make_optimizer` needs the fields ``adamw_lr, weight_decay, muon_lr,
m3_lr, m3_frequency, m3_alpha, m3_mode, m3_rms_normalize, dmgd_lr, aux_adam_lr`` (flat fields, so
``launch.py --config.F=V`` can override each).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import optax

from nlj import optim
from nlj_experiments.optim import _io

OPTIMIZERS = ("adamw", "muon", "m3", "dmgd")


def check_names(names, who: str) -> None:
  """Raises ``ValueError`` (naming ``who``) on an optimizer name not in :data:`OPTIMIZERS`."""
  for name in names:
    if name not in OPTIMIZERS:
      raise ValueError(f"{who}: unknown optimizer {name!r}; known: {OPTIMIZERS}")


def make_optimizer(
    name: str,
    cfg: Any,
    *,
    schedule: Callable[[float], Any] | None = None,
    adam_leaves: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
  """The optimizer ``name`` with ``cfg``'s hyperparameters.

  Args:
    name: one of :data:`OPTIMIZERS`.
    cfg: a config with the fields listed in the module docstring.
    schedule: maps a peak learning rate to what the optimizer gets (a float or an
      ``optax.Schedule``), applied to every learning rate including Muon's/M3's AdamW branch;
      ``None`` keeps them constant.
    adam_leaves: ``params -> bool tree``; for Muon and M3, leaves marked ``True`` go to a plain
      AdamW (``aux_adam_lr``, no weight decay) even when 2-D, e.g. a tied embedding. Non-2-D
      leaves always go to AdamW (:func:`nlj.optim.muon` / :func:`nlj.optim.m3`).
  """
  lr = schedule or (lambda peak: peak)
  if name == "adamw":
    return optax.adamw(lr(cfg.adamw_lr), weight_decay=cfg.weight_decay)
  if name == "dmgd":
    return optim.dmgd(lr(cfg.dmgd_lr), 0.9)
  if name == "muon":
    tx = optim.muon(lr(cfg.muon_lr), adam_learning_rate=lr(cfg.aux_adam_lr))
  elif name == "m3":
    tx = optim.m3(lr(cfg.m3_lr), cfg.m3_frequency, mode=cfg.m3_mode, alpha=cfg.m3_alpha,
                  rms_normalize=cfg.m3_rms_normalize, adam_learning_rate=lr(cfg.aux_adam_lr))
  else:
    raise ValueError(f"unknown optimizer {name!r}; known: {OPTIMIZERS}")
  if adam_leaves is None:
    return tx
  return optax.partition(
      {"matrix": tx, "adam": optax.adamw(lr(cfg.aux_adam_lr), weight_decay=0.0)},
      lambda p: jax.tree.map(lambda a: "adam" if a else "matrix", adam_leaves(p)))


def train(
    tx: optax.GradientTransformation,
    params: Any,
    grad_fn: Callable[..., tuple[jax.Array, Any]],
    batches: Iterator[tuple],
    steps: int,
    evaluate: Callable[[Any], dict],
    eval_every: int,
    skip_steps: int = 2,
) -> tuple[dict, dict[str, Callable[[], Any]]]:
  """Trains ``params`` with ``tx`` for ``steps`` steps; returns ``(result, timers)``.

  A step is ``loss, g = grad_fn(params, *batch)`` then the jitted ``update`` (``tx.update`` +
  ``apply_updates``); it is timed from dispatch to ``block_until_ready`` on loss, parameters and
  state (the batch is on the device before the clock starts). ``result["step_time_ms"]`` is the
  median over the steps after the first ``skip_steps`` (which include compilation) and
  ``step_time_mean_ms`` their mean (M3's slow-momentum step runs once every ``f`` steps, so
  mean > median there). ``evaluate(params) -> {metric: float}`` runs at step 0, every
  ``eval_every`` steps and at the end.

  ``timers`` holds two zero-argument callables on the final parameters and the last batch, for
  :func:`interleaved_times`: ``"step"`` (gradient + update, final state) and ``"update"`` (the
  update alone on fixed gradients; each call advances the optimizer state, parameters fixed).
  """
  state = tx.init(params)

  @jax.jit
  def update(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  curve, times = [], []
  evals = [{"step": 0, **evaluate(params)}]
  batch = None
  for step in range(1, steps + 1):
    batch = jax.block_until_ready(tuple(jax.device_put(b) for b in next(batches)))
    t0 = time.perf_counter()
    loss, g = grad_fn(params, *batch)
    params, state = update(g, state, params)
    jax.block_until_ready((loss, params, state))
    times.append(time.perf_counter() - t0)
    curve.append(float(loss))
    if step % eval_every == 0 or step == steps:
      evals.append({"step": step, **evaluate(params)})
  _, grads = grad_fn(params, *batch)
  timed_state = [state]

  def update_only():  # advances the state, so M3's slow step comes once every f calls
    out = update(grads, timed_state[0], params)
    timed_state[0] = out[1]
    return out

  timers = {"step": lambda: update(grad_fn(params, *batch)[1], state, params),
            "update": update_only}
  timed = times[skip_steps:] or times
  tail = curve[-min(20, len(curve)):]
  return {
      "train_loss": curve,
      "final_train_loss_avg20": float(np.mean(tail)),
      "evals": evals,
      "step_time_ms": 1e3 * float(np.median(timed)),
      "step_time_mean_ms": 1e3 * float(np.mean(timed)),
      "timed_steps": len(timed),
  }, timers


def interleaved_times(timers: dict[str, dict[str, Callable[[], Any]]],
                      rounds: dict[str, int]) -> dict[str, dict[str, tuple[float, float]]]:
  """``(median, mean)`` wall time (ms) of every ``timers[optimizer][kind]``, called round-robin.

  For each kind in turn, every optimizer's timer is called once (untimed warm-up), then
  ``rounds[kind]`` rounds each call every optimizer's timer once, blocking on the result; so a
  change of load on a shared machine hits every optimizer alike (the training-loop times of
  :func:`train` are taken one optimizer after the other and do not have that property).
  """
  out = {n: {} for n in timers}
  for kind, n_rounds in rounds.items():
    fns = {n: kinds[kind] for n, kinds in timers.items()}
    for fn in fns.values():
      jax.block_until_ready(fn())
    ts = {n: [] for n in fns}
    for _ in range(max(1, n_rounds)):
      for n, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts[n].append(time.perf_counter() - t0)
    for n, v in ts.items():
      out[n][kind] = (1e3 * float(np.median(v)), 1e3 * float(np.mean(v)))
  return out


def train_all(names, train_one: Callable[[str], tuple[dict, dict]], timing_steps: int,
              log: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
  """``train_one(name) -> (result, timers)`` for every optimizer, one after the other, then the
  interleaved timing: ``timing_steps`` rounds of a train step (``step_time_interleaved_ms``,
  median) and ``10 * timing_steps`` rounds of the update alone (``update_time_ms`` median,
  ``update_time_mean_ms`` mean, which includes M3's slow-momentum steps)."""
  results, timers = {}, {}
  for name in names:
    results[name], timers[name] = train_one(name)
    if log:
      log(name, results[name])
  times = interleaved_times(timers, {"step": timing_steps, "update": 10 * timing_steps})
  for name, t in times.items():
    results[name]["step_time_interleaved_ms"] = t["step"][0]
    results[name]["update_time_ms"], results[name]["update_time_mean_ms"] = t["update"]
  return results


def summarize(results: dict[str, dict]) -> tuple[dict, dict]:
  """``(summary, ratios)``: each result without its curves, and M3/Muon time ratios."""
  summary = {n: {k: v for k, v in r.items() if k not in ("train_loss", "evals")}
             for n, r in results.items()}
  ratios = {}
  if "m3" in results and "muon" in results:
    m3, muon = results["m3"], results["muon"]
    ratios = {f"m3_over_muon_{k}": m3[f"{k}_ms"] / muon[f"{k}_ms"]
              for k in ("step_time", "step_time_mean", "step_time_interleaved", "update_time",
                        "update_time_mean")
              if f"{k}_ms" in m3 and f"{k}_ms" in muon}
  return summary, ratios


def plot(results: dict[str, dict], path: str, *, eval_key: str, eval_title: str,
         device: str, log_loss: bool = True) -> None:
  """Train loss (moving average), ``evals[eval_key]`` vs step, and median times, to ``path``.

  With ``log_loss=False`` the evaluation panel starts after step 0 (its value goes in the title).
  """
  plt = _io.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  yscale = "log" if log_loss else "linear"
  for n, r in results.items():
    c = np.asarray(r["train_loss"])
    k = max(1, min(10, len(c) // 5))
    smooth = np.convolve(c, np.ones(k) / k, mode="valid")
    axes[0].plot(np.arange(k, len(c) + 1), smooth, label=n)
    ev = r["evals"] if log_loss else [e for e in r["evals"] if e["step"] > 0]
    axes[1].plot([e["step"] for e in ev], [e[eval_key] for e in ev], "o-", label=n)
  if not log_loss:  # on a linear scale the step-0 value would flatten the curves
    first = next(iter(results.values()))["evals"][0]
    eval_title = f"{eval_title}; step 0: {first[eval_key]:.3f}"
  axes[0].set(title="train loss (moving avg)", xlabel="step", yscale=yscale)
  axes[1].set(title=eval_title, xlabel="step", yscale=yscale)
  names = list(results)
  x = np.arange(len(names))
  bars = (("step_time_ms", "train step (in training)"),
          ("step_time_interleaved_ms", "train step (interleaved)"),
          ("update_time_ms", "update only (interleaved)"))
  for i, (key, label) in enumerate(bars):
    axes[2].bar(x + 0.27 * (i - 1), [results[n].get(key, np.nan) for n in names], 0.27,
                label=label)
  top = max(results[n].get(k, 0.0) for n in names for k, _ in bars)
  axes[2].set(title=f"median time (ms, log), {device}", xticks=x, xticklabels=names,
              yscale="log", ylim=(None, 30 * top))  # room for the legend above the bars
  for ax in axes:
    ax.legend(fontsize=8, loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
