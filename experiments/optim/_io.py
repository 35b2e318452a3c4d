"""Small shared helpers for the optim experiments: JSON output and a headless matplotlib."""

from __future__ import annotations

import json
import math
import os
from typing import Any


def pyplot():
  """``matplotlib.pyplot`` on the non-interactive Agg backend (imported lazily)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def finite(x: Any) -> Any:
  """Floats as JSON-safe values (NaN/inf become strings); recurses into dicts and lists."""
  if isinstance(x, dict):
    return {k: finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [finite(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  return x


def write_json(workdir: str, name: str, result: dict) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  with open(path, "w") as f:
    json.dump(finite(result), f, indent=2)
  return path
