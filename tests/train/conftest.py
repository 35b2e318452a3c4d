"""Train tests: 8 fake CPU devices for the sharding checks.

The device-count flag is appended to ``XLA_FLAGS`` (keeping any flags already set). It only
takes effect if no JAX backend has started in this process yet; when one
has (e.g. an xdist worker that ran other test directories first), a test marked
``needs_8_devices`` reruns alone in a fresh ``pytest`` subprocess and passes iff it passes there.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
_SUBPROCESS = "NLJ_TRAIN_TEST_SUBPROCESS"

if DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_FLAG}".strip()


def pytest_configure(config: pytest.Config) -> None:
  config.addinivalue_line("markers", "needs_8_devices: runs with 8 (fake CPU) JAX devices")


def _rerun_alone(item: pytest.Item) -> None:
  root = Path(__file__).resolve().parents[2]
  env = {**os.environ, _SUBPROCESS: "1"}
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
       item.nodeid], cwd=root, env=env, capture_output=True, text=True, timeout=900)
  if result.returncode:
    pytest.fail(f"{item.nodeid} failed in a subprocess with 8 devices:\n"
                f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}", pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
  if pyfuncitem.get_closest_marker("needs_8_devices") is None:
    return None
  import jax  # pylint: disable=import-outside-toplevel
  if jax.device_count() >= 8:
    return None
  if os.environ.get(_SUBPROCESS):
    pytest.fail(f"only {jax.device_count()} devices although XLA_FLAGS has {DEVICE_FLAG}")
  _rerun_alone(pyfuncitem)
  return True
