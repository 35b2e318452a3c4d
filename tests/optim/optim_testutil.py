"""NumPy oracles and small trees shared by the nlj.optim tests (independent of nlj.optim)."""

import numpy as np

NS = (3.4445, -4.7750, 2.0315)


def np_newton_schulz(x, steps=5, eps=1e-8):
  """Quintic Newton–Schulz in float64 NumPy, written from the formula."""
  x = np.asarray(x, np.float64)
  a, b, c = NS
  t = x.shape[0] > x.shape[1]
  y = x.T if t else x
  y = y / (np.sqrt(np.sum(y * y)) + eps)
  for _ in range(steps):
    s = y @ y.T
    y = a * y + b * s @ y + c * s @ s @ y
  return y.T if t else y


def grads(seed, shapes, scale=1.0):
  """A dict tree of random float32 gradients with the given shapes."""
  rng = np.random.default_rng(seed)
  return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def as_np(tree):
  return {k: np.asarray(v, np.float64) for k, v in tree.items()}
