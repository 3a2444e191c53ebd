"""Train one SAE from an activation cache: one explicit loop, checkpointed and resumable.

Recipe (dictionary_learning / "saprmarks recipe", shared/reference/methods.md §1.3 and §3.2): activations
optionally scaled so that E||x||^2 = 1 (the factor is folded back into the weights on save);
``b_dec`` = geometric median of the first batch; ``W_enc = W_dec^T``; unit-norm decoder rows with the
parallel gradient component removed; Adam with linear warm-up, constant, then linear decay to 0 over the
last 20 % of steps; gradient-norm clipping; AuxK for dead latents (k_aux = d_in/2, coefficient 1/32).

A killed run resumes from ``<out>/checkpoint/state.pt``: model, optimiser, schedule, dead-latent counters,
RNG state and data position are restored, so the remaining batches are exactly those an uninterrupted run
would have seen.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import losses
from .activations.cache import ActivationCache
from .io import atomic_write, write_json
from .regularizers import as_regularizer_spec
from .sae.activations import BatchTopK, JumpReLU, MatryoshkaBatchTopK
from .sae.config import SAEConfig
from .sae.model import SAE
from .sae.saving import save_sae


@dataclass
class TrainConfig:
    """Training run of one SAE on a harvested activation cache."""

    cache: str = "runs/demo/cache"
    """Activation cache directory written by ``saelab harvest``."""
    target_cache: str | None = None
    """DENOISING VARIANT (not the masked-regularization paper's default): a paired clean cache (harvest
    --paired_clean_out) whose rows are the reconstruction targets of the masked cache's inputs."""
    out: str = "runs/demo/sae"
    """Output directory: the SAE (SAELens layout), ``train_log.jsonl`` and the resumable checkpoint."""
    activation: str = "topk"
    """Sparsifying activation: relu, topk, batchtopk, jumprelu or matryoshka_batchtopk."""
    matryoshka_fractions: list[float] = field(default_factory=lambda: [1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32])
    """matryoshka_batchtopk: fraction of the latents in each nested group (sum 1; the last takes the remainder)."""
    regularizers: list[str] = field(default_factory=list)
    """Extra losses (saelab.regularizers), e.g. c2r, c2r:lambda=5,every=5,alpha=1,chunk=8192, ortho:lambda=0.25; in a YAML file also mappings {name: c2r, lambda: 5}."""
    encoder: str = "linear"
    """Encoder scoring: linear, cosine_global, cosine_per_feature, cosine_base_delta, cosine_grouped, magnitude_bypass."""
    n_groups: int = 4
    """cosine_grouped: number of groups of contiguous latents sharing (a, b)."""
    cosine_init: str = "auto"
    """Cosine encoders: b init; auto = ln sqrt(d_in) unless mean ||x - b_dec|| differs from sqrt(d_in) by > 2x."""
    expansion_factor: float = 16.0
    """d_sae = expansion_factor * d_in (ignored when d_sae is set)."""
    d_sae: int | None = None
    """Number of latents; overrides expansion_factor."""
    k: int = 32
    """Active latents per token (topk) or mean active latents per token (batchtopk)."""
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
    jumprelu_init_threshold: float = 0.001
    """JumpReLU: initial threshold on the normalised scale (Rajamanoharan et al. 2024)."""
    jumprelu_bandwidth: float = 0.001
    """JumpReLU: straight-through-estimator kernel width on the normalised scale."""
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
    """Device for the SAE."""
    progress: bool = True
    """Show a progress bar with tokens/s."""


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


def _build(cfg: TrainConfig, cache: ActivationCache, steps: int) -> tuple[SAE, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    d_in = cache.d_in
    d_sae = cfg.d_sae or int(round(cfg.expansion_factor * d_in))
    man = cache.manifest
    sae_cfg = SAEConfig(
        d_in=d_in, d_sae=d_sae, activation=cfg.activation, k=cfg.k,
        jumprelu_init_threshold=cfg.jumprelu_init_threshold, jumprelu_bandwidth=cfg.jumprelu_bandwidth,
        encoder=cfg.encoder, n_groups=cfg.n_groups, cosine_init=cfg.cosine_init,
        matryoshka_fractions=list(cfg.matryoshka_fractions),
        model_name=man.get("model", ""), hook_name=man.get("hook_name", ""),
        context_size=int(man.get("context_size", 128)),
    )
    torch.manual_seed(cfg.seed)
    sae = SAE(sae_cfg).to(cfg.device)
    lr = cfg.lr if cfg.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    warmup = max(1, min(cfg.warmup_steps, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup, cfg.decay_start))
    return sae, opt, sched


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
    """Train an SAE on ``cfg.cache`` and save it to ``cfg.out``.

    Returns:
        :class:`TrainResult` with the SAE directory and run totals.

    Raises:
        FileNotFoundError / CacheMismatchError: from opening the cache.
        ValueError: a checkpoint in ``cfg.out`` was made with a different configuration (the message says
            to pick another ``--out`` or delete the checkpoint), or the loss became non-finite.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cache = ActivationCache.open(cfg.cache)
    target = None
    if cfg.target_cache:
        from .activations.harvest import check_paired_caches

        target = ActivationCache.open(cfg.target_cache)
        check_paired_caches(cache, target)
    n_tokens = cfg.n_tokens or cache.n_tokens
    steps = max(1, n_tokens // cfg.batch_size)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint" / "state.pt"
    regs = [as_regularizer_spec(r) for r in cfg.regularizers]  # spec errors before any work
    cfg_dict = asdict(cfg)
    cfg_dict["regularizers"] = [str(r) for r in regs]  # canonical form, so "c2r" and "c2r:lambda=5" resume alike
    identity = {k: v for k, v in cfg_dict.items() if k not in ("checkpoint_every", "log_every", "threads", "progress", "out")}

    sae, opt, sched = _build(cfg, cache, steps)
    matryoshka = isinstance(sae.activation, MatryoshkaBatchTopK)
    if matryoshka and sae.encoder.restores_norm:
        raise ValueError(f"matryoshka_batchtopk needs a linear decoder; encoder {cfg.encoder!r} rescales the reconstruction")
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    aux_k = cfg.aux_k or d_in // 2
    dead_tokens = cfg.dead_tokens or min(10_000_000, max(cfg.batch_size, n_tokens // 10))
    threshold_start = min(cfg.threshold_start_step, steps // 5)
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=cfg.device)
    step, scale = 0, _norm_scale(cache, cfg)
    log_path = out / "train_log.jsonl"

    if ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=False)
        if state["identity"] != identity:
            diff = {k: (state["identity"].get(k), v) for k, v in identity.items() if state["identity"].get(k) != v}
            raise ValueError(
                f"{ckpt_path} was written by a run with a different configuration {diff} (checkpoint, requested); "
                f"use another --out or delete {ckpt_path.parent} to start over"
            )
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        since_fired, step, scale = state["since_fired"], state["step"], state["scale"]
        torch.set_rng_state(state["rng"])
        _truncate_log(log_path, step)  # rows logged after the checkpoint are logged again
    elif log_path.exists():
        log_path.unlink()

    def checkpoint() -> None:
        state = {
            "identity": identity, "sae": sae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
            "since_fired": since_fired, "step": step, "scale": scale, "rng": torch.get_rng_state(),
        }
        atomic_write(ckpt_path, lambda p: torch.save(state, p))

    batches = cache.iter_batches(cfg.batch_size, seed=cfg.seed, epochs=None, start_batch=step)
    # the paired clean cache has the same shard sizes, so the same seed yields row-aligned batches
    targets = target.iter_batches(cfg.batch_size, seed=cfg.seed, epochs=None, start_batch=step) if target else None
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * cfg.batch_size, initial=step * cfg.batch_size, unit="tok", unit_scale=True, desc=f"train {cfg.activation}", dynamic_ncols=True)
    t0, toks0 = time.perf_counter(), step * cfg.batch_size
    log_rows: list[dict] = []
    last: dict = {}
    last_reg: dict[str, float] = {}  # latest unweighted value of each regularizer (computed every T steps)
    sae.train()
    while step < steps:
        x = next(batches).to(cfg.device, non_blocking=True) / scale
        y = next(targets).to(cfg.device, non_blocking=True) / scale if targets is not None else x
        if step == 0:
            with torch.no_grad():
                sae.b_dec.copy_(losses.geometric_median(x))
                sae.encoder.init_from_data_(x - sae.b_dec)  # cosine encoders: norm-adaptive b (no-op for linear)
        code, pre = sae.encode_code(x)
        if matryoshka:  # mean over nested prefixes; x_hat is the full reconstruction (one decode in total)
            rec = losses.matryoshka_reconstruction(y, code.values, sae.W_dec, sae.b_dec, sae.activation.group_sizes)
            x_hat, loss = rec.x_hat, rec.loss
            parts = {"matryoshka": rec.loss, "mse": rec.prefix_losses[-1]}
        else:
            x_hat = sae.decode_code(code)
            mse = losses.reconstruction_loss(y, x_hat)
            loss = mse
            parts = {"mse": mse}
        dead = since_fired >= dead_tokens
        if cfg.activation in ("topk", "batchtopk", "matryoshka_batchtopk") and cfg.aux_coefficient > 0:
            aux = losses.auxk_loss((y - x_hat).detach(), pre, dead, sae.W_dec, aux_k)
            loss = loss + cfg.aux_coefficient * aux
            parts["auxk"] = aux
        sparsity_scale = min(1.0, (step + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0
        if cfg.activation == "relu":
            l1 = losses.l1_penalty(code.values, sae.W_dec)
            loss = loss + sparsity_scale * cfg.l1_coefficient * l1
            parts["l1"] = l1
        elif cfg.activation == "jumprelu":
            assert isinstance(sae.activation, JumpReLU)
            l0 = sae.activation.l0(pre).mean()
            loss = loss + sparsity_scale * cfg.l0_coefficient * l0
            parts["l0_penalty"] = l0
        for spec in regs:
            term = spec.compute(step, code, sae.W_dec)  # None off-schedule; else lambda * T * loss
            if term is not None:
                loss = loss + term
                last_reg[spec.name] = float(term.detach()) / (spec.coefficient * spec.every) if spec.coefficient else 0.0
        if not torch.isfinite(loss):
            raise ValueError(f"non-finite loss at step {step} ({ {k: float(v) for k, v in parts.items()} }); lower --lr or check the cache for NaNs")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad_()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            fired = code.active_mask_counts(d_sae) > 0
            since_fired += x.shape[0]
            since_fired[fired] = 0
            if isinstance(sae.activation, BatchTopK) and step >= threshold_start:
                sae.activation.update_threshold(code)
        step += 1
        if bar is not None:
            bar.update(x.shape[0])
        if step % cfg.log_every == 0 or step == steps:
            with torch.no_grad():
                elapsed = time.perf_counter() - t0
                last = {
                    "step": step, "tokens": step * cfg.batch_size, "loss": float(loss),
                    **{k: float(v) for k, v in parts.items()}, **last_reg,
                    "fvu": float(losses.fvu(y, x_hat)), "l0": float(code.l0().float().mean()),
                    "dead_frac": float(dead.float().mean()), "lr": sched.get_last_lr()[0],
                    "tokens_per_s": (step * cfg.batch_size - toks0) / max(elapsed, 1e-9),
                    **{k: v for k, v in sae.encoder.scale_stats().items() if isinstance(v, float)},  # learned a, b
                }
            log_rows.append(last)
            if bar is not None:
                bar.set_postfix(fve=f"{1 - last['fvu']:.3f}", l0=f"{last['l0']:.1f}", dead=f"{last['dead_frac']:.2f}")
        if step % cfg.checkpoint_every == 0 or step == steps:
            _append_log(log_path, log_rows)
            log_rows = []
            checkpoint()
    if bar is not None:
        bar.close()
    _append_log(log_path, log_rows)
    seconds = time.perf_counter() - t0

    sae.eval()
    if scale != 1.0:
        sae.fold_input_scale_(scale)
    man = cache.manifest
    sae.cfg.extra.update({  # cfg.json describes how the SAE was made: regularizers and harvest-side masking too
        "train": {"tokens": steps * cfg.batch_size, "steps": steps, "norm_scale": scale, "cache": str(cfg.cache)},
        "regularizers": [str(r) for r in regs],
        "masking": {k: man[k] for k in ("mask_prob", "mask_token_id", "mask_string", "mask_seed") if k in man} or None,
        "denoising_target_cache": cfg.target_cache,
    })
    save_sae(sae, out)
    write_json(out / "training_cfg.json", cfg_dict)
    return TrainResult(sae_dir=out, steps=steps, tokens=steps * cfg.batch_size, seconds=seconds, final=last)


def _append_log(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, lambda p: p.write_text("".join(r + "\n" for r in rows)))
