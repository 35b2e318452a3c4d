r"""``optim/orthogonal_tasks``: momentum is a short-context memory (§4.3, eq. 45).

Continual linear regression: ``K`` tasks whose inputs live in mutually orthogonal subspaces
:math:`S_i \subset \mathbb R^d` (blocks of a random orthogonal matrix), all labelled by one
teacher :math:`y = w_*^\top x`, so one weight vector solves every task and task ``i``'s
gradient :math:`\nabla L_i(w) = 2\,\mathbb E[x x^\top](w - w_*)` lies in :math:`S_i`
(eq. 45: :math:`L_i(W) = \mathbb E_{(x,y)\sim D_i}[(W^\top x - y)^2]`). The tasks are trained one
after the other with minibatch SGD-type optimizers from :mod:`nlj.optim`.

Recorded per step: every task's loss on a held-out set and, for the momentum methods, the norm
of the momentum memory inside each task's subspace :math:`\|P_{S_i} m\|`. What it shows:

* The momentum is a memory of the recent gradients only: after a task switch its content in the
  old task's subspace decays like :math:`\alpha^{t}` — ``steps_to_forget`` is the number of
  steps after the switch until :math:`\|P_{S_i} m\|` is below 1% of its value at the switch
  (:math:`\log 0.01/\log\alpha` ≈ 44 for α = 0.9, the paper's "last 43 gradients carry 99%";
  ≈ 459 for α = 0.99) — so after a few dozen steps of a new task nothing about the old ones is
  left in the optimizer state.
* With exactly orthogonal subspaces the *weights* do not interfere, so an old task's loss only
  moves while stale momentum is still acting on its subspace (``max_old_task_rise``: the largest
  rise of task ``i``'s loss after its phase ends). The forgetting eq. 45 is about is the
  optimizer's memory, not the weights.

Defaults: ``K = 3`` tasks, ``d = 24`` (8 dims each), 150 steps per task, batch 8,
``lr = 0.02``; methods ``sgd``, ``momentum`` (α = 0.9), ``momentum_0.99`` and ``delta_momentum``
(α = 0.9, normalised rank-1 erase ζ = 0.5). Momentum methods use the learning rate
``lr·(1-α)`` (delta momentum ``lr·(1-α+ζ)``, its gain along a constant gradient) so that their
stationary step equals SGD's (otherwise α = 0.99 at ``lr`` diverges).
Outputs ``orthogonal_tasks.json`` and ``.png``.
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
  num_tasks: int = 3
  dims_per_task: int = 8
  steps_per_task: int = 150
  batch_size: int = 8
  eval_size: int = 256
  learning_rate: float = 0.02
  seed: int = 0
  methods: tuple[str, ...] = ("sgd", "momentum", "momentum_0.99", "delta_momentum")


def _transform(name: str) -> tuple[optax.GradientTransformation | None, float]:
  """The momentum transform (descent direction, no lr) of a method and the factor on the
  learning rate that makes its stationary step along a constant gradient equal SGD's."""
  if name == "sgd":
    return None, 1.0
  if name == "momentum":
    return optim.scale_by_generalized_momentum(0.9), 1 - 0.9
  if name == "momentum_0.99":
    return optim.scale_by_generalized_momentum(0.99), 1 - 0.99
  if name == "delta_momentum":
    zeta = 0.5
    return (optim.scale_by_generalized_momentum(0.9, objective="l2", delta_strength=zeta),
            1 - 0.9 + zeta)
  raise ValueError(f"orthogonal_tasks: unknown method {name!r}; known: sgd, momentum, "
                   "momentum_0.99, delta_momentum")


def run(config: Config, workdir: str) -> dict:
  """Trains every method through the task sequence; writes JSON + PNG into ``workdir``."""
  for m in config.methods:
    _transform(m)  # validates the names before any work
  k, s = config.num_tasks, config.dims_per_task
  d = k * s
  rng = np.random.default_rng(config.seed)
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  bases = jnp.asarray(np.stack([q[:, i * s:(i + 1) * s] for i in range(k)]), jnp.float32)
  w_star = jnp.asarray(rng.standard_normal(d), jnp.float32)
  key = jax.random.PRNGKey(config.seed)
  eval_x = jnp.einsum("kds,kns->knd", bases,
                      jax.random.normal(jax.random.fold_in(key, 1), (k, config.eval_size, s)))

  def losses(w):
    return jnp.mean((eval_x @ w - eval_x @ w_star)**2, axis=1)  # [k]

  def loss_fn(w, x):
    return jnp.mean((x @ w - x @ w_star)**2)

  total = k * config.steps_per_task
  out, traces = {}, {}
  for name in config.methods:
    tx, lr_factor = _transform(name)
    lr = config.learning_rate * lr_factor
    w = jnp.zeros(d)
    state = tx.init(w) if tx is not None else None

    @jax.jit
    def step(w, state, t):
      task = t // config.steps_per_task
      z = jax.random.normal(jax.random.fold_in(key, 1000 + t), (config.batch_size, s))
      x = z @ bases[task].T
      g = jax.grad(loss_fn)(w, x)
      if tx is None:
        u, mem = g, jnp.zeros(d)
      else:
        u, state = tx.update(g, state, w)
        mem = state.momentum
      share = jnp.linalg.norm(bases.transpose(0, 2, 1) @ mem, axis=1)  # [k]: ||P_Si m||
      return w - lr * u, state, losses(w), share

    ls, shares = [], []
    for t in range(total):
      w, state, l, sh = step(w, state, t)
      ls.append(np.asarray(l))
      shares.append(np.asarray(sh))
    ls, shares = np.stack(ls), np.stack(shares)  # [T, k]
    traces[name] = (ls, shares)
    forget, rise = [], []
    for i in range(k - 1):
      switch = (i + 1) * config.steps_per_task
      after = shares[switch:, i]
      below = np.where(after < 0.01 * shares[switch - 1, i])[0]
      forget.append(int(below[0]) if len(below) and tx is not None else None)
      rise.append(float(np.max(ls[switch:, i]) - ls[switch - 1, i]))
    out[name] = {
        "final_task_losses": ls[-1].tolist(),
        "loss_at_end_of_own_task": [float(ls[(i + 1) * config.steps_per_task - 1, i])
                                    for i in range(k)],
        "learning_rate": lr,
        "steps_to_forget": forget,
        "max_old_task_rise": rise,
    }

  plt = _io.pyplot()
  n = len(config.methods)
  fig, axes = plt.subplots(2, n, figsize=(4 * n, 6), squeeze=False)
  for j, name in enumerate(config.methods):
    ls, shares = traces[name]
    for i in range(k):
      axes[0, j].semilogy(np.maximum(ls[:, i], 1e-12), label=f"task {i + 1}")
      if name != "sgd":
        axes[1, j].semilogy(np.maximum(shares[:, i], 1e-12), label=f"S{i + 1}")
    for ax in axes[:, j] if name != "sgd" else axes[:1, j]:
      for b in range(1, k):
        ax.axvline(b * config.steps_per_task, color="k", ls=":", lw=0.8)
    axes[0, j].set(title=f"{name}: task losses", xlabel="step")
    axes[1, j].set(title="‖P_Si m‖: momentum per subspace" if name != "sgd" else "(no memory)",
                   xlabel="step")
    axes[0, j].legend(fontsize=7)
    if name == "sgd":
      axes[1, j].axis("off")
    else:
      axes[1, j].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(workdir, exist_ok=True)
  fig.savefig(os.path.join(workdir, "orthogonal_tasks.png"), dpi=100)
  plt.close(fig)
  _io.write_json(workdir, "orthogonal_tasks.json",
                 {"config": dataclasses.asdict(config), "results": out})
  return out


register("optim/orthogonal_tasks",
         "Momentum forgets: continual regression on orthogonal subspaces (eq. 45)", Config())(run)
