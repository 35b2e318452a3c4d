"""Local readers: text files, JSONL, saved HF datasets, token arrays, and their errors."""

import importlib.util
import json
import sys

import numpy as np
import pytest

from nlj.data import DataError
from nlj.data import Document
from nlj.data import load_tokens
from nlj.data import read_hf_dataset
from nlj.data import read_jsonl
from nlj.data import read_text_files


def test_text_files_from_dir_and_file(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "b.txt").write_text("second")
  (tmp_path / "sub" / "a.txt").write_text("first ∑")
  (tmp_path / "empty.txt").write_text("  \n")
  (tmp_path / "skip.md").write_text("not matched")
  assert read_text_files(tmp_path) == [Document("b.txt", "second"),
                                       Document("sub/a.txt", "first ∑")]
  assert read_text_files([tmp_path / "b.txt"]) == [Document("b.txt", "second")]


def test_jsonl_fields(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in [
      {"body": "one", "key": "x"}, {"body": "two", "key": "y"}]) + "\n\n")
  assert read_jsonl(path, text_field="body") == [Document("d.jsonl:1", "one"),
                                                  Document("d.jsonl:2", "two")]
  assert [d.id for d in read_jsonl(path, "body", id_field="key")] == ["x", "y"]
  with pytest.raises(DataError, match=r"d\.jsonl:1: .*string field 'text'"):
    read_jsonl(path)
  path.write_text('{"text": "ok"}\n{broken\n')
  with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
    read_jsonl(path)


def test_missing_path(tmp_path):
  for reader in (read_text_files, read_jsonl, load_tokens):
    with pytest.raises(DataError, match="does not exist"):
      reader(tmp_path / "nope")


def test_empty_corpus(tmp_path):
  (tmp_path / "a.txt").write_text("")
  with pytest.raises(DataError, match="empty corpus"):
    read_text_files(tmp_path)
  (tmp_path / "e.jsonl").write_text('{"text": " "}\n')
  with pytest.raises(DataError, match="empty corpus"):
    read_jsonl(tmp_path / "e.jsonl")
  np.save(tmp_path / "e.npy", np.zeros(0, np.uint16))
  with pytest.raises(DataError, match="empty"):
    load_tokens(tmp_path / "e.npy")


def test_undecodable_bytes_name_file_and_offset(tmp_path):
  (tmp_path / "bad.txt").write_bytes(b"good text \xff\xfe more")
  with pytest.raises(DataError, match=r"bad\.txt: bytes 10\.\.11 are not valid UTF-8"):
    read_text_files(tmp_path)
  (tmp_path / "bad.jsonl").write_bytes(b'{"text": "\xc3"}\n')
  with pytest.raises(DataError, match="not valid UTF-8"):
    read_jsonl(tmp_path / "bad.jsonl")


def test_load_tokens_checks_shape_dtype_and_range(tmp_path):
  np.save(tmp_path / "t.npy", np.array([1, 2, 3], np.uint16))
  tokens = load_tokens(tmp_path / "t.npy", vocab_size=4)
  np.testing.assert_array_equal(tokens, [1, 2, 3])
  assert tokens.dtype == np.uint16
  with pytest.raises(DataError, match=r"outside \[0, 3\)"):
    load_tokens(tmp_path / "t.npy", vocab_size=3)
  np.save(tmp_path / "f.npy", np.ones((2, 2), np.float32))
  with pytest.raises(DataError, match="1-D integer"):
    load_tokens(tmp_path / "f.npy")
  (tmp_path / "x.npy").write_bytes(b"not numpy")
  with pytest.raises(DataError, match="not a valid .npy"):
    load_tokens(tmp_path / "x.npy")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs `datasets`")
def test_hf_dataset_round_trip(tmp_path):
  import datasets  # pylint: disable=import-outside-toplevel
  import pyarrow  # pylint: disable=import-outside-toplevel
  # An explicit fingerprint skips datasets' dill hashing, which some pyarrow versions break.
  table = datasets.table.InMemoryTable(pyarrow.table({"text": ["a", "b"]}))
  train = datasets.Dataset(table, fingerprint="fixture")
  datasets.DatasetDict({"train": train}).save_to_disk(str(tmp_path / "hf"))
  assert read_hf_dataset(tmp_path / "hf", split="train") == [Document("train:0", "a"),
                                                             Document("train:1", "b")]
  with pytest.raises(DataError, match="split 'test' not found"):
    read_hf_dataset(tmp_path / "hf", split="test")


def test_hf_dataset_without_datasets_names_the_package(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(ImportError, match="pip install datasets"):
    read_hf_dataset(tmp_path)
