"""Train tests: 8 fake CPU devices for the sharding checks.

The device-count flag is appended to ``XLA_FLAGS`` (keeping any flags already set). It only
takes effect if no JAX backend has started in this process yet; when one
has (e.g. an xdist worker that ran other test directories first), a test marked
``needs_8_devices`` reruns alone in a fresh ``pytest`` subprocess and passes iff it passes there.
"""

import os

import pytest

from tests.isolation import in_subprocess, run_alone

DEVICE_FLAG = "--xla_force_host_platform_device_count=8"

if DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_FLAG}".strip()


def pytest_configure(config: pytest.Config) -> None:
  config.addinivalue_line("markers", "needs_8_devices: runs with 8 (fake CPU) JAX devices")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
  if pyfuncitem.get_closest_marker("needs_8_devices") is None:
    return None
  import jax  # pylint: disable=import-outside-toplevel
  if jax.device_count() >= 8:
    return None
  if in_subprocess():
    pytest.fail(f"only {jax.device_count()} devices although XLA_FLAGS has {DEVICE_FLAG}")
  run_alone(pyfuncitem, "with 8 devices")
  return True
