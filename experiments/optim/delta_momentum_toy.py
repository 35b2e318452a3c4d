r"""``optim/delta_momentum_toy``: momentum vs delta momentum on eq. 53 (Fig. 4).

Minimise :math:`\psi(r,\theta) = r^2 + k\,(r - \theta + a\sin(\omega r))^2` from
:math:`(r_0, \theta_0) = (-3.5, 2)` (minimum at the origin). The paper gives neither
:math:`k, a, \omega` nor the step sizes; defaults here: ``k = 5, a = 0.5, ω = 3`` (a curved,
ill-conditioned valley with wiggles), forget gate ``α = 0.9`` for every method, and for each
method the learning rate is the best of a shared grid (fewest steps until ψ stays below
``tol``; ties by final loss). Methods (all :mod:`nlj.optim`, parameter ``p = (r, θ)`` is one
leaf, so the rank-1 delta form uses the full 2-D gradient as the key):

* ``momentum``: heavy-ball, ``optim.generalized_momentum`` (dot-product objective).
* ``delta_literal``: eq. 49 literally, ``m ← m(α - ζ g gᵀ) + g`` with raw gradients
  (``normalize_keys=False``, ``ζ = 1e-4``, so ``ζ‖g‖² < 1 + α`` even at the start where
  ``‖g‖ ≈ 55``): strong, gradient-dependent damping in steep regions, plain momentum near the
  minimum.
* ``delta_normalized``: the library default (unit keys, ``ζ = 0.05``): a gradient-direction
  dependent but scale-free erase.

Outputs ``delta_momentum_toy.json`` (per method: best lr, steps to tolerance, final ψ, the whole
grid) and ``delta_momentum_toy.png`` (trajectories on the contour plot and ψ vs step).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nlj import optim
from nlj_experiments import register
from nlj_experiments.optim import _io


@dataclasses.dataclass(frozen=True)
class Config:
  k: float = 5.0
  a: float = 0.5
  omega: float = 3.0
  start: tuple[float, float] = (-3.5, 2.0)
  steps: int = 300
  alpha: float = 0.9
  learning_rates: tuple[float, ...] = (0.002, 0.003, 0.005, 0.007, 0.01, 0.014, 0.02, 0.03)
  delta_literal_strength: float = 1e-4
  delta_normalized_strength: float = 0.05
  tol: float = 1e-4


def psi(p: jax.Array, cfg: Config) -> jax.Array:
  r, th = p[0], p[1]
  return r**2 + cfg.k * (r - th + cfg.a * jnp.sin(cfg.omega * r))**2


def methods(cfg: Config) -> dict:
  return {
      "momentum": lambda lr: optim.generalized_momentum(lr, cfg.alpha),
      "delta_literal": lambda lr: optim.delta_momentum(
          lr, cfg.alpha, delta_strength=cfg.delta_literal_strength, normalize_keys=False),
      "delta_normalized": lambda lr: optim.delta_momentum(
          lr, cfg.alpha, delta_strength=cfg.delta_normalized_strength),
  }


def trajectory(tx: optax.GradientTransformation, cfg: Config):
  """``(points [steps+1, 2], losses [steps+1])`` of ``tx`` on ψ from the start point."""
  p0 = jnp.asarray(cfg.start, jnp.float32)

  def step(carry, _):
    p, s = carry
    g = jax.grad(psi)(p, cfg)
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    return (p, s), p

  _, ps = jax.jit(lambda: jax.lax.scan(step, (p0, tx.init(p0)), None, cfg.steps))()
  ps = jnp.concatenate([p0[None], ps])
  return np.asarray(ps), np.asarray(jax.vmap(lambda p: psi(p, cfg))(ps))


def steps_to_tol(losses: np.ndarray, tol: float) -> int | None:
  """First step from which ψ stays below ``tol`` to the end (a settle time, so a lucky dip of an
  oscillating run does not count); ``None`` if it never settles."""
  bad = np.where(~(np.isfinite(losses) & (losses < tol)))[0]
  if len(bad) == 0:
    return 0
  return int(bad[-1]) + 1 if bad[-1] + 1 < len(losses) else None


def run(config: Config, workdir: str) -> dict:
  """Grid over learning rates per method; writes JSON + PNG into ``workdir``."""
  if not config.learning_rates or min(config.learning_rates) <= 0:
    raise ValueError("delta_momentum_toy: learning_rates must be a non-empty tuple of floats > 0")
  results, best_traj = {}, {}
  for name, make in methods(config).items():
    grid = []
    for lr in config.learning_rates:
      ps, ls = trajectory(make(lr), config)
      grid.append({"lr": lr, "steps_to_tol": steps_to_tol(ls, config.tol),
                   "final_loss": float(ls[-1])})
      key = (grid[-1]["steps_to_tol"] if grid[-1]["steps_to_tol"] is not None else 10**9,
             ls[-1] if np.isfinite(ls[-1]) else np.inf)
      if name not in best_traj or key < best_traj[name][0]:
        best_traj[name] = (key, lr, ps, ls)
    _, lr, ps, ls = best_traj[name]
    results[name] = {"best_lr": lr, "steps_to_tol": steps_to_tol(ls, config.tol),
                     "final_loss": float(ls[-1]), "grid": grid}

  plt = _io.pyplot()
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 5))
  allp = np.concatenate([t[2] for t in best_traj.values()])
  allp = allp[np.all(np.isfinite(allp), axis=1)]
  lo, hi = allp.min(0) - 0.5, allp.max(0) + 0.5
  r = np.linspace(lo[0], hi[0], 200)
  th = np.linspace(lo[1], hi[1], 200)
  rr, tt = np.meshgrid(r, th)
  zz = rr**2 + config.k * (rr - tt + config.a * np.sin(config.omega * rr))**2
  ax0.contour(rr, tt, np.log10(zz + 1e-3), levels=25, cmap="Greys")
  for name, (_, lr, ps, ls) in best_traj.items():
    ax0.plot(ps[:, 0], ps[:, 1], ".-", ms=2, lw=0.8, label=f"{name} (lr={lr})")
    ax1.semilogy(np.maximum(ls, 1e-16), label=f"{name} (lr={lr})")
  ax0.plot(*config.start, "k*", ms=12)
  ax0.plot(0, 0, "r*", ms=12)
  ax0.set(xlabel="r", ylabel="θ",
          title=f"ψ = r² + {config.k}(r − θ + {config.a} sin({config.omega} r))²")
  ax1.axhline(config.tol, color="k", ls=":", lw=0.8)
  ax1.set(xlabel="step", ylabel="ψ", title=f"ψ vs step, α = {config.alpha}, best lr each")
  ax0.legend(fontsize=8)
  ax1.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(workdir, exist_ok=True)
  fig.savefig(os.path.join(workdir, "delta_momentum_toy.png"), dpi=100)
  plt.close(fig)
  out = {"config": dataclasses.asdict(config), "results": results}
  _io.write_json(workdir, "delta_momentum_toy.json", out)
  return {n: {k: v for k, v in r.items() if k != "grid"} for n, r in results.items()}


register("optim/delta_momentum_toy",
         "Momentum vs delta momentum on the 2-D toy of eq. 53 / Fig. 4", Config())(run)
