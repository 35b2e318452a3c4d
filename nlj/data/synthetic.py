"""Synthetic tasks: multi-query associative recall (MQAR).

MQAR follows the Zoology recipe (Arora, Eyuboglu et al., 2023, arXiv:2312.04927,
`zoology/data/multiquery_ar.py`). Each example of length L holds K key-value pairs, then the K
keys again as queries at power-law distributed gaps; the target at each query is its value:

  inputs   k1 v1 k2 v2 ... kK vK | 0 0 k2 0 ... 0 k1 0 ...
  targets  .  .  .  .  ...  .  . | . . v2 . ... . v1 . ...      (mask = 1 only at the queries)

  * keys from [1, V/2), values from [V/2, V), each drawn without replacement per example;
  * the context `k1 v1 ... kK vK` is repeated `num_passes` times (JRT, arXiv:2407.05483);
  * the query region (L - 2K·passes) has `space = (L - 2K·passes) // 2` slots; K distinct slots
    are drawn with probability p_i ∝ a·i^(a-1) (i = 1..space, a = `power_a`) by successive
    sampling (as `numpy.random.choice(..., replace=False, p=p)`), and key j goes to slot gap_j;
  * with `random_non_queries`, the 0 fillers of the input are replaced by uniform random ids.

Zoology's standard train mix is (L=64, K=4), (128, 8), (256, 16), (256, 32), (256, 64) with
V=8192; its Figure 2 uses `random_non_queries=False` (this function's default).
"""

import numpy as np

_CHUNK = 1024  # examples generated per vectorized step; fixed so output depends only on args.


def _distinct_uniform(rng: np.random.Generator, n: int, pool: int, k: int) -> np.ndarray:
  """`n` rows of `k` distinct ids drawn uniformly from [0, pool), in draw order.

  Draws with replacement, then redraws every repeat of an earlier id in its row until none is
  left; since the procedure treats all ids alike, every ordered k-tuple of distinct ids is
  equally likely.

  Returns:
    int64, shape `[n, k]`.
  """
  s = rng.integers(pool, size=(n, k))
  while True:
    order = np.argsort(s, axis=1, kind="stable")
    ranked = np.take_along_axis(s, order, axis=1)
    repeat = np.zeros_like(s, dtype=bool)
    repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    if not repeat.any():
      return s
    np.put_along_axis(repeat, order, repeat.copy(), axis=1)
    s[repeat] = rng.integers(pool, size=int(repeat.sum()))


def _distinct_weighted(rng: np.random.Generator, n: int, k: int, log_p: np.ndarray) -> np.ndarray:
  """`n` rows of `k` distinct ids from [0, len(log_p)), drawn one at a time ∝ exp(log_p).

  Gumbel-top-k: the k largest `log_p + Gumbel noise`, in decreasing order, are distributed as
  successive sampling without replacement (`numpy.random.choice(..., replace=False, p=p)`).

  Returns:
    int64, shape `[n, k]`.
  """
  scores = log_p + rng.gumbel(size=(n, log_p.size))
  top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
  return np.take_along_axis(top, order, axis=1)


def mqar(
    num_examples: int, seq_len: int = 64, num_kv_pairs: int = 4, vocab_size: int = 8192,
    seed: int = 0, *, power_a: float = 0.01, num_passes: int = 1,
    random_non_queries: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Generates MQAR examples (pure numpy, deterministic in `seed`).

  Args:
    num_examples: number of examples N.
    seq_len: input length L (even).
    num_kv_pairs: key-value pairs K per example.
    vocab_size: V; must exceed L and leave K distinct keys in [1, V/2).
    seed: random seed.
    power_a: power-law exponent a of the query gaps (1.0 = uniform).
    num_passes: times the key-value context is repeated before the queries.
    random_non_queries: replace the 0 fillers of the inputs by uniform random ids in [0, V).

  Returns:
    `(inputs, targets, mask)`, each int32 `[N, L]`: the model reads `inputs`; at positions with
    `mask == 1` (exactly K per row, each holding a query key) it must predict `targets`, the
    value paired with that key earlier in the row; elsewhere `targets` is 0 and `mask` is 0.

  Raises:
    ValueError: the sizes violate `2K·num_passes + 2K <= L`, L even, `V > L`, or K < V/2.

  Example:
    inputs, targets, mask = mqar(1000, seq_len=64, num_kv_pairs=4, seed=0)
  """
  k, length, v = num_kv_pairs, seq_len, vocab_size
  context = 2 * k * num_passes
  if num_examples < 1 or k < 1 or num_passes < 1 or length % 2:
    raise ValueError(
        f"need num_examples, num_kv_pairs, num_passes >= 1 and an even seq_len; got "
        f"{num_examples}, {k}, {num_passes}, {length}")
  if context + 2 * k > length:
    raise ValueError(
        f"2*num_kv_pairs*num_passes + 2*num_kv_pairs = {context + 2 * k} must be <= seq_len "
        f"= {length}")
  if v <= length or k > v // 2 - 1:
    raise ValueError(
        f"vocab_size ({v}) must exceed seq_len ({length}) and hold {k} keys in [1, {v // 2})")
  rng = np.random.default_rng(seed)
  space = (length - context) // 2
  log_p = np.log(power_a) + (power_a - 1) * np.log(np.arange(1, space + 1))
  inputs = np.empty((num_examples, length), np.int32)
  targets = np.empty((num_examples, length), np.int32)
  for start in range(0, num_examples, _CHUNK):
    n = min(_CHUNK, num_examples - start)
    keys = 1 + _distinct_uniform(rng, n, v // 2 - 1, k)
    values = v // 2 + _distinct_uniform(rng, n, v - v // 2, k)
    gaps = _distinct_weighted(rng, n, k, log_p)
    x = np.zeros((n, length + 1), np.int64)
    x[:, 0:context:2] = np.tile(keys, num_passes)
    x[:, 1:context:2] = np.tile(values, num_passes)
    np.put_along_axis(x, context + 2 * gaps, keys, axis=1)
    y = np.zeros((n, length + 1), np.int64)
    np.put_along_axis(y, context + 2 * gaps + 1, values, axis=1)
    x = x[:, :-1]
    if random_non_queries:
      x = np.where(x == 0, rng.integers(v, size=x.shape), x)
    inputs[start:start + n] = x
    targets[start:start + n] = y[:, 1:]
  return inputs, targets, (targets > 0).astype(np.int32)
