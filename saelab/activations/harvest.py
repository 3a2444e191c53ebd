"""Harvest LM activations at a hook point into an on-disk :class:`ActivationCache`.

Pipeline: documents (bundled corpora or user files) -> held-out split -> shuffled document order ->
tokenised and packed into fixed-length contexts, each starting with the model's prefix token (BOS or
``<|endoftext|>``) and with the prefix token separating documents -> early-stopped forward pass to the
hook -> row filter (drop position 0, special tokens, and tokens whose norm exceeds ``max_norm_multiple`` x
the batch median, as dictionary_learning's ``max_activation_norm_multiple``) -> cache rows with their token
id, document index and position. The split, the packing and the row filter are
:mod:`saelab.data.split`'s (the evals read the same held-out split).

The stream is a pure function of (corpora, split, seed, tokenizer, context size), so a resumed harvest
regenerates it and skips the contexts already stored (progress is checkpointed by the cache writer).

Masked regularization (Narayanaswamy et al. 2026, arXiv 2604.06495; the reading documented in
:mod:`saelab.activations.masking`): with
``mask_prob > 0`` each context's tokens are replaced, 1:1 and independently with probability ``mask_prob``,
by one mask token id (``'...'``) *before* the LM forward (position 0 and special tokens are never masked;
see :mod:`saelab.activations.masking`), and the activations of the corrupted contexts are stored with the
same row filter as a clean harvest, plus per-row columns ``input_ids`` (the id fed to the LM) and
``masked`` (whether the masking replaced this token); ``token_ids`` keep the original ids. The mask of a
context depends only on ``(mask_seed, context index)``, so resumes are exact. The masked stream is its own
cache (its own ``--out``): the mask settings are identity keys of the manifest, so a clean cache is never
resumed as a masked one or vice versa. Evaluation always uses clean text (the evaluators never mask).

Devices and precision: ``device`` is checked once (:func:`saelab.devices.resolve_device`); the LM runs there in
``lm_dtype`` (fp32 by default; bf16/fp16 halve the forward's memory and time on a GPU) and only its forward runs on
the device. Each batch's hook output is copied to the host (on CUDA into a pinned buffer, asynchronously, with one
wait per batch) and everything after it (row filter, float32 conversion, cache writes) runs on the CPU, so the
stored rows of a batch are the host computation on the activations the device produced, and the CPU path is the
same code with the copy left out. The cache stores ``dtype`` whatever ``lm_dtype`` is; a non-fp32 ``lm_dtype`` is
an identity key of the manifest (absent means fp32), so a resume never mixes LM precisions.

Several hooks (``hook_name`` a list, glob or range): one forward per batch, stopped after the deepest hook, feeds
one cache per hook (``<out>/<hook_name>/``), each equal to that hook's single-hook harvest: the LM forward is the
costly part, so N hooks cost about one harvest of the deepest rather than N. With ``shared_rows`` the row filter is
the intersection of the hooks' filters, so the caches are row-aligned (a transcoder's input and target).

Denoising variant (``paired_clean_out``; NOT the paper's default, which trains on the masked activations
alone): the clean forward of the same contexts is written to a second, row-aligned cache (same rows, same
order, same shard boundaries), to be used as the reconstruction target of the masked inputs.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from simple_parsing.helpers import field as cli_field

from ..data.corpora import Corpus
from ..data.split import DataConfig, iter_contexts, select_rows, training_order
from ..devices import DTYPES, bf16_native, parse_dtype, resolve_device, synchronize
from ..io import read_json, write_json
from ..models.hooks import HookPoint, capture, capture_many, is_multi_hook, resolve_hooks
from ..models.lm import DEFAULT_MODEL, LoadedLM, load_lm
from .cache import ActivationCache, ActivationCacheWriter
from .cache_format import MANIFEST, CacheMismatchError
from .masking import DEFAULT_MASK_STRING, mask_contexts, mask_token_id


@dataclass
class HarvestConfig:
    """Harvest activations of ``model`` at ``hook_name`` into a cache directory."""

    model: str = DEFAULT_MODEL
    """Model: the bundled alias smollm2-135m, a .gguf file or a local HF model directory."""
    hook_name: str | list[str] = cli_field(default="blocks.15.hook_resid_post", nargs="+", type=str, required=False)
    """Hook point: blocks.L.hook_resid_post or an HF module path such as model.layers.15. Several hooks (names,
    globs like 'blocks.*.hook_resid_post', ranges like blocks.4-8.hook_resid_post) are harvested from one forward
    pass per batch, each into its own cache <out>/<hook_name>/ (and <paired_clean_out>/<hook_name>/)."""
    out: str = "runs/demo/cache"
    """Cache directory (resumed if it holds an unfinished harvest with the same settings); with several hooks, the
    folder of their caches, one per hook at <out>/<hook_name>/."""
    n_tokens: int = 500_000
    """Activation rows to store (after filtering)."""
    context_size: int = 128
    """Tokens per context, including the prefix token at position 0."""
    batch_size: int | None = None
    """Contexts per forward pass (default: 8 on CPU; on a GPU 8,192 tokens' worth, e.g. 64 contexts of 128
    tokens; a resumed harvest keeps the batch size its cache was started with)."""
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
    """Device of the LM: cpu, cuda or cuda:N."""
    lm_dtype: str = "fp32"
    """dtype of the LM's weights and forward: fp32, bf16 or fp16 (bf16/fp16 are for GPUs: bf16 on one without
    native bf16, compute capability < 8, warns). The cache stores --dtype whatever this is; a cache is only
    resumed with the lm_dtype it was started with."""
    progress: bool = True
    """Show a progress bar with tokens/s."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text selection and held-out split."""
    mask_prob: float = 0.0
    """Masked regularization (arXiv 2604.06495): probability of replacing each token by the mask token before
    the LM forward (0 = clean harvest; the paper's value is unknown, 0.15 is a usual start). Harvest the
    masked stream into its own --out; evaluation always uses clean text."""
    mask_string: str = DEFAULT_MASK_STRING
    """Mask text (the paper's '...'); must be a single token, tried without then with a leading space."""
    mask_token_id: int | None = None
    """Mask token id, overriding mask_string (when the string is not a single token)."""
    mask_seed: int = 0
    """Seed of the masks; a context's mask depends only on (mask_seed, context index)."""
    shared_rows: bool = False
    """Several hooks: keep a token only where every hook's row filter keeps it, so every hook's cache holds the same
    tokens row by row (what a transcoder's input and target caches need). Off: each hook's cache equals its
    single-hook harvest (each hook drops its own norm outliers)."""
    paired_clean_out: str | None = None
    """DENOISING VARIANT, not the paper's default: also write the clean activations of the same rows (same
    order and shards) to this cache, as the reconstruction target of the masked inputs. Needs mask_prob > 0."""


CPU_BATCH_SIZE = 8
"""Default contexts per forward pass on the CPU, and the batch size of a resumed cache whose progress records none
(clean CPU harvests record none, as they always did)."""

GPU_BATCH_TOKENS = 8192
"""Default tokens per forward pass on other devices (``GPU_BATCH_TOKENS // context_size`` contexts, at least
:data:`CPU_BATCH_SIZE`): a GPU needs thousands of tokens a batch to be busy."""

PAIR_ROLE = "clean_target"
"""``pair_role`` manifest value of the paired clean cache written by the denoising variant."""

MASK_PROTECT = "position 0 and special tokens"
"""Positions never masked (recorded in the manifest as ``mask_protect``)."""


class HarvestStopped(Exception):
    """The caller asked a running :func:`harvest` to stop (its ``stop`` event); the committed checkpoints are kept."""


def harvest(cfg: HarvestConfig, lm: LoadedLM | None = None, *, stop: threading.Event | None = None,
            ready: threading.Event | None = None) -> ActivationCache | dict[str, ActivationCache]:
    """Run (or resume) a harvest and return the finished cache (with several hooks, one cache per hook).

    Several hooks (``cfg.hook_name`` a list of more than one name, or any glob or range;
    :func:`saelab.models.hooks.is_multi_hook`): one forward pass per batch captures them all
    (:func:`saelab.models.hooks.capture_many`, stopped after the deepest), and each hook's cache, at
    ``<out>/<hook_name>/`` (and ``<paired_clean_out>/<hook_name>/``), is exactly the cache a single-hook harvest of
    that hook writes: the row filter (position 0, special tokens, norm outliers against the batch median) is per
    hook, so hooks may keep different rows, and each cache stops at its own ``n_tokens`` (with ``cfg.shared_rows`` a
    token is kept only where every hook's filter keeps it, so the caches hold the same tokens row by row; the
    manifests then record the hooks as ``shared_rows``, an identity key). Every cache checkpoints
    on the same batches and resumes on its own; one that a kill left a checkpoint ahead waits until the others
    reach it. A background harvest (``ready``, used by the streaming trainer) takes one hook only.

    With ``cfg.mask_prob > 0`` the harvest is *masked* (module docstring; arXiv 2604.06495): the manifest
    also records ``mask_prob``, ``mask_token_id``, ``mask_string``, ``mask_choice`` (how the id was chosen),
    ``mask_seed`` and ``mask_protect``, the progress records ``batch_size``, and every row gets the extra
    columns ``input_ids`` (int32, the id fed to the LM) and ``masked`` (bool). A clean harvest
    (``mask_prob == 0``) writes exactly the manifest keys and columns it always did.

    With ``cfg.paired_clean_out`` (denoising variant, not the paper's default) the clean forward of the same
    contexts is written to that path: the rows kept are those of the *masked* pass (its keep mask: position 0,
    special tokens and masked-pass norm outliers dropped), so the masked cache is the same with or without the
    pair; the pair's manifest equals the masked one plus ``pair_role: "clean_target"``, its columns are the
    same, both writers get the same rows and checkpoints and so the same shard boundaries, and
    ``iter_batches`` with the same arguments yields row-aligned batches from both (see
    :func:`check_paired_caches`). Rows the *clean* pass would have dropped as norm outliers are counted in
    the pair's ``progress["clean_outlier_rows"]``. If a crash leaves one cache a checkpoint ahead of the
    other, the resumed run regenerates the missing part for the one behind only (same batches, same
    checkpoints); this needs the same ``batch_size`` as before.

    The LM runs on ``cfg.device`` in ``cfg.lm_dtype``; a given ``lm`` runs where it is, in its own dtype (a
    warning says so when that differs from ``cfg``), and the dtype it actually has is the one recorded. A
    non-fp32 LM dtype is recorded as the manifest key ``lm_dtype`` (absent: fp32, so fp32 caches are unchanged).
    The progress records ``batch_size`` when masking or off the CPU; with ``cfg.batch_size=None`` a resumed
    harvest takes that recorded size (absent: :data:`CPU_BATCH_SIZE`), a new one :func:`default_batch_size`.

    Args:
        cfg: the harvest settings.
        lm: an already loaded model (loaded from ``cfg.model`` onto ``cfg.device`` in ``cfg.lm_dtype`` otherwise).
        stop: checked before every forward batch; once set, the harvest raises :class:`HarvestStopped` (rows
            after the last checkpoint are discarded, as after a kill; re-running resumes). Used by
            :class:`saelab.activations.stream.BackgroundHarvest`.
        ready: set once the output cache is open: its settings checked against ``cfg`` and a resumed cache
            cleaned up, so from then on its manifest only gains shards (what a follower may read).

    Returns:
        The complete :class:`ActivationCache` at ``cfg.out`` (the masked one for a masked harvest); with several
        hooks, ``hook_name -> ActivationCache`` at ``<out>/<hook_name>/``.

    Raises:
        CacheMismatchError: ``cfg.out`` (or ``paired_clean_out``) holds a cache made with other settings,
            including a clean cache resumed with mask settings and vice versa.
        ValueError: several hooks with ``ready`` (a streamed harvest follows one cache) or with an ``out`` that holds
            a single-hook cache, a glob matching no hook,
            ``cfg.device`` is not a device this machine has, unknown ``lm_dtype``, a batch size that is
            not a positive int, unknown hook name (lists valid ones), the corpus is too small for ``n_tokens``, bad mask
            settings (``mask_prob`` outside [0, 1], a mask string that is not one token, a special or
            out-of-vocabulary mask id, ``paired_clean_out`` without masking or equal to ``out``), or a resume
            of unequal paired caches with another ``batch_size``.
        RuntimeError: the paired caches came out misaligned (should not happen; delete the pair and re-run).
        HarvestStopped: ``stop`` was set.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _check_mask_config(cfg)
    device, lm_dtype = resolve_device(cfg.device), parse_dtype(cfg.lm_dtype)
    if lm is None:
        check_lm_dtype(lm_dtype, device)
        lm = load_lm(cfg.model, device=device, dtype=lm_dtype)
    else:
        device, lm_dtype = _placement_of(lm, cfg, device, lm_dtype)
    hooks = resolve_hooks(lm.model, cfg.hook_name)
    multi = is_multi_hook(cfg.hook_name)
    if multi and ready is not None:
        raise ValueError(f"a background (streamed) harvest follows one cache, but hook_name names {len(hooks)} hooks "
                         f"({', '.join(h.hook_name for h in hooks)}); stream one hook, or harvest them first with "
                         f"`saelab harvest --hook_name ...` and train on their caches")
    outs = {h.hook_name: _hook_outs(cfg, h.hook_name if multi else None) for h in hooks}
    for root in (cfg.out, cfg.paired_clean_out) if multi else ():
        if root is not None and (Path(root) / MANIFEST).is_file():
            raise ValueError(f"{root} holds a single-hook activation cache, but a multi-hook harvest writes one cache "
                             f"per hook into <out>/<hook_name>/; choose another --out (or --paired_clean_out)")
    cfg = replace(cfg, batch_size=_resolve_batch_size(cfg, device, [o for pair in outs.values() for o in pair]))
    masking = cfg.mask_prob > 0
    mask_id = None
    meta: dict[str, Any] = {
        "context_size": cfg.context_size, "n_tokens_requested": cfg.n_tokens, "prefix_id": lm.prefix_id,
        "max_norm_multiple": cfg.max_norm_multiple, "exclude_special_tokens": cfg.exclude_special_tokens,
        "seed": cfg.seed, "data": asdict(cfg.data), "module_path": None,
    }
    if lm_dtype != torch.float32:  # absent means fp32: fp32 manifests stay as they always were
        meta["lm_dtype"] = dtype_name(lm_dtype)
    if cfg.shared_rows and len(hooks) > 1:  # absent: each hook's own filter, as always
        meta["shared_rows"] = [h.hook_name for h in hooks]
    if masking:
        mask_id, choice = _resolve_mask_id(lm, cfg)
        meta.update(mask_prob=float(cfg.mask_prob), mask_token_id=mask_id, mask_string=cfg.mask_string,
                    mask_choice=choice, mask_seed=int(cfg.mask_seed), mask_protect=MASK_PROTECT)
    train_docs = training_order(cfg.data, cfg.seed)
    widths = _hook_widths(lm, hooks, device)
    sinks: list[_Sink] = []
    try:
        for hook in hooks:
            out, paired = outs[hook.hook_name]
            targets = ((out, {}, not masking), (paired, {"pair_role": PAIR_ROLE}, True))
            for path, extra_meta, clean in targets:
                if path is None:
                    continue
                w = _open_writer(path, model=cfg.model, hook_name=hook.hook_name, d_in=widths[hook.hook_name],
                                 dtype=cfg.dtype, meta={**meta, "module_path": hook.module_path, **extra_meta})
                sinks.append(_Sink(w, str(path), clean, dict(w.progress), w.n_tokens, hook=hook.hook_name))
        if ready is not None:
            ready.set()
        if not all(s.writer.complete for s in sinks):
            for hook in hooks:  # a masked cache and its paired clean cache share rows: the one behind catches up
                _plan_catch_up([s for s in sinks if s.hook == hook.hook_name], cfg)
            _run(cfg, lm, hooks, train_docs, sinks, mask_id, stop, device)
        for s in sinks:  # before finalize: a complete cache always has its documents.json
            if not s.writer.complete:
                _write_documents(s.out, train_docs, s.max_doc)
        caches = {(s.hook, s.clean and masking): s.writer.finalize(s.progress) for s in sinks}
    except BaseException:
        for s in sinks:  # release the write locks; uncommitted rows are discarded, as a reopen would
            try:
                s.writer.close()
            except Exception:  # noqa: BLE001 - report the original error
                pass
        raise
    result = {h.hook_name: caches[(h.hook_name, False)] for h in hooks}
    if cfg.paired_clean_out is not None:
        for h in hooks:
            check_paired_caches(caches[(h.hook_name, False)], caches[(h.hook_name, True)])
    return result if multi else result[hooks[0].hook_name]


def _hook_outs(cfg: HarvestConfig, sub: str | None) -> tuple[str, str | None]:
    """The cache paths (``out``, ``paired_clean_out``) of one hook: the configured ones, or their ``sub`` folder."""
    if sub is None:
        return cfg.out, cfg.paired_clean_out
    paired = None if cfg.paired_clean_out is None else str(Path(cfg.paired_clean_out) / sub)
    return str(Path(cfg.out) / sub), paired


@dataclass
class _Sink:
    """One cache being written by :func:`harvest` and its resume cursor."""

    writer: ActivationCacheWriter
    out: str
    clean: bool
    """Stores the clean forward's activations (the paired target, or a clean harvest)."""
    progress: dict
    stored: int
    catch_up_to: int = -1
    """While ``done < catch_up_to`` this cache is behind the other one (after a crash between their checkpoints)."""
    catch_up_at: frozenset = frozenset()
    """Context counts at which the cache ahead checkpointed (so this one makes the same shard boundaries)."""
    hook: str = ""
    """Canonical name of the hook whose activations this cache stores."""

    @property
    def done(self) -> int:
        return int(self.progress.get("contexts_done", 0))

    @property
    def max_doc(self) -> int:
        return int(self.progress.get("max_doc", -1))


def _check_mask_config(cfg: HarvestConfig) -> None:
    p = cfg.mask_prob
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1] (0 = clean harvest), got {p!r}")
    if not isinstance(cfg.mask_seed, int) or isinstance(cfg.mask_seed, bool) or cfg.mask_seed < 0:
        raise ValueError(f"mask_seed must be a non-negative int, got {cfg.mask_seed!r}")
    if cfg.paired_clean_out is not None:
        if p == 0:
            raise ValueError("paired_clean_out (the denoising variant) needs a masked harvest: set --mask_prob > 0")
        if Path(cfg.paired_clean_out).resolve() == Path(cfg.out).resolve():
            raise ValueError(f"paired_clean_out must differ from out ({cfg.out}): the clean target is a second cache")


def _resolve_mask_id(lm: LoadedLM, cfg: HarvestConfig) -> tuple[int, str]:
    """The mask token id and how it was chosen (``cfg.mask_token_id`` overrides ``cfg.mask_string``)."""
    if cfg.mask_token_id is None:
        mid, choice = mask_token_id(lm.tokenizer, cfg.mask_string)
    else:
        mid = cfg.mask_token_id
        if not isinstance(mid, int) or isinstance(mid, bool) or mid < 0:
            raise ValueError(f"mask_token_id must be a non-negative int, got {mid!r}")
        choice = f"mask_token_id {mid} given explicitly (decodes to {lm.tokenizer.decode([mid])!r})"
    emb = lm.model.get_input_embeddings() if hasattr(lm.model, "get_input_embeddings") else None
    vocab = int(emb.num_embeddings) if emb is not None and hasattr(emb, "num_embeddings") else len(lm.tokenizer)
    if mid >= vocab:
        raise ValueError(f"mask token id {mid} is outside the model's vocabulary (size {vocab})")
    if mid in lm.special_ids:
        raise ValueError(
            f"mask token id {mid} is a special token of this tokenizer ({sorted(lm.special_ids)}); masked positions "
            "would act as document boundaries and be dropped from the data. Choose another --mask_string or "
            "--mask_token_id"
        )
    return mid, choice


def _plan_catch_up(sinks: list[_Sink], cfg: HarvestConfig) -> None:
    """If the two paired caches (of one hook) stopped at different checkpoints, mark the one behind to catch up
    alone. Caches of different hooks need no plan: they keep their own rows and checkpoint on the same batches."""
    if len(sinks) < 2:
        return
    lead = max(sinks, key=lambda s: s.done)
    behind = [s for s in sinks if s.done < lead.done]
    if not behind:
        return
    first = min(s.done for s in behind)
    segment = [dict(sh["progress"]) for sh in read_json(Path(lead.out) / "manifest.json")["shards"]
               if first < int(sh["progress"]["contexts_done"]) <= lead.done]
    used = {p.get("batch_size") for p in [*segment, lead.progress]}
    if used != {cfg.batch_size}:  # paired caches are masked harvests: their progress always records batch_size
        raise ValueError(
            f"{lead.out} is ahead of {behind[0].out} (contexts {lead.done} vs {first}); re-creating the missing rows "
            f"of the latter needs the batch size those rows were made with (--batch_size "
            f"{' / '.join(map(str, sorted(used, key=str)))}), not {cfg.batch_size}"
        )
    for s in behind:
        s.catch_up_to = lead.done
        s.catch_up_at = frozenset(int(p["contexts_done"]) for p in segment if s.done < p["contexts_done"]) | {lead.done}


def _run(cfg: HarvestConfig, lm: LoadedLM, hooks: list[HookPoint], train_docs: Corpus, sinks: list[_Sink],
         mask_id: int | None, stop: threading.Event | None = None, device: torch.device = torch.device("cpu")) -> None:
    """The harvest loop: forward batches of contexts and add the kept rows to every sink that needs them.

    Only the LM forward runs on ``device`` (token ids go there; the hook outputs come back through
    :class:`HostCopies`, one wait per batch); the masks, row filter and cache writes are CPU work. One forward
    captures every hook that a cache still needs (:func:`capture_many`), and each hook's rows are filtered on
    that hook's activations, as a single-hook harvest filters them.

    The loop starts at the fewest contexts done among the unfinished caches; a cache further ahead (a kill
    between the checkpoints of one batch) takes rows again once the loop reaches its cursor. Checkpoints fall
    every ``checkpoint_every`` batches from that start, which is a checkpoint of every cache, so all caches
    keep the shard boundaries of an uninterrupted run.
    """
    n = cfg.n_tokens
    masking = mask_id is not None
    special = lm.special_ids if cfg.exclude_special_tokens else {lm.prefix_id}
    protect_ids = torch.tensor(sorted(lm.special_ids), device="cpu")  # never masked, whether or not they are dropped
    host = HostCopies(device)
    ctx_i = min((s.done for s in sinks if s.stored < n), default=min(s.done for s in sinks))
    contexts = iter_contexts(lm, train_docs, cfg.context_size)
    for _ in range(ctx_i):
        next(contexts)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=min(s.stored for s in sinks), unit="tok", unit_scale=True,
                   desc=f"harvest {', '.join(h.hook_name for h in hooks)}" + (" (masked)" if masking else ""),
                   dynamic_ncols=True)
    n_batches = 0
    while any(s.stored < n for s in sinks):
        if stop is not None and stop.is_set():
            raise HarvestStopped(f"harvest into {cfg.out} stopped by its caller after {min(s.stored for s in sinks)} rows; "
                                 f"re-running it resumes from its last checkpoint")
        chunk = [c for _, c in zip(range(cfg.batch_size), contexts)]
        if not chunk:
            raise ValueError(
                f"the training documents ran out after {min(s.stored for s in sinks)} stored tokens (< n_tokens={n}); "
                "add corpora/text files or lower --n_tokens"
            )
        nxt = ctx_i + len(chunk)
        for s in sinks:
            if s.stored < n and ctx_i < s.done < nxt:
                raise RuntimeError(f"{s.out} stopped in the middle of a batch (contexts_done={s.done}); was the batch "
                                   f"size changed? Delete the paired caches and harvest again")
        active = [s for s in sinks if s.stored < n and s.done <= ctx_i]
        ids = torch.stack([c[0] for c in chunk])
        docs = torch.stack([c[1] for c in chunk])
        if masking:
            ids_in, mask = mask_contexts(ids, cfg.mask_prob, mask_id, cfg.mask_seed, range(ctx_i, nxt),
                                         protect=torch.isin(ids, protect_ids))
        else:
            ids_in, mask = ids, None
        # a shared row filter reads every hook, including those of caches a kill left a checkpoint ahead
        need = {h.hook_name for h in hooks} if cfg.shared_rows else {s.hook for s in active}
        need_clean = {s.hook for s in active if s.clean} if masking else set()
        slots = {h.hook_name: i for i, h in enumerate(hooks)}
        h_in = {k: host.copy(2 * slots[k], v)
                for k, v in _capture(lm.model, [h for h in hooks if h.hook_name in need], ids_in.to(device)).items()}
        h_cl: dict[str, torch.Tensor] = {}
        if need_clean:
            h_cl = {k: host.copy(2 * slots[k] + 1, v) for k, v in
                    _capture(lm.model, [h for h in hooks if h.hook_name in need_clean], ids.to(device)).items()}
        host.wait()  # the one wait of the batch: every copy is done
        acts, keep, clean_keep = {}, {}, {}
        for k, v in h_in.items():
            acts[k] = v.float()  # no-op for an fp32 LM; the norms of the row filter and the cache rows are float32
            keep[k] = select_rows(acts[k], ids_in, special, cfg.max_norm_multiple)
        if cfg.shared_rows:
            both = torch.stack(list(keep.values())).all(dim=0)
            keep = dict.fromkeys(keep, both)
        rows_of = {k: m.nonzero(as_tuple=False) for k, m in keep.items()}
        for k, v in h_cl.items():
            h_cl[k] = v.float()
            clean_keep[k] = select_rows(h_cl[k], ids, special, cfg.max_norm_multiple)
        for s in active:
            r = rows_of[s.hook][: n - s.stored]
            b, t = r[:, 0], r[:, 1]
            src = h_cl[s.hook] if (s.clean and s.hook in h_cl) else acts[s.hook]
            extra = None
            if masking:
                extra = {"input_ids": ids_in[b, t].to(torch.int32), "masked": mask[b, t]}
            s.writer.add(src[b, t], token_ids=ids[b, t], doc_ids=docs[b, t], positions=t, extra=extra)
            prog = {"contexts_done": nxt, "max_doc": max(s.max_doc, int(docs.max()))}
            if masking or device.type != "cpu":  # CPU clean harvests keep the progress they always had
                prog["batch_size"] = cfg.batch_size
            if s.clean and s.hook in clean_keep:
                dropped = int((~clean_keep[s.hook][b, t]).sum())  # rows the clean pass's own filter would have dropped
                prog["clean_outlier_rows"] = int(s.progress.get("clean_outlier_rows", 0)) + dropped
            s.progress, s.stored = prog, s.stored + len(r)
        ctx_i = nxt
        n_batches += 1
        if bar is not None:
            bar.update(min(s.stored for s in sinks) - bar.n)
        for s in active:
            if s.done <= s.catch_up_to:  # catching up: checkpoint exactly where the cache ahead did
                if s.done in s.catch_up_at:
                    s.writer.checkpoint(s.progress)
                if s.done == s.catch_up_to:
                    _check_caught_up(s, [o for o in sinks if o is not s and o.hook == s.hook])
            elif n_batches % cfg.checkpoint_every == 0:
                s.writer.checkpoint(s.progress)
    if bar is not None:
        bar.close()


def _check_caught_up(s: _Sink, others: list[_Sink]) -> None:
    mine = [sh["n_rows"] for sh in read_json(Path(s.out) / "manifest.json")["shards"]]
    for o in others:
        theirs = [sh["n_rows"] for sh in read_json(Path(o.out) / "manifest.json")["shards"]]
        if mine != theirs:
            raise RuntimeError(
                f"after re-creating the rows missing from {s.out}, its shards ({len(mine)}) do not line up with those "
                f"of {o.out} ({len(theirs)}); delete both caches and harvest again"
            )


_PAIRED_COLUMNS = ("token_ids", "doc_ids", "positions", "input_ids", "masked")


def check_paired_caches(masked: ActivationCache, target: ActivationCache, *, full: bool = False) -> None:
    """Check that ``target`` is the paired clean cache of the masked cache ``masked`` (denoising variant).

    Paired means: ``target``'s manifest has ``pair_role == "clean_target"`` and otherwise the same identity
    keys (model, hook, ``d_in``, dtype, every meta key incl. the mask settings) as ``masked``; the same number
    of rows and the same shard sizes (so :meth:`ActivationCache.iter_batches` with the same arguments yields
    row-aligned batches); and the same per-row ``token_ids``, ``doc_ids``, ``positions``, ``input_ids`` and
    ``masked`` columns, checked on the first and last shard (cheap), or on every shard with ``full=True``
    (reads all meta files).

    Raises:
        ValueError: naming the first difference found.
    """
    mm, tm = masked.manifest, target.manifest
    if tm.get("pair_role") != PAIR_ROLE:
        raise ValueError(f"{target.path} is not a paired clean cache (pair_role {tm.get('pair_role')!r}); make one "
                         f"with `saelab harvest --mask_prob P --paired_clean_out DIR`")
    if "pair_role" in mm or "mask_prob" not in mm:
        raise ValueError(f"{masked.path} is not a masked activation cache (its manifest has no mask settings)")
    keys = ["model", "hook_name", "d_in", "dtype", *mm.get("meta_keys", []), *tm.get("meta_keys", [])]
    diffs = {k: (mm.get(k, "<absent>"), tm.get(k, "<absent>")) for k in dict.fromkeys(keys) if k != "pair_role"
             and mm.get(k, "<absent>") != tm.get(k, "<absent>")}
    if diffs:
        lines = "\n".join(f"  {k}: masked {a!r}, target {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"{target.path} is not the paired clean cache of {masked.path}; settings differ:\n{lines}")
    if masked.n_tokens != target.n_tokens or not np.array_equal(masked.shard_rows, target.shard_rows):
        raise ValueError(
            f"{target.path} ({target.n_tokens} rows, {target.n_shards} shards) is not row-aligned with {masked.path} "
            f"({masked.n_tokens} rows, {masked.n_shards} shards); re-run the paired harvest to finish both"
        )
    shards = range(masked.n_shards) if full or masked.n_shards <= 2 else (0, masked.n_shards - 1)
    for i in shards:
        a, b = masked.shard_arrays(i)[1], target.shard_arrays(i)[1]
        for col in _PAIRED_COLUMNS:
            if col not in a or col not in b or not np.array_equal(a[col], b[col]):
                raise ValueError(f"{target.path} and {masked.path} differ in column {col!r} of shard {i}; they are "
                                 f"not a row-aligned pair")


def _open_writer(out: str, **kw: Any) -> ActivationCacheWriter:
    """:class:`ActivationCacheWriter` of ``out``; a mismatch of the LM dtype names fp32 where the manifest has no
    ``lm_dtype`` (what its absence means) instead of ``<absent>``."""
    try:
        return ActivationCacheWriter(out, **kw)
    except CacheMismatchError as e:
        if "lm_dtype" not in e.differences:
            raise
        diffs = {k: tuple(v if isinstance(v, str) or k != "lm_dtype" else "fp32" for v in pair)
                 for k, pair in e.differences.items()}
        raise CacheMismatchError(e.path, diffs) from None


def _hook_widths(lm: LoadedLM, hooks: list[HookPoint], device: torch.device) -> dict[str, int]:
    """Width of each hook's output (``hook_name -> d_in``): one two-token forward on ``device`` (the LM's)."""
    ids = torch.full((1, 2), lm.prefix_id, dtype=torch.long, device=device)
    return {name: int(h.shape[-1]) for name, h in _capture(lm.model, hooks, ids).items()}


def _capture(model: torch.nn.Module, hooks: list[HookPoint], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``hook_name -> (batch, seq, d_model)`` outputs of ``hooks`` from one early-stopped forward: :func:`capture`
    for one hook (the single-hook harvest's own call), :func:`capture_many` for several."""
    if len(hooks) == 1:
        return {hooks[0].hook_name: capture(model, hooks[0], input_ids)}
    return capture_many(model, hooks, input_ids)


class HostCopies:
    """Device -> host copies of one batch's hook outputs: into pinned buffers, asynchronously, one wait a batch.

    On the CPU, :meth:`copy` returns its argument and :meth:`wait` does nothing. Elsewhere :meth:`copy` queues
    ``buffer.copy_(t, non_blocking=True)`` into a host buffer kept per ``slot`` (page-locked on CUDA, so the copy
    is a DMA that overlaps the host's work; PyTorch "pin_memory" notes) and returns the buffer, valid once
    :meth:`wait` has returned and until the next :meth:`copy` of that slot (the caller copies what it keeps; the
    cache writer does).

    Args:
        device: the device the tensors come from.
        pin: page-lock the buffers (default: on CUDA only, where pinning exists); ``False`` with a CPU device
            takes the asynchronous path anyway with ordinary buffers (what the tests use to exercise it).
    """

    def __init__(self, device: torch.device, pin: bool | None = None) -> None:
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda" if pin is None else bool(pin)
        self.staged = self.device.type != "cpu" or pin is not None
        self._bufs: dict[int, torch.Tensor] = {}

    def copy(self, slot: int, t: torch.Tensor) -> torch.Tensor:
        """Queue the copy of ``t`` (any shape and dtype) to the host; the host tensor (same shape and dtype)."""
        if not self.staged:
            return t
        buf = self._bufs.get(slot)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.pin)
            self._bufs[slot] = buf
        buf.copy_(t, non_blocking=True)
        return buf

    def wait(self) -> None:
        """Wait for the copies queued so far (on CUDA, for this thread's current stream only, not the device)."""
        if not self.staged:
            return
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        else:
            synchronize(self.device)


def dtype_name(dtype: torch.dtype) -> str:
    """The :data:`saelab.devices.DTYPES` name of ``dtype`` (``"bf16"``), or its torch name if it has none."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def cache_lm_dtype(manifest: dict) -> str:
    """The LM dtype a cache was harvested with (``"fp32"``, ``"bf16"``, ``"fp16"``): its ``lm_dtype`` manifest
    key, absent (fp32) in caches made in fp32."""
    return str(manifest.get("lm_dtype", "fp32"))


def check_lm_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Warn when ``dtype`` is bf16 on a device without native bf16 (:func:`saelab.devices.bf16_native`): such
    devices emulate bf16, slower than fp32 (a warning, not an error: the result is still a valid bf16 harvest)."""
    if dtype == torch.bfloat16 and not bf16_native(device):
        where = (f"{torch.cuda.get_device_name(device)} (compute capability "
                 f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))} < 8.0)" if device.type == "cuda"
                 else f"this {device.type} device")
        warnings.warn(f"--lm_dtype bf16: {where} has no native bf16 matmuls, so the LM forward is emulated and "
                      f"likely slower than fp32; use --lm_dtype fp32" + (" or fp16" if device.type == "cuda" else ""),
                      stacklevel=3)


def _placement_of(lm: LoadedLM, cfg: HarvestConfig, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of a given ``lm`` (where its forward runs), with a warning where ``cfg`` differs."""
    p = next(lm.model.parameters(), None)
    if p is None:
        return device, dtype
    if p.device != device or p.dtype != dtype:
        warnings.warn(f"harvest: the given LM is on {p.device} in {dtype_name(p.dtype)}, not --device {cfg.device} / "
                      f"--lm_dtype {cfg.lm_dtype}; it runs where it is, and the cache records {dtype_name(p.dtype)}",
                      stacklevel=3)
    return p.device, p.dtype


def default_batch_size(device: torch.device, context_size: int) -> int:
    """Contexts per forward pass when the user sets none: :data:`CPU_BATCH_SIZE` on the CPU, else
    ``max(CPU_BATCH_SIZE, GPU_BATCH_TOKENS // context_size)`` (64 for 128-token contexts)."""
    if device.type == "cpu":
        return CPU_BATCH_SIZE
    return max(CPU_BATCH_SIZE, GPU_BATCH_TOKENS // max(int(context_size), 1))


def _resolve_batch_size(cfg: HarvestConfig, device: torch.device, outs: list[str | None] | None = None) -> int:
    """``cfg.batch_size``, or the one a resumed cache was made with, or :func:`default_batch_size`.

    A resume re-creates later rows batch by batch (the row filter's median is per batch, and paired caches must
    checkpoint at the same contexts), so without an explicit size a resume keeps the recorded one (progress
    ``batch_size``; absent: :data:`CPU_BATCH_SIZE`, the only default before sizes were recorded), and an explicit
    one that differs from a recorded one warns.

    ``outs`` are the cache paths to look in (default: ``cfg.out`` and ``cfg.paired_clean_out``; a multi-hook
    harvest passes each hook's).

    Raises:
        ValueError: ``cfg.batch_size`` is not ``None`` or a positive int.
    """
    bs = cfg.batch_size
    if bs is not None and (not isinstance(bs, int) or isinstance(bs, bool) or bs < 1):
        raise ValueError(f"batch_size must be a positive int (contexts per forward pass), got {bs!r}")
    recorded, unfinished = None, False
    for out in (outs if outs is not None else (cfg.out, cfg.paired_clean_out)):
        path = Path(out) / MANIFEST if out is not None else None
        if path is None or not path.is_file():
            continue
        try:
            m = read_json(path)
            prog = m.get("progress") or {}
            started = int(prog.get("contexts_done", 0)) > 0
        except (OSError, ValueError, TypeError, AttributeError):  # unreadable: the cache writer reports it
            continue
        if started:
            recorded, unfinished = prog.get("batch_size"), not m.get("complete", False)
            break
    if bs is None:
        if recorded is not None:
            return int(recorded)
        return CPU_BATCH_SIZE if unfinished else default_batch_size(device, cfg.context_size)
    if unfinished and recorded is not None and recorded != bs:
        warnings.warn(f"{cfg.out} was harvested with --batch_size {recorded}; resuming it with {bs} filters the rest "
                      f"by other batches' medians, so it will differ from an uninterrupted harvest (leave --batch_size "
                      f"unset to keep {recorded})", stacklevel=3)
    return bs


def _write_documents(out: str, docs: Corpus, max_doc: int) -> None:
    """``documents.json``: doc index (as stored per row) -> (doc_id, source, label).

    Also deletes the temporary files of an earlier ``documents.json`` write that a killed run left behind
    (``atomic_write`` names them ``.documents.json.*.tmp``; the cache writer only cleans up its own files).
    """
    for stale in Path(out).glob(".documents.json.*.tmp"):
        stale.unlink(missing_ok=True)
    write_json(
        f"{out}/documents.json",
        [{"doc_id": d.doc_id, "source": d.source, "label": d.label} for d in docs[: max_doc + 1]],
    )
