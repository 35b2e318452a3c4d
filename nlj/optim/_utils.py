"""Shared helpers for :mod:`nlj.optim`: argument checks and schedule evaluation.

Every public transform validates its hyperparameters eagerly (at construction time) so that a
bad value fails with a message naming the argument and the allowed range, not with a NaN
thousands of steps later. Schedules (callables) cannot be checked before they are evaluated and
are passed through unchecked.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


def _static_float(x: Any) -> float | None:
  """``float(x)`` for Python/NumPy scalars and concrete 0-d arrays; ``None`` otherwise."""
  if callable(x) or jnp.ndim(x) != 0:
    return None
  try:
    return float(x)
  except Exception:  # a tracer: cannot be checked eagerly
    return None


def check_range(
    fn: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_schedule: bool = False,
) -> None:
  """Raises ``ValueError`` if a static scalar hyperparameter lies outside ``[low, high]``.

  Args:
    fn: name of the public function, used in the message.
    name: name of the argument, used in the message.
    value: the hyperparameter; schedules (callables) are accepted when ``allow_schedule``.
    low: lower bound, or ``None`` for none.
    high: upper bound, or ``None`` for none.
    low_inclusive: whether ``low`` itself is allowed.
    high_inclusive: whether ``high`` itself is allowed.
    allow_schedule: whether a callable ``count -> value`` (an ``optax.Schedule``) is allowed.
  """
  if callable(value):
    if not allow_schedule:
      raise ValueError(f"{fn}: {name} must be a number, not a schedule (got {value!r})")
    return
  v = _static_float(value)
  if v is None:
    return  # traced or array-valued: cannot be checked here
  lo = "[" if low_inclusive else "("
  hi = "]" if high_inclusive else ")"
  allowed = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
  bad = v != v  # NaN
  if low is not None:
    bad |= v < low if low_inclusive else v <= low
  if high is not None:
    bad |= v > high if high_inclusive else v >= high
  if bad:
    extra = " or an optax.Schedule" if allow_schedule else ""
    raise ValueError(f"{fn}: {name} must be in {allowed}{extra}; got {value!r}")


def check_learning_rate(fn: str, learning_rate: Any, name: str = "learning_rate") -> None:
  """Learning rates are non-negative numbers or schedules."""
  check_range(fn, name, learning_rate, low=0.0, allow_schedule=True)


def check_int(fn: str, name: str, value: Any, *, low: int) -> None:
  """Raises ``ValueError`` unless ``value`` is a Python int ``>= low``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ValueError(f"{fn}: {name} must be an integer >= {low}; got {value!r}")


def check_choice(fn: str, name: str, value: Any, choices: Sequence[str]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{fn}: unknown {name}={value!r}; allowed: {', '.join(map(repr, choices))}")


def value_at(x: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  """Evaluates a scalar-or-schedule hyperparameter at step ``count`` (0-based)."""
  return x(count) if callable(x) else jnp.asarray(x)


def zeros_like(params: Any, dtype: Any = None) -> Any:
  """Zeros with each parameter's shape (so optimizer state shards like the parameter)."""
  return optax.tree.zeros_like(params, dtype=dtype)
