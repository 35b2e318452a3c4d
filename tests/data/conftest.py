"""Fixtures for the data tests: a tiny local corpus packaged like a PyPI wheel."""

import json
import zipfile
from pathlib import Path

import pytest

from nlj.data import cache
from nlj.data import corpus
from nlj.data import packages
from nlj.data import sources
from nlj.data.loaders import Document

from .helpers import FIXTURE_DOCS
from .helpers import FIXTURE_MEMBER


def _extract(archive: Path) -> list[Document]:
  docs = json.loads(packages.read_member(archive, FIXTURE_MEMBER))
  return [Document(k, v) for k, v in docs.items()]


@pytest.fixture
def fixture_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
  """Registers corpus "fixture" (24 short documents, half held out); returns its cache dir.

  The "wheel" is pre-placed in `<cache>/downloads` with its true hash, so no pip call is made.
  """
  cache_dir = tmp_path / "cache"
  wheel = cache_dir / "downloads" / "fixture-1.0-py3-none-any.whl"
  wheel.parent.mkdir(parents=True)
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr(FIXTURE_MEMBER, json.dumps(FIXTURE_DOCS))
  package = packages.Package("fixture", "1.0", wheel.name, cache.sha256_file(wheel))
  spec = corpus.CorpusSpec((sources.Source("fixture_part", package, _extract),), 0.5)
  monkeypatch.setitem(corpus.CORPORA, "fixture", spec)
  return cache_dir
