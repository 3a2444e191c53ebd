"""The README's main job: bundled model + bundled text -> activation cache -> TopK SAE -> core eval.

Every stage is resumable: re-running the same command skips finished stages and resumes an interrupted
harvest or training run from its last checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .activations.harvest import DataConfig, HarvestConfig, harvest
from .evals.core import CoreEvalConfig, run_core_eval
from .io import write_json
from .models.lm import DEFAULT_MODEL, load_lm
from .report import metrics_table
from .train import TrainConfig, train


@dataclass
class DemoConfig:
    """End-to-end demo on the bundled model and text."""

    out: str = "runs/demo"
    """Output directory (cache/, sae/, results.json)."""
    model: str = DEFAULT_MODEL
    """Model alias, .gguf file or HF directory."""
    hook_name: str = "blocks.15.hook_resid_post"
    """Hook point (a middle layer of the 30-layer default model)."""
    n_tokens: int = 400_000
    """Activation rows to harvest for training."""
    train_tokens: int = 1_200_000
    """Training tokens (epochs over the cache = train_tokens / n_tokens)."""
    expansion_factor: float = 16.0
    """d_sae / d_in."""
    k: int = 32
    """TopK k."""
    batch_size: int = 2048
    """SAE batch size (tokens)."""
    lr: float = 1e-3
    """Adam learning rate (short runs need a larger one than the 2e-4 long-run default)."""
    eval_tokens: int = 8192
    """Held-out tokens for the core evaluation."""
    threads: int | None = None
    """torch CPU threads."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text selection and held-out split."""


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; print the metrics table and where everything was written.

    Returns:
        The results dict also written to ``<out>/results.json``.
    """
    out = Path(cfg.out)
    t0 = time.perf_counter()
    lm = load_lm(cfg.model)
    print(f"[1/3] harvest {cfg.n_tokens:,} tokens of {cfg.model} at {cfg.hook_name} over {', '.join(cfg.data.corpora)}")
    cache = harvest(
        HarvestConfig(model=cfg.model, hook_name=cfg.hook_name, out=str(out / "cache"), n_tokens=cfg.n_tokens, threads=cfg.threads, data=cfg.data),
        lm=lm,
    )
    t1 = time.perf_counter()
    sae_dir = out / "sae"
    print(f"[2/3] train TopK SAE: d_in={cache.d_in}, d_sae={int(cfg.expansion_factor * cache.d_in)}, k={cfg.k}, {cfg.train_tokens:,} tokens")
    train(TrainConfig(  # resumes from its checkpoint; a finished run is only re-saved
        cache=str(cache.path), out=str(sae_dir), activation="topk", expansion_factor=cfg.expansion_factor, k=cfg.k,
        n_tokens=cfg.train_tokens, batch_size=cfg.batch_size, lr=cfg.lr, threads=cfg.threads,
    ))
    t2 = time.perf_counter()
    print(f"[3/3] core evaluation on {cfg.eval_tokens:,} held-out tokens (CE/KL with the SAE spliced in)")
    metrics = run_core_eval(CoreEvalConfig(sae=str(sae_dir), n_tokens=cfg.eval_tokens, threads=cfg.threads, data=cfg.data), lm=lm)
    t3 = time.perf_counter()
    results = {
        "metrics": metrics.to_dict(),
        "timings_s": {"harvest": t1 - t0, "train": t2 - t1, "eval": t3 - t2, "total": t3 - t0},
        "cache": str(cache.path), "sae": str(sae_dir),
    }
    write_json(out / "results.json", results)
    print()
    print(metrics_table({"topk": metrics.to_dict()}))
    print()
    print(f"SAE (SAELens layout): {sae_dir}/cfg.json, {sae_dir}/sae_weights.safetensors")
    print(f"activation cache:     {cache.path} ({cache.n_tokens:,} tokens)")
    print(f"metrics:              {sae_dir}/eval_core.json, {out}/results.json")
    print(f"time: harvest {t1 - t0:.0f}s, train {t2 - t1:.0f}s, eval {t3 - t2:.0f}s, total {t3 - t0:.0f}s")
    return results

