"""Run one test alone in a fresh ``pytest`` process (used by the conftest hooks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SUBPROCESS = "NLJ_TEST_SUBPROCESS"


def in_subprocess() -> bool:
  """Whether this process is such a fresh run."""
  return bool(os.environ.get(SUBPROCESS))


def run_alone(item: pytest.Item, why: str) -> None:
  """Run ``item`` in a fresh process; fail with its output unless it passes there."""
  root = Path(__file__).resolve().parents[1]
  env = {**os.environ, SUBPROCESS: "1"}
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
       item.nodeid], cwd=root, env=env, capture_output=True, text=True, timeout=900)
  if result.returncode:
    pytest.fail(f"{item.nodeid} failed in a fresh process ({why}):\n"
                f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}", pytrace=False)
