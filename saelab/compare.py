"""``saelab compare``: one harvest per mask setting, many SAEs (arms x seeds), every eval suite, one report.

An experiment file (YAML/TOML/JSON, see ``experiments/default.yaml``) names a model, a hook, a token budget,
a shared base training config and named *arms* that override it (any :class:`~saelab.train.TrainConfig`
field, plus ``mask_prob`` for a masked harvest), the seeds, the eval suites and the paper claims to check.

Layout of the output folder::

    <out>/caches/clean, <out>/caches/masked_p0.15     shared activation caches (one per mask setting)
    <out>/arms/<arm>/seed<s>/                          the SAE (SAELens layout), train_log.jsonl, eval_<suite>.json
    <out>/report/                                      report.md, report.html, plots/*.png, browsers/<arm>/index.html

Resumable: harvests and training resume from their checkpoints, finished SAEs (``training_cfg.json`` present)
and finished evals (``eval_<suite>.json`` present) are never redone.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .activations.harvest import DataConfig, HarvestConfig, harvest
from .config_files import from_dict, read_config_file
from .io import read_json, write_json
from .models.lm import DEFAULT_MODEL, load_lm
from .train import SHARED_DATA_FIELDS, TrainConfig, train_many

DEFAULT_EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "default.yaml"


@dataclass
class Claim:
    """A paper's claim, checked by comparing an arm with the baseline.

    ``expect`` maps a metric (``suite.field`` as in the report table) to the direction the paper predicts:
    ``"down"`` or ``"up"``. The claim is *reproduced* when every metric moves in the predicted direction by more
    than the seed standard deviation (or at all, with one seed) and FVE drops by at most ``fve_tolerance``.
    """

    paper: str
    arm: str
    expect: dict[str, str]
    fve_tolerance: float = 0.02


@dataclass
class ExperimentConfig:
    """An experiment: shared harvest, base SAE recipe, arms, seeds, evals and claims."""

    name: str = "default"
    """Experiment name (report title)."""
    out: str = "runs/compare"
    """Output folder."""
    model: str = DEFAULT_MODEL
    """Model alias, .gguf file or HF model directory."""
    hook_name: str = "blocks.15.hook_resid_post"
    """Hook point."""
    n_tokens: int = 200_000
    """Activation rows harvested per cache (clean and each masked setting)."""
    context_size: int = 128
    """Harvest context length."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text and held-out split (evaluation always uses the clean held-out documents)."""
    base: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields shared by every arm (e.g. activation, k, expansion_factor, n_tokens, lr)."""
    arms: dict[str, dict[str, Any]] = field(default_factory=lambda: {"baseline": {}})
    """Arm name -> overrides of ``base`` (TrainConfig fields, plus mask_prob for a masked harvest)."""
    baseline: str = "baseline"
    """The arm every other arm is compared with."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds; each arm is trained once per seed."""
    evals: list[str] = field(default_factory=lambda: ["core"])
    """Eval suites run on every SAE (names from saelab.evals.EVAL_SUITES)."""
    eval_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Suite name -> config overrides (e.g. {core: {n_tokens: 8192}})."""
    eval_arms: dict[str, list[str]] = field(default_factory=dict)
    """Suite name -> arms it runs on (default: every arm); for expensive suites such as cos_inner."""
    claims: list[dict[str, Any]] = field(default_factory=list)
    """Paper claims to check: {paper, arm, expect: {metric: up|down}, fve_tolerance}."""
    train_together: int = 8
    """At most this many SAEs train in one pass over a cache (each batch is read once and every SAE steps on it);
    lower it when the SAEs do not fit in memory together."""
    browsers: bool = True
    """Build an HTML feature browser for each arm (first seed)."""
    threads: int | None = None
    """torch CPU threads."""


def load_experiment(path: str | Path | None = None, **overrides: Any) -> ExperimentConfig:
    """Read an experiment file (default: the repository's ``experiments/default.yaml``).

    Raises:
        FileNotFoundError, ValueError: missing file, parse error, or unknown keys (named).
    """
    data = read_config_file(path or DEFAULT_EXPERIMENT)
    data.update({k: v for k, v in overrides.items() if v is not None})
    exp = from_dict(ExperimentConfig, data)
    _validate(exp)
    return exp


def _validate(exp: ExperimentConfig) -> None:
    from .evals import EVAL_SUITES

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, over in {"base": exp.base, **exp.arms}.items():
        bad = set(over) - train_fields - {"mask_prob"}
        if bad:
            raise ValueError(f"arm {name!r}: unknown keys {sorted(bad)}; valid: TrainConfig fields and mask_prob")
    if exp.train_together < 1:
        raise ValueError(f"train_together must be >= 1, got {exp.train_together}")
    if exp.baseline not in exp.arms:
        raise ValueError(f"baseline arm {exp.baseline!r} is not among the arms {list(exp.arms)}")
    for suite in exp.evals:
        EVAL_SUITES.get(suite)  # raises KeyError listing the valid suites
    for c in exp.claims:
        Claim(**c)


@dataclass
class ArmRun:
    """One trained SAE of the experiment."""

    arm: str
    seed: int
    sae_dir: Path
    cache: Path
    mask_prob: float


def _cache_dir(exp: ExperimentConfig, mask_prob: float) -> Path:
    return Path(exp.out) / "caches" / (f"masked_p{mask_prob:g}" if mask_prob else "clean")


def plan(exp: ExperimentConfig) -> list[ArmRun]:
    """Every (arm, seed) SAE of the experiment, in training order."""
    runs = []
    for arm, over in exp.arms.items():
        p = float(over.get("mask_prob", exp.base.get("mask_prob", 0.0)))
        for seed in exp.seeds:
            runs.append(ArmRun(arm, seed, Path(exp.out) / "arms" / arm / f"seed{seed}", _cache_dir(exp, p), p))
    return runs


def _train_config(exp: ExperimentConfig, run: ArmRun) -> TrainConfig:
    fields = {**exp.base, **exp.arms[run.arm]}
    fields.pop("mask_prob", None)
    return TrainConfig(**{**fields, "cache": str(run.cache), "out": str(run.sae_dir), "seed": run.seed, "threads": exp.threads})


def run_experiment(exp: ExperimentConfig) -> Path:
    """Run (or resume) the whole experiment and write the report.

    Returns:
        Path of ``report.md``.
    """
    from .evals import EVAL_SUITES, LMActivationStore, run_suite
    from .report_compare import write_report

    out = Path(exp.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "experiment.json", dataclasses.asdict(exp))
    runs = plan(exp)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    lm = load_lm(exp.model)
    stages = sorted({r.mask_prob for r in runs})
    for i, p in enumerate(stages, 1):
        t = time.perf_counter()
        done = _cache_complete(_cache_dir(exp, p))
        print(f"[harvest {i}/{len(stages)}] {'masked p=' + format(p, 'g') if p else 'clean'}: {exp.n_tokens:,} tokens at "
              f"{exp.hook_name}{' (done)' if done else ''}")
        # called even when done: it checks that the cache matches this configuration
        harvest(HarvestConfig(model=exp.model, hook_name=exp.hook_name, out=str(_cache_dir(exp, p)), n_tokens=exp.n_tokens,
                              context_size=exp.context_size, mask_prob=p, threads=exp.threads, data=exp.data), lm=lm)
        if not done:
            timings[f"harvest_p{p:g}"] = time.perf_counter() - t
    # SAEs that read the same cache with the same seed see the same batches: train them in one pass (train_many)
    todo = [(r, _train_config(exp, r)) for r in runs if not (r.sae_dir / "training_cfg.json").is_file()]
    by_stream: dict[tuple, list[tuple[ArmRun, TrainConfig]]] = {}
    for r, cfg in todo:
        by_stream.setdefault(tuple(str(getattr(cfg, f)) for f in SHARED_DATA_FIELDS), []).append((r, cfg))
    groups = [g[i:i + exp.train_together] for g in by_stream.values() for i in range(0, len(g), exp.train_together)]
    print(f"[train] {len(runs) - len(todo)} of {len(runs)} SAEs already trained; {len(groups)} pass(es) over the caches for the rest")
    for i, group in enumerate(groups, 1):
        t = time.perf_counter()
        r0 = group[0][0]
        print(f"[train {i}/{len(groups)}] {', '.join(r.arm for r, _ in group)} (seed {r0.seed}) from {r0.cache.name}")
        train_many([cfg for _, cfg in group])
        timings[f"train_pass{i}_{r0.cache.name}_seed{r0.seed}"] = time.perf_counter() - t
    store = LMActivationStore(lm.name, exp.hook_name)
    for suite in exp.evals:
        arms = exp.eval_arms.get(suite, list(exp.arms))
        todo = [r for r in runs if r.arm in arms]
        for i, run in enumerate(todo, 1):
            target = run.sae_dir / f"eval_{suite}.json"
            print(f"[eval {suite} {i}/{len(todo)}] {run.arm} seed {run.seed}{' (done)' if target.is_file() else ''}")
            if target.is_file():
                continue
            t = time.perf_counter()
            cfg_cls = EVAL_SUITES.get(suite).config_cls
            over = dict(exp.eval_overrides.get(suite, {}))
            names = {f.name for f in dataclasses.fields(cfg_cls)}
            if "data" in names:
                over.setdefault("data", exp.data)
            if "sae_b" in names:
                over.setdefault("sae_b", str(_first(runs, exp.baseline).sae_dir))
            cfg = cfg_cls(**{**over, "sae": str(run.sae_dir)})
            run_suite(suite, cfg, lm=lm, store=store)
            timings[f"eval_{suite}"] = timings.get(f"eval_{suite}", 0.0) + time.perf_counter() - t
    if timings:  # only stages that did work are timed, so a resumed run keeps the first run's numbers
        timings["total_before_report"] = time.perf_counter() - t0
    prev = read_json(out / "timings.json") if (out / "timings.json").is_file() else {}
    write_json(out / "timings.json", {**prev, **timings})
    return write_report(exp, runs, lm=lm)


def _cache_complete(path: Path) -> bool:
    from .activations.cache import ActivationCache

    try:
        ActivationCache.open(path)
        return True
    except Exception:  # noqa: BLE001 - missing, incomplete or corrupt: harvest() resumes or explains
        return False


def _first(runs: list[ArmRun], arm: str) -> ArmRun:
    return next(r for r in runs if r.arm == arm)


@dataclass
class CompareConfig:
    """Run an experiment file: harvest, train every arm and seed, evaluate, write the report."""

    experiment: str | None = None
    """Experiment file (YAML/TOML/JSON); default: experiments/default.yaml of the repository."""
    out: str | None = None
    """Override the experiment's output folder."""
    threads: int | None = None
    """torch CPU threads."""


def run_compare(cfg: CompareConfig) -> Path:
    """CLI entry: load the experiment, run it, print where the report is."""
    exp = load_experiment(cfg.experiment, out=cfg.out, threads=cfg.threads)
    report = run_experiment(exp)
    print(f"report: {report} and {report.with_suffix('.html')}")
    return report
