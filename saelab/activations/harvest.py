"""Harvest LM activations at a hook point into an on-disk :class:`ActivationCache`.

Pipeline: documents (bundled corpora or user files) -> held-out split -> shuffled document order ->
tokenised and packed into fixed-length contexts, each starting with the model's prefix token (BOS or
``<|endoftext|>``) and with the prefix token separating documents -> early-stopped forward pass to the
hook -> row filter (drop position 0, special tokens, and tokens whose norm exceeds ``max_norm_multiple`` x
the batch median, as dictionary_learning's ``max_activation_norm_multiple``) -> cache rows with their token
id, document index and position.

The stream is a pure function of (corpora, split, seed, tokenizer, context size), so a resumed harvest
regenerates it and skips the contexts already stored (progress is checkpointed by the cache writer).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..data.corpora import DEFAULT_TRAIN_CORPORA, Corpus, load_corpora, load_jsonl, load_text_files
from ..io import write_json
from ..models.hooks import HookPoint, capture, resolve_hook
from ..models.lm import DEFAULT_MODEL, LoadedLM, load_lm
from .cache import ActivationCache, ActivationCacheWriter


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
    """(training documents, held-out documents), fixed by ``data.split_seed``."""
    return load_documents(data).split(data.eval_fraction, seed=data.split_seed)


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
        (token ids ``(context_size,)`` int64, document index ``(context_size,)`` int64, -1 at position 0).
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
                ids_t = torch.tensor([lm.prefix_id] + buf_ids[:body], dtype=torch.long)
                doc_t = torch.tensor([-1] + buf_doc[:body], dtype=torch.long)
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


@dataclass
class HarvestConfig:
    """Harvest activations of ``model`` at ``hook_name`` into a cache directory."""

    model: str = DEFAULT_MODEL
    """Model: the bundled alias smollm2-135m, a .gguf file or a local HF model directory."""
    hook_name: str = "blocks.15.hook_resid_post"
    """Hook point: blocks.L.hook_resid_post or an HF module path such as model.layers.15."""
    out: str = "runs/demo/cache"
    """Cache directory (resumed if it holds an unfinished harvest with the same settings)."""
    n_tokens: int = 500_000
    """Activation rows to store (after filtering)."""
    context_size: int = 128
    """Tokens per context, including the prefix token at position 0."""
    batch_size: int = 8
    """Contexts per forward pass."""
    max_norm_multiple: float = 10.0
    """Drop tokens whose norm exceeds this multiple of the batch median (0 disables)."""
    exclude_special_tokens: bool = True
    """Drop special tokens (BOS/EOS/document separators) from the data."""
    dtype: str = "float32"
    """Storage dtype: float32 or float16."""
    seed: int = 0
    """Seed of the document order."""
    checkpoint_every: int = 32
    """Forward batches between resumable checkpoints."""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)."""
    device: str = "cpu"
    """Device of the LM."""
    progress: bool = True
    """Show a progress bar with tokens/s."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text selection and held-out split."""


def harvest(cfg: HarvestConfig, lm: LoadedLM | None = None) -> ActivationCache:
    """Run (or resume) a harvest and return the finished cache.

    Args:
        cfg: the harvest settings.
        lm: an already loaded model (loaded from ``cfg.model`` otherwise).

    Returns:
        The complete :class:`ActivationCache`.

    Raises:
        CacheMismatchError: ``cfg.out`` holds a cache made with other settings.
        ValueError: unknown hook name (lists valid ones), or the corpus is too small for ``n_tokens``.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    lm = lm or load_lm(cfg.model, device=cfg.device)
    hook = resolve_hook(lm.model, cfg.hook_name)
    train_docs, _ = split_documents(cfg.data)
    train_docs = train_docs.shuffle(cfg.seed)
    meta = {
        "context_size": cfg.context_size, "n_tokens_requested": cfg.n_tokens, "prefix_id": lm.prefix_id,
        "max_norm_multiple": cfg.max_norm_multiple, "exclude_special_tokens": cfg.exclude_special_tokens,
        "seed": cfg.seed, "data": asdict(cfg.data), "module_path": hook.module_path,
    }
    d_in = _hook_width(lm, hook)
    writer = ActivationCacheWriter(cfg.out, model=cfg.model, hook_name=hook.hook_name, d_in=d_in, dtype=cfg.dtype, meta=meta)
    if writer.complete:
        return ActivationCache.open(cfg.out)
    done_ctx = int(writer.progress.get("contexts_done", 0))
    stored = writer.n_tokens
    special = lm.special_ids if cfg.exclude_special_tokens else {lm.prefix_id}
    contexts = iter_contexts(lm, train_docs, cfg.context_size)
    for _ in range(done_ctx):
        next(contexts)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.n_tokens, initial=stored, unit="tok", unit_scale=True, desc=f"harvest {hook.hook_name}", dynamic_ncols=True)
    n_batches, t0 = 0, time.perf_counter()
    max_doc = int(writer.progress.get("max_doc", -1))
    while stored < cfg.n_tokens:
        chunk = [c for _, c in zip(range(cfg.batch_size), contexts)]
        if not chunk:
            raise ValueError(
                f"the training documents ran out after {stored} stored tokens (< n_tokens={cfg.n_tokens}); "
                "add corpora/text files or lower --n_tokens"
            )
        ids = torch.stack([c[0] for c in chunk]).to(cfg.device)
        docs = torch.stack([c[1] for c in chunk])
        h = capture(lm.model, hook, ids)
        keep = select_rows(h, ids, special, cfg.max_norm_multiple)
        rows = keep.nonzero(as_tuple=False)
        rows = rows[: cfg.n_tokens - stored]
        b, t = rows[:, 0], rows[:, 1]
        writer.add(
            h[b, t].float().cpu(), token_ids=ids[b, t].cpu(), doc_ids=docs[b.cpu(), t.cpu()], positions=t.cpu(),
        )
        stored += len(rows)
        done_ctx += len(chunk)
        max_doc = max(max_doc, int(docs.max()))
        n_batches += 1
        if bar is not None:
            bar.update(len(rows))
        if n_batches % cfg.checkpoint_every == 0:
            writer.checkpoint({"contexts_done": done_ctx, "max_doc": max_doc})
    if bar is not None:
        bar.close()
    _write_documents(cfg.out, train_docs, max_doc)
    return writer.finalize({"contexts_done": done_ctx, "max_doc": max_doc})


def _hook_width(lm: LoadedLM, hook: HookPoint) -> int:
    ids = torch.tensor([[lm.prefix_id, lm.prefix_id]])
    return int(capture(lm.model, hook, ids).shape[-1])


def _write_documents(out: str, docs: Corpus, max_doc: int) -> None:
    """``documents.json``: doc index (as stored per row) -> (doc_id, source, label)."""
    write_json(
        f"{out}/documents.json",
        [{"doc_id": d.doc_id, "source": d.source, "label": d.label} for d in docs[: max_doc + 1]],
    )
