"""The loop's prefetching iterator: same batches, each with the position after it."""

import jax
import numpy as np

from nlj.data import PackedBatches
from nlj.train import make_mesh, prefetch

TOKENS = np.arange(2000, dtype=np.uint16) % 251


def test_prefetch_yields_batches_in_order_with_positions():
  mesh = make_mesh("data:1", jax.devices()[:1])
  batches = PackedBatches(TOKENS, 4, 16, seed=0)
  items = list(prefetch(batches, mesh, count=5, size=2))
  expected = PackedBatches(TOKENS, 4, 16, seed=0)
  assert len(items) == 5
  for i, (batch, position) in enumerate(items):
    np.testing.assert_array_equal(batch, next(expected))
    assert position == {"epoch": 0, "index": i + 1}
  assert batches.state() == {"epoch": 0, "index": 5}  # drew exactly `count` batches


def test_prefetch_of_fewer_batches_than_its_depth():
  mesh = make_mesh("data:1", jax.devices()[:1])
  assert len(list(prefetch(PackedBatches(TOKENS, 4, 16, seed=0), mesh, count=1, size=3))) == 1
  assert not list(prefetch(PackedBatches(TOKENS, 4, 16, seed=0), mesh, count=0))
