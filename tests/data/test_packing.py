"""Packing boundaries, segment ids, and the resumable, host-sharded batch iterator."""

import itertools
import json

import numpy as np
import pytest

from nlj.data import DataError
from nlj.data import PackedBatches
from nlj.data import pack
from nlj.data import segment_ids

EOS = 9999


def _stream(n: int = 1000) -> np.ndarray:
  """Token i is i (so windows are distinct), except an EOS at every 8th position."""
  return np.where(np.arange(n) % 8 == 7, EOS, np.arange(n)).astype(np.uint16)


def test_pack_windows_overlap_by_one_and_cover_the_stream():
  tokens = np.arange(23)
  windows = pack(tokens, seq_len=5)
  assert windows.shape == (4, 6)  # (23 - 1) // 5
  np.testing.assert_array_equal(windows[:, -1], windows[1:, 0].tolist() + [20])
  targets = windows[:, 1:].ravel()
  np.testing.assert_array_equal(targets, np.arange(1, 21))  # every target exactly once
  assert not windows.flags.writeable


def test_segment_ids_follow_eos_boundaries():
  batch = np.array([[1, 2, EOS, 3, EOS, EOS, 4], [EOS, 5, 6, 7, 8, 9, 1]])
  np.testing.assert_array_equal(
      segment_ids(batch, EOS), [[1, 1, 1, 2, 2, 3, 4], [1, 2, 2, 2, 2, 2, 2]])
  assert segment_ids(batch, EOS).dtype == np.int32


def test_batches_shape_dtype_and_epoch_coverage():
  it = PackedBatches(_stream(), batch_size=4, seq_len=16, seed=0, num_epochs=1)
  assert it.num_sequences == 62 and it.steps_per_epoch == 15
  batches = list(it)
  assert len(batches) == 15
  assert all(b.shape == (4, 17) and b.dtype == np.int32 for b in batches)
  rows = {tuple(r) for r in np.concatenate(batches)}
  assert len(rows) == 60  # 15 batches of distinct windows; the last 2 windows are dropped
  assert rows <= {tuple(w) for w in pack(_stream(), 16)}


def test_same_seed_same_batches_other_seed_differs():
  take = lambda seed: np.stack(list(itertools.islice(
      PackedBatches(_stream(), 4, 16, seed=seed), 20)))
  np.testing.assert_array_equal(take(3), take(3))
  assert not np.array_equal(take(3), take(4))


def test_epochs_reshuffle():
  it = PackedBatches(_stream(), 4, 16, seed=0)
  first = [next(it) for _ in range(it.steps_per_epoch)]
  second = [next(it) for _ in range(it.steps_per_epoch)]
  assert not np.array_equal(np.stack(first), np.stack(second))


def test_unshuffled_keeps_stream_order():
  it = PackedBatches(_stream(), 2, 16, seed=0, shuffle=False)
  np.testing.assert_array_equal(next(it), pack(_stream(), 16)[:2])


@pytest.mark.parametrize("k", [0, 1, 7, 15, 16, 29])  # 15 steps per epoch: crosses epochs
def test_exact_resume(k):
  n = 20
  uninterrupted = list(itertools.islice(PackedBatches(_stream(), 4, 16, seed=5), k + n))
  first = PackedBatches(_stream(), 4, 16, seed=5)
  consumed = list(itertools.islice(first, k))
  saved = json.loads(json.dumps(first.state()))  # survives a checkpoint round trip
  resumed = PackedBatches(_stream(), 4, 16, seed=5)
  resumed.restore({key: np.asarray(v) for key, v in saved.items()})
  rest = list(itertools.islice(resumed, n))
  np.testing.assert_array_equal(np.stack(consumed + rest), np.stack(uninterrupted))
  assert resumed.state() == {"epoch": (k + n) // 15, "index": (k + n) % 15}


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_shards_are_disjoint_and_cover_the_global_batch(hosts):
  glob = PackedBatches(_stream(), 8, 16, seed=1)
  shards = [PackedBatches(_stream(), 8, 16, seed=1, process_index=p, process_count=hosts)
            for p in range(hosts)]
  for _ in range(10):
    parts = [next(s) for s in shards]
    assert all(p.shape == (8 // hosts, 17) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), next(glob))
  # Resuming on a different host count continues the same global stream.
  single = PackedBatches(_stream(), 8, 16, seed=1)
  single.restore(shards[0].state())
  np.testing.assert_array_equal(next(single), next(glob))


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=2000), "seq_len=2000 needs at least 2001 tokens"),
    (dict(batch_size=100), "fewer than one batch of 100"),
    (dict(batch_size=6, process_count=4), "multiple of process_count"),
    (dict(process_index=2, process_count=2), r"process_index must be in \[0, 2\)"),
    (dict(seq_len=0), "seq_len must be >= 1"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
  args = dict(tokens=_stream(), batch_size=4, seq_len=16, seed=0) | kwargs
  with pytest.raises(DataError, match=match):
    PackedBatches(**args)


def test_bad_state_raises():
  it = PackedBatches(_stream(), 4, 16, seed=0)
  with pytest.raises(DataError, match="'epoch' and 'index'"):
    it.restore({"epoch": 0})
  with pytest.raises(DataError, match="out of range"):
    it.restore({"epoch": 0, "index": 15})
