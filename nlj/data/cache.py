"""Cache directory, content hashes and crash-safe writes.

Nothing here ever leaves a partially written file or directory under its final name: files are
written to a temporary sibling and renamed into place (`os.replace` is atomic on POSIX), and a
cache directory is assembled in a temporary sibling directory and renamed as a whole.
"""

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

ENV_VAR = "NLJ_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
  """Resolves the data cache directory.

  Args:
    path: explicit directory; wins over everything else.

  Returns:
    `path` if given, else `$NLJ_DATA_DIR` if set, else `<repo>/data_cache` (git-ignored).
  """
  if path is not None:
    return Path(path).expanduser().resolve()
  if os.environ.get(ENV_VAR):
    return Path(os.environ[ENV_VAR]).expanduser().resolve()
  return _REPO_ROOT / "data_cache"


def sha256_bytes(data: bytes) -> str:
  """Hex SHA-256 of `data`."""
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
  """Hex SHA-256 of the file at `path`, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
  """Writes `data` to `path` via a temporary sibling file and an atomic rename."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; the cache is shared.
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
  """Yields an empty temporary directory that replaces `final` when the block exits cleanly.

  If the block raises, the temporary directory is deleted and `final` is left as it was. An
  existing `final` is replaced (moved aside, then deleted), so a reader sees either the old or
  the new directory, or briefly none, never a partial one.

  Args:
    final: the directory to create or replace.

  Yields:
    The temporary directory to fill.
  """
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
  os.chmod(tmp, 0o755)  # mkdtemp makes 0700 directories; the cache is shared.
  try:
    yield tmp
    try:
      os.replace(tmp, final)
    except OSError:  # `final` exists and is not empty: move it aside first.
      old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
      os.replace(final, old)
      os.replace(tmp, final)
      shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
