"""One command from text to evaluated SAE: harvest -> train -> core eval (``saelab run``; ``saelab demo`` is the
README's main job: the defaults, a TopK SAE on the bundled model and text).

Any combination of the three methods is one command line, e.g. BatchTopK k=64 with a per-feature base+delta
cosine encoder, C²R lambda=5 and a masked harvest with p=0.15::

    saelab run --out runs/combo --activation batchtopk --k 64 --encoder cosine_base_delta \
        --regularizers c2r:lambda=5 --mask_prob 0.15

Masking only changes the *training* activations (a separate cache, ``<out>/cache_masked_p<p>``); the
evaluation always runs on clean held-out text. Every stage is resumable: re-running the same command skips
finished stages and resumes an interrupted harvest or training run from its last checkpoint.

With ``--stream`` the harvest runs on a background thread and training starts as soon as the first shards are
committed (:func:`saelab.pipeline.harvest_and_train`; :mod:`saelab.activations.stream`): same cache on disk, stream-order batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .activations.harvest import HarvestConfig
from .activations.stream import HarvestFailedError
from .config_files import flat_nested
from .data.split import DataConfig
from .devices import resolve_device
from .evals.core import CoreEvalConfig, run_core_eval
from .io import write_json
from .models.lm import DEFAULT_MODEL, load_lm
from .pipeline import harvest_and_train
from .reports.metrics import metrics_table
from .sae.config import SAEConfig
from .train import TrainConfig


@dataclass
class DemoConfig:
    """Harvest, train and evaluate one SAE (defaults: the README demo on the bundled model and text)."""

    out: str = "runs/demo"
    """Output directory (cache/, sae/, results.json)."""
    model: str = DEFAULT_MODEL
    """Model alias, .gguf file or HF directory."""
    hook_name: str = "blocks.15.hook_resid_post"
    """Hook point (a middle layer of the 30-layer default model)."""
    n_tokens: int = 300_000
    """Activation rows to harvest for training."""
    train_tokens: int = 1_000_000
    """Training tokens (epochs over the cache = train_tokens / n_tokens)."""
    sae: SAEConfig = flat_nested(SAEConfig)
    """Architecture of the SAE (activation, k, d_sae / expansion_factor, encoder, ...): flags ``--k 32``, config
    keys ``k: 32`` or ``sae: {k: 32}``; its d_in and metadata come from the harvested cache."""
    regularizers: list[str] = field(default_factory=list)
    """Regularizers, e.g. c2r (lambda 5, alpha 1, every 5) or c2r:lambda=5,alpha=1 or ortho:lambda=0.25."""
    mask_prob: float = 0.0
    """Masked regularization: probability of replacing each input token by "..." when harvesting training activations."""
    batch_size: int = 2048
    """SAE batch size (tokens)."""
    lr: float = 1e-3
    """Adam learning rate (short runs need a larger one than the 2e-4 long-run default)."""
    eval_tokens: int = 8192
    """Held-out tokens for the core evaluation."""
    threads: int | None = None
    """torch CPU threads."""
    device: str = "cpu"
    """Device of every stage: the LM (harvest and eval), the SAE's training and its evaluation (cpu, cuda, cuda:N)."""
    stream: bool = False
    """Overlap harvest and training: harvest on a background thread, train on each window of shards as soon as it
    is committed (stream order: epoch 0 in harvest order, windows of 2 shards shuffled within; the input scale from
    the first window). Same cache on disk; the SAE differs from a non-streamed run's only through that order."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text selection and held-out split."""


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; print the metrics table and where everything was written.

    Returns:
        The results dict also written to ``<out>/results.json``.

    Raises:
        ValueError: ``cfg.device`` is not a device this machine has (:func:`saelab.devices.resolve_device`), and
            everything the harvest, training and core eval raise.
    """
    out = Path(cfg.out)
    device = str(resolve_device(cfg.device))  # before loading anything: a missing GPU is reported first
    t0 = time.perf_counter()
    lm = load_lm(cfg.model, device=device)
    t_lm = time.perf_counter()
    masked = f" with masking p={cfg.mask_prob}" if cfg.mask_prob else ""
    cache_dir = out / (f"cache_masked_p{cfg.mask_prob:g}" if cfg.mask_prob else "cache")
    sae_dir = out / "sae"
    arch = cfg.sae
    extras = "".join(f", {x}" for x in ([f"encoder {arch.encoder}"] if arch.encoder != "linear" else []) + cfg.regularizers)
    size = f"d_sae {arch.d_sae}" if arch.d_sae else f"expansion {arch.expansion_factor:g}"
    both = " while training on its shards (--stream)" if cfg.stream else ""
    print(f"[1/3] harvest {cfg.n_tokens:,} tokens of {cfg.model} at {cfg.hook_name}{masked} over {', '.join(cfg.data.corpora)}{both}")
    print(f"[2/3] train {arch.activation} SAE: {size}, k={arch.k}{extras}, {cfg.train_tokens:,} tokens")
    hcfg = HarvestConfig(model=cfg.model, hook_name=cfg.hook_name, out=str(cache_dir), n_tokens=cfg.n_tokens,
                         threads=cfg.threads, data=cfg.data, mask_prob=cfg.mask_prob, device=device)
    tcfg = TrainConfig(  # resumes from its checkpoint; a finished run is only re-saved
        cache=str(cache_dir), out=str(sae_dir), sae=replace(arch), regularizers=list(cfg.regularizers),
        n_tokens=cfg.train_tokens, batch_size=cfg.batch_size, lr=cfg.lr, threads=cfg.threads, stream=cfg.stream,
        device=device,
    )
    try:
        cache, _, stage_s = harvest_and_train(hcfg, [tcfg], lm=lm, stream=cfg.stream)
    except HarvestFailedError as e:  # the harvest's own error, as a non-streamed run reports it
        if e.__cause__ is None:
            raise
        raise e.__cause__ from e
    t2 = time.perf_counter()
    print(f"[3/3] core evaluation on {cfg.eval_tokens:,} held-out tokens (CE/KL with the SAE spliced in)")
    ecfg = CoreEvalConfig(sae=str(sae_dir), n_tokens=cfg.eval_tokens, threads=cfg.threads, data=cfg.data, device=device)
    metrics = run_core_eval(ecfg, lm=lm)
    t3 = time.perf_counter()
    results = {
        "metrics": metrics.to_dict(),
        "timings_s": {"load_lm": t_lm - t0, **stage_s, "eval": t3 - t2, "total": t3 - t0},
        "stream": cfg.stream,
        "cache": str(cache.path), "sae": str(sae_dir),
    }
    write_json(out / "results.json", results)
    print()
    print(metrics_table({arch.activation if arch.encoder == "linear" else f"{arch.activation}+{arch.encoder}": metrics.to_dict()}))
    print()
    print(f"SAE (SAELens layout): {sae_dir}/cfg.json, {sae_dir}/sae_weights.safetensors")
    print(f"activation cache:     {cache.path} ({cache.n_tokens:,} tokens)")
    print(f"metrics:              {sae_dir}/eval_core.json, {out}/results.json")
    overlap = " (overlapped)" if cfg.stream else ""
    print(f"time: harvest {stage_s['harvest']:.0f}s, train {stage_s['train']:.0f}s{overlap}, harvest+train {stage_s['harvest_train']:.0f}s, "
          f"eval {t3 - t2:.0f}s, total {t3 - t0:.0f}s")
    return results

