"""Readers for local data: text files, JSONL, saved Hugging Face datasets, token `.npy` arrays.

Text readers return `Document`s (an id and its text); `nlj.data.tokenize_documents` turns them
into a token stream and `nlj.data.PackedBatches` batches it. Ids are stable (relative paths,
line numbers, row indices) so that `nlj.data.split_documents` splits them reproducibly.

Example:
  docs = read_jsonl("train.jsonl", text_field="content")
  tokens = tokenize_documents([d.text for d in docs], get_tokenizer("gpt2"))
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nlj.data.errors import DataError

PathLike = str | os.PathLike[str]


class Document(NamedTuple):
  """One document: a stable id (unique within its source) and its text."""
  id: str
  text: str


def decode_utf8(data: bytes, where: str) -> str:
  """Decodes strict UTF-8, raising a DataError that names `where` and the bad byte offset."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(
        f"{where}: bytes {e.start}..{e.end} are not valid UTF-8 ({e.reason}); "
        "re-encode the file as UTF-8") from None


def _existing(path: PathLike) -> Path:
  p = Path(path).expanduser()
  if not p.exists():
    raise DataError(f"data path {str(p)!r} does not exist")
  return p


def _nonempty(docs: list[Document], where: str) -> list[Document]:
  kept = [d for d in docs if d.text.strip()]
  if not kept:
    raise DataError(f"{where}: no non-empty documents (empty corpus)")
  return kept


def read_text_files(
    paths: PathLike | Sequence[PathLike], pattern: str = "*.txt") -> list[Document]:
  """Reads UTF-8 text files, one document per file.

  Args:
    paths: a file, a directory (searched recursively for `pattern`), or a list of these.
    pattern: glob for files inside directories.

  Returns:
    Non-empty documents in sorted path order; ids are paths relative to the directory given
    (or the file name for a file given directly).

  Raises:
    DataError: a path does not exist, a file is not UTF-8, or no document has text.
  """
  roots = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  docs = []
  for root in map(_existing, roots):
    files = sorted(root.rglob(pattern)) if root.is_dir() else [root]
    for f in (f for f in files if f.is_file()):
      name = f.name if f == root else f.relative_to(root).as_posix()
      docs.append(Document(name, decode_utf8(f.read_bytes(), str(f))))
  return _nonempty(docs, ", ".join(map(str, roots)))


def read_jsonl(
    path: PathLike, text_field: str = "text", id_field: str | None = None) -> list[Document]:
  """Reads a JSON-lines file, one document per line.

  Args:
    path: the `.jsonl` file (UTF-8, one JSON object per line; blank lines are skipped).
    text_field: the key that holds the text.
    id_field: the key that holds the id; default: `"<file name>:<line number>"`.

  Returns:
    Non-empty documents in file order.

  Raises:
    DataError: a missing file, undecodable bytes, bad JSON, a missing or non-string field, or
      no document with text.
  """
  p = _existing(path)
  docs = []
  for n, line in enumerate(decode_utf8(p.read_bytes(), str(p)).splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{p}:{n}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
      raise DataError(f"{p}:{n}: expected an object with a string field {text_field!r}")
    doc_id = f"{p.name}:{n}" if id_field is None else str(record.get(id_field))
    docs.append(Document(doc_id, record[text_field]))
  return _nonempty(docs, str(p))


def read_hf_dataset(
    path: PathLike, split: str | None = None, text_field: str = "text") -> list[Document]:
  """Reads a Hugging Face dataset saved with `save_to_disk` (needs the `datasets` package).

  Args:
    path: the directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`.
    split: the split to read from a `DatasetDict` (required for one, ignored otherwise).
    text_field: the column that holds the text.

  Returns:
    Non-empty documents in row order; ids are `"<split>:<row>"` (or `"<row>"`).

  Raises:
    ImportError: `datasets` is not installed.
    DataError: a missing path, split or column, or no document with text.
  """
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(
        "reading a saved Hugging Face dataset needs the `datasets` package: "
        "pip install datasets") from None
  p = _existing(path)
  data = datasets.load_from_disk(str(p))
  if isinstance(data, datasets.DatasetDict):
    if split not in data:
      raise DataError(f"{p}: split {split!r} not found; available: {sorted(data)}")
    data = data[split]
  if text_field not in data.column_names:
    raise DataError(f"{p}: no column {text_field!r}; columns: {data.column_names}")
  prefix = f"{split}:" if split else ""
  docs = [Document(f"{prefix}{i}", t) for i, t in enumerate(data[text_field])]
  return _nonempty(docs, str(p))


def load_tokens(path: PathLike, vocab_size: int | None = None) -> np.ndarray:
  """Loads a pre-tokenized 1-D integer `.npy` array (memory-mapped, read-only).

  Args:
    path: the `.npy` file, shape `[n_tokens]`.
    vocab_size: if given, every id must be in `[0, vocab_size)`.

  Returns:
    The token array, shape `[n_tokens]`, its dtype as stored.

  Raises:
    DataError: a missing file, not an `.npy` array, wrong shape or dtype, empty, ids out of range.
  """
  p = _existing(path)
  try:
    tokens = np.load(p, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise DataError(f"{p}: not a valid .npy array ({e})") from None
  if not isinstance(tokens, np.ndarray):
    raise DataError(f"{p}: expected one .npy array, got an .npz archive")
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise DataError(
        f"{p}: expected a 1-D integer token array, got shape {tokens.shape} {tokens.dtype}")
  if tokens.size == 0:
    raise DataError(f"{p}: the token array is empty (empty corpus)")
  if vocab_size is not None and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise DataError(
        f"{p}: token ids span [{tokens.min()}, {tokens.max()}], outside [0, {vocab_size})")
  return tokens
