"""Text data for SAE training and probing: labelled corpora read offline from installed packages."""

from saelab.data.corpora import (
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
