"""MQAR: shapes, determinism, and that every answer is recallable from earlier tokens."""

import numpy as np
import pytest

from nlj.data import mqar


@pytest.mark.parametrize("seq_len,k,passes,random_fill", [
    (64, 4, 1, False), (128, 8, 1, True), (64, 16, 1, False), (64, 8, 2, False)])
def test_answers_are_values_of_earlier_keys(seq_len, k, passes, random_fill):
  vocab = 8192
  inputs, targets, mask = mqar(50, seq_len, k, vocab, seed=1, num_passes=passes,
                               random_non_queries=random_fill)
  assert inputs.shape == targets.shape == mask.shape == (50, seq_len)
  assert inputs.dtype == targets.dtype == mask.dtype == np.int32
  np.testing.assert_array_equal(mask.sum(1), k)
  np.testing.assert_array_equal(targets[mask == 0], 0)
  context = 2 * k * passes
  for x, y, m in zip(inputs, targets, mask):
    keys, values = x[0:2 * k:2], x[1:2 * k:2]
    assert len(set(keys)) == k and keys.min() >= 1 and keys.max() < vocab // 2
    assert len(set(values)) == k and values.min() >= vocab // 2 and values.max() < vocab
    np.testing.assert_array_equal(x[:context], np.tile(x[:2 * k], passes))
    positions = np.flatnonzero(m)
    assert positions.min() >= context and np.all((positions - context) % 2 == 0)
    for t in positions:  # the query key at t was paired with the target before t
      pair = np.flatnonzero(x[:context:2] == x[t])
      assert pair.size and 2 * pair[0] + 1 < t and x[2 * pair[0] + 1] == y[t]
    assert sorted(x[positions]) == sorted(keys)
    if not random_fill:
      np.testing.assert_array_equal(np.delete(x[context:], positions - context), 0)


def test_deterministic_in_seed():
  a = mqar(20, 64, 4, seed=7)
  b = mqar(20, 64, 4, seed=7)
  c = mqar(20, 64, 4, seed=8)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  assert not np.array_equal(a[0], c[0])


def test_power_law_favours_short_gaps():
  _, _, mask = mqar(2000, 256, 4, seed=0)
  gaps = (np.flatnonzero(mask.ravel()) % 256 - 8) // 2  # query slot in [0, 124)
  assert np.mean(gaps < 10) > 0.3  # uniform would give 10 / 124


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=63), "even seq_len"),
    (dict(seq_len=16, num_kv_pairs=5), "must be <= seq_len"),
    (dict(vocab_size=64), "must exceed seq_len"),
])
def test_bad_sizes_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mqar(**(dict(num_examples=2) | kwargs))
