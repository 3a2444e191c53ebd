"""Sparse probing (SAEBench) and the OOD probing gap (sae-probes) on mean-pooled LM and SAE features.

**Sparse probing** (SAEBench ``evals/sparse_probing``). For each binary task of
:data:`saelab.evals.tasks.PROBE_DATASETS` (one-vs-rest, balanced negatives drawn evenly from the other classes):

* per-text features are means over the text's *valid* tokens (position 0, padding and special tokens excluded;
  context 128): the LM residual at the SAE's hook, and ``sae.encode`` of every valid token, then averaged
  (the mean of the codes, not the code of the mean). Unlike SAEBench, tokens whose norm exceeds
  ``max_norm_multiple`` (10) x the median are also left out, as in SAE training and the core eval: SmolLM2 turns a
  text-initial "." into a second attention sink (norm ~23,600 vs ~175 at layer 15) that would swamp the mean;
* latents (or LM dimensions, for ``llm_top_k``) are ranked by ``|mean_pos - mean_neg|`` on the train set and a
  ``LogisticRegression(penalty="l2", C=1.0, max_iter=1000)`` is fitted on the top ``k`` for ``k in {1, 2, 5}``;
  the score is test accuracy;
* references: a probe on all SAE latents (``sae_test_accuracy``) and on the full LM residual
  (``llm_test_accuracy``). SAEBench trains these with a GPU linear probe (AdamW, 100 epochs, early stopping on
  the *test* accuracy); here they are scikit-learn ``LogisticRegression(C=full_probe_C)`` on standardised
  features (z-scored with train statistics), a deterministic CPU stand-in that does not peek at the test set;
* aggregation: mean over the tasks of a dataset, then mean over datasets.

**OOD probing gap** (Kantamneni et al. 2025, ``sae-probes`` ``run_baselines.py`` /
``utils_training.find_best_reg``). For each task of :data:`saelab.evals.tasks.OOD_TASKS`, probes are trained on
the in-distribution train split and scored by ROC AUC on the held-out in-distribution split (``id``) and on
every OOD split:

* oracle: L2 logistic regression on the raw mean-pooled LM activations;
* SAE probe: L1 logistic regression (saga, as sae-probes) on the top ``k`` latents (default 128, capped at
  ``d_sae``) ranked by ``|mean_pos - mean_neg|`` on the train split;
* both pick ``C`` from ``logspace(5, -5, 10)`` by validation AUC as ``find_best_reg`` does (one hold-out split of
  the last ``min(20 %, 100)`` training examples when there are >= 128, else 6-fold stratified CV), then refit on
  the whole train split;
* ``gap = AUC_oracle - AUC_SAE`` per split (positive: the SAE probe is worse).

sae-probes pools the *last* token; we mean-pool (same valid tokens and outlier rule as above), as SAEBench does.

**LM activations** do not depend on the SAE: every valid token's activation of every text is stored once (as
float16 unless a value overflows it) in :class:`~saelab.evals.base.LMActivationStore`, keyed by the dataset's
spec, the hash of its texts and the context size, and reused by every later run and SAE of the same model/hook.
The probes on LM features only (``llm_top_k``, the full LM probe, the OOD oracle with its choice of ``C``) do not
depend on the SAE either: their results are kept in-process, keyed by a digest of their inputs, so each is fitted
once per task however many SAEs are evaluated.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..devices import deterministic_algorithms
from ..models.hooks import HookPoint, capture, resolve_hook
from ..models.lm import LoadedLM
from ..sae.model import SAE
from .base import EVAL_SUITES, EvalConfig, EvalResult, LMActivationStore, Suite
from .tasks import OOD_TASKS, build_ood_task, build_probing_dataset, default_datasets

__all__ = [
    "OODProbingConfig",
    "OODProbingResult",
    "SparseProbingConfig",
    "SparseProbingResult",
    "auc",
    "collect_token_activations",
    "full_probe_accuracy",
    "masked_mean",
    "norm_outlier_keep",
    "ood_probe_aucs",
    "pooled_sae_features",
    "rank_by_mean_difference",
    "run_ood_probing",
    "run_sparse_probing",
    "segment_mean",
    "select_C",
    "sparse_probe_task",
    "token_activations",
    "tokenize_texts",
    "top_k_probe_accuracy",
    "valid_token_mask",
]

LM_STAGE_VERSION = 1
"""Version of the LM-stage rules (tokenisation, valid-token mask); part of the cache key."""

CS_SAE_PROBES = tuple(float(c) for c in np.logspace(5, -5, 10))
"""The inverse-regularisation grid of sae-probes ``find_best_reg``."""


# ==============================================================================================================
# Configs and results


@dataclass
class SparseProbingConfig(EvalConfig):
    """Sparse probing (SAEBench ``evals/sparse_probing``) of one saved SAE on the bundled labelled text."""

    datasets: list[str] = field(default_factory=default_datasets)
    """Datasets of ``saelab.evals.tasks.PROBE_DATASETS`` (default: all but seinfeld_laugh, which is at chance)."""
    n_train_per_class: int = 100
    """Train texts per class in each dataset's pool (SAEBench: 4000 per dataset; reduced for CPU, see tasks.py)."""
    n_test_per_class: int = 50
    """Test texts per class in each dataset's pool (SAEBench: 1000 per dataset)."""
    k_values: list[int] = field(default_factory=lambda: [1, 2, 5])
    """Numbers of top latents (and LM dimensions) probed."""
    context_size: int = 128
    """Tokens per text including the prefix token at position 0 (longer texts are truncated)."""
    seed: int = 42
    """Sampling seed of the pools and of the negatives (SAEBench: 42)."""
    full_probe_C: float = 1.0
    """C of the full-width SAE and LM reference probes (logistic regression on standardised features)."""
    full_probes: bool = True
    """Also fit the full-width SAE probe and the full LM-residual probe."""
    max_norm_multiple: float = 10.0
    """Leave out of the means tokens whose norm exceeds this multiple of the median (as in training; 0 keeps all)."""
    batch_tokens: int = 4096
    """LM batches hold at most this many (padded) tokens: probing texts vary in length, so their batches are sized in
    tokens, not sequences (the other suites' ``batch_size``)."""
    activation_cache: str | None = None
    """Root of the LM-activation cache (default: saelab.paths.cache_dir("eval_activations")); used only when the
    caller passes no store (``run_suite`` passes the default one)."""


@dataclass
class OODProbingConfig(EvalConfig):
    """OOD probing gap (sae-probes protocol, Kantamneni et al. 2025) of one saved SAE on the bundled labelled text."""

    tasks: list[str] = field(default_factory=lambda: list(OOD_TASKS.names()))
    """Tasks of ``saelab.evals.tasks.OOD_TASKS``."""
    n_train_per_class: int = 256
    """Balanced in-distribution training examples per class (sae-probes: 1,024 in total)."""
    n_id_test_per_class: int = 100
    """Held-out in-distribution test examples per class."""
    n_ood_per_class: int = 100
    """Examples per class of each OOD split."""
    k: int = 128
    """Top latents given to the L1 SAE probe (sae-probes: 128); capped at d_sae."""
    cv: bool = True
    """Choose C of both probes by validation AUC over logspace(5, -5, 10) (sae-probes); else use fixed_C."""
    fixed_C: float = 1.0
    """C of both probes when cv is off."""
    sae_solver: str = "saga"
    """Solver of the L1 SAE probe: saga (as sae-probes; fast) or liblinear (exact, but about 50x slower
    per fit at C >= 600 on unscaled latents)."""
    context_size: int = 128
    """Tokens per text including the prefix token at position 0."""
    max_norm_multiple: float = 10.0
    """Leave out of the means tokens whose norm exceeds this multiple of the median (as in training; 0 keeps all)."""
    seed: int = 42
    """Sampling seed."""
    batch_tokens: int = 4096
    """LM batches hold at most this many (padded) tokens: probing texts vary in length, so their batches are sized in
    tokens, not sequences (the other suites' ``batch_size``)."""
    activation_cache: str | None = None
    """Root of the LM-activation cache (default: saelab.paths.cache_dir("eval_activations")); used only when the
    caller passes no store (``run_suite`` passes the default one)."""


@dataclass
class SparseProbingResult(EvalResult):
    """Result of the ``sparse_probing`` suite (accuracies in [0, 1]; means over datasets of means over tasks).

    Attributes:
        sae_top_k_test_accuracy: ``{k: accuracy}`` of the top-k-latent probes (JSON keys become strings).
        llm_top_k_test_accuracy: ``{k: accuracy}`` of probes on the top-k LM residual dimensions.
        sae_test_accuracy: full-width SAE probe (None when ``full_probes`` is off).
        llm_test_accuracy: full LM-residual probe (None when ``full_probes`` is off).
        sae_top_1_test_accuracy, sae_top_2_test_accuracy, sae_top_5_test_accuracy, llm_top_1_test_accuracy, ...:
            the same numbers flattened under SAEBench's metric names (only for k in {1, 2, 5}), for tables.
        per_dataset: ``{dataset: {metric: mean over its tasks}}`` (metrics ``sae_top_{k}_test_accuracy``, ...,
            plus ``n_texts``, ``n_tokens`` (run through the LM, prefixes included), ``n_tasks``,
            ``n_outlier_tokens`` (left out by ``max_norm_multiple``)).
        per_task: one row per task: ``task``, ``dataset``, ``positive_class``, ``n_train``, ``n_test``, the
            metrics, and ``top_latents`` (the 5 best-ranked latents).
        config: the config used.
    """

    sae_top_k_test_accuracy: dict[int, float] = field(default_factory=dict)
    llm_top_k_test_accuracy: dict[int, float] = field(default_factory=dict)
    sae_test_accuracy: float | None = None
    llm_test_accuracy: float | None = None
    sae_top_1_test_accuracy: float | None = None
    sae_top_2_test_accuracy: float | None = None
    sae_top_5_test_accuracy: float | None = None
    llm_top_1_test_accuracy: float | None = None
    llm_top_2_test_accuracy: float | None = None
    llm_top_5_test_accuracy: float | None = None
    per_dataset: dict[str, dict[str, float]] = field(default_factory=dict)
    per_task: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)


@dataclass
class OODProbingResult(EvalResult):
    """Result of the ``ood_probing`` suite (ROC AUCs in [0, 1]; gap = oracle AUC - SAE AUC).

    Attributes:
        oracle_id_auc, sae_id_auc, id_gap: in-distribution test split, mean over tasks.
        oracle_ood_auc, sae_ood_auc, ood_gap: mean over tasks of the mean over each task's OOD splits.
        per_task: ``{task: {split: {"oracle_auc", "sae_auc", "gap", "n"}}}`` for the splits ``id`` and every
            OOD split, plus ``"_probe": {"oracle_C", "sae_C", "k", "sae_nonzero_weights", "n_outlier_tokens"}``.
        config: the config used.
    """

    oracle_id_auc: float | None = None
    sae_id_auc: float | None = None
    id_gap: float | None = None
    oracle_ood_auc: float | None = None
    sae_ood_auc: float | None = None
    ood_gap: float | None = None
    per_task: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)


# ==============================================================================================================
# LM stage: tokenisation, valid tokens, pooling


def tokenize_texts(lm: LoadedLM, texts: Sequence[str], context_size: int) -> list[list[int]]:
    """Token ids of each text with ``lm.prefix_id`` at position 0, truncated to ``context_size`` tokens.

    Args:
        lm: the model (tokenizer, prefix id). The tokenizer adds no special tokens itself.
        texts: the texts.
        context_size: maximum length including the prefix (>= 2).

    Returns:
        One list of ids per text (length 1 for an empty text).

    Raises:
        ValueError: ``context_size < 2``.
    """
    if context_size < 2:
        raise ValueError(f"context_size must be >= 2, got {context_size}")
    enc = lm.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [[lm.prefix_id] + list(ids[: context_size - 1]) for ids in enc]


def valid_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     special_ids: set[int] | Sequence[int]) -> torch.Tensor:
    """Boolean ``(B, T)`` mask of the tokens that are averaged: not position 0, not padding, not special.

    Args:
        input_ids: ``(B, T)`` ids.
        attention_mask: ``(B, T)``, 1 for real tokens, 0 for padding.
        special_ids: ids excluded everywhere (BOS/EOS/PAD, the prefix token).
    """
    mask = attention_mask.bool().clone()
    mask[:, 0] = False
    if len(special_ids):
        mask &= ~torch.isin(input_ids, torch.tensor(sorted(special_ids), device=input_ids.device))
    return mask


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of each row.

    Args:
        h: ``(B, T, d)`` values.
        mask: ``(B, T)`` bool.

    Returns:
        ``(B, d)`` float32; zeros for a row without any masked position.
    """
    m = mask.to(torch.float32)[..., None]
    return (h.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def _segments(offsets: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment id of every row ``(N,)`` and number of kept rows per segment ``(n,)``, on ``offsets``' device."""
    counts = (offsets[1:] - offsets[:-1]).to(torch.long)
    seg = torch.repeat_interleave(torch.arange(len(counts), device=offsets.device), counts)
    if keep is None:
        return seg, counts
    kept = torch.zeros(len(counts), dtype=torch.long, device=offsets.device)
    return seg, kept.index_add_(0, seg, keep.to(offsets.device, torch.long))


def segment_mean(values: torch.Tensor, offsets: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of consecutive row segments: row ``i`` of the output is ``values[offsets[i]:offsets[i+1]].mean(0)``.

    Args:
        values: ``(N, d)``.
        offsets: ``(n + 1,)`` non-decreasing, ``offsets[0] == 0``, ``offsets[-1] == N``.
        keep: optional ``(N,)`` bool; rows that are False are left out of their segment's mean.

    Returns:
        ``(n, d)`` float32; zeros for a segment without (kept) rows.
    """
    seg, counts = _segments(offsets.to(values.device), keep)
    out = torch.zeros(len(counts), values.shape[-1], dtype=torch.float32, device=values.device)
    v = values.float() if keep is None else values.float() * keep[:, None]
    out.index_add_(0, seg, v)
    return out / counts.clamp_min(1)[:, None].float()


def norm_outlier_keep(acts: torch.Tensor, max_norm_multiple: float | None) -> torch.Tensor:
    """``(N,)`` bool: tokens whose L2 norm is at most ``max_norm_multiple`` x the median norm of ``acts``.

    The same rule as SAE training and the core eval (``saelab.data.split.select_rows``), with the median
    taken over the whole pool of valid tokens. In SmolLM2 a text whose first token is "." gets an attention-sink-like
    activation (norm ~23,600 at layer 15 vs a median ~175), which would dominate the text's mean. ``0`` or ``None``
    keeps every token.
    """
    if not max_norm_multiple or acts.shape[0] == 0:
        return torch.ones(acts.shape[0], dtype=torch.bool, device=acts.device)
    norms = acts.float().norm(dim=-1)
    return norms <= max_norm_multiple * norms.median()


def _length_batches(lengths: Sequence[int], batch_tokens: int, max_batch: int = 256) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first) with ``len(batch) * max_len <= batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * width > batch_tokens or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def collect_token_activations(lm: LoadedLM, hook: HookPoint, token_lists: Sequence[Sequence[int]], *,
                              batch_tokens: int = 4096, progress: bool = False) -> dict[str, torch.Tensor]:
    """Run the LM up to ``hook`` on every text and keep the activations of its valid tokens.

    Texts are sorted by length, right-padded into batches of at most ``batch_tokens`` tokens, and run with an
    attention mask (causal attention: right padding never changes the real tokens' activations).

    Args:
        lm: the model.
        hook: from :func:`saelab.models.hooks.resolve_hook`.
        token_lists: ids per text, starting with ``lm.prefix_id`` (:func:`tokenize_texts`).
        batch_tokens: padded tokens per forward pass.
        progress: show a tqdm bar.

    Returns:
        ``{"acts": (N, d) float16 (float32 if a value overflows float16), "offsets": (n + 1,) int64,
        "n_tokens": () int64 (tokens run through the LM, padding excluded)}`` where the valid tokens of text
        ``i`` are rows ``offsets[i]:offsets[i+1]`` in position order.
    """
    lengths = [len(t) for t in token_lists]
    pad = getattr(lm.tokenizer, "pad_token_id", None)
    pad = lm.prefix_id if pad is None else int(pad)
    special = lm.special_ids
    per_text: list[torch.Tensor | None] = [None] * len(token_lists)
    batches = _length_batches(lengths, batch_tokens)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(lengths), unit="tok", unit_scale=True, desc="LM activations", dynamic_ncols=True)
    device = next(lm.model.parameters()).device
    for b in batches:  # each batch is padded on the CPU, copied to the LM's device once and its output copied back
        T = max(lengths[i] for i in b)
        ids = torch.full((len(b), T), pad, dtype=torch.long, device="cpu")
        attn = torch.zeros((len(b), T), dtype=torch.long, device="cpu")
        for r, i in enumerate(b):
            ids[r, : lengths[i]] = torch.tensor(token_lists[i], dtype=torch.long, device="cpu")
            attn[r, : lengths[i]] = 1
        h = capture(lm.model, hook, ids.to(device), attn.to(device)).float().cpu()
        mask = valid_token_mask(ids, attn, special)
        for r, i in enumerate(b):
            per_text[i] = h[r][mask[r]].clone()
        if bar is not None:
            bar.update(sum(lengths[i] for i in b))
    if bar is not None:
        bar.close()
    d = lm.d_model if not per_text or per_text[0] is None else per_text[0].shape[-1]
    acts = torch.cat([p for p in per_text], 0) if per_text else torch.zeros(0, d, device="cpu")
    counts = torch.tensor([p.shape[0] for p in per_text], dtype=torch.long, device="cpu")
    offsets = torch.cat([torch.zeros(1, dtype=torch.long, device="cpu"), counts.cumsum(0)])
    half = acts.half()
    if torch.isfinite(half).all():
        acts = half
    return {"acts": acts, "offsets": offsets, "n_tokens": torch.tensor(sum(lengths), dtype=torch.long, device="cpu")}


def _texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:24]


def token_activations(store: LMActivationStore, lm: LoadedLM, hook: HookPoint, name: str, texts: Sequence[str],
                      spec: dict, *, context_size: int = 128, batch_tokens: int = 4096, progress: bool = False
                      ) -> tuple[dict[str, torch.Tensor], bool]:
    """Cached :func:`collect_token_activations` of ``texts``.

    Args:
        store: the disk cache (its model/hook must be ``lm``'s / ``hook``'s).
        lm, hook: model and hook point.
        name: cache entry name (``"sparse_probing"``, ``"ood_probing"``).
        texts: the texts.
        spec: JSON description of the texts (dataset, classes, sizes, seed, ...); the key also holds the hash of
            the texts, their number, the context size and :data:`LM_STAGE_VERSION`.
        context_size: tokens per text including the prefix.
        batch_tokens: padded tokens per forward pass (not part of the key).
        progress: tqdm bar on a miss.

    Returns:
        (tensors as :func:`collect_token_activations`, whether they were computed now rather than read).
    """
    key = {**spec, "n_texts": len(texts), "texts_sha256": _texts_digest(texts), "context_size": context_size,
           "lm_stage_version": LM_STAGE_VERSION, "prefix_id": lm.prefix_id}
    computed = []

    def compute() -> dict[str, torch.Tensor]:
        computed.append(True)
        toks = tokenize_texts(lm, texts, context_size)
        return collect_token_activations(lm, hook, toks, batch_tokens=batch_tokens, progress=progress)

    return store.get(name, key, compute), bool(computed)


@torch.no_grad()
def pooled_sae_features(sae: SAE, acts: torch.Tensor, offsets: torch.Tensor, chunk_tokens: int = 4096,
                        keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-text mean over valid tokens of ``sae.encode`` of each token (the mean of the codes).

    Args:
        sae: the SAE (its input is the raw activation).
        acts: ``(N, d_in)`` valid-token activations (any float dtype; upcast to the SAE's dtype).
        offsets: ``(n + 1,)`` text boundaries in ``acts``.
        chunk_tokens: tokens encoded at a time.
        keep: optional ``(N,)`` bool; tokens that are False are not encoded nor averaged.

    Returns:
        ``(n, d_sae)`` float32 on the CPU; zeros for a text without (kept) tokens.

    The sums accumulate on the SAE's device (one ``(n, d_sae)`` copy to the CPU at the end, not every chunk's
    ``(chunk_tokens, d_sae)`` codes), with PyTorch's deterministic ``index_add_`` on CUDA (its default kernel adds
    with atomics, in a run-dependent order).
    """
    dev = sae.device
    seg, counts = _segments(offsets, keep)
    if keep is not None:
        acts, seg = acts[keep.to(acts.device)], seg[keep]
    seg = seg.to(dev)
    out = torch.zeros(len(counts), sae.cfg.d_sae, dtype=torch.float32, device=dev)
    for s in range(0, acts.shape[0], chunk_tokens):
        x = acts[s : s + chunk_tokens].to(device=dev, dtype=sae.dtype)
        f = sae.encode(x).float()
        with deterministic_algorithms(dev.type == "cuda"):  # only around the sum: encode may use other kernels
            out.index_add_(0, seg[s : s + chunk_tokens], f)
    return (out / counts.to(dev).clamp_min(1)[:, None].float()).cpu()


# ==============================================================================================================
# Probes (pure functions on feature matrices)


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


_LM_PROBE_MEMO: dict[str, Any] = {}
"""Results of the SAE-independent probes (on LM features only), keyed by a digest of their inputs and settings."""

_LM_PROBE_MEMO_MAX = 4096


def lm_memo(name: str, arrays: Sequence, params: dict, compute: Callable[[], Any]) -> Any:
    """``compute()``, or its earlier result for byte-identical ``arrays`` and equal ``params``.

    The LM-feature probes of a task (``llm_top_k``, the full LM probe, the OOD oracle) do not depend on the SAE, and
    ``saelab compare`` evaluates many SAEs on the same cached LM activations; the fits are deterministic (fixed
    ``random_state``), so a stored result equals a recomputed one.
    """
    h = hashlib.sha256(name.encode())
    for a in arrays:
        a = np.ascontiguousarray(_np(a))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    h.update(repr(sorted(params.items())).encode())
    key = h.hexdigest()
    if key not in _LM_PROBE_MEMO:
        if len(_LM_PROBE_MEMO) >= _LM_PROBE_MEMO_MAX:
            _LM_PROBE_MEMO.pop(next(iter(_LM_PROBE_MEMO)))
        _LM_PROBE_MEMO[key] = compute()
    return _LM_PROBE_MEMO[key]


def rank_by_mean_difference(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Feature indices sorted by ``|mean(X[y == 1]) - mean(X[y == 0])|``, largest first (ties: lower index first).

    Args:
        X: ``(n, d)`` features.
        y: ``(n,)`` 0/1 labels with both classes present.

    Returns:
        ``(d,)`` int64 indices.

    Raises:
        ValueError: a class is missing.
    """
    X, y = _np(X).astype(np.float64), _np(y)
    if not (y == 1).any() or not (y == 0).any():
        raise ValueError("both classes must be present to rank features")
    diff = np.abs(X[y == 1].mean(0) - X[y == 0].mean(0))
    return np.argsort(-diff, kind="stable").astype(np.int64)


def _logreg(**kw):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(**kw)


def top_k_probe_accuracy(X_train, y_train, X_test, y_test, k: int,
                         ranking: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """SAEBench top-k probe: ``LogisticRegression(penalty="l2", C=1.0, max_iter=1000)`` on the top-``k`` features
    (L2 is scikit-learn's default penalty; the argument is deprecated from 1.8 on, so it is not passed).

    Args:
        X_train, X_test: ``(n, d)`` features (not standardised, as in SAEBench).
        y_train, y_test: ``(n,)`` 0/1 labels.
        k: features kept (capped at ``d``).
        ranking: precomputed :func:`rank_by_mean_difference` of the train set.

    Returns:
        (test accuracy in [0, 1], the ``k`` feature indices used).
    """
    X_train, X_test = _np(X_train).astype(np.float64), _np(X_test).astype(np.float64)
    y_train, y_test = _np(y_train), _np(y_test)
    idx = (rank_by_mean_difference(X_train, y_train) if ranking is None else ranking)[:k]
    clf = _logreg(C=1.0, max_iter=1000).fit(X_train[:, idx], y_train)
    return float((clf.predict(X_test[:, idx]) == y_test).mean()), idx


def full_probe_accuracy(X_train, y_train, X_test, y_test, C: float = 1.0) -> float:
    """Reference probe on every feature: z-score with train statistics, then L2 logistic regression.

    Constant features (dead latents) are left at 0. Stands in for SAEBench's GPU linear probe (see the module doc).

    Returns:
        Test accuracy in [0, 1].
    """
    X_train, X_test = _np(X_train).astype(np.float64), _np(X_test).astype(np.float64)
    mu, sd = X_train.mean(0), X_train.std(0)
    sd[sd == 0] = 1.0
    clf = _logreg(C=C, max_iter=1000).fit((X_train - mu) / sd, _np(y_train))
    return float((clf.predict((X_test - mu) / sd) == _np(y_test)).mean())


def sparse_probe_task(sae_train, sae_test, lm_train, lm_test, y_train, y_test, k_values: Sequence[int] = (1, 2, 5),
                      full_probes: bool = True, full_probe_C: float = 1.0) -> dict:
    """All sparse-probing metrics of one binary task.

    Args:
        sae_train, sae_test: ``(n, d_sae)`` pooled SAE features.
        lm_train, lm_test: ``(n, d_model)`` pooled LM features.
        y_train, y_test: 0/1 labels.
        k_values: top-k sizes.
        full_probes: also fit the full-width probes.
        full_probe_C: their C.

    Returns:
        ``{"sae_top_{k}_test_accuracy", "llm_top_{k}_test_accuracy" for each k, "sae_test_accuracy",
        "llm_test_accuracy" (None without full probes), "top_latents": the 5 best-ranked latents}``.
    """
    out: dict = {}
    sae_rank = rank_by_mean_difference(sae_train, y_train)

    def lm_probes() -> dict:
        lm_rank = rank_by_mean_difference(lm_train, y_train)
        r = {f"llm_top_{k}_test_accuracy": top_k_probe_accuracy(lm_train, y_train, lm_test, y_test, k, lm_rank)[0]
             for k in k_values}
        r["llm_test_accuracy"] = (full_probe_accuracy(lm_train, y_train, lm_test, y_test, full_probe_C)
                                  if full_probes else None)
        return r

    lm = lm_memo("sparse_probe_lm", (lm_train, lm_test, y_train, y_test),
                  {"k": tuple(k_values), "full": full_probes, "C": full_probe_C}, lm_probes)
    for k in k_values:
        out[f"sae_top_{k}_test_accuracy"] = top_k_probe_accuracy(sae_train, y_train, sae_test, y_test, k, sae_rank)[0]
        out[f"llm_top_{k}_test_accuracy"] = lm[f"llm_top_{k}_test_accuracy"]
    out["sae_test_accuracy"] = None
    if full_probes:
        out["sae_test_accuracy"] = full_probe_accuracy(sae_train, y_train, sae_test, y_test, full_probe_C)
    out["llm_test_accuracy"] = lm["llm_test_accuracy"]
    out["top_latents"] = [int(i) for i in sae_rank[:5]]
    return out


def auc(y_true, scores) -> float:
    """ROC AUC of ``scores`` for 0/1 labels (``sklearn.metrics.roc_auc_score``; ties count one half).

    Raises:
        ValueError: only one class is present.
    """
    from sklearn.metrics import roc_auc_score

    y = _np(y_true)
    if len(np.unique(y)) != 2:
        raise ValueError("AUC needs both classes in y_true")
    return float(roc_auc_score(y, _np(scores)))


def _make_probe(penalty: str, C: float, solver: str, seed: int):
    # scikit-learn >= 1.8 deprecates ``penalty``: ``l1_ratio=1`` is the L1 penalty, the default is L2
    if penalty == "l1":
        import sklearn

        new_api = tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 8)
        l1 = {"l1_ratio": 1.0} if new_api else {"penalty": "l1"}
        return _logreg(**l1, C=C, solver=solver, max_iter=1000, random_state=seed)
    return _logreg(C=C, max_iter=1000, random_state=seed)


def _cv_splits(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """sae-probes ``get_cv``/``get_splits``: one hold-out of the last min(20 %, 100) examples when n >= 128,
    else 6-fold stratified CV (LeavePOut(2) when n <= 12); only splits with both classes in validation."""
    from sklearn.model_selection import LeavePOut, StratifiedKFold

    n = len(y)
    if n >= 128:
        val = min(int(0.2 * n), 100)
        splits = [(np.arange(n - val), np.arange(n - val, n))]
    elif n > 12:
        splits = list(StratifiedKFold(n_splits=6, shuffle=True, random_state=seed).split(np.zeros(n), y))
    else:
        splits = list(LeavePOut(2).split(np.zeros(n)))
    return [(tr, va) for tr, va in splits if len(np.unique(y[va])) == 2]


def select_C(X: np.ndarray, y: np.ndarray, penalty: str = "l2", Cs: Sequence[float] = CS_SAE_PROBES,
             solver: str = "saga", seed: int = 1) -> float:
    """Inverse regularisation strength with the best mean validation AUC (sae-probes ``find_best_reg``).

    Args:
        X: ``(n, d)`` training features, in the order the hold-out split uses (the last examples validate).
        y: ``(n,)`` 0/1 labels.
        penalty: ``"l2"`` (lbfgs) or ``"l1"`` (``solver``).
        Cs: candidates; ties go to the first (sae-probes order: largest C first).
        solver: solver of the L1 probe.
        seed: ``random_state`` of the fits and of the stratified folds.

    Returns:
        The chosen C (the first candidate when no valid split exists).
    """
    X, y = _np(X).astype(np.float64), _np(y)
    splits = _cv_splits(y, seed)
    if not splits:
        return float(Cs[0])
    scores = []
    for C in Cs:
        fold = []
        for tr, va in splits:
            if len(np.unique(y[tr])) < 2:
                fold.append(0.5)
                continue
            clf = _make_probe(penalty, C, solver, seed).fit(X[tr], y[tr])
            fold.append(auc(y[va], clf.predict_proba(X[va])[:, 1]))
        scores.append(float(np.mean(fold)))
    return float(Cs[int(np.argmax(scores))])


def ood_probe_aucs(lm_train, sae_train, y_train, tests: dict[str, tuple], k: int = 128, cv: bool = True,
                   fixed_C: float = 1.0, Cs: Sequence[float] = CS_SAE_PROBES, sae_solver: str = "saga",
                   seed: int = 1) -> dict[str, dict[str, float]]:
    """Oracle (L2, raw LM features) and SAE (L1, top-k latents) probe AUCs on several test splits.

    Args:
        lm_train: ``(n, d_model)`` LM features of the training split.
        sae_train: ``(n, d_sae)`` SAE features of the training split.
        y_train: ``(n,)`` 0/1 labels.
        tests: ``{split: (lm_features, sae_features, labels)}`` (both classes present in each).
        k: latents given to the SAE probe, ranked by ``|mean_pos - mean_neg|`` on train (capped at d_sae).
        cv: choose each probe's C by :func:`select_C`; else ``fixed_C``.
        fixed_C: C without CV.
        Cs: CV grid.
        sae_solver: solver of the L1 probe (``saga`` as sae-probes, or ``liblinear``).
        seed: random state.

    Returns:
        ``{split: {"oracle_auc", "sae_auc", "gap" (= oracle - SAE), "n"}}`` plus
        ``"_probe": {"oracle_C", "sae_C", "k", "sae_nonzero_weights"}``.
    """
    with warnings.catch_warnings():
        from sklearn.exceptions import ConvergenceWarning

        warnings.simplefilter("ignore", ConvergenceWarning)  # as sae-probes: saga / large-C fits stop at max_iter
        return _ood_probe_aucs(lm_train, sae_train, y_train, tests, k, cv, fixed_C, Cs, sae_solver, seed)


def _ood_probe_aucs(lm_train, sae_train, y_train, tests, k, cv, fixed_C, Cs, sae_solver, seed):
    lm_train, sae_train, y_train = _np(lm_train).astype(np.float64), _np(sae_train).astype(np.float64), _np(y_train)
    k = min(int(k), sae_train.shape[1])
    idx = rank_by_mean_difference(sae_train, y_train)[:k]
    splits = list(tests)

    def oracle_aucs() -> tuple[float, dict[str, float]]:  # SAE-independent: memoised across SAEs
        c = select_C(lm_train, y_train, "l2", Cs, seed=seed) if cv else fixed_C
        oracle = _make_probe("l2", c, "lbfgs", seed).fit(lm_train, y_train)
        return c, {s: auc(tests[s][2], oracle.predict_proba(_np(tests[s][0]).astype(np.float64))[:, 1]) for s in splits}

    c_or, or_auc = lm_memo("ood_oracle", (lm_train, y_train, *(a for s in splits for a in (tests[s][0], tests[s][2]))),
                            {"splits": tuple(splits), "cv": cv, "fixed_C": fixed_C, "Cs": tuple(Cs), "seed": seed},
                            oracle_aucs)
    c_sae = select_C(sae_train[:, idx], y_train, "l1", Cs, sae_solver, seed) if cv else fixed_C
    sae_probe = _make_probe("l1", c_sae, sae_solver, seed).fit(sae_train[:, idx], y_train)
    out: dict[str, dict[str, float]] = {}
    for split, (X_lm, X_sae, y) in tests.items():
        a_or = or_auc[split]
        a_sae = auc(y, sae_probe.predict_proba(_np(X_sae).astype(np.float64)[:, idx])[:, 1])
        out[split] = {"oracle_auc": a_or, "sae_auc": a_sae, "gap": a_or - a_sae, "n": int(len(_np(y)))}
    out["_probe"] = {"oracle_C": c_or, "sae_C": c_sae, "k": k, "sae_nonzero_weights": int((sae_probe.coef_ != 0).sum())}
    return out


# ==============================================================================================================
# Suites


def setup_suite(sae: SAE, lm: LoadedLM, cfg, store: LMActivationStore | None) -> tuple[HookPoint, LMActivationStore]:
    """The hook the SAE reads and the LM-activation store of a pooled-text suite (probing, SCR, TPP); applies
    ``cfg.threads`` and puts the SAE in eval mode.

    Raises:
        ValueError: unknown hook, or a ``store`` for another hook.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    hook = resolve_hook(lm.model, sae.cfg.hook_name)
    if store is None:
        store = LMActivationStore(lm.name, hook.hook_name, root=cfg.activation_cache)
    elif store.hook_name != hook.hook_name:
        raise ValueError(f"activation store is for hook {store.hook_name!r} but the SAE reads {hook.hook_name!r}")
    sae.eval()
    return hook, store


def _pool(res: EvalResult, sae: SAE, acts: dict[str, torch.Tensor], cfg) -> tuple[np.ndarray, np.ndarray, int]:
    """LM and SAE mean features of every text (timed as ``lm_pool`` and ``sae_encode``) and the outlier count."""
    with res.timed("lm_pool"):
        keep = norm_outlier_keep(acts["acts"], cfg.max_norm_multiple)
        X_lm = segment_mean(acts["acts"], acts["offsets"], keep).numpy()
    with res.timed("sae_encode"):
        X_sae = pooled_sae_features(sae, acts["acts"], acts["offsets"], cfg.encode_batch_size, keep).numpy()
    return X_lm, X_sae, int((~keep).sum())


@dataclass
class _Pooled:
    """One dataset's (or OOD task's) mean-pooled features, as :func:`_probe_each` hands them to a suite.

    Attributes:
        name: dataset / task name.
        item: what the suite's ``build`` returned (a ``ProbingDataset`` or an ``OODTask``).
        X_lm: ``(n_texts, d_model)`` LM mean features.
        X_sae: ``(n_texts, d_sae)`` SAE mean features.
        n_outliers: tokens left out by ``max_norm_multiple``.
        n_tokens: tokens run through the LM (prefixes included, padding excluded).
    """

    name: str
    item: Any
    X_lm: np.ndarray
    X_sae: np.ndarray
    n_outliers: int
    n_tokens: int


def _probe_each(res: EvalResult, sae: SAE, lm: LoadedLM, cfg, store: LMActivationStore | None,
                names: Sequence[str], build: Callable[[str], Any], probe: Callable[[_Pooled], str]) -> None:
    """The per-dataset skeleton shared by both suites: texts -> LM activations -> pooled LM/SAE features -> probes.

    For each name: ``build(name)`` (timed ``tasks``) returns an object with ``texts`` and ``spec``; their LM
    activations come from ``store`` under the entry ``res.suite`` (timed ``lm_activations``); :func:`_pool` gives the
    LM and SAE mean features (``lm_pool``, ``sae_encode``); ``probe`` fits the probes, records its rows in ``res``
    and returns the tail of the progress line (timed ``probes``).

    Args:
        res: the result being filled (its ``suite`` names the cache entry: ``"sparse_probing"``/``"ood_probing"``).
        sae, lm, cfg, store: as the suites' (``cfg`` needs ``threads``, ``activation_cache``, ``context_size``,
            ``batch_tokens``, ``encode_batch_size``, ``max_norm_multiple``, ``progress``).
        names: datasets / tasks, in order.
        build: name -> texts and their spec.
        probe: pooled features -> progress-line summary.

    Raises:
        ValueError: unknown hook, or a store for another hook (from :func:`setup_suite`).
    """
    hook, store = setup_suite(sae, lm, cfg, store)
    for name in names:
        t0 = time.perf_counter()
        with res.timed("tasks"):
            item = build(name)
        t_lm = time.perf_counter()
        with res.timed("lm_activations"):
            acts, fresh = token_activations(store, lm, hook, res.suite, item.texts, item.spec,
                                            context_size=cfg.context_size, batch_tokens=cfg.batch_tokens,
                                            progress=cfg.progress)
        t_lm = time.perf_counter() - t_lm
        X_lm, X_sae, n_outliers = _pool(res, sae, acts, cfg)
        pooled = _Pooled(name, item, X_lm, X_sae, n_outliers, int(acts["n_tokens"]))
        del acts
        with res.timed("probes"):
            summary = probe(pooled)
        if cfg.progress:
            print(f"[{res.suite}] {name}: {len(item.texts)} texts, {pooled.n_tokens:,} tok, LM {t_lm:.1f}s "
                  f"({'computed' if fresh else 'cached'}), total {time.perf_counter() - t0:.1f}s | {summary}")
    if cfg.progress:
        print(f"[{res.suite}] timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res.timings_s.items()))


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def run_sparse_probing(sae: SAE, lm: LoadedLM, cfg: SparseProbingConfig,
                       store: LMActivationStore | None = None) -> SparseProbingResult:
    """Run the sparse-probing suite on ``sae`` (see the module doc).

    Stages timed in ``timings_s``: ``tasks`` (building pools), ``lm_activations`` (LM forward or cache read),
    ``lm_pool`` (LM mean features), ``sae_encode``, ``probes``.

    Args:
        sae: the SAE; its ``cfg.hook_name`` picks the hook.
        lm: the model it reads.
        cfg: settings.
        store: LM-activation cache (default: one at ``cfg.activation_cache`` for this model and hook).

    Returns:
        :class:`SparseProbingResult`.

    Raises:
        KeyError: unknown dataset; ValueError: unknown hook, or a store for another hook.
    """
    res = SparseProbingResult(suite="sparse_probing", sae=str(cfg.sae), config=asdict(cfg))

    def build(name: str):
        return build_probing_dataset(name, cfg.n_train_per_class, cfg.n_test_per_class, cfg.seed)

    def probe(p: _Pooled) -> str:
        X_lm, X_sae = p.X_lm, p.X_sae
        rows = []
        for task in p.item.tasks:
            m = sparse_probe_task(X_sae[task.train_index], X_sae[task.test_index], X_lm[task.train_index],
                                  X_lm[task.test_index], task.train_labels, task.test_labels, cfg.k_values,
                                  cfg.full_probes, cfg.full_probe_C)
            rows.append({"task": task.name, "dataset": p.name, "positive_class": task.positive_class,
                         "n_train": task.n_train, "n_test": task.n_test, **m})
        res.per_task.extend(rows)
        metrics = [k for k in rows[0] if k.endswith("_accuracy")]
        d = res.per_dataset[p.name] = {k: _mean(r[k] for r in rows) for k in metrics}
        d.update({"n_tasks": len(rows), "n_texts": len(p.item.texts), "n_tokens": p.n_tokens,
                  "n_outlier_tokens": p.n_outliers})
        if not cfg.progress:
            return ""
        tops = " ".join(f"top{k} {d[f'sae_top_{k}_test_accuracy']:.3f}/{d[f'llm_top_{k}_test_accuracy']:.3f}"
                        for k in cfg.k_values)
        full = f" full {d['sae_test_accuracy']:.3f}/{d['llm_test_accuracy']:.3f}" if cfg.full_probes else ""
        return f"SAE/LLM acc {tops}{full}"

    _probe_each(res, sae, lm, cfg, store, cfg.datasets, build, probe)
    for k in cfg.k_values:
        res.sae_top_k_test_accuracy[k] = _mean(d[f"sae_top_{k}_test_accuracy"] for d in res.per_dataset.values())
        res.llm_top_k_test_accuracy[k] = _mean(d[f"llm_top_{k}_test_accuracy"] for d in res.per_dataset.values())
        if k in (1, 2, 5):
            setattr(res, f"sae_top_{k}_test_accuracy", res.sae_top_k_test_accuracy[k])
            setattr(res, f"llm_top_{k}_test_accuracy", res.llm_top_k_test_accuracy[k])
    res.sae_test_accuracy = _mean(d["sae_test_accuracy"] for d in res.per_dataset.values())
    res.llm_test_accuracy = _mean(d["llm_test_accuracy"] for d in res.per_dataset.values())
    return res


def run_ood_probing(sae: SAE, lm: LoadedLM, cfg: OODProbingConfig,
                    store: LMActivationStore | None = None) -> OODProbingResult:
    """Run the OOD-probing suite on ``sae`` (see the module doc).

    Stages timed in ``timings_s``: ``tasks``, ``lm_activations``, ``lm_pool``, ``sae_encode``, ``probes``.

    Args:
        sae: the SAE; its ``cfg.hook_name`` picks the hook.
        lm: the model it reads.
        cfg: settings.
        store: LM-activation cache (default: one at ``cfg.activation_cache`` for this model and hook).

    Returns:
        :class:`OODProbingResult`.

    Raises:
        KeyError: unknown task; ValueError: unknown hook, or a store for another hook.
    """
    res = OODProbingResult(suite="ood_probing", sae=str(cfg.sae), config=asdict(cfg))

    def build(name: str):
        return build_ood_task(name, cfg.n_train_per_class, cfg.n_id_test_per_class, cfg.n_ood_per_class, cfg.seed)

    def probe(p: _Pooled) -> str:
        X_lm, X_sae = p.X_lm, p.X_sae
        tr_i, tr_y = p.item.splits["train"]
        tests = {s: (X_lm[i], X_sae[i], y) for s, (i, y) in p.item.splits.items() if s != "train"}
        out = ood_probe_aucs(X_lm[tr_i], X_sae[tr_i], tr_y, tests, cfg.k, cfg.cv, cfg.fixed_C,
                             sae_solver=cfg.sae_solver, seed=cfg.seed)
        out["_probe"]["n_outlier_tokens"] = p.n_outliers
        res.per_task[p.name] = out
        parts = " ".join(f"{s} {v['oracle_auc']:.3f}/{v['sae_auc']:.3f}" for s, v in out.items() if s != "_probe")
        return f"oracle/SAE AUC {parts}"

    _probe_each(res, sae, lm, cfg, store, cfg.tasks, build, probe)
    tasks = list(res.per_task.values())
    res.oracle_id_auc = _mean(t["id"]["oracle_auc"] for t in tasks)
    res.sae_id_auc = _mean(t["id"]["sae_auc"] for t in tasks)
    res.id_gap = _mean(t["id"]["gap"] for t in tasks)

    def ood_mean(t: dict, key: str) -> float:
        return float(np.mean([v[key] for s, v in t.items() if s not in ("id", "_probe")]))

    res.oracle_ood_auc = _mean(ood_mean(t, "oracle_auc") for t in tasks)
    res.sae_ood_auc = _mean(ood_mean(t, "sae_auc") for t in tasks)
    res.ood_gap = _mean(ood_mean(t, "gap") for t in tasks)
    return res


EVAL_SUITES.register("sparse_probing")(Suite(SparseProbingConfig, run_sparse_probing,
                                              "SAEBench sparse probing: top-k latent probes on bundled labelled text"))
EVAL_SUITES.register("ood_probing")(Suite(OODProbingConfig, run_ood_probing,
                                           "OOD probing gap: L2 oracle vs L1 top-k SAE probe AUC, in and out of "
                                           "distribution"))
