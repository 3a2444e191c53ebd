"""``saelab compare``: one harvest per mask setting, many SAEs (arms x sweep points x seeds), every eval suite,
one report.

An experiment file (YAML/TOML/JSON; bundled: ``saelab/experiments/default.yaml``, ``paper.yaml``,
``paper_gpu.yaml``, chosen by name) names a model, a hook, a token budget, a shared base training config and named
*arms* that override it (any :class:`~saelab.train.TrainConfig` field, plus ``mask_prob`` for a masked harvest),
optionally with a ``sweep`` (the arm becomes the Cartesian grid of its sweep values), the seeds, the eval suites
and the paper claims to check.

Layout of the output folder::

    <out>/caches/clean, <out>/caches/masked_p0.15          shared activation caches (one per mask setting)
    <out>/arms/<arm>/seed<s>/                               an arm without a sweep: the SAE (SAELens layout),
                                                            train_log.jsonl, eval_<suite>.json
    <out>/arms/<arm>/k=16,c2r.lambda=0.5/seed<s>/           one point of an arm's sweep
    <out>/report/                                           report.md, report.html, plots/*.png, browsers/

Several hooks (``hook_name: [A, B, ...]``): one multi-hook harvest per mask setting (one LM forward per batch for
every hook; :mod:`saelab.activations.harvest`), each arm trained on every hook, the SAEs of all hooks trained in
the same passes over the caches (:func:`~saelab.train.train_many`, one stream per hook), and one report per hook::

    <out>/caches/clean/<hook>/, <out>/caches/masked_p0.15/<hook>/
    <out>/hooks/<hook>/arms/<arm>/seed<s>/, <out>/hooks/<hook>/report/
    <out>/report.md                                         links to the hooks' reports

Resumable: harvests and training resume from their checkpoints, finished SAEs (``training_cfg.json`` present)
and finished evals (``eval_<suite>.json`` present) are never redone.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .activations.harvest import HarvestConfig, harvest
from .config_files import flat_field_types, from_dict, read_config_file
from .data.split import DataConfig
from .devices import resolve_device
from .io import read_json, write_json
from .models.lm import DEFAULT_MODEL, load_lm
from .regularizers import REGULARIZERS, as_regularizer_spec
from .reports.compare import format_point, format_value, write_report
from .train import SHARED_DATA_FIELDS, TrainConfig, train_many

DEFAULT_EXPERIMENT = "default"
"""The bundled experiment ``saelab compare`` runs without ``--experiment``."""

MATCH_MODES = ("l0", "fve", "none")
"""How a claim pairs an arm with the baseline frontier: at the arm's L0, at the arm's FVE, or unmatched."""

DIRECTIONS = ("up", "down")

#: TrainConfig fields an experiment sets itself (per run) or that never change the weights: not sweepable
_NOT_SWEEPABLE = ("cache", "target_cache", "out", "seed", "threads", "progress", "checkpoint_every", "log_every")
#: TrainConfig fields the experiment sets per run (not allowed in base or an arm)
_SET_PER_RUN = ("cache", "target_cache", "out", "seed")
#: HarvestConfig fields the experiment sets itself (not allowed under ``harvest:``)
_HARVEST_OWN = ("model", "hook_name", "out", "n_tokens", "context_size", "mask_prob", "threads", "data", "device")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass
class Claim:
    """A paper's claim, checked by comparing one arm with a baseline arm (``saelab.stats``).

    Attributes:
        paper: the claim in words, with its source (shown in the report).
        arm: the arm the paper's method is applied to.
        expect: metric (``suite.field`` as in the eval JSON flattening, e.g.
            ``absorption.mean_absorption_fraction_score``) -> predicted direction, ``"up"`` or ``"down"``.
        baseline: the arm compared with (``None``: the experiment's ``baseline``). Every run of it (every sweep
            point and seed) forms the baseline frontier.
        match: ``"l0"`` (compare at the arm's L0 on the baseline's FVE-vs-L0 frontier), ``"fve"`` (at the arm's
            FVE) or ``"none"`` (plain difference of means).
        fve_tolerance: the reconstruction condition unless ``match == "fve"`` (where it holds by construction):
            the arm's FVE minus the baseline frontier's, at the matched point, must be >= ``-fve_tolerance``.
    """

    paper: str
    arm: str
    expect: dict[str, str]
    baseline: str | None = None
    match: str = "l0"
    fve_tolerance: float = 0.02


@dataclass
class ExperimentConfig:
    """An experiment: shared harvest, base SAE recipe, arms (optionally swept), seeds, evals and claims."""

    name: str = "default"
    """Experiment name (report title)."""
    out: str = "runs/compare"
    """Output folder."""
    model: str = DEFAULT_MODEL
    """Model alias, .gguf file or HF model directory."""
    hook_name: str | list[str] = "blocks.15.hook_resid_post"
    """Hook point, or a list of hook points (each named as the harvest names it: blocks.L.hook_resid_post or an HF
    module path below a block): every arm is then trained and evaluated on every hook, from one harvest per mask
    setting, with one report per hook."""
    n_tokens: int = 200_000
    """Activation rows harvested for the clean cache (and each masked cache unless n_tokens_masked is set)."""
    n_tokens_masked: int | None = None
    """Activation rows harvested per masked cache (default: n_tokens)."""
    context_size: int = 128
    """Harvest context length."""
    device: str = "cpu"
    """Device of every stage: the LM (harvests and evals), the SAEs' training (unless ``base`` or an arm sets
    ``device``) and the evals (unless ``eval_overrides`` sets it): cpu, cuda or cuda:N."""
    harvest: dict[str, Any] = field(default_factory=dict)
    """Other HarvestConfig fields for every harvest (e.g. batch_size, dtype)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text and held-out split (evaluation always uses the clean held-out documents)."""
    base: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields shared by every arm (e.g. activation, k, expansion_factor, n_tokens, lr), flat: the
    architecture keys go into ``TrainConfig.sae`` (saelab.config_files.nest_flat_keys)."""
    arms: dict[str, dict[str, Any]] = field(default_factory=lambda: {"baseline": {}})
    """Arm name -> overrides of ``base`` (TrainConfig fields, mask_prob for a masked harvest, and
    ``sweep: {key: [values]}`` over TrainConfig fields, mask_prob or ``<regularizer>.<param>``)."""
    baseline: str = "baseline"
    """The arm every other arm is compared with (unless a claim names another)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds; each arm (each sweep point) is trained once per seed."""
    evals: list[str] = field(default_factory=lambda: ["core"])
    """Eval suites run on every SAE (names from saelab.evals.EVAL_SUITES)."""
    eval_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Suite name -> config overrides (e.g. {core: {n_tokens: 8192}})."""
    eval_arms: dict[str, list[str]] = field(default_factory=dict)
    """Suite name -> arms it runs on (default: every arm); for expensive suites such as cos_inner."""
    claims: list[dict[str, Any]] = field(default_factory=list)
    """Paper claims to check: {paper, arm, baseline, match: l0|fve|none, expect: {metric: up|down}, fve_tolerance}."""
    train_together: int = 8
    """At most this many SAEs train in one pass over a cache (each batch is read once and every SAE steps on it);
    lower it when the SAEs do not fit in memory together."""
    browsers: bool = True
    """Build an HTML feature browser for each arm (first sweep point, first seed)."""
    threads: int | None = None
    """torch CPU threads."""


# ----------------------------------------------------------------------------------------------- experiment files

def hook_names(exp: ExperimentConfig) -> list[str]:
    """The experiment's hooks: ``[hook_name]``, or the list it gives."""
    return [exp.hook_name] if isinstance(exp.hook_name, str) else list(exp.hook_name)


def is_multi_hook_experiment(exp: ExperimentConfig) -> bool:
    """Whether ``hook_name`` lists several hooks (the multi-hook layout: ``<out>/hooks/<hook>/``)."""
    return len(hook_names(exp)) > 1


def hook_experiment(exp: ExperimentConfig, hook: str) -> ExperimentConfig:
    """The single-hook view of one hook of a multi-hook experiment (its folder ``<out>/hooks/<hook>``, where its
    SAEs and report live); with one hook, ``exp`` with ``hook_name`` that hook."""
    if not is_multi_hook_experiment(exp):
        return exp if exp.hook_name == hook else dataclasses.replace(exp, hook_name=hook)
    return dataclasses.replace(exp, hook_name=hook, out=str(Path(exp.out) / "hooks" / hook))


def bundled_experiments() -> list[str]:
    """Names of the experiment files shipped in the package (``saelab/experiments/<name>.yaml``)."""
    root = resources.files("saelab").joinpath("experiments")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


@contextmanager
def _experiment_file(name_or_path: str | Path) -> Iterator[Path]:
    """The experiment file as a real path: an existing file, else a bundled experiment's name.

    Raises:
        FileNotFoundError: neither an existing file nor a bundled name (lists the bundled names).
    """
    path = Path(name_or_path)
    if path.is_file():
        yield path
        return
    names = bundled_experiments()
    if str(name_or_path) not in names:
        raise FileNotFoundError(f"experiment {str(name_or_path)!r}: no such file, and not a bundled experiment; "
                                f"bundled: {', '.join(names)} (or give a YAML/TOML/JSON file)")
    with resources.as_file(resources.files("saelab").joinpath("experiments", f"{name_or_path}.yaml")) as p:
        yield p


def load_experiment(name_or_path: str | Path | None = None, **overrides: Any) -> ExperimentConfig:
    """Read an experiment: a YAML/TOML/JSON file, or the name of a bundled one (default: ``default``).

    Args:
        name_or_path: an existing file, else a name from :func:`bundled_experiments`.
        overrides: top-level fields to replace (``None`` values are ignored), e.g. ``out``.

    Raises:
        FileNotFoundError: no such file or bundled name.
        ValueError, KeyError: parse error or an invalid experiment (the message names the problem).
    """
    with _experiment_file(name_or_path or DEFAULT_EXPERIMENT) as path:
        data = read_config_file(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    exp = from_dict(ExperimentConfig, data)
    validate(exp)
    return exp


# ------------------------------------------------------------------------------------------------------ validation

def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as parsed from YAML/TOML/JSON) fits the simple type ``hint`` of a config field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list or hint is list:
        return isinstance(value, list)
    return True


def _check_train_value(where: str, key: str, value: Any) -> None:
    hint = flat_field_types(TrainConfig)[key]
    if not _type_ok(value, hint):
        extra = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) else ""
        raise ValueError(f"{where}: {key} = {value!r} is not a {getattr(hint, '__name__', hint)}{extra}")


def _check_mask_prob(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{where}: mask_prob = {value!r} must be a number in [0, 1)")


def point_name(point: Mapping[str, Any]) -> str:
    """``k=16,c2r.lambda=0.5`` for ``{"k": 16, "c2r.lambda": 0.5}`` (keys in sweep order); ``""`` for ``{}``: the
    sweep point in run labels and folder names."""
    return format_point(point, sep=",")


def _regularizer_names(specs: Sequence[Any]) -> list[str]:
    return [as_regularizer_spec(s).name for s in specs]


def _check_sweep(arm: str, over: Mapping[str, Any], base: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first problem of arm ``arm``'s ``sweep`` (see :class:`ExperimentConfig`)."""
    sweep = over["sweep"]
    where = f"arm {arm!r}: sweep"
    if not isinstance(sweep, Mapping) or not sweep:
        raise ValueError(f"{where} must be a non-empty mapping {{key: [values, ...]}}, e.g. sweep: {{k: [16, 32, 64]}}")
    train_fields = set(flat_field_types(TrainConfig))
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}.{key} must be a non-empty list of values, e.g. {key}: [16, 32], got {values!r}")
        if key in over:
            raise ValueError(f"{where}: {key!r} is both set and swept in the arm; drop one of them")
        if key in train_fields:
            if key in _NOT_SWEEPABLE:
                raise ValueError(f"{where}: {key!r} cannot be swept (the experiment sets it per run; "
                                 f"seeds go in `seeds`)")
            for v in values:
                _check_train_value(f"{where}.{key}", key, v)
        elif key == "mask_prob":
            for v in values:
                _check_mask_prob(f"{where}.{key}", v)
        elif "." in key:
            reg, param = key.split(".", 1)
            if reg not in REGULARIZERS:
                raise ValueError(f"{where}: {key!r} names unknown regularizer {reg!r}; "
                                 f"valid: {', '.join(REGULARIZERS.names())}")
            have = _regularizer_names(over.get("regularizers", base.get("regularizers", [])))
            if reg not in have:
                raise ValueError(f"{where}: {key!r} sweeps regularizer {reg!r}, which the arm does not have "
                                 f"(its regularizers: {have or 'none'}); add it to the arm's regularizers")
            valid = REGULARIZERS.get(reg).defaults
            if param not in valid:
                raise ValueError(f"{where}: {key!r}: unknown parameter {param!r} of {reg!r}; valid: {', '.join(valid)}")
        else:
            raise ValueError(f"{where}: unknown key {key!r}; valid: TrainConfig fields, mask_prob, "
                             f"or <regularizer>.<param> (e.g. c2r.lambda)")
        shown = [format_value(v) for v in values]
        dup = sorted({s for s in shown if shown.count(s) > 1})
        if dup:
            raise ValueError(f"{where}.{key}: values {dup} repeat (as printed with :g), so their labels and SAE "
                             f"folders would collide; give distinct values")
        bad = [s for s in shown if not _SAFE_NAME.match(s)]
        if bad:
            raise ValueError(f"{where}.{key}: values {bad} cannot be part of a folder name "
                             f"(use letters, digits, _ . + -)")


def validate(exp: ExperimentConfig) -> None:
    """Check an experiment before anything runs, so that a typo fails in a second, not after an hour of training.

    Raises:
        ValueError: an unknown or ill-typed field, a bad sweep (unknown key, empty list, sweep of a regularizer the
            arm does not have, repeated values), an unknown baseline/arm name, a bad claim, ... (named).
        KeyError: an unknown eval suite (lists the valid suites).
    """
    from .evals import EVAL_SUITES

    train_fields = set(flat_field_types(TrainConfig))
    if not exp.arms:
        raise ValueError("the experiment has no arms; add at least `arms: {baseline: {}}`")
    if "sweep" in exp.base:
        raise ValueError("base may not sweep: move the sweep into an arm (arms: {baseline: {sweep: {k: [16, 32]}}})")
    for name, over in {"base": exp.base, **exp.arms}.items():
        if name != "base" and not _SAFE_NAME.match(str(name)):
            raise ValueError(f"arm name {name!r} must be a folder name (letters, digits, _ . + -)")
        if not isinstance(over, Mapping):
            raise ValueError(f"arm {name!r}: expected a mapping of overrides (use {{}} for none), got {over!r}")
        bad = set(over) - train_fields - {"mask_prob", "sweep"}
        if bad:
            raise ValueError(f"arm {name!r}: unknown keys {sorted(bad)}; "
                             f"valid: TrainConfig fields, mask_prob and sweep")
        bad = set(over) & set(_SET_PER_RUN)
        if bad:
            raise ValueError(f"arm {name!r}: {sorted(bad)} are set by the experiment per run (seeds go in `seeds`)")
        for key, value in over.items():
            if key in train_fields:
                _check_train_value(f"arm {name!r}", key, value)
        if "mask_prob" in over:
            _check_mask_prob(f"arm {name!r}", over["mask_prob"])
        if "sweep" in over:
            _check_sweep(name, over, exp.base)
    if exp.baseline not in exp.arms:
        raise ValueError(f"baseline arm {exp.baseline!r} is not among the arms {list(exp.arms)}")
    hooks = hook_names(exp)
    if not hooks or len(set(hooks)) < len(hooks) or not all(isinstance(h, str) and h for h in hooks):
        raise ValueError(f"hook_name must be a hook name or a list of distinct hook names, got {exp.hook_name!r}")
    from .models.hooks import is_hook_pattern

    bad = [h for h in hooks if is_hook_pattern(h) or "/" in h]
    if bad:
        raise ValueError(f"hook_name: list the hooks one by one (no globs, ranges or slashes in an experiment), got {bad}")
    if not exp.seeds or len(set(exp.seeds)) < len(exp.seeds) or not all(isinstance(s, int) for s in exp.seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {exp.seeds!r}")
    for key in ("n_tokens", "n_tokens_masked", "train_together"):
        n = getattr(exp, key)
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"{key} must be a positive integer, got {n!r}")
    harvest_fields = {f.name for f in dataclasses.fields(HarvestConfig)}
    bad = set(exp.harvest) - (harvest_fields - set(_HARVEST_OWN))
    if bad:
        raise ValueError(f"harvest: keys {sorted(bad)} are unknown or set by the experiment itself; valid: "
                         f"{', '.join(sorted(harvest_fields - set(_HARVEST_OWN)))}")
    for suite in exp.evals:
        EVAL_SUITES.get(suite)  # raises KeyError listing the valid suites
    for suite, over in exp.eval_overrides.items():
        if suite not in exp.evals:
            raise ValueError(f"eval_overrides names suite {suite!r}, which is not in evals {exp.evals}")
        valid = {f.name for f in dataclasses.fields(EVAL_SUITES.get(suite).config_cls)} - {"sae"}
        bad = set(over) - valid
        if bad:
            raise ValueError(f"eval_overrides.{suite}: unknown keys {sorted(bad)}; valid: {', '.join(sorted(valid))}")
    for suite, arms in exp.eval_arms.items():
        if suite not in exp.evals:
            raise ValueError(f"eval_arms names suite {suite!r}, which is not in evals {exp.evals}")
        bad = [a for a in arms if a not in exp.arms]
        if bad:
            raise ValueError(f"eval_arms.{suite}: unknown arms {bad}; arms: {list(exp.arms)}")
    experiment_claims(exp)
    runs = plan(exp)
    for r in runs:
        _train_config(exp, r)  # applies every sweep point (regularizer parameters are checked here)


def experiment_claims(exp: ExperimentConfig) -> list[Claim]:
    """The experiment's claims as :class:`Claim` objects, ``baseline`` filled in with the experiment's default.

    Raises:
        ValueError: unknown or missing keys, an unknown arm or baseline, a claim of the baseline against itself,
            ``match`` not in :data:`MATCH_MODES`, a direction not up/down, a metric that is not ``suite.field`` of
            a suite in ``evals`` run on both arms, no ``core`` suite (the L0/FVE matching and the reconstruction
            condition need it), or a negative ``fve_tolerance``.
    """
    names = [f.name for f in dataclasses.fields(Claim)]
    required = [f.name for f in dataclasses.fields(Claim) if f.default is dataclasses.MISSING]
    out = []
    for i, c in enumerate(exp.claims, 1):
        where = f"claim {i}"
        if not isinstance(c, Mapping):
            raise ValueError(f"{where}: expected a mapping with keys {names}, got {c!r}")
        bad, missing = set(c) - set(names), [k for k in required if k not in c]
        if bad or missing:
            raise ValueError(f"{where}: unknown keys {sorted(bad)} / missing keys {missing}; "
                             f"valid keys: {', '.join(names)}")
        claim = Claim(**c)
        claim.baseline = claim.baseline or exp.baseline
        where = f"claim {i} ({claim.arm} vs {claim.baseline})"
        for role, arm in (("arm", claim.arm), ("baseline", claim.baseline)):
            if arm not in exp.arms:
                raise ValueError(f"{where}: {role} {arm!r} is not among the arms {list(exp.arms)}")
        if claim.arm == claim.baseline:
            raise ValueError(f"{where}: the arm is its own baseline")
        if claim.match not in MATCH_MODES:
            raise ValueError(f"{where}: match {claim.match!r} must be one of {', '.join(MATCH_MODES)}")
        if "core" not in exp.evals:
            raise ValueError(f"{where}: claims need the core suite in evals (L0 and FVE for matching and the "
                             f"reconstruction condition)")
        tol = claim.fve_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
            raise ValueError(f"{where}: fve_tolerance must be a number >= 0, got {claim.fve_tolerance!r}")
        if not isinstance(claim.expect, Mapping) or not claim.expect:
            raise ValueError(f"{where}: expect must map at least one metric to up/down, e.g. "
                             f"{{absorption.mean_absorption_fraction_score: down}}")
        for metric, direction in claim.expect.items():
            if direction not in DIRECTIONS:
                raise ValueError(f"{where}: {metric}: direction {direction!r} must be up or down")
            suite = str(metric).split(".", 1)[0]
            if "." not in str(metric) or suite not in exp.evals:
                raise ValueError(f"{where}: metric {metric!r} must be suite.field with a suite in evals {exp.evals}")
            for arm in (claim.arm, claim.baseline):
                if arm not in exp.eval_arms.get(suite, exp.arms):
                    raise ValueError(f"{where}: {metric!r} is not measured on arm {arm!r} (eval_arms.{suite})")
        out.append(claim)
    return out


# ------------------------------------------------------------------------------------------------------------ plan

@dataclass
class ArmRun:
    """One trained SAE of the experiment: an arm, one point of its sweep, one seed."""

    arm: str
    """The experiment's arm name, e.g. ``"c2r"``."""
    point: dict[str, Any]
    """This run's sweep values, e.g. ``{"k": 16}`` or ``{"c2r.lambda": 0.5}``; ``{}`` without a sweep."""
    seed: int
    sae_dir: Path
    """``<out>/arms/<arm>/seed<s>``, or ``<out>/arms/<arm>/<point_name>/seed<s>`` with a sweep (under
    ``<out>/hooks/<hook>/`` in a multi-hook experiment)."""
    cache: Path
    mask_prob: float
    hook: str = ""
    """The hook this SAE reads (``""``: the experiment's only hook)."""

    @property
    def label(self) -> str:
        """``"c2r"`` without a sweep, ``"c2r[c2r.lambda=0.5]"`` / ``"baseline[k=16]"`` with one (values with :g)."""
        return f"{self.arm}[{point_name(self.point)}]" if self.point else self.arm


def sweep_points(sweep: Mapping[str, Sequence[Any]] | None) -> list[dict[str, Any]]:
    """The Cartesian grid of a sweep, first key slowest: ``{k: [16, 32], a: [1, 2]}`` -> k=16,a=1; k=16,a=2; ...

    ``[{}]`` (one point, no values) for no sweep.
    """
    keys = list(sweep or {})
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep[k] for k in keys))]


def cache_tokens(exp: ExperimentConfig, mask_prob: float) -> int:
    """Activation rows harvested into the cache of ``mask_prob`` (0: the clean cache)."""
    return exp.n_tokens if not mask_prob else (exp.n_tokens_masked or exp.n_tokens)


def _cache_dir(exp: ExperimentConfig, mask_prob: float) -> Path:
    """The harvest folder of ``mask_prob``: the cache itself, or with several hooks the folder of their caches."""
    return Path(exp.out) / "caches" / (f"masked_p{mask_prob:g}" if mask_prob else "clean")


def _cache_label(run: ArmRun) -> str:
    """``clean`` / ``masked_p0.15``, with the hook in a multi-hook experiment (``clean/blocks.4.hook_resid_post``)."""
    return f"{run.cache.parent.name}/{run.cache.name}" if run.hook else run.cache.name


def plan(exp: ExperimentConfig) -> list[ArmRun]:
    """Every SAE of the experiment: arms in file order, then sweep points in grid order, then seeds.

    Raises:
        ValueError: two runs would share an SAE folder.
    """
    runs = []
    multi = is_multi_hook_experiment(exp)
    for hook in hook_names(exp):
        root = Path(hook_experiment(exp, hook).out) / "arms"
        for arm, over in exp.arms.items():
            for point in sweep_points(over.get("sweep")):
                p = float(point.get("mask_prob", over.get("mask_prob", exp.base.get("mask_prob", 0.0))))
                folder = root / arm / point_name(point) if point else root / arm
                cache = _cache_dir(exp, p) / hook if multi else _cache_dir(exp, p)
                for seed in exp.seeds:
                    runs.append(ArmRun(arm, dict(point), seed, folder / f"seed{seed}", cache, p, hook if multi else ""))
    dirs = [r.sae_dir for r in runs]
    if len(set(dirs)) < len(dirs):
        raise ValueError(f"two runs share an SAE folder: {sorted({str(d) for d in dirs if dirs.count(d) > 1})}")
    return runs


def first_runs(runs: Sequence[ArmRun]) -> dict[str, ArmRun]:
    """Arm -> its first run (first sweep point, first seed): the one that gets a feature browser."""
    out: dict[str, ArmRun] = {}
    for r in runs:
        out.setdefault(r.arm, r)
    return out


def _apply_regularizer_param(specs: Sequence[Any], reg: str, param: str, value: Any) -> list[Any]:
    """``specs`` with ``param`` of every ``reg`` spec set to ``value`` (e.g. ``c2r``, ``lambda``, 0.5), written back
    in the one-line form; other specs are returned unchanged.

    Raises:
        ValueError: no spec named ``reg``, or a bad value (from :meth:`RegularizerSpec.from_dict`).
    """
    out, hit = [], False
    for s in specs:
        spec = as_regularizer_spec(s)
        if spec.name == reg:
            d = spec.to_dict()
            d[param] = value
            s, hit = str(type(spec).from_dict(d)), True
        out.append(s)
    if not hit:
        raise ValueError(f"sweep key {reg}.{param}: the arm has no {reg!r} regularizer (regularizers: {list(specs)})")
    return out


def _train_config(exp: ExperimentConfig, run: ArmRun) -> TrainConfig:
    """The TrainConfig of one run: ``base``, then the arm's overrides, then the run's sweep point."""
    fields = {**exp.base, **exp.arms[run.arm]}
    fields.pop("sweep", None)
    fields.pop("mask_prob", None)
    for key, value in run.point.items():
        if key == "mask_prob":
            continue
        if "." not in key:
            fields[key] = value
        else:
            reg, param = key.split(".", 1)
            fields["regularizers"] = _apply_regularizer_param(fields.get("regularizers", []), reg, param, value)
    fields.setdefault("device", exp.device)  # the experiment's device unless base or the arm names one
    # flat architecture keys (k, activation, expansion_factor, ...) go into TrainConfig.sae
    return from_dict(TrainConfig, {**fields, "cache": str(run.cache), "out": str(run.sae_dir), "seed": run.seed,
                                   "threads": exp.threads})


def train_passes(exp: ExperimentConfig, runs: Sequence[ArmRun]) -> list[list[tuple[ArmRun, TrainConfig]]]:
    """Group ``runs`` into passes of :func:`~saelab.train.train_many`: runs of one harvest (one mask setting; every
    hook of it in a multi-hook experiment) that agree on every data field (``SHARED_DATA_FIELDS``: seed, batch
    size, token count, normalisation, ...) see the same batches of their caches, so each cache batch is read once
    for the whole group; groups hold at most ``train_together`` SAEs."""
    by_stream: dict[tuple, list[tuple[ArmRun, TrainConfig]]] = {}
    for r in runs:
        cfg = _train_config(exp, r)
        key = (r.mask_prob, *(str(getattr(cfg, f)) for f in SHARED_DATA_FIELDS))
        by_stream.setdefault(key, []).append((r, cfg))
    n = exp.train_together
    return [g[i:i + n] for g in by_stream.values() for i in range(0, len(g), n)]


def _eval_runs(exp: ExperimentConfig, runs: Sequence[ArmRun], suite: str) -> list[ArmRun]:
    arms = exp.eval_arms.get(suite, list(exp.arms))
    return [r for r in runs if r.arm in arms]


def _train_tokens(exp: ExperimentConfig, run: ArmRun, cfg: TrainConfig) -> int:
    return cfg.n_tokens or cache_tokens(exp, run.mask_prob)


def describe(exp: ExperimentConfig) -> str:
    """The resolved experiment as text (``saelab compare --plan``): caches with token counts, every SAE label and
    its seeds, the training passes, the eval suites and the claims, and the cost terms (tokens x SAEs).

    Nothing is loaded or run; finished SAEs and evals found under ``out`` are marked.
    """
    runs = plan(exp)
    cfgs = {id(r): _train_config(exp, r) for r in runs}
    lines = [f"experiment: {exp.name}",
             f"model {exp.model}, hook{'s' if is_multi_hook_experiment(exp) else ''} {', '.join(hook_names(exp))}, "
             f"context {exp.context_size}, device {exp.device}, out {exp.out}"]
    stages = sorted({r.mask_prob for r in runs})
    lines.append(f"caches ({len(stages)}):")
    for p in stages:
        d = _cache_dir(exp, p)
        kind = f"mask_prob {p:g}" if p else "clean"
        lines.append(f"  {d.name:<16} {cache_tokens(exp, p):>12,} tokens  {kind}"
                     f"  ({d})")
    labels: dict[str, list[ArmRun]] = {}
    for r in runs:
        labels.setdefault(f"{r.hook}: {r.label}" if r.hook else r.label, []).append(r)
    done = sum((r.sae_dir / "training_cfg.json").is_file() for r in runs)
    lines.append(f"SAEs ({len(runs)} = {len(labels)} configurations x {len(exp.seeds)} seeds; {done} already trained):")
    width = max(len(lab) for lab in labels)
    for lab, rs in labels.items():
        c = cfgs[id(rs[0])]
        regs = f", {'; '.join(map(str, c.regularizers))}" if c.regularizers else ""
        lines.append(f"  {lab:<{width}}  seeds {','.join(str(r.seed) for r in rs)}  {_cache_label(rs[0])}: "
                     f"{c.sae.activation} k={c.sae.k} "
                     f"{f'd_sae={c.sae.d_sae}' if c.sae.d_sae else format(c.sae.expansion_factor, 'g') + 'x'} {c.sae.encoder}"
                     f"{'' if c.normalize_activations else ' raw'}{regs}, "
                     f"{_train_tokens(exp, rs[0], c):,} training tokens")
    passes = train_passes(exp, runs)
    lines.append(f"training passes ({len(passes)}; at most {exp.train_together} SAEs each, "
                 f"each batch read once per pass):")
    for i, group in enumerate(passes, 1):
        r0, c0 = group[0]
        caches = list(dict.fromkeys(_cache_label(r) for r, _ in group))
        lines.append(f"  {i:>3}. {', '.join(caches)} seed {r0.seed}, {_train_tokens(exp, r0, c0):,} tokens: "
                     f"{len(group)} SAEs ({', '.join(r.label for r, _ in group)})")
    lines.append(f"evals ({len(exp.evals)} suites):")
    for suite in exp.evals:
        todo = _eval_runs(exp, runs, suite)
        have = sum((r.sae_dir / f"eval_{suite}.json").is_file() for r in todo)
        arms = exp.eval_arms.get(suite)
        over = exp.eval_overrides.get(suite)
        lines.append(f"  {suite:<16} {len(todo):>4} SAEs{' (' + ', '.join(arms) + ')' if arms else ''}"
                     f"{' ' + str(over) if over else ''}{f'; {have} done' if have else ''}")
    claims = experiment_claims(exp)
    lines.append(f"claims ({len(claims)}):")
    for c in claims:
        exp_s = ", ".join(f"{m} {d}" for m, d in c.expect.items())
        lines.append(f"  {c.arm} vs {c.baseline}, match {c.match}: {exp_s}  [{c.paper}]")
    harvested = sum(cache_tokens(exp, p) for p in stages)
    sae_tokens = sum(_train_tokens(exp, r, cfgs[id(r)]) for r in runs)
    read = sum(_train_tokens(exp, g[0][0], g[0][1]) * len({r.cache for r, _ in g}) for g in passes)
    n_evals = sum(len(_eval_runs(exp, runs, s)) for s in exp.evals)
    lines.append(f"cost terms: harvest {harvested:,} LM tokens; training {len(runs)} SAEs x their tokens = "
                 f"{sae_tokens:,} SAE-tokens ({read:,} cache rows read in {len(passes)} passes); "
                 f"evals {n_evals} (SAE, suite) runs")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------- run

def run_experiment(exp: ExperimentConfig) -> Path:
    """Run (or resume) the whole experiment and write the report (with several hooks, one per hook).

    Returns:
        Path of ``report.md`` (with several hooks, ``<out>/report.md``, which links to the hooks' reports).

    Raises:
        ValueError: ``exp.device`` is not a device this machine has (:func:`saelab.devices.resolve_device`), a hook
            of a multi-hook experiment not named as the harvest names it (the message gives the names), and
            everything the harvests, training and evals raise.
    """
    out = Path(exp.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "experiment.json", dataclasses.asdict(exp))
    runs = plan(exp)
    timings = _Timings(out / "timings.json")
    resolve_device(exp.device)  # a missing GPU is reported before the model loads
    # the harvests' LM precision (harvest: {lm_dtype: bf16} on a GPU) is the evals' too: they read the same activations
    lm = load_lm(exp.model, device=exp.device, dtype=exp.harvest.get("lm_dtype", "fp32"))
    hooks = hook_names(exp)
    if len(hooks) > 1:  # the caches are <harvest>/<canonical hook name>/: the experiment must use those names
        from .models.hooks import resolve_hook

        canonical = [resolve_hook(lm.model, h).hook_name for h in hooks]
        if canonical != hooks:
            raise ValueError(f"hook_name: name the hooks as the harvest does, {canonical} (got {hooks})")
    stages = sorted({r.mask_prob for r in runs})
    for i, p in enumerate(stages, 1):
        t = time.perf_counter()
        done = all(_cache_complete(c) for c in {r.cache for r in runs if r.mask_prob == p})  # every hook's cache
        print(f"[harvest {i}/{len(stages)}] {'masked p=' + format(p, 'g') if p else 'clean'}: {cache_tokens(exp, p):,} "
              f"tokens at {', '.join(hooks)}{' (done)' if done else ''}")
        # called even when done: it checks that the cache matches this configuration (with several hooks, one
        # forward per batch feeds every hook's cache)
        harvest(HarvestConfig(**exp.harvest, model=exp.model, hook_name=exp.hook_name, out=str(_cache_dir(exp, p)),
                              n_tokens=cache_tokens(exp, p), context_size=exp.context_size, mask_prob=p,
                              threads=exp.threads, device=exp.device, data=exp.data), lm=lm)
        if not done:
            timings.add(f"harvest_p{p:g}", time.perf_counter() - t)
    # SAEs that read the same cache with the same seed see the same batches: train them in one pass (train_many)
    todo = [r for r in runs if not (r.sae_dir / "training_cfg.json").is_file()]
    groups = train_passes(exp, todo)
    print(f"[train] {len(runs) - len(todo)} of {len(runs)} SAEs already trained; "
          f"{len(groups)} pass(es) over the caches for the rest")
    for i, group in enumerate(groups, 1):
        t = time.perf_counter()
        r0 = group[0][0]
        caches = ", ".join(dict.fromkeys(_cache_label(r) for r, _ in group))
        print(f"[train {i}/{len(groups)}] {', '.join(r.label for r, _ in group)} (seed {r0.seed}) from {caches}")
        train_many([cfg for _, cfg in group])
        timings.add(f"train_pass{i}_{_cache_dir(exp, r0.mask_prob).name}_seed{r0.seed}", time.perf_counter() - t)
    reports = []
    for hook in hooks:
        hook_runs = [r for r in runs if r.hook in ("", hook)]
        _evaluate(hook_experiment(exp, hook), hook_runs, lm, timings)
        reports.append(write_report(hook_experiment(exp, hook), hook_runs, lm=lm))
    return reports[0] if len(hooks) == 1 else _write_hook_index(exp, reports)


def _evaluate(exp: ExperimentConfig, runs: Sequence[ArmRun], lm, timings: _Timings) -> None:
    """Run every eval suite of ``exp`` (one hook's view, :func:`hook_experiment`) on the SAEs of ``runs``, all of
    that hook; finished evals are kept."""
    from .evals import EVAL_SUITES, LMActivationStore, run_suite

    store = LMActivationStore(lm.name, exp.hook_name)
    sae_b = str(first_runs(runs)[exp.baseline].sae_dir)  # the reference SAE of suites that compare two SAEs
    for suite in exp.evals:
        todo = _eval_runs(exp, runs, suite)
        for i, run in enumerate(todo, 1):
            target = run.sae_dir / f"eval_{suite}.json"
            where = f"{run.hook}: " if run.hook else ""
            print(f"[eval {suite} {i}/{len(todo)}] {where}{run.label} seed {run.seed}{' (done)' if target.is_file() else ''}")
            if target.is_file():
                continue
            t = time.perf_counter()
            cfg_cls = EVAL_SUITES.get(suite).config_cls
            over = dict(exp.eval_overrides.get(suite, {}))
            names = {f.name for f in dataclasses.fields(cfg_cls)}
            if "data" in names:
                over.setdefault("data", exp.data)
            over.setdefault("device", exp.device)
            if "sae_b" in names:
                over.setdefault("sae_b", sae_b)
            cfg = cfg_cls(**{**over, "sae": str(run.sae_dir)})
            run_suite(suite, cfg, lm=lm, store=store)
            timings.add(f"eval_{suite}", time.perf_counter() - t)


def _write_hook_index(exp: ExperimentConfig, reports: Sequence[Path]) -> Path:
    """``<out>/report.md`` of a multi-hook experiment: a link to each hook's report, with its claims' verdicts."""
    from .io import atomic_write

    out = Path(exp.out)
    lines = [f"# saelab compare: {exp.name}", "",
             f"Model `{exp.model}`, {len(reports)} hooks from one harvest per mask setting; one report per hook.", ""]
    for hook, rep_path in zip(hook_names(exp), reports):
        lines.append(f"- `{hook}`: [{rep_path.relative_to(out)}]({rep_path.relative_to(out)})")
        summary = rep_path.parent / "summary.json"
        for claim in (read_json(summary).get("claims", []) if summary.is_file() else []):
            lines.append(f"  - {claim.get('paper')} ({claim.get('arm')}): {claim.get('verdict')}")
    atomic_write(out / "report.md", lambda p: p.write_text("\n".join(lines) + "\n"))
    return out / "report.md"


class _Timings:
    """Wall-clock seconds per stage in ``timings.json``, written as each stage finishes and added across sittings:
    an interrupted or crashed run keeps the time of the work it finished, and a resumed run adds only the work it
    does (skipped stages cost nothing), so ``total`` is the work time of the whole experiment."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, stage: str, seconds: float) -> None:
        t = read_json(self.path) if self.path.is_file() else {}
        t[stage] = t.get(stage, 0.0) + seconds
        t["total"] = sum(v for k, v in t.items() if k not in ("total", "total_before_report"))
        t.pop("total_before_report", None)
        write_json(self.path, t)


def _cache_complete(path: Path) -> bool:
    from .activations.cache import ActivationCache

    try:
        ActivationCache.open(path)
        return True
    except Exception:  # noqa: BLE001 - missing, incomplete or corrupt: harvest() resumes or explains
        return False


@dataclass
class CompareConfig:
    """Run an experiment file: harvest, train every arm, sweep point and seed, evaluate, write the report."""

    experiment: str = DEFAULT_EXPERIMENT
    """Experiment: a YAML/TOML/JSON file, or a bundled name (default, paper, paper_gpu)."""
    out: str | None = None
    """Override the experiment's output folder."""
    threads: int | None = None
    """torch CPU threads."""
    device: str | None = None
    """Override the experiment's device (the LM, training and evals): cpu, cuda or cuda:N."""
    plan: bool = False
    """Print the resolved experiment (caches, every SAE, training passes, evals, claims) and exit; loads nothing."""


def run_compare(cfg: CompareConfig) -> Path | None:
    """CLI entry: load the experiment, then print its plan (``--plan``) or run it and print where the report is."""
    exp = load_experiment(cfg.experiment, out=cfg.out, threads=cfg.threads, device=cfg.device)
    if cfg.plan:
        print(describe(exp))
        return None
    report = run_experiment(exp)
    print(f"report: {report} and {report.with_suffix('.html')}")
    return report
