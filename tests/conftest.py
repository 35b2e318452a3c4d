"""Shared test setup: CPU only, small shapes; the longest tests start first under xdist."""

import itertools
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _share_sizes(count: int, workers: int) -> list[int]:
  """How pytest-xdist's ``worksteal`` first splits ``count`` tests over ``workers``: in turn,
  each worker takes ``remaining // workers_left`` of them, contiguous in collection order."""
  sizes, left = [], count
  for k in range(workers):
    sizes.append(left // (workers - k))
    left -= sizes[-1]
  return sizes


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  """Put the tests marked ``slow`` at the heads of the xdist workers' first shares, in turn.

  ``worksteal`` later moves only queued tests from a busy worker to an idle one, never a running
  one, so a long test that starts late in a share finishes last however well the rest is
  balanced; started first on separate workers, the long tests overlap everything else. Without
  xdist the order is unchanged."""
  workers = getattr(config, "workerinput", {}).get("workercount", 1)
  slow = [item for item in items if item.get_closest_marker("slow")]
  if workers < 2 or not slow:
    return
  fast = iter([item for item in items if not item.get_closest_marker("slow")])
  ordered = []
  for k, size in enumerate(_share_sizes(len(items), workers)):
    heads = slow[k::workers]
    ordered += heads + list(itertools.islice(fast, max(0, size - len(heads))))
  items[:] = ordered + list(fast)
