"""Packing a token stream into fixed-length windows, and a resumable, host-sharded batch iterator.

A stream `[n_tokens]` (documents each followed by EOS) is cut into windows of `seq_len + 1`
tokens with stride `seq_len`: window i is `tokens[i*seq_len : i*seq_len + seq_len + 1]`, so
consecutive windows share one token and every token after the first is a target exactly once.
A row's `inputs = row[:-1]`, `targets = row[1:]`. Windows cross document boundaries; the EOS
tokens mark them, and `segment_ids` turns them into per-token document ids for attention masks.

`PackedBatches` draws global batches of `batch_size` windows from a permutation of all windows
seeded by `(seed, epoch)` (the last partial batch of an epoch is dropped), and hands host
`process_index` of `process_count` its contiguous slice of each global batch. Its position is
`{"epoch": e, "index": i}` (the next batch is batch i of epoch e), the same on every host; a new
iterator restored to that state continues exactly, on any number of hosts that divides the
batch.

Example:
  batches = PackedBatches(corpus.train, batch_size=8, seq_len=512, seed=0,
                          process_index=jax.process_index(), process_count=jax.process_count())
  for step, batch in zip(range(num_steps), batches):   # batch: int32 [8 // hosts, 513]
    ...
  checkpoint["data"] = batches.state()
"""

from collections.abc import Mapping

import numpy as np

from nlj.data.errors import DataError


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Windows of `seq_len + 1` tokens at stride `seq_len`, as a read-only view.

  Args:
    tokens: token stream, shape `[n_tokens]`.
    seq_len: model sequence length (inputs and targets are `seq_len` long).

  Returns:
    Shape `[(n_tokens - 1) // seq_len, seq_len + 1]`, dtype of `tokens` (a view, no copy).

  Raises:
    DataError: `tokens` is not 1-D, `seq_len < 1`, or not even one window fits.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise DataError(f"tokens must be 1-D [n_tokens], got shape {tokens.shape}")
  if seq_len < 1:
    raise DataError(f"seq_len must be >= 1, got {seq_len}")
  n = (tokens.size - 1) // seq_len
  if n < 1:
    raise DataError(
        f"seq_len={seq_len} needs at least {seq_len + 1} tokens per sequence, but the token "
        f"array holds only {tokens.size}")
  view = np.lib.stride_tricks.sliding_window_view(tokens[:n * seq_len + 1], seq_len + 1)
  return view[::seq_len]


def segment_ids(batch: np.ndarray, eos_id: int) -> np.ndarray:
  """Per-token document ids within each row, starting at 1; an EOS belongs to the document it ends.

  Args:
    batch: token ids, shape `[batch, length]`.
    eos_id: the EOS id.

  Returns:
    int32, shape `[batch, length]`: `1 + number of EOS strictly before the position`.
  """
  ends = (np.asarray(batch) == eos_id).astype(np.int32)
  return (1 + np.cumsum(ends, axis=-1) - ends).astype(np.int32)


class PackedBatches:
  """Deterministic, seed-shuffled, resumable and host-sharded batches of packed windows.

  Yields int32 arrays `[batch_size // process_count, seq_len + 1]`.

  Args:
    tokens: token stream, shape `[n_tokens]`.
    batch_size: the global batch size, summed over hosts.
    seq_len: model sequence length; rows hold `seq_len + 1` tokens.
    seed: shuffling seed (non-negative int).
    process_index: this host's index, in `[0, process_count)`.
    process_count: number of hosts; must divide `batch_size`.
    shuffle: permute windows each epoch; False keeps stream order (e.g. for evaluation).
    num_epochs: stop after this many epochs; None iterates forever.

  Raises:
    DataError: bad sizes or host arguments, or fewer windows than one global batch.
  """

  def __init__(
      self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
      process_index: int = 0, process_count: int = 1, *, shuffle: bool = True,
      num_epochs: int | None = None):
    if batch_size < 1 or process_count < 1 or batch_size % process_count:
      raise DataError(
          f"batch_size ({batch_size}) must be a positive multiple of process_count "
          f"({process_count})")
    if not 0 <= process_index < process_count:
      raise DataError(f"process_index must be in [0, {process_count}), got {process_index}")
    if seed < 0:
      raise DataError(f"seed must be a non-negative int, got {seed}")
    self._windows = pack(tokens, seq_len)
    if len(self._windows) < batch_size:
      raise DataError(
          f"{len(self._windows)} sequences of {seq_len + 1} tokens fit in "
          f"{np.asarray(tokens).size} tokens, fewer than one batch of {batch_size}")
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.seed = seed
    self.shuffle = shuffle
    self.num_epochs = num_epochs
    self.local_batch_size = batch_size // process_count
    self.steps_per_epoch = len(self._windows) // batch_size
    self._local = slice(process_index * self.local_batch_size,
                        (process_index + 1) * self.local_batch_size)
    self._epoch = 0
    self._index = 0
    self._order: tuple[int, np.ndarray] | None = None

  @property
  def num_sequences(self) -> int:
    """Number of packed windows available per epoch (before dropping the partial batch)."""
    return len(self._windows)

  def state(self) -> dict[str, int]:
    """The position of the next batch: `{"epoch": e, "index": i}` (plain ints)."""
    return {"epoch": self._epoch, "index": self._index}

  def restore(self, state: Mapping[str, int]) -> None:
    """Moves to a position returned by `state()` (ints or 0-d arrays, e.g. from a checkpoint).

    Raises:
      DataError: missing keys or a position outside this iterator's epochs.
    """
    try:
      epoch, index = int(state["epoch"]), int(state["index"])
    except (KeyError, TypeError, ValueError):
      raise DataError(
          f"state must be a mapping with int 'epoch' and 'index', got {state!r}") from None
    if epoch < 0 or not 0 <= index < self.steps_per_epoch:
      raise DataError(
          f"state {{'epoch': {epoch}, 'index': {index}}} is out of range: index must be in "
          f"[0, {self.steps_per_epoch}) for this data, batch size and seq_len")
    self._epoch, self._index = epoch, index

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._order is None or self._order[0] != epoch:
      n = len(self._windows)
      order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
               else np.arange(n))
      self._order = (epoch, order)
    return self._order[1]

  def __iter__(self) -> "PackedBatches":
    return self

  def __next__(self) -> np.ndarray:
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    start = self._index * self.batch_size
    rows = self._permutation(self._epoch)[start:start + self.batch_size][self._local]
    batch = self._windows[rows].astype(np.int32)
    self._index += 1
    if self._index == self.steps_per_epoch:
      self._epoch, self._index = self._epoch + 1, 0
    return batch
