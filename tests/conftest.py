"""Shared test setup: CPU only, small shapes.

``@pytest.mark.isolated("why")`` runs a test alone in a fresh ``pytest`` process (it passes iff
it passes there): for tests whose XLA compilation has crashed the process late in a full-suite
worker while passing alone.
"""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.isolation import in_subprocess, run_alone  # noqa: E402  (after JAX_PLATFORMS)


def pytest_configure(config: pytest.Config) -> None:
  config.addinivalue_line("markers", "isolated(why): runs alone in a fresh pytest process")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
  marker = pyfuncitem.get_closest_marker("isolated")
  if marker is None or in_subprocess():
    return None
  run_alone(pyfuncitem, marker.args[0] if marker.args else "isolated")
  return True
