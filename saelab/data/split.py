"""The held-out split and the packing of documents into contexts, shared by the harvest and the evals.

:class:`DataConfig` names the text (bundled corpora and user files) and the seed and fraction of its
train/held-out document split; :func:`split_documents` makes that split, so the harvest trains only on the
training documents and every eval reads only the held-out ones. :func:`training_order` is the harvest's
shuffled document order. :func:`iter_contexts` packs documents into fixed-length contexts, each starting
with the model's prefix token and with the prefix token separating documents (SAELens / dictionary_learning
packing); :func:`select_rows` is the row filter that decides which token activations are SAE data (position 0,
special tokens and norm outliers dropped, as dictionary_learning's ``max_activation_norm_multiple``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .corpora import DEFAULT_TRAIN_CORPORA, Corpus, data_location, load_corpora, load_jsonl, load_text_files

if TYPE_CHECKING:  # type hints only: the model loader is not needed to split or pack text
    from ..models.lm import LoadedLM


@dataclass
class DataConfig:
    """Which text to use and how it is split into training and held-out documents."""

    corpora: list[str] = field(default_factory=lambda: list(DEFAULT_TRAIN_CORPORA))
    """Bundled corpora (see ``saelab.data.list_corpora()``); empty to use only text_files."""
    text_files: list[str] = field(default_factory=list)
    """Your own text: .txt files, directories of .txt files, or .jsonl files with a "text" field."""
    eval_fraction: float = 0.02
    """Fraction of documents held out for evaluation (never harvested for training)."""
    split_seed: int = 0
    """Seed of the train/held-out document split."""
    limit_per_corpus: int | None = None
    """Read at most this many documents per corpus (quick experiments)."""


def load_documents(data: DataConfig) -> Corpus:
    """All documents named by ``data`` (bundled corpora followed by user files)."""
    parts: list[Corpus] = []
    if data.corpora:
        parts.append(load_corpora(data.corpora, limit_per_corpus=data.limit_per_corpus))
    for f in data.text_files:
        parts.append(load_jsonl(f) if str(f).endswith(".jsonl") else load_text_files([f]))
    if not parts:
        raise ValueError("no text: give at least one corpus (--corpora) or text file (--text_files)")
    if len(parts) == 1:
        return parts[0]
    docs = [d for p in parts for d in p]
    return Corpus(docs, name="+".join(p.name for p in parts))


def split_documents(data: DataConfig) -> tuple[Corpus, Corpus]:
    """(training documents, held-out documents), fixed by ``data.split_seed``. Made once per process for bundled
    corpora (see :func:`training_order`); with ``text_files`` every call reads the files again."""
    if data.text_files:
        return load_documents(data).split(data.eval_fraction, seed=data.split_seed)
    return _bundled_split(tuple(data.corpora), data.eval_fraction, data.split_seed, data.limit_per_corpus,
                          data_location())


def training_order(data: DataConfig, seed: int) -> Corpus:
    """The training documents of ``data`` in the harvest's order (shuffled by ``seed``).

    The split and the shuffle of the ~345k bundled documents are a noticeable Python cost on top of parsing them (cached
    per process by :mod:`saelab.data.corpora`); both are pure functions of their arguments, so for bundled corpora
    they are made once per process (``saelab compare`` harvests a clean and a masked stream of the same text)."""
    if data.text_files:
        return split_documents(data)[0].shuffle(seed)
    return _bundled_order(tuple(data.corpora), data.eval_fraction, data.split_seed, data.limit_per_corpus, seed,
                          data_location())


@functools.lru_cache(maxsize=4)
def _bundled_split(corpora: tuple[str, ...], eval_fraction: float, split_seed: int, limit: int | None,
                   location: tuple[str | None, ...]) -> tuple[Corpus, Corpus]:
    data = DataConfig(corpora=list(corpora), eval_fraction=eval_fraction, split_seed=split_seed, limit_per_corpus=limit)
    return load_documents(data).split(eval_fraction, seed=split_seed)


@functools.lru_cache(maxsize=4)
def _bundled_order(corpora: tuple[str, ...], eval_fraction: float, split_seed: int, limit: int | None, seed: int,
                   location: tuple[str | None, ...]) -> Corpus:
    return _bundled_split(corpora, eval_fraction, split_seed, limit, location)[0].shuffle(seed)


def iter_contexts(
    lm: LoadedLM, docs: Sequence, context_size: int, *, docs_per_batch: int = 64
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pack documents into contexts of ``context_size`` tokens.

    Every context starts with ``lm.prefix_id`` at position 0; documents are separated by the prefix token
    and may continue into the next context (SAELens/dictionary_learning-style packing).

    Args:
        lm: the loaded model (for its tokenizer and prefix id).
        docs: documents in the order to use (objects with ``.text``).
        context_size: tokens per context, including position 0.
        docs_per_batch: documents tokenised per tokenizer call.

    Yields:
        (token ids ``(context_size,)`` int64, document index ``(context_size,)`` int64, -1 at position 0), on the CPU.
    """
    if context_size < 2:
        raise ValueError(f"context_size must be >= 2, got {context_size}")
    body = context_size - 1
    buf_ids: list[int] = []
    buf_doc: list[int] = []
    for start in range(0, len(docs), docs_per_batch):
        batch = docs[start : start + docs_per_batch]
        enc = lm.tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
        for j, ids in enumerate(enc):
            if not ids:
                continue
            di = start + j
            if buf_ids:
                buf_ids.append(lm.prefix_id)
                buf_doc.append(di)
            buf_ids.extend(ids)
            buf_doc.extend([di] * len(ids))
            while len(buf_ids) >= body:
                ids_t = torch.tensor([lm.prefix_id] + buf_ids[:body], dtype=torch.long, device="cpu")
                doc_t = torch.tensor([-1] + buf_doc[:body], dtype=torch.long, device="cpu")
                del buf_ids[:body], buf_doc[:body]
                yield ids_t, doc_t


def select_rows(h: torch.Tensor, ids: torch.Tensor, special_ids: set[int], max_norm_multiple: float | None) -> torch.Tensor:
    """Boolean ``(B, T)`` mask of the activations kept as SAE data.

    Drops position 0 (the attention sink: norm ~25,000 from layer 12 on in SmolLM2), special tokens, and
    tokens whose L2 norm exceeds ``max_norm_multiple`` x the median norm of the kept tokens in the batch.
    """
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 0] = False
    if special_ids:
        keep &= ~torch.isin(ids, torch.tensor(sorted(special_ids), device=ids.device))
    if max_norm_multiple and keep.any():
        norms = h.norm(dim=-1)
        med = norms[keep].median()
        keep &= norms <= max_norm_multiple * med
    return keep


__all__ = ["DataConfig", "iter_contexts", "load_documents", "select_rows", "split_documents", "training_order"]
