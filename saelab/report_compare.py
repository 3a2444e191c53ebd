"""The ``saelab compare`` report: metric tables (mean ± std over seeds, deltas vs the baseline), one sentence per
paper claim, matplotlib plots, and links to the HTML feature browsers. Written as ``report.md`` and
``report.html`` (same content) in ``<out>/report``.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import atomic_write, read_json, write_json

HEADLINE = (
    "core.fve", "core.l0", "core.dead_frac", "core.ce_loss_score", "core.kl_score", "core.average_max_decoder_cosine_sim",
    "absorption.mean_absorption_fraction_score", "absorption.mean_full_absorption_score",
    "absorption.mean_num_split_features", "absorption.n_letters_qualifying",
    "sparse_probing.sae_top_1_test_accuracy", "sparse_probing.sae_top_2_test_accuracy",
    "sparse_probing.sae_top_5_test_accuracy", "sparse_probing.llm_top_1_test_accuracy",
    "sparse_probing.sae_test_accuracy", "sparse_probing.llm_test_accuracy",
    "ood_probing.sae_id_auc", "ood_probing.oracle_id_auc", "ood_probing.id_gap",
    "ood_probing.sae_ood_auc", "ood_probing.oracle_ood_auc", "ood_probing.ood_gap",
    "norm_quartiles.fve_q1", "norm_quartiles.fve_q4", "norm_quartiles.l2_ratio_q4", "norm_quartiles.firing_q4_q1_ratio",
    "cos_inner.win_rate_signed", "cos_inner.win_rate_abs",
    "autointerp.mean_score", "autointerp.chance_score",
)
"""Metrics shown in the headline table when present (others appear in the full table)."""


def flatten(suite: str, result: dict[str, Any]) -> dict[str, float]:
    """Numeric leaves of an eval result: ``suite.field`` for numbers, ``suite.field.key`` for dicts of numbers."""
    out: dict[str, float] = {}
    for k, v in result.items():
        if k in ("timings_s", "config", "suite", "sae") or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and v is not None:
            out[f"{suite}.{k}"] = float(v)
        elif isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                    out[f"{suite}.{k}.{kk}"] = float(vv)
    return out


def collect(runs: Sequence, suites: Sequence[str]) -> dict[str, dict[int, dict[str, float]]]:
    """``{arm: {seed: {metric: value}}}`` from the ``eval_<suite>.json`` files of every run."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    for r in runs:
        row = table.setdefault(r.arm, {}).setdefault(r.seed, {})
        for s in suites:
            f = r.sae_dir / f"eval_{s}.json"
            if f.is_file():
                row.update(flatten(s, json.loads(f.read_text())))
    return table


@dataclass
class Stat:
    """Mean and sample standard deviation over seeds (std is None with one seed)."""

    mean: float
    std: float | None
    n: int

    def __str__(self) -> str:
        if self.std is None:
            return _num(self.mean)
        return f"{_num(self.mean)} ± {_num(self.std)}"


def _num(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"


def stats(table: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, Stat]]:
    """``{arm: {metric: Stat}}`` over seeds."""
    out: dict[str, dict[str, Stat]] = {}
    for arm, seeds in table.items():
        metrics = sorted({m for row in seeds.values() for m in row})
        out[arm] = {}
        for m in metrics:
            vals = [row[m] for row in seeds.values() if m in row and not math.isnan(row[m])]
            if vals:
                out[arm][m] = Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))
    return out


def _delta(v: float) -> str:
    return f"{0.0 if abs(v) < 1e-9 else v:+.3g}"


def check_claim(claim: dict[str, Any], st: dict[str, dict[str, Stat]], baseline: str) -> dict[str, Any]:
    """Evaluate one paper claim (``{paper, arm, expect: {metric: up|down}, fve_tolerance}``) against the baseline.

    Verdicts:
      * ``reproduced``: with >= 2 seeds, every metric moves the predicted way by more than the seed noise
        ``hypot(std_arm, std_baseline)`` and FVE drops by at most ``fve_tolerance``;
      * ``direction matches (1 seed)``: with one seed, every metric moves the predicted way and FVE is within
        tolerance, but there is no noise estimate to call it reproduced;
      * ``not reproduced``: some metric moves the other way (or not beyond the noise), or FVE dropped more than
        the tolerance (the sentence says which);
      * ``not measured`` / ``not run``: the metrics or the arm are missing.

    Returns:
        ``{paper, arm, verdict, sentence}``; the sentence gives every delta and the reason for the verdict.
    """
    arm, paper = claim["arm"], claim["paper"]
    if arm not in st or baseline not in st:
        return {"paper": paper, "arm": arm, "verdict": "not run", "sentence": f"{paper}: arm {arm!r} was not run."}
    parts, failed, missing = [], [], []
    n = max((s.n for s in st[arm].values()), default=0)
    for metric, direction in claim["expect"].items():
        a, b = st[arm].get(metric), st[baseline].get(metric)
        if a is None or b is None:
            missing.append(metric)
            continue
        delta = a.mean - b.mean
        noise = math.hypot(a.std or 0.0, b.std or 0.0)
        good = (delta < -noise) if direction == "down" else (delta > noise)
        name = metric.split(".", 1)[1]
        if not good:
            failed.append(f"{name} did not go {direction}" + (" beyond the seed noise" if noise else ""))
        parts.append(f"{name} {_delta(delta)}" + (f" ± {noise:.2g}" if noise else ""))
    fve_a, fve_b = st[arm].get("core.fve"), st[baseline].get("core.fve")
    if fve_a and fve_b:
        d_fve, tol = fve_a.mean - fve_b.mean, claim.get("fve_tolerance", 0.02)
        parts.append(f"FVE {_delta(d_fve)}")
        if d_fve < -tol:
            failed.append(f"FVE fell by more than the {tol:g} tolerance, so reconstruction is not equal")
    if missing and not parts:
        verdict = "not measured"
    elif failed or missing:
        verdict = "not reproduced"
    else:
        verdict = "reproduced" if n >= 2 else "direction matches (1 seed)"
    why = {
        "not reproduced": "; ".join(failed + ([f"missing: {', '.join(missing)}"] if missing else [])),
        "direction matches (1 seed)": "every metric moved the predicted way, but one seed gives no noise estimate: add seeds",
    }.get(verdict, "")
    sentence = (f"{paper} ({arm} vs {baseline}): {', '.join(parts) or 'no metrics'}. "
                f"Verdict at this scale ({n} seed{'s' if n != 1 else ''}): {verdict}" + (f" ({why})." if why else "."))
    return {"paper": paper, "arm": arm, "verdict": verdict, "sentence": sentence}


# ------------------------------------------------------------------------------------------------ plots


def _plots(exp, runs: Sequence, table, plot_dir: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, str]] = []
    arms = list(exp.arms)
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(arms)}

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        atomic_write(plot_dir / name, lambda p: fig.savefig(p, dpi=110, format="png"))
        plt.close(fig)
        made.append((title, f"plots/{name}"))

    # FVE vs L0
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        pts = [(row["core.l0"], row["core.fve"]) for row in table.get(arm, {}).values() if "core.fve" in row and "core.l0" in row]
        if pts:
            ax.scatter(*zip(*pts), label=arm, color=colors[arm], s=40)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("FVE (held-out)")
    ax.legend(fontsize=8)
    save(fig, "fve_vs_l0.png", "FVE vs L0 per arm")

    # training curves and learned a
    logs = {r.arm: _read_log(r.sae_dir / "train_log.jsonl") for r in runs if r.seed == exp.seeds[0]}
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, rows in logs.items():
        if rows:
            ax.plot([r["tokens"] for r in rows], [1 - r["fvu"] for r in rows], label=arm, color=colors[arm])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training-batch FVE")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    save(fig, "training_curves.png", "Training curves (first seed)")
    cos_logs = {a: rows for a, rows in logs.items() if rows and "a_mean" in rows[-1]}
    if cos_logs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, rows in cos_logs.items():
            t = [r["tokens"] for r in rows]
            ax.plot(t, [r["a_mean"] for r in rows], label=f"{arm} mean a", color=colors[arm])
            ax.fill_between(t, [r["a_min"] for r in rows], [r["a_max"] for r in rows], color=colors[arm], alpha=0.15)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("learned a (band: min..max over latents)")
        ax.legend(fontsize=8)
        save(fig, "learned_a.png", "Learned norm exponent a over training (cosine arms)")

    # per-task sparse probing, per-letter absorption, norm-quartile firing: drawn from the eval files
    for plot in (_plot_probing, _plot_absorption, _plot_quartiles):
        item = plot(plt, exp, runs, colors)
        if item is not None:
            fig, name, title = item
            save(fig, name, title)
    return made


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _first_seed_results(exp, runs, suite: str) -> dict[str, dict]:
    out = {}
    for r in runs:
        f = r.sae_dir / f"eval_{suite}.json"
        if r.seed == exp.seeds[0] and f.is_file():
            out[r.arm] = json.loads(f.read_text())
    return out


def _grouped_bars(plt, categories: list[str], series: dict[str, list[float]], colors, ylabel: str, figsize=(9, 4)):
    fig, ax = plt.subplots(figsize=figsize)
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (arm, vals) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(categories))], vals, width=width, label=arm, color=colors.get(arm))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(categories))])
    ax.set_xticklabels(categories, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return fig


def _plot_probing(plt, exp, runs, colors):
    res = _first_seed_results(exp, runs, "sparse_probing")
    per = {arm: {d: v.get("sae_top_1_test_accuracy", float("nan")) for d, v in (r.get("per_dataset") or {}).items()}
           for arm, r in res.items()}
    cats = sorted({d for v in per.values() for d in v})
    if not cats:
        return None
    fig = _grouped_bars(plt, cats, {a: [per[a].get(c, float("nan")) for c in cats] for a in per}, colors, "SAE top-1 probe accuracy")
    return fig, "sparse_probing_per_task.png", "Sparse probing (top-1 latent) per task"


def _plot_absorption(plt, exp, runs, colors):
    res = _first_seed_results(exp, runs, "absorption")
    per = {arm: {row["letter"]: row.get("absorption_fraction", float("nan")) for row in r.get("per_letter", [])} for arm, r in res.items()}
    cats = sorted({c for v in per.values() for c in v})
    if not cats:
        return None
    fig = _grouped_bars(plt, cats, {a: [per[a].get(c, float("nan")) for c in cats] for a in per}, colors, "mean absorption fraction")
    return fig, "absorption_per_letter.png", "Absorption per letter"


def _plot_quartiles(plt, exp, runs, colors):
    res = _first_seed_results(exp, runs, "norm_quartiles")
    per = {arm: [b.get("firing_frac", float("nan")) for b in r.get("bins", [])] for arm, r in res.items() if r.get("bins")}
    if not per:
        return None
    cats = [f"Q{i + 1}" for i in range(max(len(v) for v in per.values()))]
    fig = _grouped_bars(plt, cats, per, colors, "fraction of latent firings", figsize=(6, 4))
    return fig, "norm_quartile_firing.png", "Latent firings per input-norm quartile"


# ----------------------------------------------------------------------------------------------- report


def write_report(exp, runs: Sequence, *, lm=None) -> Path:
    """Aggregate the evals of ``runs`` and write ``report.md``, ``report.html``, plots and browsers.

    Returns:
        Path of ``report.md``.
    """
    out = Path(exp.out) / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = collect(runs, exp.evals)
    st = stats(table)
    claims = [check_claim(c, st, exp.baseline) for c in exp.claims]
    plots = _plots(exp, runs, table, out / "plots")
    browsers = _browsers(exp, runs, out / "browsers", lm) if exp.browsers else {}
    write_json(out / "summary.json", {
        "stats": {a: {m: {"mean": s.mean, "std": s.std, "n": s.n} for m, s in ms.items()} for a, ms in st.items()},
        "claims": claims, "per_seed": table,
    })
    arms = list(exp.arms)
    metrics_all = sorted({m for ms in st.values() for m in ms})
    headline = [m for m in HEADLINE if m in metrics_all]
    rest = [m for m in metrics_all if m not in headline]

    def rows(metrics: list[str]) -> list[list[str]]:
        body = []
        for m in metrics:
            base = st.get(exp.baseline, {}).get(m)
            cells = [m]
            for a in arms:
                s = st.get(a, {}).get(m)
                if s is None:
                    cells.append("-")
                elif a == exp.baseline or base is None:
                    cells.append(str(s))
                else:
                    cells.append(f"{s} (Δ {_delta(s.mean - base.mean)})")
            body.append(cells)
        return body

    header = ["metric", *arms]
    md = [f"# saelab compare: {exp.name}", "",
          f"Model `{exp.model}`, hook `{exp.hook_name}`, {exp.n_tokens:,} harvested tokens per cache, seeds {exp.seeds}. "
          f"Values are mean ± std over seeds; Δ is the difference from the baseline arm `{exp.baseline}`. "
          "Evaluation always uses clean held-out text."]
    judges = _autointerp_judges(runs)
    if judges:
        md += ["", f"Auto-interp judge: {'; '.join(judges)} (scores are only comparable under the same judge)."]
    md += ["", "## Paper claims", ""]
    md += [f"- {c['sentence']}" for c in claims] or ["- (no claims configured)"]
    md += ["", "## Headline metrics", "", *_md_table(header, rows(headline)), "", "## Plots", ""]
    md += [f"![{t}]({p})" for t, p in plots]
    if browsers:
        md += ["", "## Feature browsers", ""] + [f"- [{a}]({p})" for a, p in browsers.items()]
    md += ["", "## All metrics", "", *_md_table(header, rows(rest))]
    timing_rows = _timing_rows(Path(exp.out) / "timings.json")
    if timing_rows:
        md += ["", "## Run time", "", "Wall-clock seconds per stage (stages skipped on a resumed run keep their first time).", "",
               *_md_table(["stage", "seconds"], timing_rows)]
    md_path = out / "report.md"
    atomic_write(md_path, lambda p: p.write_text("\n".join(md) + "\n"))
    html_doc = _html(exp, claims, header, rows(headline), rows(rest), plots, browsers, judges)
    atomic_write(out / "report.html", lambda p: p.write_text(html_doc))
    return md_path


def _timing_rows(path: Path) -> list[list[str]]:
    """``[[stage, seconds]]`` from the experiment's ``timings.json`` (empty when absent)."""
    if not path.is_file():
        return []
    return [[k, f"{v:,.0f}"] for k, v in read_json(path).items() if isinstance(v, (int, float))]


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in body]


def _autointerp_judges(runs: Sequence) -> list[str]:
    """The judges named in the runs' ``eval_autointerp.json`` files (auto-interp scores depend on the judge)."""
    found: list[str] = []
    for r in runs:
        f = r.sae_dir / "eval_autointerp.json"
        if f.is_file():
            j = json.loads(f.read_text()).get("judge")
            if j and j not in found:
                found.append(j)
    return found


def _html(exp, claims, header, head_rows, rest_rows, plots, browsers, judges=()) -> str:
    e = html.escape

    def table(body):
        th = "".join(f"<th>{e(h)}</th>" for h in header)
        trs = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"

    verdict_class = {"reproduced": "ok", "direction matches (1 seed)": "maybe", "not reproduced": "no"}
    claim_items = "".join(f"<li class='{verdict_class.get(c['verdict'], 'na')}'>{e(c['sentence'])}</li>" for c in claims)
    imgs = "".join(f"<figure><img src='{e(p)}' alt='{e(t)}'><figcaption>{e(t)}</figcaption></figure>" for t, p in plots)
    links = "".join(f"<li><a href='{e(p)}'>{e(a)}</a></li>" for a, p in browsers.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>saelab compare: {e(exp.name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
li.ok{{color:#065f46}}li.maybe{{color:#92400e}}li.no{{color:#991b1b}}figure{{display:inline-block;margin:8px}}img{{max-width:560px}}</style></head><body>
<h1>saelab compare: {e(exp.name)}</h1>
<p>Model <code>{e(exp.model)}</code>, hook <code>{e(exp.hook_name)}</code>, {exp.n_tokens:,} harvested tokens per cache,
seeds {e(str(exp.seeds))}. Values are mean ± std over seeds; Δ is the difference from <code>{e(exp.baseline)}</code>.</p>
{'<p>Auto-interp judge: ' + e('; '.join(judges)) + ' (scores are only comparable under the same judge).</p>' if judges else ''}
<h2>Paper claims</h2><ul>{claim_items or '<li>(none configured)</li>'}</ul>
<h2>Headline metrics</h2>{table(head_rows)}<h2>Plots</h2>{imgs}
{'<h2>Feature browsers</h2><ul>' + links + '</ul>' if links else ''}
<h2>All metrics</h2>{table(rest_rows)}</body></html>
"""


def _browsers(exp, runs, root: Path, lm) -> dict[str, str]:
    try:
        from .reports.browser import BrowserConfig, build_feature_browser
    except ModuleNotFoundError:
        return {}
    out = {}
    for r in runs:
        if r.seed != exp.seeds[0]:
            continue
        target = root / r.arm
        if not (target / "index.html").is_file():
            build_feature_browser(BrowserConfig(sae=str(r.sae_dir), cache=str(Path(exp.out) / "caches" / "clean"),
                                                out=str(target), max_rows=50_000), lm=lm)
        out[r.arm] = f"browsers/{r.arm}/index.html"
    return out
