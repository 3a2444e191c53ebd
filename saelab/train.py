"""Train one SAE from an activation cache: one explicit loop, checkpointed and resumable.

Recipe (saprmarks/dictionary_learning, the "saprmarks recipe" of the C²R authors' ``pipeline.sh`` and of the cosine
paper's ``exp40_karvonen_recipe.py``): activations
optionally scaled so that E||x||^2 = 1 (the factor is folded back into the weights on save);
``b_dec`` = geometric median of the first batch; ``W_enc = W_dec^T``; unit-norm decoder rows with the
parallel gradient component removed; Adam with linear warm-up, constant, then linear decay to 0 over the
last 20 % of steps; gradient-norm clipping; AuxK for dead latents (k_aux = d_in/2, coefficient 1/32).

A killed run resumes from ``<out>/checkpoint/`` (``state.safetensors`` + ``state.json``, read without pickle; see
:mod:`saelab.checkpoint`): model, optimiser, schedule, dead-latent counters, RNG state and data position are
restored, so the remaining batches are exactly those an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .sae import losses
from .activations.cache import ActivationCache
from .activations.prefetch import Prefetcher
from .activations.stream import CacheFollower, stream_norm_scale
from . import checkpoint as ckpt
from .config_files import flat_nested, flat_view
from .devices import deterministic_algorithms, resolve_device
from .distributed import DistInfo, init_distributed
from .io import atomic_write, json_default, write_json
from .regularizers import as_regularizer_spec
from .sae.activations import BatchTopK
from .sae.config import SAEConfig
from .sae.model import SAE
from .sae.objective import LossWeights, SAELoss, check_trainable
from .sae.saving import save_sae
from .kernels.mode import dense_reference, sparse_path_enabled
from .kernels.sparse_step import set_selection_gemm


@dataclass
class TrainConfig:
    """Training run of one SAE on a harvested activation cache."""

    cache: str = "runs/demo/cache"
    """Activation cache directory written by ``saelab harvest``; the folder of a multi-hook harvest (one cache per
    hook) trains one SAE per hook, all in one pass over the caches, into <out>/<hook name>/."""
    target_cache: str | None = None
    """DENOISING VARIANT (not the masked-regularization paper's default): a paired clean cache (harvest
    --paired_clean_out) whose rows are the reconstruction targets of the masked cache's inputs."""
    stream: bool = False
    """Stream order: epoch 0 reads the shards in harvest order (windows of stream_window_shards consecutive shards,
    rows shuffled within each), later epochs as usual, and the input scale comes from the first window. If the
    cache's harvest is still running (saelab run --stream, or saelab harvest --out CACHE in another process),
    training follows it, using each window as soon as it is committed; the weights are the same either way."""
    stream_window_shards: int = 2
    """stream: consecutive shards per window (rows are shuffled within a window; training starts after the first)."""
    stream_timeout: float = 600.0
    """stream: fail when a harvest in another process commits no new shard for this many seconds (0 = wait forever)."""
    verify_cache: bool = True
    """Check each shard's SHA-256 the first time it is read; off skips the check."""
    out: str = "runs/demo/sae"
    """Output directory: the SAE (SAELens layout), ``train_log.jsonl`` and the resumable checkpoint."""
    sae: SAEConfig = flat_nested(SAEConfig)
    """Architecture of the SAE (activation, k, d_sae / expansion_factor, encoder, ...): flags ``--k 32``, config
    keys ``k: 32`` or ``sae: {k: 32}``; its d_in and metadata come from the cache (:meth:`SAEConfig.resolved`)."""
    regularizers: list[str] = field(default_factory=list)
    """Extra losses (saelab.regularizers), e.g. c2r, c2r:lambda=5,every=5,alpha=1,chunk=8192, ortho:lambda=0.25; in a YAML file also mappings {name: c2r, lambda: 5}."""
    n_tokens: int | None = None
    """Training tokens; default = one pass over the cache."""
    batch_size: int = 4096
    """Tokens per optimiser step."""
    lr: float | None = None
    """Adam learning rate; default 2e-4 / sqrt(d_sae / 2^14) (dictionary_learning BatchTopK auto-lr)."""
    warmup_steps: int = 1000
    """Linear LR warm-up steps (capped at a tenth of the run)."""
    decay_start: float = 0.8
    """Fraction of the run after which the LR decays linearly to 0."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    normalize_activations: bool = True
    """Scale inputs so that E||x||^2 = 1 during training (folded into the weights on save)."""
    aux_k: int | None = None
    """AuxK: dead latents used per token; default d_in // 2."""
    aux_coefficient: float = 1 / 32
    """AuxK loss weight (Gao et al. 2024)."""
    dead_tokens: int | None = None
    """A latent is dead after this many tokens without firing; default min(10M, n_tokens // 10)."""
    l1_coefficient: float = 1.0
    """ReLU SAEs: L1 penalty weight (on the normalised scale)."""
    l0_coefficient: float = 1.0
    """JumpReLU SAEs: L0 penalty weight (on the normalised scale)."""
    sparsity_warmup_steps: int = 0
    """Linear warm-up of the L1/L0 coefficient."""
    threshold_start_step: int = 1000
    """BatchTopK: first step of the EMA inference-threshold updates (capped at a fifth of the run)."""
    seed: int = 0
    """Seed for initialisation and data order."""
    checkpoint_every: int = 200
    """Steps between resumable checkpoints."""
    log_every: int = 25
    """Steps between log lines in train_log.jsonl."""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)."""
    device: str = "cpu"
    """Device for the SAE: cpu, cuda or cuda:N (under torchrun each rank uses cuda:<local rank>)."""
    progress: bool = True
    """Show a progress bar with tokens/s."""
    selection_gemm: str = "auto"
    """TopK/BatchTopK pair selection: fp32 (full fp32 scores), bf16 (one bf16 GEMM screens candidates under a certified error bound, exact fp32 values; same pairs up to float ties), auto (bf16 on CUDA or a CPU with AVX-512 BF16/AMX). See saelab.kernels.sparse_step.set_selection_gemm."""
    compile: bool = False
    """torch.compile the forward and losses (inductor; the first step compiles, which takes seconds). On CPU it speeds up the dense steps a little but slows the hand-fused sparse TopK step (graph breaks around its custom kernels; benchmarks/RESULTS.md), so it is off by default; try it on GPUs."""
    concurrent_saes: bool = True
    """train_many on CPU: step several SAEs at once, one per thread (threads split between them), instead of one
    after the other on every thread; faster for small SAEs. Each SAE's weights are then those of a run alone with
    threads // min(#SAEs, threads) threads (float rounding of multi-threaded reductions differs with the thread
    count). SAEs trained in one pass share it."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms for the run (and CUBLAS_WORKSPACE_CONFIG=:4096:8): on CUDA, per-latent
    sums (index_add_, the backward of index_select) then use deterministic kernels instead of atomics, so two runs
    give the same weights bit for bit (slower). The CPU path is deterministic without it (see the README's GPU
    section)."""
    autocast: str = "none"
    """Mixed precision of the forward pass: none (fp32) or bf16 (torch.autocast: GEMMs in bf16 with fp32 accumulation; weights, gradients, Adam and the losses' reductions stay fp32). Speeds up the dense steps (relu, jumprelu: ~2x on an AMX CPU); the sparse TopK/BatchTopK step has no autocast GEMMs and is unchanged."""


AUTOCAST_MODES = ("none", "bf16")
"""Values of :attr:`TrainConfig.autocast`."""


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    sae_dir: Path
    steps: int
    tokens: int
    seconds: float
    final: dict = field(default_factory=dict)


def _lr_lambda(total: int, warmup: int, decay_start: float):
    decay_from = int(decay_start * total)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step >= decay_from:
            return max(0.0, (total - step) / max(1, total - decay_from))
        return 1.0

    return f


def _check_row_aligned(source: ActivationCache, target: ActivationCache) -> None:
    """Check that a transcoder's input cache ``source`` and target cache ``target`` hold the same tokens row by row:
    same model, row count and shard sizes (so equal ``iter_batches`` arguments give aligned batches), and the same
    ``token_ids``/``doc_ids``/``positions`` columns on the first and last shard.

    Raises:
        ValueError: naming the first difference and the fix (harvest both hooks in one pass).
    """
    fix = ("harvest both hooks in one pass with a shared row filter (saelab harvest --hook_name IN OUT --shared_rows "
           "true), then pass --cache <out>/IN --target_cache <out>/OUT")
    ms, mt = source.manifest.get("model"), target.manifest.get("model")
    if ms != mt:
        raise ValueError(f"{target.path} (model {mt!r}) and {source.path} (model {ms!r}) come from different models; {fix}")
    if source.n_tokens != target.n_tokens or not np.array_equal(source.shard_rows, target.shard_rows):
        raise ValueError(f"{target.path} ({target.n_tokens} rows, {target.n_shards} shards) is not row-aligned with "
                         f"{source.path} ({source.n_tokens} rows, {source.n_shards} shards); {fix}")
    for i in sorted({0, source.n_shards - 1}):
        a, b = source.shard_arrays(i)[1], target.shard_arrays(i)[1]
        for col in ("token_ids", "doc_ids", "positions"):
            if col in a and col in b and not np.array_equal(a[col], b[col]):
                raise ValueError(f"{target.path} and {source.path} differ in column {col!r} of shard {i}: not the same "
                                 f"tokens row by row; {fix}")


def _build(cfg: TrainConfig, cache: ActivationCache, steps: int, device: str) -> tuple[SAE, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    man = cache.manifest
    out = {}
    if cfg.sae.transcoder:  # the decoder's width and hook come from the target cache
        if not cfg.target_cache:
            raise ValueError("a transcoder predicts another hook's activations: set --target_cache to the cache of "
                             "the output hook (e.g. the MLP output), row-aligned with --cache (the MLP input)")
        target = ActivationCache.open(cfg.target_cache, verify_checksums=False)
        out = {"d_out": target.d_in, "hook_name_out": target.manifest.get("hook_name", "")}
    sae_cfg = cfg.sae.resolved(cache.d_in, model_name=man.get("model", ""), hook_name=man.get("hook_name", ""),
                               context_size=int(man.get("context_size", 128)), **out)
    d_sae = sae_cfg.d_sae
    torch.manual_seed(cfg.seed)
    sae = SAE(sae_cfg).to(device)
    set_selection_gemm(sae, cfg.selection_gemm)
    lr = cfg.lr if cfg.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)
    # fused Adam: one kernel for every parameter (CPU and CUDA in torch >= 2.4)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=True)
    warmup = max(1, min(cfg.warmup_steps, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup, cfg.decay_start))
    return sae, opt, sched


def _match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Give each optimiser state tensor its parameter's layout after a resume.

    Fused Adam (``torch._fused_adam_``) steps a parameter and its moments as flat buffers, so each moment must have
    its parameter's strides (``W_enc`` is column-major, strides ``(1, d_in)``); checkpoints hold dense row-major
    tensors (safetensors), so every state tensor of the parameter's shape is copied into ``torch.empty_like(param)``.
    Checkpoints written while the optimiser saw ``W_enc`` as its ``(d_sae, d_in)`` transpose hold its Adam moments in
    that shape: they are transposed to ``W_enc``'s ``(d_in, d_sae)`` (same values, so the resumed run is exact)."""
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in list(opt.state.get(p, {}).items()):
                if not isinstance(v, Tensor) or v.dim() != p.dim() or v.dim() == 0:
                    continue
                if v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p).copy_(v)
                elif v.dim() == 2 and v.shape != p.shape and v.shape == p.shape[::-1]:
                    opt.state[p][k] = torch.empty_like(p).copy_(v.t())


def _as_json(obj):
    """``obj`` as it reads back from JSON (tuples as lists, paths as strings): checkpoint identities compare so."""
    return json.loads(json.dumps(obj, default=json_default))


def _restore_tuples(saved_groups: list[dict], groups: list[dict]) -> list[dict]:
    """The optimiser's ``param_groups`` from JSON, with the values the live groups hold as tuples (Adam's
    ``betas``) made tuples again, so the restored groups equal the saved ones."""
    return [{k: tuple(v) if isinstance(g.get(k), tuple) and isinstance(v, list) else v for k, v in sg.items()}
            for sg, g in zip(saved_groups, groups)]


def _norm_scale(cache: ActivationCache, cfg: TrainConfig) -> float:
    """sqrt(E||x||^2) over (a sample of) the cache; 1.0 when normalisation is off."""
    if not cfg.normalize_activations:
        return 1.0
    stats = cache.manifest.get("stats") or {}
    if stats.get("mean_sq_norm"):
        return math.sqrt(float(stats["mean_sq_norm"]))
    sq, n = 0.0, 0
    for i, x in enumerate(cache.iter_batches(cfg.batch_size, seed=cfg.seed + 1, epochs=1, drop_last=False)):
        sq += float(x.double().pow(2).sum())
        n += x.shape[0]
        if i >= 20:
            break
    return math.sqrt(sq / max(n, 1))


def train(cfg: TrainConfig) -> TrainResult:
    """Train an SAE on ``cfg.cache`` and save it to ``cfg.out`` (see :func:`train_many`).

    Returns:
        :class:`TrainResult` with the SAE directory and run totals.

    Raises:
        FileNotFoundError / CacheMismatchError: from opening the cache.
        ValueError: a checkpoint in ``cfg.out`` was made with a different configuration (the message says
            to pick another ``--out`` or delete the checkpoint), or the loss became non-finite.
    """
    return train_many([cfg])[0]


def hook_configs(cfg: TrainConfig) -> list[TrainConfig]:
    """One config per hook when ``cfg.cache`` is the folder of a multi-hook harvest, else ``[cfg]``.

    Each hook's config reads ``<cache>/<hook_name>/`` and writes ``<out>/<hook_name>/``; :func:`train_many` trains
    them in one pass over the caches. The caches of one harvest hold the same number of rows unless the per-hook
    row filter dropped different rows, in which case ``n_tokens`` must be given (:func:`train_many` says so).

    Raises:
        ValueError: a transcoder or ``target_cache`` with a multi-hook folder (a transcoder pairs two given hooks:
            pass ``--cache ROOT/<input hook> --target_cache ROOT/<output hook>``).
    """
    from .activations.cache import hook_cache_dirs

    hooks = hook_cache_dirs(cfg.cache)
    if not hooks:
        return [cfg]
    if cfg.target_cache or cfg.sae.transcoder:
        raise ValueError(f"{cfg.cache} holds the caches of {len(hooks)} hooks ({', '.join(hooks)}); a transcoder or a "
                         "target cache pairs two of them: pass --cache <folder>/<input hook> --target_cache "
                         "<folder>/<output hook>")
    return [replace(cfg, cache=str(path), out=str(Path(cfg.out) / name)) for name, path in hooks.items()]


#: TrainConfig fields that SAEs trained in one pass (:func:`train_many`) must share (their caches may differ: each
#: cache is one stream of the pass)
SHARED_DATA_FIELDS = ("seed", "batch_size", "n_tokens", "normalize_activations", "device",
                      "stream", "stream_window_shards", "concurrent_saes", "verify_cache", "deterministic")

#: TrainConfig fields that do not change the trained weights (not part of a checkpoint's identity)
_NOT_IDENTITY = ("checkpoint_every", "log_every", "threads", "progress", "out", "stream_timeout",
                 "selection_gemm", "compile", "concurrent_saes", "verify_cache", "deterministic")  # selection_gemm: same pairs up to float ties (saelab.kernels)


def _run_identity(cfg_dict: dict) -> dict:
    """The config values a checkpoint must match to be resumed, from the FLAT view of the config
    (:func:`saelab.config_files.flat_view`: the architecture fields of ``sae`` at the top level, its d_in and
    metadata left out, which the cache determines), so checkpoints written when ``TrainConfig`` held those fields
    itself still resume; an unset ``d_sae`` (0) reads as ``None`` as it did then. The stream fields only count when
    ``stream`` is on, and the transcoder fields only when ``transcoder`` is on, so checkpoints written before they
    existed still resume."""
    ident = {k: v for k, v in cfg_dict.items() if k not in _NOT_IDENTITY}
    if not ident.get("d_sae"):
        ident["d_sae"] = None
    if not ident.get("transcoder"):
        ident.pop("transcoder", None)
        ident.pop("skip", None)
    if not ident.get("stream"):
        ident.pop("stream", None)
        ident.pop("stream_window_shards", None)
    return ident


def _open_source(c0: TrainConfig, harvest_alive, cancel: threading.Event) -> tuple[ActivationCache, CacheFollower | None]:
    """The cache to train on, and a follower when it is a stream whose harvest is still running.

    With ``stream`` this waits for the first window of shards (the SAE's shapes and the input scale come from it).
    A finished cache is read by :meth:`ActivationCache.iter_batches` with ``stream_order=True``, which yields the
    batches the follower would have yielded.
    """
    if not c0.stream:
        return ActivationCache.open(c0.cache, verify_checksums=c0.verify_cache), None
    if c0.target_cache:
        raise ValueError("stream does not support target_cache (the denoising variant): finish the paired harvest, "
                         "then train without --stream")
    follower = CacheFollower(c0.cache, window_shards=c0.stream_window_shards, producer_alive=harvest_alive,
                             timeout_s=c0.stream_timeout, cancel=cancel, verify_checksums=c0.verify_cache)
    snap = follower.wait_for_window(0)
    if snap is None or snap.manifest.get("complete"):
        return ActivationCache.open(c0.cache, verify_checksums=c0.verify_cache), None
    return snap, follower


def _cache_rows(cache: ActivationCache, c0: TrainConfig) -> int:
    """Rows of the finished cache: its size, or, for a cache still being harvested, the harvest's ``n_tokens``."""
    if cache.manifest.get("complete", True):
        return cache.n_tokens
    want = cache.manifest.get("n_tokens_requested")
    if not want:
        raise ValueError(f"the cache at {cache.path} is still being harvested and its manifest does not say how many "
                         f"rows it will hold; pass --n_tokens")
    return int(want)


def train_many(cfgs: list[TrainConfig], dist: DistInfo | None = None, *,
               harvest_alive: Callable[[], bool] | None = None) -> list[TrainResult]:
    """Train several SAEs from ONE pass over the activation stream: each batch is read once and every SAE takes a
    step on it (arms of an experiment, or several sizes/sparsities on one hook).

    The SAEs may read different caches (e.g. one per hook of a multi-hook harvest, ``<root>/<hook_name>/``): each
    cache (with its target cache) is then one stream of the pass, read once, with its own input scale, and step
    ``s`` gives every SAE batch ``s`` of its own stream. The streams must give the same number of steps (equal row
    counts, or an explicit ``n_tokens``).

    Each SAE gets exactly the weights :func:`train` would give it alone on the same number of threads (same
    batches, same init, its own RNG for regularizers), its own checkpoint, log and output folder. A killed run
    resumes every SAE from its own checkpoint; SAEs that are ahead skip the batches they have already seen.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the batches are sharded by rank and gradients averaged
    (:mod:`saelab.distributed`); only rank 0 writes files.

    With ``stream`` (:mod:`saelab.activations.stream`) the batches come in stream order and, while the cache's
    harvest is still running, each window of shards is used as soon as it is committed.

    On CPU, with ``concurrent_saes`` (default) and at least two SAEs and two threads, the SAEs step concurrently,
    one per worker thread, the threads split between them (:func:`_step_concurrently`); each SAE's weights are then
    those of a run alone on its share of the threads.

    Args:
        cfgs: the runs; they must agree on the data fields (:data:`SHARED_DATA_FIELDS`: seed, batch_size, n_tokens,
            normalize_activations, device, stream, ...) and have distinct ``out`` folders; their ``cache`` and
            ``target_cache`` may differ (without ``stream``).
        dist: the process group (default: from torchrun's environment, or single-process).
        harvest_alive: with ``stream``, whether the harvest writing the cache still runs; raises if it failed
            (:meth:`saelab.activations.stream.BackgroundHarvest.alive`). ``None``: a harvest in another process,
            bounded by ``stream_timeout``.

    Returns:
        One :class:`TrainResult` per config, in order.

    Raises:
        ValueError: the configs disagree on a data field or share an ``out``, several caches with ``stream``, or
            caches of different sizes without ``n_tokens``; plus everything :func:`train` raises.
        HarvestFailedError / TimeoutError / RuntimeError: with ``stream``, the harvest failed, went silent or
            stopped before finishing the cache (:meth:`saelab.activations.stream.CacheFollower.wait_for_window`).
    """
    if not cfgs:
        return []
    for f in SHARED_DATA_FIELDS:
        vals = {str(getattr(c, f)) for c in cfgs}
        if len(vals) > 1:
            raise ValueError(f"train_many: every config must share {f!r} (one pass over one stream), got {sorted(vals)}")
    outs = [str(Path(c.out).resolve()) for c in cfgs]
    if len(set(outs)) < len(outs):
        raise ValueError(f"train_many: configs share an output folder: {outs}")
    c0 = cfgs[0]
    dist = dist or init_distributed(c0.device)
    device = resolve_device(c0.device, dist.local_rank if dist.enabled else None)
    with deterministic_algorithms(c0.deterministic):
        return _train_pass(cfgs, c0, dist, device, harvest_alive)


class _Source(NamedTuple):
    """One data stream of a pass: an input cache (a follower while its harvest still runs), its target cache (a
    transcoder's output hook or the denoising variant's clean pair) and its input scale."""

    cache: ActivationCache
    follower: CacheFollower | None
    target: ActivationCache | None
    scale: float


def _open_stream_source(c0: TrainConfig, harvest_alive, cancel: threading.Event) -> _Source:
    """Open ``c0.cache`` (and ``c0.target_cache``), check a target's row alignment and compute the input scale."""
    cache, follower = _open_source(c0, harvest_alive, cancel)
    target = None
    if c0.target_cache:
        from .activations.harvest import check_paired_caches

        target = ActivationCache.open(c0.target_cache, verify_checksums=c0.verify_cache)
        if c0.sae.transcoder:
            _check_row_aligned(cache, target)
        else:
            check_paired_caches(cache, target)
    if c0.stream and c0.normalize_activations:
        scale = stream_norm_scale(cache, c0.stream_window_shards)
    else:
        scale = _norm_scale(cache, c0)
    return _Source(cache, follower, target, scale)


def _source_key(cfg: TrainConfig) -> tuple[str, str]:
    """Which stream a run reads: its input cache and target cache, resolved."""
    return str(Path(cfg.cache).resolve()), str(Path(cfg.target_cache).resolve()) if cfg.target_cache else ""


def _batches_of(src: _Source, c0: TrainConfig, start: int):
    """``(x, y | None)`` host batches of one source from batch ``start`` on, in the order :func:`train` reads them."""
    if src.follower is not None:
        stream = src.follower.batches(c0.batch_size, seed=c0.seed, epochs=None, start_batch=start)
    elif c0.stream:
        stream = src.cache.iter_batches(c0.batch_size, seed=c0.seed, epochs=None, start_batch=start,
                                        shuffle_window_shards=c0.stream_window_shards, stream_order=True)
    else:
        stream = src.cache.iter_batches(c0.batch_size, seed=c0.seed, epochs=None, start_batch=start)
    if src.target is None:
        return ((x, None) for x in stream)
    # a row-aligned target has the same shard sizes, so the same seed yields row-aligned batches
    return zip(stream, src.target.iter_batches(c0.batch_size, seed=c0.seed, epochs=None, start_batch=start))


def _train_pass(cfgs: list[TrainConfig], c0: TrainConfig, dist: DistInfo, device: torch.device,
                harvest_alive: Callable[[], bool] | None) -> list[TrainResult]:
    """The body of :func:`train_many` once the device is known.

    Runs on different caches (several hooks of one harvest) read one stream each; every stream is read once per
    pass, and a step ``s`` of the pass hands each SAE batch ``s`` of its own stream, the batch :func:`train` would
    give it alone."""
    if c0.threads:
        torch.set_num_threads(c0.threads)
    cancel = threading.Event()  # ends a follower still waiting for shards when training stops
    key_of = [_source_key(c) for c in cfgs]
    first: dict[tuple[str, str], TrainConfig] = {}  # stream -> the first config reading it, in order
    for k, c in zip(key_of, cfgs):
        first.setdefault(k, c)
    keys = list(first)
    if len(keys) > 1 and c0.stream:
        raise ValueError("stream follows one cache: train SAEs on several caches without --stream "
                         f"(got {len(keys)} caches)")
    sources = [_open_stream_source(first[k], harvest_alive, cancel) for k in keys]
    rows = {k: c0.n_tokens or _cache_rows(src.cache, first[k]) for k, src in zip(keys, sources)}
    if len(set(rows.values())) > 1:
        raise ValueError("train_many steps SAEs on several caches together, so they need the same number of training "
                         f"tokens, but the caches hold {', '.join(f'{v:,} ({k[0]})' for k, v in rows.items())} rows; "
                         "pass --n_tokens (at most the smallest)")
    n_tokens = rows[keys[0]]
    steps = max(1, n_tokens // c0.batch_size)
    dist.shard_size(c0.batch_size)  # fail before any work when the ranks cannot split the batch
    src_of = [keys.index(k) for k in key_of]
    runs = [_Run(c, sources[i].cache, steps, sources[i].scale, device, dist, source=i) for c, i in zip(cfgs, src_of)]
    start = min(r.step for r in runs)

    per_source = [_host_batches(_batches_of(src, first[k], start), src.scale, dist, pin=device.type == "cuda")
                  for k, src in zip(keys, sources)]
    batches = Prefetcher(zip(*per_source), depth=2)  # one tuple of batches (one per source) per step
    bar = None
    if c0.progress and dist.is_main:
        from tqdm.auto import tqdm

        desc = f"train {c0.sae.activation}" if len(runs) == 1 else f"train {len(runs)} SAEs"
        if len(keys) > 1:
            desc += f" on {len(keys)} caches"
        bar = tqdm(total=steps * c0.batch_size, initial=start * c0.batch_size, unit="tok", unit_scale=True, desc=desc, dynamic_ncols=True)

    def prepare_one(b: _Batch) -> _Batch:  # this rank's shard to the device
        x = b.x.to(device, non_blocking=True)
        return b._replace(x=x, y=b.y.to(device, non_blocking=True) if b.y is not b.x else x)

    def prepare(bs: tuple[_Batch, ...]) -> tuple[_Batch, ...]:  # once per step, shared by the SAEs of each source
        return tuple(prepare_one(b) for b in bs)

    def advance(n_batches: int) -> None:
        if bar is not None:
            bar.update(n_batches * c0.batch_size)
            if len(runs) == 1 and runs[0].last:
                last = runs[0].last
                bar.set_postfix(fve=f"{1 - last['fvu']:.3f}", l0=f"{last['l0']:.1f}", dead=f"{last['dead_frac']:.2f}")

    workers = _concurrent_workers(runs, c0, dist, device)
    try:
        if workers > 1:
            _step_concurrently(runs, (prepare(b) for b in batches), start, steps, workers, advance)
        else:
            for s in range(start, steps):
                batch = prepare(next(batches))
                for r in runs:
                    if r.step == s:
                        r.train_step(batch[r.source])
                advance(1)
    finally:
        cancel.set()
        batches.close()
        if bar is not None:
            bar.close()
    return [r.finish() for r in runs]


class _Batch(NamedTuple):
    """One global batch of the stream, divided by the input scale.

    ``host_x``/``host_y`` ``(B, d_in)`` stay on the CPU (the NaN check and the step-0 initialisation read the whole
    batch there, without a device round trip); ``x``/``y`` ``(B / world_size, d_in)`` are this rank's shard, on the
    training device once :func:`train_many` has moved them (the same tensors as the host ones single-process on CPU).
    ``y is x`` when there is no target cache."""

    host_x: Tensor
    host_y: Tensor
    x: Tensor
    y: Tensor


def _host_batches(pairs, scale: float, dist: DistInfo, pin: bool) -> Iterator[_Batch]:
    """``(xb, yb | None)`` pairs from the cache readers -> :class:`_Batch` with host tensors, on the prefetch thread.

    Only this rank's shard is copied on to the device later, not the global batch; with ``pin`` (CUDA) the shard is
    put in page-locked memory so that copy is asynchronous (``non_blocking``)."""
    for xb, yb in pairs:
        hx = xb / scale
        hy = yb / scale if yb is not None else hx
        x = dist.shard(hx)
        if pin:
            x = x.pin_memory()
        y = x if hy is hx else (dist.shard(hy).pin_memory() if pin else dist.shard(hy))
        yield _Batch(hx, hy, x, y)


def _concurrent_workers(runs: list[_Run], c0: TrainConfig, dist: DistInfo, device: torch.device) -> int:
    """How many SAEs :func:`train_many` steps at once (1: one after the other, each on every intra-op thread).

    Several CPU SAEs step concurrently, one per worker thread with ``threads // workers`` intra-op threads each,
    when there are at least two SAEs and two threads (``c0.concurrent_saes``). Not under torchrun (each rank must
    issue its collectives in the same order) nor with ``compile``. Small SAEs are overhead-bound: much of their
    step is single-threaded 1-D work (selection sorts, bincounts, gathers) and short kernels whose fork/join costs
    rival their arithmetic, so one SAE per core uses the cores better than intra-op parallelism
    (``benchmarks/RESULTS.md``, "Many small SAEs in one pass")."""
    if (not c0.concurrent_saes or len(runs) < 2 or dist.enabled or torch.device(device).type != "cpu"
            or any(r.cfg.compile for r in runs)):
        return 1
    return min(len(runs), torch.get_num_threads())


#: batches held at once by :func:`_step_concurrently`: how far the SAEs of one pass may drift apart
CONCURRENT_WINDOW = 4


def _step_concurrently(runs: list[_Run], batches, start: int, steps: int, workers: int,
                       advance: Callable[[int], None]) -> None:
    """Train ``runs`` on ``batches`` (an iterator of tuples of :class:`_Batch`, one per stream of the pass, starting at
    batch ``start``; run ``r`` takes element ``r.source``) up to ``steps``, with ``workers`` threads each stepping one
    SAE at a time.

    Each SAE takes its own batches in order (the batch of its step ``s`` is the stream's batch ``s``, as in the
    one-after-the-other loop), so its arithmetic is that of a run alone on ``threads // workers`` intra-op
    threads. A free worker takes the SAE furthest behind whose next batch is loaded; the main thread loads
    batches while they are within :data:`CONCURRENT_WINDOW` of the slowest SAE and drops those every SAE has
    passed, so SAEs of unequal cost keep every worker busy. ``advance(n)`` is called when the slowest SAE has
    moved ``n`` batches on. The first exception of a step (or of ``batches``) stops the workers after their current
    step and is re-raised here.
    """
    total = torch.get_num_threads()
    cond = threading.Condition()
    window: dict[int, _Batch] = {}
    busy: set[int] = set()
    failed: list[BaseException] = []
    stop = [False]

    def pick() -> int | None:  # under cond: the free SAE furthest behind whose batch is loaded
        ready = [i for i, r in enumerate(runs) if i not in busy and r.step < steps and r.step in window]
        return min(ready, key=lambda i: runs[i].step, default=None)

    # the caller's thread-local step mode (saelab.kernels.mode.dense_reference) holds in the workers too
    mode = contextlib.nullcontext if sparse_path_enabled() else dense_reference

    def work(n_threads: int) -> None:
        torch.set_num_threads(n_threads)  # this thread's OpenMP/MKL team only
        try:
            while True:
                with cond:
                    while (i := pick()) is None:
                        if stop[0] or failed or all(r.step >= steps for r in runs):
                            return
                        cond.wait()
                    busy.add(i)
                    batch = window[runs[i].step][runs[i].source]
                try:
                    with mode():
                        runs[i].train_step(batch)
                finally:
                    with cond:
                        busy.discard(i)
                        cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - re-raised by the main thread
            with cond:
                failed.append(e)
                cond.notify_all()

    pool = [threading.Thread(target=work, args=(total // workers + (w < total % workers),), daemon=True,
                             name=f"saelab-sae-{w}") for w in range(workers)]
    for t in pool:
        t.start()
    loaded = done = start
    try:
        while True:
            with cond:
                while True:
                    if failed:
                        raise failed[0]
                    low = min(r.step for r in runs)
                    for s in [s for s in window if s < low]:
                        del window[s]
                    if low > done:
                        advance(low - done)
                        done = low
                    if low >= steps:
                        return
                    if loaded < steps and loaded - low < CONCURRENT_WINDOW:
                        break
                    cond.wait()
            try:
                batch = next(batches)  # outside the lock: the workers go on meanwhile
            except BaseException as e:  # noqa: BLE001 - stop the workers first
                with cond:
                    failed.append(e)
                raise
            with cond:
                window[loaded] = batch
                loaded += 1
                cond.notify_all()
    finally:
        with cond:
            stop[0] = True
            cond.notify_all()
        for t in pool:
            t.join()
        torch.set_num_threads(total)  # the workers changed the default that new threads start with


def _check_finite_batch(x: Tensor, cache: str | Path, step: int, ckpt_path: Path) -> None:
    """Raise before a training step whose batch ``x (B, d_in)`` holds NaN/Inf.

    The cache writer refuses non-finite rows at harvest (``ActivationCacheWriter.add``), so such a batch means
    a cache changed after its harvest (read with ``verify_cache`` off), one written by another tool, or an input
    scale of 0. The test is one sum per batch: NaN/Inf propagate into it, so a finite sum proves the batch finite
    (as ``_count_nonfinite_rows`` of the cache writer); a non-finite sum, which finite values of |x| > ~1e31 can
    also give by overflow, is confirmed element-wise, and only then are the bad rows counted.

    Args:
        x: the batch, already divided by the input scale.
        cache: the cache it came from (named in the message).
        step: the step about to be taken (0-based: the number of steps done).
        ckpt_path: the run's checkpoint file, which the failing step leaves untouched.

    Raises:
        ValueError: ``x`` holds a NaN or Inf; names the cache, the step, the rows and the fix.
    """
    if bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all()):
        return
    bad = int((~torch.isfinite(x)).any(dim=-1).sum())
    kept = (f"the last checkpoint, {ckpt_path}, is intact and a re-run resumes from it" if ckpt_path.is_file()
            else "no checkpoint was written yet")
    raise ValueError(
        f"{cache}: NaN/Inf activations in {bad} of {x.shape[0]} rows of the batch of step {step}; nothing was "
        f"written ({kept}); re-harvest the cache (delete {cache} and re-run `saelab harvest ... --out {cache}`, "
        "with --max_norm_multiple > 0 so that overflowing tokens are dropped), then re-run this command"
    )


class _Run:
    """The state of one SAE being trained: model, optimiser, schedule, counters, RNG; one step at a time."""

    def __init__(self, cfg: TrainConfig, cache: ActivationCache, steps: int, scale: float, device: str, dist: DistInfo,
                 source: int = 0) -> None:
        self.cfg, self.cache, self.steps, self.scale, self.device, self.dist = cfg, cache, steps, scale, device, dist
        self.source = source  # index of this run's stream in its pass (:func:`_train_pass`)
        self.out = Path(cfg.out)
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.out / "checkpoint"
        self.ckpt_path = self.ckpt_dir / ckpt.META
        self.log_path = self.out / "train_log.jsonl"
        self.regs = [as_regularizer_spec(r) for r in cfg.regularizers]  # spec errors before any work
        if cfg.autocast not in AUTOCAST_MODES:
            raise ValueError(f"unknown autocast {cfg.autocast!r}; choose one of {', '.join(AUTOCAST_MODES)}")
        self.device_type = torch.device(device).type
        self.forward = torch.compile(self._forward) if cfg.compile else self._forward
        regs = [str(r) for r in self.regs]  # canonical form, so "c2r" and "c2r:lambda=5" resume alike
        self.cfg_dict = {**asdict(cfg), "regularizers": regs}  # training_cfg.json: the config tree (--config reads it)
        self.identity = _run_identity({**flat_view(cfg), "regularizers": regs})
        self.sae, self.opt, self.sched = _build(cfg, cache, steps, device)
        check_trainable(self.sae)  # before any step: a Matryoshka SAE with a norm-restoring decoder cannot train
        d_sae = self.sae.cfg.d_sae
        n_tokens = steps * cfg.batch_size
        # AuxK predicts the residual, in the output space: d_out // 2 (= d_in // 2 for an SAE, Gao et al. 2024 §A.2)
        self.weights = LossWeights(aux_k=cfg.aux_k or self.sae.cfg.out_dim // 2, aux_coefficient=cfg.aux_coefficient,
                                   l1_coefficient=cfg.l1_coefficient, l0_coefficient=cfg.l0_coefficient)
        self.dead_tokens = cfg.dead_tokens or min(10_000_000, max(cfg.batch_size, n_tokens // 10))
        self.threshold_start = min(cfg.threshold_start_step, steps // 5)
        # BatchTopK inference threshold: EMA of the batch's minimum positive activation with beta = 0.999
        # (dictionary_learning), i.e. a ~1000-batch horizon. A shorter run would keep the large minima of early
        # training (the first value's weight after n updates is beta^n) and its inference L0 would fall well below
        # k, so the horizon is capped at a quarter of the updates; runs with >= 4000 updates are unchanged.
        n_updates = max(1, steps - self.threshold_start)
        self.threshold_beta = 1.0 - 1.0 / min(1000.0, max(1.0, n_updates / 4))
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # regularizers' RNG (C²R chunks), per SAE
        self.step = 0
        self.log_rows: list[dict] = []
        self.last: dict = {}
        self.last_reg: dict[str, float] = {}  # latest unweighted value of each regularizer (computed every T steps)
        self.reg_terms: dict[str, tuple[Tensor, float]] = {}  # terms not yet read into last_reg: (lambda*T*loss, lambda*T)
        self.loss_checks: list[tuple[int, Tensor, dict[str, Tensor]]] = []  # (step, loss is finite, loss terms) unread
        self.t0 = time.perf_counter()
        if ckpt.has_checkpoint(self.ckpt_dir):
            self._resume()
        elif dist.is_main and self.log_path.exists():
            self.log_path.unlink()
        self.toks0 = self.step * cfg.batch_size
        self.sae.train()

    def _resume(self) -> None:
        """Restore the state of the checkpoint in ``<out>/checkpoint`` (see :mod:`saelab.checkpoint`); an old
        ``state.pt`` that torch's safe loader accepts is converted to the new pair first (by the main rank).

        Raises:
            ValueError (:class:`saelab.checkpoint.CheckpointError`): an unreadable, mismatched or refused
                checkpoint, or one from a different configuration or input scale; the message names the fix.
        """
        d = self.ckpt_dir
        if self.dist.is_main and not (d / ckpt.META).is_file():
            ckpt.convert_checkpoint(d)  # an old state.pt: safe loader only; refused files raise with the fix
        try:
            state = ckpt.read_checkpoint(d, roll_forward=self.dist.is_main)
        except FileNotFoundError:  # another rank's conversion removed state.pt between the checks
            state = ckpt.read_checkpoint(d)
        saved, want = _as_json(state["identity"]), _as_json(self.identity)
        if saved != want:
            diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
            raise ValueError(
                f"{self.ckpt_path} was written by a run with a different configuration {diff} (checkpoint, requested); "
                f"use another --out or delete {d} to start over"
            )
        if "scale" in state and float(state["scale"]) != float(self.scale):
            raise ValueError(
                f"{self.ckpt_path} was trained with input scale {state['scale']!r}, but the cache now gives {self.scale!r}: "
                f"its data changed since; use another --out or delete {d} to start over"
            )
        self.sae.load_state_dict(state["sae"])
        opt_state = state["opt"]
        self.opt.load_state_dict({**opt_state, "param_groups": _restore_tuples(opt_state["param_groups"],
                                                                                self.opt.state_dict()["param_groups"])})
        _match_state_layout(self.opt)
        self.sched.load_state_dict(state["sched"])
        self.since_fired, self.step = state["since_fired"].to(self.device), int(state["step"])
        self.gen.set_state(state["rng"])
        self.last_reg.update(state.get("last_reg", {}))
        if self.dist.is_main:
            for tmp in d.glob(".*.tmp"):  # left by a kill inside an atomic write
                tmp.unlink(missing_ok=True)
            (d / ckpt.PENDING).unlink(missing_ok=True)  # tensors of a checkpoint killed before its commit
            # rows logged after the checkpoint are logged again; a torn last line (kill inside the append) goes too
            _truncate_log(self.log_path, self.step, state.get("log_bytes"))

    def _checkpoint(self) -> None:
        """Write the resumable state as ``<out>/checkpoint/state.{safetensors,json}`` (main rank only)."""
        if not self.dist.is_main:
            return
        state = {
            "identity": self.identity, "sae": self.sae.state_dict(), "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(), "since_fired": self.since_fired, "step": self.step,
            "scale": self.scale, "rng": self.gen.get_state(), "last_reg": dict(self.last_reg),
            "log_bytes": self.log_path.stat().st_size if self.log_path.exists() else 0,
        }
        ckpt.write_checkpoint(self.ckpt_dir, state)

    def _forward(self, x: Tensor, y: Tensor, step: int) -> tuple[SAELoss, Tensor]:
        """The loss of one step on this rank's inputs ``x`` and targets ``y``: the SAE's own loss
        (:meth:`SAE.loss`) plus the regularizers due at ``step``; returns it with the dead-latent mask."""
        cfg, sae = self.cfg, self.sae
        dead = self.since_fired >= self.dead_tokens
        sparsity_scale = min(1.0, (step + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0
        out = sae.loss(x, y, dead=dead, weights=self.weights, sparsity_scale=sparsity_scale)
        loss = out.loss
        for spec in self.regs:
            term = spec.compute(step, out.code, sae.W_dec, self.gen)  # None off-schedule; else lambda * T * loss
            if term is not None:
                loss = loss + term
                self.reg_terms[spec.name] = (term.detach(), spec.coefficient * spec.every)
        return out._replace(loss=loss), dead

    def train_step(self, batch: _Batch) -> None:
        """One optimiser step on a global batch (already normalised); this rank steps on its shard ``batch.x``.

        Raises:
            ValueError: NaN/Inf in the batch (:func:`_check_finite_batch`: checked on the host copy of the global
                batch, so every rank stops alike, before any weight or file changes), or a non-finite loss
                (:meth:`_check_losses`).
        """
        cfg, sae, step = self.cfg, self.sae, self.step
        # before anything changes: a bad batch leaves the weights and the last checkpoint as they were
        _check_finite_batch(batch.host_x, cfg.cache, step, self.ckpt_path)
        if batch.host_y is not batch.host_x:
            _check_finite_batch(batch.host_y, cfg.target_cache or cfg.cache, step, self.ckpt_path)
        if step == 0:
            with torch.no_grad():  # from the global batch, so every rank starts identical
                x_all = batch.host_x.to(self.device)
                # b_dec sits in the output space: a transcoder's is the median of its targets
                y_all = batch.host_y.to(self.device) if sae.cfg.transcoder else x_all
                sae.b_dec.copy_(losses.geometric_median(y_all))
                sae.encoder.init_from_data_(x_all - sae.b_in)  # cosine encoders: norm-adaptive b (no-op for linear)
        x, y = batch.x, batch.y
        d_sae = sae.cfg.d_sae
        # the forward and the losses under autocast (cfg.autocast); backward and the optimiser step outside
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
            out, dead = self.forward(x, y, step)
        loss, code, x_hat, parts = out.loss, out.code, out.x_hat, out.parts
        self.loss_checks.append((step, torch.isfinite(loss.detach()), {k: v.detach() for k, v in parts.items()}))
        if self.device_type == "cpu":  # reading the flag costs nothing here: stop before the weights change
            self._check_losses()
        sae.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.average_gradients(sae.parameters())
        sae.remove_parallel_decoder_grad_()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            fired = self.dist.sum_(code.active_mask_counts(d_sae)) > 0
            self.since_fired += batch.host_x.shape[0]
            self.since_fired.masked_fill_(fired, 0)
            if isinstance(sae.activation, BatchTopK) and step >= self.threshold_start:
                sae.activation.update_threshold(code, beta=self.threshold_beta)
            self.dist.broadcast_buffers(sae)
        self.step = step = step + 1
        logs, saves = step % cfg.log_every == 0 or step == self.steps, step % cfg.checkpoint_every == 0 or step == self.steps
        if logs or saves:
            self._check_losses()
            for name, (term, weight) in self.reg_terms.items():  # read once per log line, not every step
                self.last_reg[name] = float(term) / weight if weight else 0.0
            self.reg_terms.clear()
        if logs:
            with torch.no_grad():
                elapsed = time.perf_counter() - self.t0
                self.last = {
                    "step": step, "tokens": step * cfg.batch_size, "loss": float(loss),
                    **{k: float(v) for k, v in parts.items()}, **self.last_reg,
                    "fvu": float(losses.fvu(y, x_hat)), "l0": float(code.l0().float().mean()),
                    "dead_frac": float(dead.float().mean()), "lr": self.sched.get_last_lr()[0],
                    "tokens_per_s": (step * cfg.batch_size - self.toks0) / max(elapsed, 1e-9),
                    **{k: v for k, v in sae.encoder.scale_stats().items() if isinstance(v, float)},  # learned a, b
                }
            self.log_rows.append(self.last)
        if saves:
            if self.dist.is_main:
                _append_log(self.log_path, self.log_rows)
            self.log_rows = []
            self._checkpoint()

    def _check_losses(self) -> None:
        """Raise if a loss since the last check was NaN/Inf, naming the first such step and its loss terms.

        On CPU this runs every step, before the backward pass. Elsewhere reading the flag makes the host wait for
        the device, so the flags pile up on the device and are read once per log line and before every checkpoint:
        a bad step then stops the run a few steps later, before anything is written, and the last checkpoint holds
        finite weights.

        Raises:
            ValueError: a non-finite loss; the message names the step, the loss terms and the fix.
        """
        checks, self.loss_checks = self.loss_checks, []
        if not checks or bool(torch.stack([ok for _, ok, _ in checks]).all()):
            return
        step, _, parts = next(c for c in checks if not bool(c[1]))
        raise ValueError(f"{self.out}: non-finite loss at step {step} ({ {k: float(v) for k, v in parts.items()} }); "
                         "lower --lr or check the cache for NaNs")

    def finish(self) -> TrainResult:
        """Fold the input scale into the weights and save the SAE (SAELens layout) and ``training_cfg.json``."""
        cfg, sae = self.cfg, self.sae
        if self.dist.is_main:
            _append_log(self.log_path, self.log_rows)
        self.log_rows = []
        seconds = time.perf_counter() - self.t0
        sae.eval()
        if self.scale != 1.0:
            sae.fold_input_scale_(self.scale)
        man = self.cache.manifest
        sae.cfg.extra.update({  # cfg.json describes how the SAE was made: regularizers and harvest-side masking too
            "train": {"tokens": self.steps * cfg.batch_size, "steps": self.steps, "norm_scale": self.scale, "cache": str(cfg.cache)},
            "regularizers": [str(r) for r in self.regs],
            "masking": {k: man[k] for k in ("mask_prob", "mask_token_id", "mask_string", "mask_seed") if k in man} or None,
            # a transcoder's target is its output hook; any other target cache is the denoising variant's
            **({"target_cache": cfg.target_cache} if sae.cfg.transcoder else {"denoising_target_cache": cfg.target_cache}),
        })
        if self.dist.is_main:
            save_sae(sae, self.out)
            write_json(self.out / "training_cfg.json", self.cfg_dict)
        self.dist.barrier()
        return TrainResult(sae_dir=self.out, steps=self.steps, tokens=self.steps * cfg.batch_size, seconds=seconds, final=self.last)


def _append_log(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _truncate_log(path: Path, step: int, log_bytes: int | None = None) -> None:
    """Cut ``train_log.jsonl`` back to what it held at the checkpoint of ``step``: to ``log_bytes`` when the
    checkpoint recorded it, else to the rows with ``step <= step`` (a line that does not parse, torn by a kill, is
    dropped)."""
    if not path.exists():
        return
    if log_bytes is not None:
        if path.stat().st_size > log_bytes:
            with open(path, "r+b") as f:
                f.truncate(log_bytes)
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            if line.strip() and json.loads(line)["step"] <= step:
                rows.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write(path, lambda p: p.write_text("".join(r + "\n" for r in rows)))
