"""The ``saelab compare`` report: paper claims judged at a matched operating point with paired 95 % CIs, one figure
per claim, the seed-to-seed noise floor, learned cosine exponents, metric tables, plots and feature browsers.

Written to ``<out>/report`` as ``report.md`` and ``report.html`` (same content, built from one list of blocks),
``plots/*.png``, ``summary.json`` and ``browsers/<arm>/index.html``. The statistics (matched comparison, CI,
verdict) come from :mod:`saelab.stats`; this module reads the eval files, builds the measurements and lays them out.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write, read_json, write_json
from ..stats import Comparison, Measurement, compare, seed_spread, verdict

HEADLINE = (
    "core.fve", "core.l0", "core.dead_frac", "core.ce_loss_score", "core.kl_score",
    "core.average_max_decoder_cosine_sim",
    "absorption.mean_absorption_fraction_score", "absorption.mean_full_absorption_score",
    "absorption.mean_num_split_features", "absorption.n_letters_qualifying",
    "sparse_probing.sae_top_1_test_accuracy", "sparse_probing.sae_top_2_test_accuracy",
    "sparse_probing.sae_top_5_test_accuracy", "sparse_probing.llm_top_1_test_accuracy",
    "sparse_probing.sae_test_accuracy", "sparse_probing.llm_test_accuracy",
    "ood_probing.sae_id_auc", "ood_probing.oracle_id_auc", "ood_probing.id_gap",
    "ood_probing.sae_ood_auc", "ood_probing.oracle_ood_auc", "ood_probing.ood_gap",
    "scr.scr_metric_threshold_20", "tpp.tpp_threshold_20_total_metric",
    "norm_quartiles.fve_q1", "norm_quartiles.fve_q4", "norm_quartiles.l2_ratio_q4", "norm_quartiles.firing_q4_q1_ratio",
    "cos_inner.win_rate_signed", "cos_inner.win_rate_abs",
    "autointerp.mean_score", "autointerp.chance_score",
)
"""Metrics shown in the headline and seed-spread tables when present (every metric appears in the full dump)."""

METRIC_NAMES = {
    "core.fve": "FVE", "core.l0": "L0", "core.dead_frac": "dead latents", "core.ce_loss_score": "CE-loss score",
    "core.kl_score": "KL score", "core.average_max_decoder_cosine_sim": "avg. max decoder cosine",
    "core.mse": "MSE", "core.cossim": "cosine(x, x̂)", "core.l2_ratio": "L2 ratio ‖x̂‖/‖x‖", "core.l1": "L1",
    "core.relative_reconstruction_bias": "relative reconstruction bias",
    "absorption.mean_absorption_fraction_score": "absorption fraction",
    "absorption.mean_full_absorption_score": "full absorption",
    "absorption.mean_num_split_features": "split features",
    "absorption.n_letters_qualifying": "letters qualifying (absorption)",
    "sparse_probing.sae_test_accuracy": "sparse probing, all SAE latents",
    "sparse_probing.llm_test_accuracy": "probing, LM activations",
    "ood_probing.sae_id_auc": "SAE probe AUC (in-distribution)",
    "ood_probing.oracle_id_auc": "oracle AUC (in-distribution)",
    "ood_probing.id_gap": "ID gap (oracle − SAE AUC)", "ood_probing.sae_ood_auc": "SAE probe AUC (OOD)",
    "ood_probing.oracle_ood_auc": "oracle AUC (OOD)", "ood_probing.ood_gap": "OOD gap (oracle − SAE AUC)",
    "norm_quartiles.fve_q1": "FVE, lowest-norm quartile", "norm_quartiles.fve_q4": "FVE, highest-norm quartile",
    "norm_quartiles.l2_ratio_q4": "L2 ratio, highest-norm quartile",
    "norm_quartiles.firing_q4_q1_ratio": "firings Q4 / Q1 (input norm)",
    "cos_inner.win_rate_signed": "cosine-vs-inner win rate (signed)",
    "cos_inner.win_rate_abs": "cosine-vs-inner win rate (|·|)",
    "autointerp.mean_score": "auto-interp score", "autointerp.chance_score": "auto-interp chance score",
}
"""Human names of metric keys (``suite.field`` as flattened from the eval JSON); unknown metrics keep their key."""

_TOPK_NAME = re.compile(r"^sparse_probing\.(sae|llm)_top_(\d+)_test_accuracy$")
_ABLATION_NAME = re.compile(r"^(scr\.scr_metric|tpp\.tpp)_threshold_(\d+)(_total_metric)?$")

PAPER_A = (
    ("Global a, Qwen3-8B L18, 500M tokens, raw activations (n = 3 seeds)", "0.258 ± 0.0007"),
    ("Per-feature a: mean over latents", "0.076"),
    ("Per-feature a: share of latents with |a| < 0.05", "23 %"),
    ("Any setting: largest a_i", "no a_i > 0.5"),
    ("Small-scale target for a learned global a", "a ∈ [0, 0.3]"),
)
"""Learned-exponent values reported by Naihin & Stambler 2026 ("Size Doesn't Matter: Cosine-Scored Sparse
Autoencoders", arXiv 2606.15054, Table 1 and Fig. 13), shown beside this experiment's learned ``a``."""

SMALL_A = 0.05
"""|a| below this counts as "cosine-like" (the paper's Fig. 13 threshold)."""

FRONTIER_KEYS = ("k",)
"""Sweep keys that move an SAE along its sparsity frontier: points differing only in these form one plotted line."""

VERDICT_CLASS = {"reproduced": "v-reproduced", "contradicted": "v-contradicted", "inconclusive": "v-inconclusive",
                 "condition met": "c-ok", "condition failed": "c-fail"}
"""CSS class of each verdict cell in the HTML report."""


def metric_name(metric: str) -> str:
    """Human name of a metric key, e.g. ``absorption.mean_absorption_fraction_score`` -> "absorption fraction";
    ``sparse_probing.sae_top_{k}_test_accuracy`` -> "sparse probing top-k", ``scr.scr_metric_threshold_{N}`` -> "SCR, N
    latents ablated" (TPP likewise); unknown keys are returned unchanged."""
    if metric in METRIC_NAMES:
        return METRIC_NAMES[metric]
    m = _TOPK_NAME.match(metric)
    if m:
        return f"sparse probing top-{m.group(2)}" if m.group(1) == "sae" else f"LM-activation probing top-{m.group(2)}"
    m = _ABLATION_NAME.match(metric)
    if m:
        return f"{'SCR' if m.group(1).startswith('scr') else 'TPP'}, {m.group(2)} latents ablated"
    return metric


def flatten(suite: str, result: dict[str, Any]) -> dict[str, float]:
    """Numeric leaves of an eval result: ``suite.field`` for numbers, ``suite.field.key`` for dicts of numbers."""
    out: dict[str, float] = {}
    for k, v in result.items():
        if k in ("timings_s", "config", "suite", "sae") or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[f"{suite}.{k}"] = float(v)
        elif isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                    out[f"{suite}.{k}.{kk}"] = float(vv)
    return out


# ------------------------------------------------------------------------------------------- items per metric


def _absorption_items(res: Mapping[str, Any], field_: str) -> dict[str, float] | None:
    col = {"mean_absorption_fraction_score": "absorption_fraction",
           "mean_full_absorption_score": "full_absorption_rate",
           "mean_num_split_features": "num_split_features"}.get(field_)
    rows = res.get("per_letter") or []
    if col is None or not all(col in r and r[col] is not None for r in rows):
        return None
    return {str(r["letter"]): float(r[col]) for r in rows}


def _probing_items(res: Mapping[str, Any], field_: str) -> dict[str, float] | None:
    per = res.get("per_dataset") or {}
    if not per or not all(isinstance(d, dict) and d.get(field_) is not None for d in per.values()):
        return None
    return {name: float(d[field_]) for name, d in per.items()}


def _ood_items(res: Mapping[str, Any], field_: str) -> dict[str, float] | None:
    """Per-task values: ``*_id_*`` fields read the task's ``id`` split; ``*_ood_*`` fields average its OOD splits
    (every split except ``id`` and ``_probe``), as ``saelab.evals.probing.run_ood_probing`` forms the means."""
    key = {"oracle_id_auc": "oracle_auc", "sae_id_auc": "sae_auc", "id_gap": "gap",
           "oracle_ood_auc": "oracle_auc", "sae_ood_auc": "sae_auc", "ood_gap": "gap"}.get(field_)
    per = res.get("per_task") or {}
    if key is None or not per:
        return None
    out = {}
    for task, splits in per.items():
        try:
            if "_id_" in field_ or field_ == "id_gap":
                out[task] = float(splits["id"][key])
            else:
                out[task] = float(np.mean([v[key] for s, v in splits.items() if s not in ("id", "_probe")]))
        except (KeyError, TypeError, ValueError):
            return None
    return out


def _scr_items(res: Mapping[str, Any], field_: str) -> dict[str, float] | None:
    """Per-(dataset, pair) values of an SCR key: the runs that have it (``saelab.evals.scr_tpp.run_scr`` averages
    those)."""
    rows = [r for r in res.get("per_pair") or [] if r.get(field_) is not None]
    if not rows:
        return None
    return {f"{r['dataset']}:{'/'.join(map(str, r['pair']))}": float(r[field_]) for r in rows}


ITEM_RULES: dict[str, Callable[[Mapping[str, Any], str], dict[str, float] | None]] = {
    "absorption": _absorption_items, "sparse_probing": _probing_items, "ood_probing": _ood_items,
    "scr": _scr_items, "tpp": _probing_items,
}
"""Suite -> function giving the per-item values (letters, datasets, tasks) of one of its metrics."""


def metric_items(metric: str, result: Mapping[str, Any]) -> dict[str, float] | None:
    """Per-item values of ``metric`` (``suite.field``) from its suite's eval result, for the paired bootstrap.

    Returned only when their plain mean equals the reported value within 1e-9 (else the metric is not a plain mean
    over those items and a bootstrap over them would test something else): None otherwise, or for suites without
    items (``ITEM_RULES``).
    """
    suite, _, field_ = metric.partition(".")
    rule = ITEM_RULES.get(suite)
    reported = result.get(field_)
    if rule is None or not isinstance(reported, (int, float)) or isinstance(reported, bool):
        return None
    items = rule(result, field_)
    if not items or not all(math.isfinite(v) for v in items.values()):
        return None
    return items if abs(float(np.mean(list(items.values()))) - float(reported)) <= 1e-9 else None


# ------------------------------------------------------------------------------------------------ run data


@dataclass
class RunData:
    """The eval results of one trained SAE (one arm sweep point, one seed)."""

    run: Any
    """The :class:`saelab.compare.ArmRun` (or any object with its fields)."""
    arm: str
    label: str
    point: dict[str, Any]
    seed: int
    results: dict[str, dict] = field(default_factory=dict)
    """Suite -> its ``eval_<suite>.json`` content."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Flattened numeric metrics (``suite.field``)."""

    def value(self, metric: str) -> float:
        """The metric's value, nan when missing."""
        return self.metrics.get(metric, float("nan"))


def run_label(run: Any) -> str:
    """The run's label (``ArmRun.label``: ``"c2r"`` or ``"c2r[c2r.lambda=0.5]"``), or its arm name."""
    return getattr(run, "label", None) or run.arm


def load_runs(runs: Sequence[Any]) -> list[RunData]:
    """Read every ``eval_<suite>.json`` in each run's ``sae_dir`` (missing files are simply absent)."""
    out = []
    for r in runs:
        d = RunData(r, r.arm, run_label(r), dict(getattr(r, "point", None) or {}), int(r.seed))
        for f in sorted(Path(r.sae_dir).glob("eval_*.json")):
            suite = f.stem[len("eval_"):]
            try:
                d.results[suite] = res = json.loads(f.read_text())
            except ValueError:
                continue
            d.metrics.update(flatten(suite, res))
        out.append(d)
    return out


def by_label(data: Sequence[RunData]) -> dict[str, list[RunData]]:
    """Runs grouped by label, in plan order."""
    out: dict[str, list[RunData]] = {}
    for d in data:
        out.setdefault(d.label, []).append(d)
    return out


@dataclass
class Stat:
    """Mean and sample standard deviation over seeds (std None with one seed)."""

    mean: float
    std: float | None
    n: int

    def __str__(self) -> str:
        return _num(self.mean) if self.std is None else f"{_num(self.mean)} ± {_spread(self.std, self.mean)}"


def stats_by_label(groups: Mapping[str, Sequence[RunData]]) -> dict[str, dict[str, Stat]]:
    """``{label: {metric: Stat over seeds}}`` (NaN values ignored)."""
    out: dict[str, dict[str, Stat]] = {}
    for label, rows in groups.items():
        out[label] = {}
        for m in sorted({m for r in rows for m in r.metrics}):
            vals = [r.metrics[m] for r in rows if m in r.metrics and math.isfinite(r.metrics[m])]
            if vals:
                out[label][m] = Stat(statistics.fmean(vals), seed_spread(vals), len(vals))
    return out


# --------------------------------------------------------------------------------------------------- claims


@dataclass
class ClaimRow:
    """One row of the claim table: a claim's expected metric at one arm sweep point, or its reconstruction
    condition (``role == "reconstruction"``: ΔFVE at the matched point, met when ≥ −``fve_tolerance``)."""

    claim: int
    paper: str
    arm: str
    baseline: str
    match: str
    label: str
    point: dict[str, Any]
    metric: str
    direction: str
    role: str
    comparison: Comparison | None
    verdict: str
    reason: str
    full_reason: str = ""


def _measurements(rows: Sequence[RunData], metric: str, match: str) -> tuple[list[Measurement], list[str]]:
    """Measurements of ``metric`` for runs; runs without core metrics (when matching on them) or without the metric
    are left out and named in the second list."""
    ms, missing = [], []
    for r in rows:
        l0, fve, v = r.value("core.l0"), r.value("core.fve"), r.value(metric)
        if match != "none" and not (math.isfinite(l0) and math.isfinite(fve)):
            missing.append(f"{r.label} seed {r.seed} has no core metrics (eval_core.json) and cannot be matched")
            continue
        if not math.isfinite(v):
            missing.append(f"{r.label} seed {r.seed} has no {metric}")
            continue
        suite = metric.partition(".")[0]
        ms.append(Measurement(r.seed, l0, fve, v, metric_items(metric, r.results.get(suite, {}))))
    return ms, missing


def _short_reason(c: Comparison, reason: str) -> str:
    """The verdict's reason without the estimate prefix (the table already shows Δ, CI, method and the point)."""
    est = f"Δ {c.metric} = {c.delta:+.4g} [{c.ci_low:+.4g}, {c.ci_high:+.4g}] ({c.method}; {c.matched_at})"
    out = reason.replace(est + " ", "the CI ").replace(est + ":", "").replace(est, "the CI")
    out = out.replace(f"Δ {c.metric} = {c.delta:+.4g} with no CI", "no CI")
    return out.strip(" :;") or reason


def _compare(arm_ms, base_ms, **kw) -> tuple[Comparison | None, str]:
    if not arm_ms:
        return None, "no arm run could be measured"
    if not base_ms:
        return None, "no baseline run could be measured"
    try:
        return compare(arm_ms, base_ms, **kw), ""
    except ValueError as e:  # e.g. match "none" against a baseline sweep: the message says which match to choose
        return None, str(e)


def evaluate_claim(index: int, claim: Mapping[str, Any], groups: Mapping[str, Sequence[RunData]],
                   default_baseline: str) -> list[ClaimRow]:
    """Rows of one claim ``{paper, arm, baseline, match, expect: {metric: up|down}, fve_tolerance}``: per arm sweep
    point, one row per expected metric then (match != "fve") the reconstruction-condition row.

    The baseline measurements are every run of the claim's baseline arm (all sweep points and seeds: its per-seed
    frontier); the arm measurements are the runs of one sweep point. A verdict needs the reconstruction condition
    (ΔFVE at the matched point ≥ −fve_tolerance, point estimate); an arm run without core metrics makes the row
    inconclusive.
    """
    arm, paper = claim["arm"], claim["paper"]
    base_arm = claim.get("baseline") or default_baseline
    match, tol = claim.get("match", "l0") or "l0", float(claim.get("fve_tolerance", 0.02))
    base_rows = [r for rows in groups.values() for r in rows if r.arm == base_arm]
    arm_labels = [lab for lab, rows in groups.items() if rows and rows[0].arm == arm]
    common = dict(claim=index, paper=paper, arm=arm, baseline=base_arm, match=match)
    if not arm_labels or not base_rows:
        why = f"arm {arm if not arm_labels else base_arm!r} has no runs"
        return [ClaimRow(**common, label=arm, point={}, metric=m, direction=d, role="claim", comparison=None,
                         verdict="inconclusive", reason=why, full_reason=why)
                for m, d in claim["expect"].items()]
    out: list[ClaimRow] = []
    for label in arm_labels:
        rows = groups[label]
        head = dict(**common, label=label, point=rows[0].point)
        recon_ok, recon_note, recon_row = True, "", None
        if match != "fve":
            a_ms, a_miss = _measurements(rows, "core.fve", match)
            b_ms, b_miss = _measurements(base_rows, "core.fve", match)
            c, err = _compare(a_ms, b_ms, metric="core.fve", direction="up", match=match)
            where = "at matched L0" if match == "l0" else "(unmatched)"
            if c is None or not math.isfinite(c.delta):
                recon_ok = False
                recon_note = f"ΔFVE {where} unavailable ({err or 'nothing paired'})"
            else:
                recon_ok = c.delta >= -tol
                ci = f" [{_sig(c.ci_low)}, {_sig(c.ci_high)}]" if math.isfinite(c.ci_low) else " (no CI)"
                recon_note = f"ΔFVE {where} {_sig(c.delta)}{ci} {'≥' if recon_ok else '<'} −{tol:g}"
            if a_miss:  # the condition cannot be checked on every arm seed; the claim rows are inconclusive anyway
                recon_note = f"{recon_note} on the seeds with core metrics ({len(a_miss)} without)"
            text = recon_note + ("; " + "; ".join(a_miss + b_miss) if a_miss or b_miss else "")
            met = recon_ok and not a_miss
            recon_row = ClaimRow(**head, metric="core.fve", direction="up", role="reconstruction", comparison=c,
                                 verdict="condition met" if met else "condition failed", reason=text, full_reason=text)
        for metric, direction in claim["expect"].items():
            a_ms, a_miss = _measurements(rows, metric, match)
            b_ms, b_miss = _measurements(base_rows, metric, match)
            c, err = _compare(a_ms, b_ms, metric=metric, direction=direction, match=match)
            if c is None:
                v, full = "inconclusive", err
                short = err
            else:
                v, full = verdict(c, reconstruction_ok=recon_ok, reconstruction_note=recon_note)
                short = _short_reason(c, verdict(c, reconstruction_ok=recon_ok)[1])
            if match != "fve":
                short += f"; reconstruction: {recon_note}"
            if a_miss:  # an arm run that cannot be measured or matched leaves the claim undecided
                v = "inconclusive"
                short = f"{'; '.join(a_miss)}, so the verdict is inconclusive; on the other seeds {short}"
            if b_miss:  # the comparison's own notes (dropped seeds, items) are in the verdict's reason already
                short += "; " + "; ".join(b_miss)
            out.append(ClaimRow(**head, metric=metric, direction=direction, role="claim", comparison=c, verdict=v,
                                reason=short, full_reason=full))
        if recon_row is not None:
            out.append(recon_row)
    return out


def claim_summary(claim: Mapping[str, Any], rows: Sequence[ClaimRow]) -> tuple[str, str]:
    """(overall verdict, one sentence) for a claim: each arm point is reproduced when every expected metric is,
    contradicted when any is contradicted (mixed when others are reproduced), else inconclusive."""
    per: dict[str, str] = {}
    for label in dict.fromkeys(r.label for r in rows):
        vs = [r.verdict for r in rows if r.label == label and r.role == "claim"]
        if vs and all(v == "reproduced" for v in vs):
            per[label] = "reproduced"
        elif "contradicted" in vs:
            per[label] = "mixed" if "reproduced" in vs else "contradicted"
        else:
            per[label] = "inconclusive"
    base, match = (rows[0].baseline, rows[0].match) if rows else ("?", "?")
    head = f"{claim['paper']} ({claim['arm']} vs {base}, matched {match})"
    points = {label: next(r.point for r in rows if r.label == label) for label in per}

    def detail(label: str) -> str:
        """Each metric's own verdict where an arm point's metrics disagree."""
        vs = [(metric_name(r.metric), r.verdict) for r in rows if r.label == label and r.role == "claim"]
        return "" if len({v for _, v in vs}) < 2 else " (" + "; ".join(f"{m}: {v}" for m, v in vs) + ")"

    if len(per) == 1 and not next(iter(points.values())):
        label, v = next(iter(per.items()))
        return v, f"{head}: {v}{detail(label)}."
    parts = []
    for v in ("reproduced", "contradicted", "mixed", "inconclusive"):
        where = [(format_point(points[lab]) or lab) + detail(lab) for lab, pv in per.items() if pv == v]
        if where:
            parts.append(f"{v} at {_and(where)}")
    overall = next(v for v in ("reproduced", "contradicted", "mixed", "inconclusive") if v in per.values()) \
        if len(set(per.values())) == 1 else "mixed"
    return overall, f"{head}: " + "; ".join(parts) + "."


def claim_glance(rows: Sequence[ClaimRow]) -> tuple[list[str], list[list[Any]]]:
    """One claim's rows pivoted for reading at a glance: one row per arm point, one column per expected metric
    (``Δ [95 % CI] verdict``) and, where the claim is matched on L0, a last column with the reconstruction condition.

    Args:
        rows: the rows :func:`evaluate_claim` returned for one claim.

    Returns:
        ``(header, body)``; the metric cells are :class:`Cell` objects classed by verdict.
    """
    metrics = list(dict.fromkeys(r.metric for r in rows if r.role == "claim"))
    directions = {r.metric: r.direction for r in rows if r.role == "claim"}
    recon = any(r.role == "reconstruction" for r in rows)
    header = ["arm point", "matched at", *[f"{metric_name(m)} ({directions[m]})" for m in metrics]]
    header += ["ΔFVE (condition)"] if recon else []

    def cell(r: ClaimRow | None) -> Any:
        if r is None:
            return "-"
        c = r.comparison
        if c is None or not math.isfinite(c.delta):  # e.g. the arm lies outside the baseline's frontier
            return Cell(f"not matched: {r.verdict}", VERDICT_CLASS.get(r.verdict, ""))
        ci = f" [{_sig(c.ci_low)}, {_sig(c.ci_high)}]" if math.isfinite(c.ci_low) else " (no CI)"
        return Cell(f"{_sig(c.delta)}{ci} {r.verdict}", VERDICT_CLASS.get(r.verdict, ""))

    body = []
    for label in dict.fromkeys(r.label for r in rows):
        mine = [r for r in rows if r.label == label]
        comp = next((r.comparison for r in mine if r.comparison is not None), None)
        at = comp.matched_at.split(" (")[0] if comp is not None else "-"
        if comp is not None and comp.out_of_range and "outside" not in at:
            at += " (outside the baseline's range)"
        line = [label, at, *[cell(next((r for r in mine if r.role == "claim" and r.metric == m), None))
                             for m in metrics]]
        if recon:
            line.append(cell(next((r for r in mine if r.role == "reconstruction"), None)))
        body.append(line)
    return header, body


def _and(xs: Sequence[str]) -> str:
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def format_value(value: Any) -> str:
    """A sweep value as it appears in labels, folder names and the report: numbers with ``:g`` (0.5, 16, 1e-05),
    everything else (booleans included) with ``str``."""
    return format(value, "g") if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def format_point(point: Mapping[str, Any], sep: str = ", ") -> str:
    """``k=16, c2r.lambda=0.5`` for ``{"k": 16, "c2r.lambda": 0.5}`` (keys in sweep order); ``""`` for ``{}``."""
    return sep.join(f"{k}={format_value(v)}" for k, v in point.items())


# --------------------------------------------------------------------------------------------- learned a


def learned_a(sae_dir: Path) -> dict[str, Any] | None:
    """Per-latent learned norm exponent ``a`` of a cosine-scored SAE, read from ``sae_weights.safetensors``.

    ``encoder.a`` is a scalar (global), ``(d_sae,)`` (per-feature) or ``(G,)`` (grouped: latent ``i`` uses group
    ``min(i // (d_sae // G), G - 1)``); base+delta stores ``encoder.a_base`` and ``encoder.delta`` with
    ``a_i = a_base + delta_i`` (Naihin & Stambler 2026, arXiv 2606.15054, Fig. 1 and Fig. 10).

    Returns:
        ``{encoder, n, mean, std, min, max, frac_small}`` over latents (``std`` the population std over latents,
        0 for a global ``a``; ``frac_small`` the share with ``|a| < 0.05``), or None for SAEs without ``a``.
    """
    from safetensors import safe_open

    from ..sae.saving import CFG_FILENAME, WEIGHTS_FILENAME

    path = Path(sae_dir) / WEIGHTS_FILENAME
    if not path.is_file():
        return None
    with safe_open(str(path), framework="np") as f:
        keys = set(f.keys())
        t = {k: f.get_tensor(k) for k in ("encoder.a", "encoder.a_base", "encoder.delta") if k in keys}
    if "encoder.a_base" in t and "encoder.delta" in t:
        a = float(t["encoder.a_base"].reshape(())) + t["encoder.delta"].reshape(-1)
    elif "encoder.a" in t:
        a = t["encoder.a"].reshape(-1)
    else:
        return None
    cfg_path = Path(sae_dir) / CFG_FILENAME
    cfg = (read_json(cfg_path).get("saelab") or {}).get("config", {}) if cfg_path.is_file() else {}
    d_sae, enc = int(cfg.get("d_sae", a.size)), str(cfg.get("encoder", "cosine"))
    if a.size < d_sae:  # global or grouped: expand the 1 or G values to the d_sae latents
        a = a[np.minimum(np.arange(d_sae) // (d_sae // a.size), a.size - 1)]
    a = a.astype(np.float64)
    return {"encoder": enc, "n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "max": float(a.max()), "frac_small": float((np.abs(a) < SMALL_A).mean())}


def _normalised(sae_dir: Path) -> str:
    f = Path(sae_dir) / "training_cfg.json"
    if not f.is_file():
        return "unknown"
    v = read_json(f).get("normalize_activations")
    return "unknown" if v is None else ("yes" if v else "no (raw)")


# ------------------------------------------------------------------------------------------------ plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = "osD^v<>Pp*hX"


def _series(groups: Mapping[str, Sequence[RunData]], arm: str) -> dict[str, list[str]]:
    """Labels of ``arm`` grouped into plotted lines: points that differ only in ``FRONTIER_KEYS`` share a line."""
    out: dict[str, list[str]] = {}
    for label, rows in groups.items():
        if rows and rows[0].arm == arm:
            rest = {k: v for k, v in rows[0].point.items() if k not in FRONTIER_KEYS}
            out.setdefault(f"{arm} [{format_point(rest)}]" if rest else arm, []).append(label)
    return out


def _xy(rows: Sequence[RunData], xm: str, ym: str) -> tuple[float, float, float, float] | None:
    """Mean and seed std of x and y over the seeds that have both (std 0 with one seed)."""
    pts = [(r.value(xm), r.value(ym)) for r in rows]
    pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
    if not pts:
        return None
    xs, ys = zip(*pts)
    return (statistics.fmean(xs), seed_spread(xs) or 0.0, statistics.fmean(ys), seed_spread(ys) or 0.0)


def _draw_frontier(ax, groups, arms: Sequence[str], xm: str, ym: str, colors: Mapping[str, Any],
                   series_colors: Sequence[Any] | None = None) -> bool:
    """Draw each arm's lines (see :func:`_series`) on ``ax``: one colour per arm and a marker per line, or with
    ``series_colors`` one colour per non-baseline line (the first arm keeps its colour). Returns whether anything
    was drawn."""
    drawn, n_series = False, 0
    for i_arm, arm in enumerate(arms):
        for j, (name, labels) in enumerate(_series(groups, arm).items()):
            color = colors[arm]
            if series_colors is not None and i_arm > 0:
                color, n_series = series_colors[n_series % len(series_colors)], n_series + 1
            pts = []
            for lab in labels:
                p = _xy(groups[lab], xm, ym)
                if p is not None:
                    pts.append((*p, groups[lab][0].point))
            if not pts:
                continue
            pts.sort(key=lambda p: p[0])
            x, xe, y, ye, points = zip(*pts)
            ax.errorbar(x, y, xerr=xe, yerr=ye, fmt=("-" if len(pts) > 1 else "") + _MARKERS[j % len(_MARKERS)],
                        color=color, label=name, capsize=3, markersize=5, linewidth=1.2, elinewidth=0.8)
            for xi, yi, pt in zip(x, y, points):
                tag = format_point({k: pt[k] for k in FRONTIER_KEYS if k in pt})
                if tag and len(pts) > 1:
                    ax.annotate(tag, (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=6, color=color)
            drawn = True
    return drawn


def _log_x(ax) -> None:
    """Log-scale x axis with plain tick labels (16, 20, 30 rather than 2x10^1); minor ticks are labelled only
    when the data span less than ~1.5 decades, where they do not crowd."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    lo, hi = ax.get_xlim()
    ax.xaxis.set_minor_formatter(plain if hi / max(lo, 1e-12) < 30 else NullFormatter())
    ax.tick_params(axis="x", which="both", labelsize=8)


def _arm_colors(plt, arms: Sequence[str], baseline: str) -> dict[str, Any]:
    others = [a for a in arms if a != baseline]
    cols = {a: plt.cm.tab10((i + 1) % 10) for i, a in enumerate(others)}
    cols[baseline] = "#222222"
    return cols


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def claim_figure(claim: Mapping[str, Any], groups, baseline: str, colors, path: Path) -> bool:
    """One figure for a claim: a panel per expected metric plus FVE, metric vs L0 (log x) of the claim's baseline
    and arm, or vs FVE when the claim matches FVE (the FVE panel is always vs L0); points are means over seeds with
    seed-std error bars in both axes. Returns False when nothing could be drawn."""
    plt = _plt()
    match = claim.get("match", "l0") or "l0"
    metrics = list(claim["expect"]) + (["core.fve"] if "core.fve" not in claim["expect"] else [])
    arms = [baseline, claim["arm"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.9), squeeze=False)
    drawn = False
    for ax, m in zip(axes[0], metrics):
        xm = "core.fve" if match == "fve" and m != "core.fve" else "core.l0"
        drawn |= _draw_frontier(ax, groups, arms, xm, m, colors, [plt.cm.tab10(i) for i in (1, 0, 2, 3, 4, 6, 8, 9)])
        if xm == "core.l0":
            _log_x(ax)
        ax.set_xlabel("L0 (active latents per token, log scale)" if xm == "core.l0" else "FVE (held-out)")
        direction = claim["expect"].get(m)
        ax.set_ylabel(metric_name(m) + (f"  (claim: {direction})" if direction else ""))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{claim['paper']}: {claim['arm']} vs {baseline} (matched {match}; mean ± seed std)", fontsize=10)
    if drawn:
        _save(plt, fig, path)
    else:
        plt.close(fig)
    return drawn


def _plots(exp, groups, arms: Sequence[str], colors, plot_dir: Path) -> list[tuple[str, str]]:
    plt = _plt()
    made: list[tuple[str, str]] = []

    def save(fig, name: str, title: str) -> None:
        _save(plt, fig, plot_dir / name)
        made.append((title, f"plots/{name}"))

    first = {lab: min(rows, key=lambda r: r.seed) for lab, rows in groups.items() if rows}
    logs = {lab: _read_log(Path(r.run.sae_dir) / "train_log.jsonl") for lab, r in first.items()}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    label_colors = _label_colors(plt, first)
    for lab, rows in logs.items():
        if rows and "fvu" in rows[-1]:
            ax.plot([r["tokens"] for r in rows], [1 - r["fvu"] for r in rows], label=lab, color=label_colors[lab])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training-batch FVE")
    ax.set_ylim(bottom=0)
    if ax.lines:
        ax.legend(fontsize=7)
        save(fig, "training_curves.png", "Training curves (first seed)")
    else:
        plt.close(fig)
    cos_logs = {lab: rows for lab, rows in logs.items() if rows and "a_mean" in rows[-1]}
    if cos_logs:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for lab, rows in cos_logs.items():
            t, c = [r["tokens"] for r in rows], colors[first[lab].arm]
            ax.plot(t, [r["a_mean"] for r in rows], label=f"{lab} mean a", color=c)
            if "a_min" in rows[-1] and "a_max" in rows[-1]:
                ax.fill_between(t, [r["a_min"] for r in rows], [r["a_max"] for r in rows], color=c, alpha=0.15)
        ax.axhspan(0, 0.3, color="#16a34a", alpha=0.06, label="paper's small-scale target a ∈ [0, 0.3]")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("learned a (band: min..max over latents)")
        ax.legend(fontsize=7)
        save(fig, "learned_a.png", "Learned norm exponent a over training (cosine arms, first seed)")
    for plot in (_plot_probing, _plot_absorption, _plot_quartiles):
        item = plot(plt, first, colors)
        if item is not None:
            save(*item)
    return made


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _grouped_bars(plt, categories: list[str], series: dict[str, list[float]], colors: Mapping[str, Any], ylabel: str,
                  figsize=(9, 4)):
    fig, ax = plt.subplots(figsize=figsize)
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (lab, vals) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(categories))], vals, width=width, label=lab, color=colors.get(lab))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(categories))])
    ax.set_xticklabels(categories, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return fig


def _label_colors(plt, first: Mapping[str, RunData]) -> dict[str, Any]:
    return {lab: plt.cm.tab20(i % 20) for i, lab in enumerate(first)}


def _per_item_bars(plt, first, per: Mapping[str, Mapping[str, float]], ylabel: str):
    """Grouped bars of one value per item (dataset, letter) and arm point; ``None`` when no arm has an item."""
    cats = sorted({c for v in per.values() for c in v})
    if not cats:
        return None
    return _grouped_bars(plt, cats, {a: [per[a].get(c, float("nan")) for c in cats] for a in per},
                         _label_colors(plt, first), ylabel)


def _plot_probing(plt, first, colors):
    per = {lab: {d: v.get("sae_top_1_test_accuracy", float("nan"))
                 for d, v in (r.results["sparse_probing"].get("per_dataset") or {}).items()}
           for lab, r in first.items() if "sparse_probing" in r.results}
    fig = _per_item_bars(plt, first, per, "SAE top-1 probe accuracy")
    title = "Sparse probing (top-1 latent) per dataset (first seed)"
    return None if fig is None else (fig, "sparse_probing_per_task.png", title)


def _plot_absorption(plt, first, colors):
    per = {lab: {row["letter"]: row.get("absorption_fraction", float("nan"))
                 for row in r.results["absorption"].get("per_letter", [])}
           for lab, r in first.items() if "absorption" in r.results}
    fig = _per_item_bars(plt, first, per, "mean absorption fraction")
    return None if fig is None else (fig, "absorption_per_letter.png", "Absorption per letter (first seed)")


def _plot_quartiles(plt, first, colors):
    per = {lab: [b.get("firing_frac", float("nan")) for b in r.results["norm_quartiles"].get("bins", [])]
           for lab, r in first.items() if r.results.get("norm_quartiles", {}).get("bins")}
    if not per:
        return None
    cats = [f"Q{i + 1}" for i in range(max(len(v) for v in per.values()))]
    fig = _grouped_bars(plt, cats, per, _label_colors(plt, first), "fraction of latent firings", figsize=(6, 4))
    return fig, "norm_quartile_firing.png", "Latent firings per input-norm quartile (first seed)"


# ----------------------------------------------------------------------------------------- document blocks


@dataclass
class Cell:
    """A table cell with an HTML class (verdict colouring)."""

    text: str
    cls: str = ""

    def __str__(self) -> str:
        return self.text


Block = tuple
"""A document block: ``("h1"|"h2"|"p", text)``, ``("bullets", texts[, classes])``, ``("table", header, rows[, class])``,
``("figure", title, src)`` or ``("links", [(text, href)])``; rendered to Markdown and to HTML."""


def _num(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"


def _spread(sd: float | None, mean: float = 1.0) -> str:
    """A seed std with 2 significant digits; "0" below float noise (1e-12 relative to the mean), "-" when None."""
    if sd is None or not math.isfinite(sd):
        return "-"
    return "0" if sd <= 1e-12 * max(1.0, abs(mean)) else f"{sd:.2g}"


def _sig(v: float) -> str:
    """Signed, 3 significant digits; "n/a" when not finite."""
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{0.0 if abs(v) < 1e-12 else v:+.3g}"


def _delta(v: float) -> str:
    return f"{0.0 if abs(v) < 1e-9 else v:+.3g}"


def _render_md(blocks: Sequence[Block]) -> str:
    def cell(c) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out += ["#" * int(kind[1]) + " " + b[1], ""]
        elif kind == "p":
            out += [b[1], ""]
        elif kind == "bullets":
            out += [f"- {t}" for t in b[1]] + [""]
        elif kind == "table":
            out += ["| " + " | ".join(cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
            out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in b[2]] + [""]
        elif kind == "figure":
            out += [f"![{b[1]}]({b[2]})", ""]
        elif kind == "links":
            out += [f"- [{t}]({h})" for t, h in b[1]] + [""]
    return "\n".join(out).rstrip() + "\n"


def _inline(text: str) -> str:
    """Escaped text with ``code`` spans as <code>."""
    parts = str(text).split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#111}
h2{margin-top:1.6em;border-bottom:1px solid #ddd}.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:top}
th{background:#f3f4f6}td:first-child,th:first-child{text-align:left}
table.claims td,table.claims th{text-align:left}table.claims td.reason{max-width:520px;font-size:12px;color:#333}
td.v-reproduced{background:#d1fae5;color:#065f46;font-weight:600}
td.v-contradicted{background:#fee2e2;color:#991b1b;font-weight:600}
td.v-inconclusive{background:#fef3c7;color:#92400e;font-weight:600}td.c-ok{color:#065f46}td.c-fail{color:#991b1b}
li.v-reproduced{color:#065f46}li.v-contradicted,li.v-mixed{color:#991b1b}li.v-inconclusive{color:#92400e}
figure{display:inline-block;margin:8px;vertical-align:top}img{max-width:100%}figcaption{font-size:13px;color:#444}
code{background:#f3f4f6;padding:0 3px}"""


def _render_html(title: str, blocks: Sequence[Block]) -> str:
    e = html.escape
    body: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "bullets":
            items = b[1]
            classes = b[2] if len(b) > 2 else [""] * len(items)
            lis = "".join(f"<li class='{e(c)}'>{_inline(t)}</li>" for t, c in zip(items, classes))
            body.append(f"<ul>{lis}</ul>")
        elif kind == "table":
            cls = b[3] if len(b) > 3 else ""
            th = "".join(f"<th>{_inline(h)}</th>" for h in b[1])
            trs = "".join("<tr>" + "".join(
                f"<td class='{e(c.cls)}'>{_inline(c.text)}</td>" if isinstance(c, Cell) else f"<td>{_inline(c)}</td>"
                for c in r) + "</tr>" for r in b[2])
            body.append(f"<div class='scroll'><table class='{e(cls)}'><thead><tr>{th}</tr></thead>"
                        f"<tbody>{trs}</tbody></table></div>")
        elif kind == "figure":
            body.append(f"<figure><img src='{e(b[2])}' alt='{e(b[1])}'><figcaption>{e(b[1])}</figcaption></figure>")
        elif kind == "links":
            body.append("<ul>" + "".join(f"<li><a href='{e(h)}'>{e(t)}</a></li>" for t, h in b[1]) + "</ul>")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title><style>{_CSS}</style></head>'
            f"<body>\n" + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------------------------- report


def _jsonable(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples lists, numpy scalars Python numbers."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _arm_points_text(arms: Sequence[str], groups) -> str:
    parts = []
    for arm in arms:
        pts = [format_point(rows[0].point) for rows in groups.values() if rows and rows[0].arm == arm]
        pts = [p for p in pts if p]
        parts.append(f"`{arm}`" + (f" ({'; '.join(pts)})" if pts else ""))
    return ", ".join(parts)


def write_report(exp, runs: Sequence, *, lm=None) -> Path:
    """Aggregate the evals of ``runs`` (``ArmRun``-like: ``arm, point, seed, sae_dir, label``) and write
    ``report.md``, ``report.html``, ``plots/*.png``, ``summary.json`` and the feature browsers in ``<out>/report``.

    Claims are judged with :func:`saelab.stats.compare` / :func:`saelab.stats.verdict` (see :func:`evaluate_claim`).

    Returns:
        Path of ``report.md``.
    """
    out = Path(exp.out) / "report"
    (out / "plots").mkdir(parents=True, exist_ok=True)
    data = load_runs(runs)
    groups = by_label(data)
    arms = list(dict.fromkeys([*exp.arms, *(d.arm for d in data)]))
    arms = [a for a in arms if any(d.arm == a for d in data)] or list(exp.arms)
    st = stats_by_label(groups)
    plt = _plt()
    colors = _arm_colors(plt, arms, exp.baseline)

    # claims
    claim_rows: list[ClaimRow] = []
    summaries: list[tuple[str, str]] = []
    figures: list[tuple[str, str]] = []
    for i, claim in enumerate(exp.claims):
        claim = dict(claim)
        rows = evaluate_claim(i, claim, groups, exp.baseline)
        claim_rows += rows
        summaries.append(claim_summary(claim, rows))
        name = f"claim{i + 1}_{re.sub(r'[^A-Za-z0-9_-]+', '_', claim['arm'])}.png"
        base = claim.get("baseline") or exp.baseline
        if claim_figure(claim, groups, base, colors, out / "plots" / name):
            figures.append((f"Claim {i + 1}: {claim['paper']} ({claim['arm']} vs {base})", f"plots/{name}"))

    # global frontier
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if _draw_frontier(ax, groups, arms, "core.l0", "core.fve", colors):
        _log_x(ax)
        ax.set_xlabel("L0 (active latents per token, log scale)")
        ax.set_ylabel("FVE (held-out)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        _save(plt, fig, out / "plots" / "fve_vs_l0.png")
        frontier = [("FVE vs L0 frontier of every arm (mean ± seed std)", "plots/fve_vs_l0.png")]
    else:
        plt.close(fig)
        frontier = []
    plots = _plots(exp, groups, arms, colors, out / "plots")
    browsers = _browsers(exp, runs, out / "browsers", lm) if exp.browsers else {}

    # learned a
    a_rows, a_runs = [], []
    for label, rows in groups.items():
        per = [(r, learned_a(Path(r.run.sae_dir))) for r in rows]
        per = [(r, s) for r, s in per if s is not None]
        if not per:
            continue
        for r, s in per:
            a_runs.append({"label": label, "seed": r.seed,
                           "normalize_activations": _normalised(Path(r.run.sae_dir)), **s})
        means = [s["mean"] for _, s in per]
        sd = seed_spread(means)
        a_rows.append([label, per[0][1]["encoder"], str(len(per)), str(per[0][1]["n"]),
                       _num(statistics.fmean(means)) + (f" ± {_num(sd)}" if sd is not None else ""),
                       _num(statistics.fmean(s["std"] for _, s in per)), _num(min(s["min"] for _, s in per)),
                       _num(max(s["max"] for _, s in per)),
                       f"{100 * statistics.fmean(s['frac_small'] for _, s in per):.0f} %",
                       ", ".join(sorted({_normalised(Path(r.run.sae_dir)) for r, _ in per}))])

    # tables
    metrics_all = sorted({m for ms in st.values() for m in ms})
    headline = [m for m in HEADLINE if m in metrics_all]
    labels = list(groups)
    base_labels = [lab for lab in labels if groups[lab][0].arm == exp.baseline]

    def setting(run, key: str):
        """The value of a swept key in ``run``'s recipe (base, arm overrides, sweep point), e.g. its ``k``."""
        return {**exp.base, **exp.arms.get(run.arm, {}), **run.point}.get(key)

    def ref_label(label: str) -> str | None:
        """The baseline point whose swept settings (e.g. k) equal this arm's, else the baseline's first point."""
        run = groups[label][0]
        same = [b for b in base_labels
                if all(setting(run, key) == value for key, value in groups[b][0].point.items())]
        return same[0] if same else (base_labels[0] if base_labels else None)

    def metric_rows(metrics: Sequence[str], human: bool) -> list[list[str]]:
        body = []
        for m in metrics:
            cells = [metric_name(m) if human else m]
            for lab in labels:
                s, ref = st.get(lab, {}).get(m), ref_label(lab)
                b = st.get(ref, {}).get(m) if ref else None
                if s is None:
                    cells.append("-")
                elif b is None or ref == lab:
                    cells.append(str(s))
                else:
                    cells.append(f"{s} (Δ {_delta(s.mean - b.mean)})")
            body.append(cells)
        return body

    header_labels = [lab if ref_label(lab) in (None, lab) else f"{lab} (Δ vs {ref_label(lab)})" for lab in labels]
    spread_rows = []
    for lab in labels:
        cells = []
        for m in headline:
            vals = [r.value(m) for r in groups[lab]]
            finite = [v for v in vals if math.isfinite(v)]
            cells.append(_spread(seed_spread(vals), statistics.fmean(finite) if finite else 1.0))
        spread_rows.append([lab, str(len(groups[lab])), *cells])

    claim_table = []
    for r in claim_rows:
        c = r.comparison
        ci = f"{_sig(c.delta)} [{_sig(c.ci_low)}, {_sig(c.ci_high)}]" if c is not None else "n/a"
        if c is not None and not math.isfinite(c.ci_low):
            ci = f"{_sig(c.delta)} (no CI)"
        name = "FVE (reconstruction condition)" if r.role == "reconstruction" else \
            f"{metric_name(r.metric)} (claim: {r.direction})"
        op = (c.matched_at if c is not None else "-") + (" [outside baseline range]" if c is not None and c.out_of_range
                                                         and "outside" not in c.matched_at else "")
        claim_table.append([r.paper, r.label, op, name, ci, c.method if c is not None else "-",
                            Cell(r.verdict, VERDICT_CLASS.get(r.verdict, "")), Cell(r.reason, "reason")])

    # document
    n_seeds = len(exp.seeds)
    blocks: list[Block] = [
        ("h1", f"saelab compare: {exp.name}"),
        ("p", f"Model `{exp.model}`, hook `{exp.hook_name}`, {exp.n_tokens:,} harvested tokens per cache, seeds "
              f"{list(exp.seeds)} ({n_seeds} per arm point). Arms (sweep points): {_arm_points_text(arms, groups)}; "
              f"baseline `{exp.baseline}`. Each claim is judged at a matched operating point: per seed, the baseline's "
              "sweep is a frontier and its metric is interpolated at the arm's L0 (in log L0) or FVE, as the claim "
              "says; Δ = arm − matched baseline, averaged over paired seeds (same seed = same data order and init), "
              "with a paired 95 % CI: a bootstrap over items (letters, datasets, tasks) and seeds where the metric is "
              "a mean over items, else a Student-t interval over seeds (no CI with one seed). Reproduced: the CI "
              "excludes 0 in the claimed direction and the reconstruction condition holds (ΔFVE at the matched point "
              "≥ −fve_tolerance, point estimate); contradicted: the CI excludes 0 the other way; inconclusive "
              "otherwise. Evaluation always uses clean held-out text; values are mean ± std over seeds."),
    ]
    judges = _autointerp_judges(runs)
    if judges:
        blocks.append(("p", f"Auto-interp judge: {'; '.join(judges)} "
                            "(scores are only comparable under the same judge)."))
    blocks.append(("h2", "Paper claims"))
    if claim_table:
        blocks.append(("bullets", [s for _, s in summaries], [f"v-{v}" for v, _ in summaries]))
        for i, claim in enumerate(exp.claims):
            mine = [r for r in claim_rows if r.claim == i]
            if mine:
                header, body = claim_glance(mine)
                blocks += [("h3", f"{claim['paper']}: {claim['arm']} vs {mine[0].baseline}, matched "
                                  f"{mine[0].match.upper() if mine[0].match != 'none' else 'none'}"),
                           ("table", header, body, "glance")]
        blocks += [("h3", "Every claim row, with its CI method and reason"),
                   ("table", ["claim", "arm", "operating point", "metric", "Δ [95 % CI]", "CI method", "verdict",
                              "reason"], claim_table, "claims")]
    else:
        blocks.append(("p", "No claims configured."))
    blocks.append(("h2", "Claim figures"))
    blocks += [("figure", t, p) for t, p in figures + frontier] or [("p", "No core metrics: nothing to plot.")]
    if headline:
        blocks += [("h2", "Seed-to-seed spread"),
                   ("p", "Sample standard deviation over seeds of each headline metric per arm point: the noise floor "
                         "to compare deltas with (\"-\": fewer than 2 seeds)."),
                   ("table", ["arm point", "seeds", *[metric_name(m) for m in headline]], spread_rows, "spread")]
    if a_rows:
        blocks += [("h2", "Learned norm exponent a (cosine arms)"),
                   ("p", "Final per-latent `a` read from each saved SAE (score = e^b ‖x − b_dec‖^a cos + b_enc; "
                         "a = 0 is a pure cosine). mean a: mean ± std over seeds of each run's mean over latents; "
                         f"std a and the share with |a| < {SMALL_A:g}: averaged over seeds; min and max: over all "
                         "seeds' latents."),
                   ("table", ["arm point", "encoder", "seeds", "latents", "mean a", "std a", "min a", "max a",
                              f"|a| < {SMALL_A:g}", "activations normalised"], a_rows, "learned-a"),
                   ("p", "Cosine paper (Naihin & Stambler 2026, arXiv 2606.15054, Table 1 / Fig. 13):"),
                   ("table", ["setting", "value"], [list(r) for r in PAPER_A], "paper-a")]
    blocks += [("h2", "Headline metrics"),
               ("p", "Mean ± std over seeds; Δ vs the baseline point with the same swept settings (e.g. the same k), else vs the "
                     "baseline's first point (named in the column header)."),
               ("table", ["metric", *header_labels], metric_rows(headline, True), "metrics")]
    if plots:
        blocks += [("h2", "Other plots")] + [("figure", t, p) for t, p in plots]
    if browsers:
        blocks += [("h2", "Feature browsers"), ("links", list(browsers.items()))]
    blocks += [("h2", "All metrics"), ("table", ["metric", *header_labels], metric_rows(metrics_all, False), "metrics")]
    timing_rows = _timing_rows(Path(exp.out) / "timings.json")
    if timing_rows:
        blocks += [("h2", "Run time"),
                   ("p", "Wall-clock seconds of the work done per stage, added over sittings when a run was interrupted and "
                         "resumed (finished stages cost nothing again); total: their sum."),
                   ("table", ["stage", "seconds"], timing_rows, "")]

    write_json(out / "summary.json", _jsonable({
        "stats": {lab: {m: {"mean": s.mean, "std": s.std, "n": s.n} for m, s in ms.items()} for lab, ms in st.items()},
        "points": {lab: {"arm": rows[0].arm, "point": rows[0].point, "seeds": [r.seed for r in rows]}
                   for lab, rows in groups.items()},
        "per_seed": {lab: {str(r.seed): r.metrics for r in rows} for lab, rows in groups.items()},
        "comparisons": [{**{k: v for k, v in dataclasses.asdict(r).items() if k not in ("comparison", "full_reason")},
                         "reason": r.full_reason or r.reason, "table_reason": r.reason,
                         "comparison": dataclasses.asdict(r.comparison) if r.comparison is not None else None}
                        for r in claim_rows],
        "claims": [{"paper": c["paper"], "arm": c["arm"], "verdict": v, "sentence": s}
                   for c, (v, s) in zip(exp.claims, summaries)],
        "learned_a": a_runs,
    }))
    md_path = out / "report.md"
    atomic_write(md_path, lambda p: p.write_text(_render_md(blocks)))
    atomic_write(out / "report.html", lambda p: p.write_text(_render_html(f"saelab compare: {exp.name}", blocks)))
    return md_path


def _timing_rows(path: Path) -> list[list[str]]:
    """``[[stage, seconds]]`` from the experiment's ``timings.json`` (empty when absent)."""
    if not path.is_file():
        return []
    return [[k, f"{v:,.0f}"] for k, v in read_json(path).items() if isinstance(v, (int, float))]


def _autointerp_judges(runs: Sequence) -> list[str]:
    """The judges named in the runs' ``eval_autointerp.json`` files (auto-interp scores depend on the judge)."""
    found: list[str] = []
    for r in runs:
        f = Path(r.sae_dir) / "eval_autointerp.json"
        if f.is_file():
            j = json.loads(f.read_text()).get("judge")
            if j and j not in found:
                found.append(j)
    return found


def _browsers(exp, runs, root: Path, lm) -> dict[str, str]:
    """One feature browser per arm, for its first sweep point and first seed: ``{title: relative href}``."""
    try:
        from .browser import BrowserConfig, build_feature_browser
    except ModuleNotFoundError:
        return {}
    out, seen = {}, set()
    # the clean cache of these runs' hook (with several hooks, <out>/caches/clean/<hook>)
    clean = next((r.cache for r in runs if not getattr(r, "mask_prob", 0.0)), Path(exp.out) / "caches" / "clean")
    for r in runs:
        if r.arm in seen or r.seed != exp.seeds[0]:
            continue
        seen.add(r.arm)
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", r.arm)
        target = root / slug
        if not (target / "index.html").is_file():
            build_feature_browser(BrowserConfig(sae=str(r.sae_dir), cache=str(clean),
                                                out=str(target), max_rows=50_000, device=exp.device), lm=lm)
        out[run_label(r)] = f"browsers/{slug}/index.html"
    return out
