"""Tokenizers behind one small interface, and the document -> token-stream step.

  name        vocab   eos     needs           file (fetched once into <cache>/tokenizers)
  "bytes"       257   256     nothing         none: UTF-8 bytes are the ids
  "gpt2"      50257   50256   tiktoken        gpt2.tiktoken, from the openai-whisper sdist
  "llama32k"  32000   2       sentencepiece   tokenizer.model.v1, from the mistral-common wheel

The GPT-2 ranks are r50k_base (their SHA-256 equals tiktoken's official file); the 32k model is
the Llama/Mistral-7B SentencePiece BPE with byte fallback. Both files are taken from pinned PyPI
files with `pip download --no-deps` (nothing is installed) and checked by SHA-256. `decode` drops
the EOS id, so `decode(encode(s)) == s` for every tokenizer.
"""

import dataclasses
import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from nlj.data import cache as cache_lib
from nlj.data import packages
from nlj.data.errors import DataError

TIKTOKEN_PIN = "tiktoken==0.14.0"
SENTENCEPIECE_PIN = "sentencepiece==0.2.2"
# GPT-2's pre-tokenization regex, as tiktoken's r50k_base defines it.
_GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|"""
                 r"""\s+(?!\S)|\s""")


class Tokenizer(Protocol):
  """What every tokenizer offers."""
  name: str
  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    """Ids of `text`; never adds BOS/EOS, never parses special tokens out of the text."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`[encode(t) for t in texts]`, possibly multi-threaded."""

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, with the EOS id dropped."""


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, EOS = 256. Needs no file."""
  name = "bytes"
  vocab_size = 257
  eos_id = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids if int(i) != self.eos_id]
    if any(not 0 <= i < 256 for i in ids):
      raise ValueError(f"byte tokenizer ids must be in [0, 256], got {ids}")
    return bytes(ids).decode("utf-8", errors="replace")


class TiktokenTokenizer:
  """GPT-2 BPE (r50k_base) through tiktoken, from a local ranks file."""
  name = "gpt2"

  def __init__(self, ranks_file: Path):
    tiktoken = _import("tiktoken", TIKTOKEN_PIN)
    from tiktoken.load import load_tiktoken_bpe  # pylint: disable=import-outside-toplevel
    ranks = load_tiktoken_bpe(str(ranks_file))
    self.eos_id = len(ranks)
    self._enc = tiktoken.Encoding(
        name="gpt2_nlj", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": self.eos_id})
    self.vocab_size = self._enc.n_vocab

  def encode(self, text: str) -> list[int]:
    return self._enc.encode_ordinary(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._enc.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

  def decode(self, ids: Iterable[int]) -> str:
    return self._enc.decode([int(i) for i in ids if int(i) != self.eos_id])


class SentencePieceTokenizer:
  """Llama-style 32k SentencePiece BPE with byte fallback; EOS is `</s>`."""
  name = "llama32k"

  def __init__(self, model_file: Path):
    spm = _import("sentencepiece", SENTENCEPIECE_PIN)
    self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
    self.vocab_size = self._sp.vocab_size()
    self.eos_id = self._sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids if int(i) != self.eos_id])


@dataclasses.dataclass(frozen=True)
class TokenizerFile:
  """A tokenizer file inside a pinned PyPI file."""
  package: packages.Package
  member: str
  filename: str
  sha256: str


TOKENIZER_FILES = {
    "gpt2": TokenizerFile(
        packages.OPENAI_WHISPER, "openai_whisper-20250625/whisper/assets/gpt2.tiktoken",
        "gpt2.tiktoken", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
    "llama32k": TokenizerFile(
        packages.MISTRAL_COMMON, "mistral_common/data/tokenizer.model.v1",
        "llama32k.model", "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"),
}
TOKENIZERS = ("bytes", *TOKENIZER_FILES)


def _import(module: str, pin: str):
  try:
    return __import__(module)
  except ImportError:
    raise ImportError(
        f"this tokenizer needs the `{module}` package: pip install {pin} "
        "(or the nlj extra that lists it)") from None


def tokenizer_file(name: str, cache: Path) -> Path:
  """The verified tokenizer file for `name` in `<cache>/tokenizers`, fetched if missing.

  Raises:
    DataError: unknown name, failed download, or a hash mismatch.
  """
  spec = TOKENIZER_FILES[name]
  path = cache / "tokenizers" / spec.filename
  if path.is_file() and cache_lib.sha256_file(path) == spec.sha256:
    return path
  data = packages.read_member(packages.fetch(spec.package, cache), spec.member)
  digest = cache_lib.sha256_bytes(data)
  if digest != spec.sha256:
    raise DataError(f"{spec.member}: sha256 {digest} does not match the pinned {spec.sha256}")
  cache_lib.atomic_write_bytes(path, data)
  return path


@functools.lru_cache(maxsize=8)
def _load(name: str, cache: Path) -> Tokenizer:
  if name == "bytes":
    return ByteTokenizer()
  if name == "gpt2":
    _import("tiktoken", TIKTOKEN_PIN)
    return TiktokenTokenizer(tokenizer_file(name, cache))
  _import("sentencepiece", SENTENCEPIECE_PIN)
  return SentencePieceTokenizer(tokenizer_file(name, cache))


def get_tokenizer(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Tokenizer:
  """Returns the tokenizer `name`, fetching its file into the cache on first use.

  Args:
    name: one of "bytes", "gpt2", "llama32k".
    cache_dir: data cache directory; default `$NLJ_DATA_DIR` or `<repo>/data_cache`.

  Raises:
    ValueError: unknown name.
    ImportError: tiktoken / sentencepiece is missing (the message gives the pip pin).
    DataError: the file is not cached and cannot be downloaded, or its hash is wrong.
  """
  if name not in TOKENIZERS:
    raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {name!r}")
  return _load(name, cache_lib.cache_dir(cache_dir))


def token_dtype(vocab_size: int) -> np.dtype:
  """`uint16` when every id fits (vocab_size <= 65536), else `uint32`."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenize_documents(texts: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
  """Encodes documents into one stream, each document followed by EOS.

  Args:
    texts: the documents' texts.
    tokenizer: any `Tokenizer`.

  Returns:
    Token ids, shape `[sum(len(encode(t)) + 1 for t in texts)]`, dtype `token_dtype(vocab)`.

  Raises:
    DataError: `texts` is empty.
  """
  if not texts:
    raise DataError("no documents to tokenize (empty corpus)")
  dtype = token_dtype(tokenizer.vocab_size)
  eos = np.array([tokenizer.eos_id], dtype)
  pieces = []
  for start in range(0, len(texts), 1024):
    for ids in tokenizer.encode_batch(texts[start:start + 1024]):
      pieces += [np.asarray(ids, dtype), eos]
  return np.concatenate(pieces)
