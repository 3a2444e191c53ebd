"""The ``saelab compare`` report on fake runs with planted effects: claim table first with the right verdicts,
one figure per claim, seed spread, learned ``a``, summary.json, items per metric, and a headless-Chromium render."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from saelab.compare import ExperimentConfig
from saelab.io import write_json

from chromium import run_chromium
from saelab.reports.compare import learned_a, metric_items, metric_name, write_report
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE
from saelab.sae.saving import save_sae

SEEDS = (0, 1, 2)
LETTERS = "abcdefghijklmnopqrst"
DATASETS = ("ag_news", "europarl", "github", "amazon", "bias_in_bios")
ABS = "absorption.mean_absorption_fraction_score"
TOP1 = "sparse_probing.sae_top_1_test_accuracy"
A_PER_FEATURE = np.linspace(-0.02, 0.4, 16)  # the planted learned exponent of the cosine arm (d_sae = 16)


@dataclass
class FakeRun:
    """The fields of ``saelab.compare.ArmRun`` that the report reads."""

    arm: str
    point: dict[str, Any]
    seed: int
    sae_dir: Path
    cache: Path = Path("/nonexistent")
    mask_prob: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.arm}[{', '.join(f'{k}={v:g}' for k, v in self.point.items())}]" if self.point else self.arm


def base_fve(l0: float, seed: int) -> float:
    """The baseline frontier: FVE linear in log2 L0 (so interpolation in log L0 is exact), a per-seed offset."""
    return 0.6 + 0.08 * math.log2(l0 / 8) + 0.004 * seed


def base_abs(l0: float, seed: int, i: int) -> float:
    """Baseline absorption of letter ``i``: linear in log2 L0, a per-letter and per-seed offset."""
    return 0.4 - 0.05 * math.log2(l0 / 8) + 0.01 * (i % 5) + 0.003 * seed


def base_top1(l0: float, seed: int, i: int) -> float:
    return 0.7 + 0.02 * math.log2(l0 / 8) + 0.01 * i - 0.002 * seed


@dataclass
class Spec:
    """One fake arm point: its L0 and planted effects relative to the baseline frontier at that L0."""

    l0: float
    d_abs: float = 0.0
    d_top1: float = 0.0
    d_fve: float = 0.0
    core: tuple[int, ...] = SEEDS  # seeds that have eval_core.json
    extra: dict[str, Any] = field(default_factory=dict)


def _write(run: FakeRun, spec: Spec, noise: float) -> None:
    """Eval files of one fake SAE: the baseline frontier at its L0 plus the planted effects, plus independent
    Gaussian noise (sd ``noise``) on every item and on FVE, seeded by the run."""
    d, s = run.sae_dir, run.seed
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([s, sum(map(ord, run.label))])
    l0 = spec.l0 * (1 + 0.01 * s)
    fve = base_fve(l0, s) + spec.d_fve + 0.2 * noise * rng.standard_normal()
    if s in spec.core:
        write_json(d / "eval_core.json", {"suite": "core", "fve": fve, "l0": l0, "dead_frac": 0.01 * (s + 1),
                                          "average_max_decoder_cosine_sim": 0.3 + 0.01 * s})
    rows = [{"letter": c, "absorption_fraction": base_abs(l0, s, i) + spec.d_abs + noise * rng.standard_normal(),
             "full_absorption_rate": 0.1, "num_split_features": 1 + i % 2} for i, c in enumerate(LETTERS)]
    write_json(d / "eval_absorption.json", {
        "suite": "absorption", "status": "ok", "n_letters_qualifying": len(rows), "per_letter": rows,
        "mean_absorption_fraction_score": statistics.fmean(r["absorption_fraction"] for r in rows),
        "mean_full_absorption_score": 0.1, "mean_num_split_features": 1.5})
    per = {name: {"sae_top_1_test_accuracy": base_top1(l0, s, i) + spec.d_top1 + noise * rng.standard_normal()}
           for i, name in enumerate(DATASETS)}
    write_json(d / "eval_sparse_probing.json", {
        "suite": "sparse_probing", "per_dataset": per,
        "sae_top_1_test_accuracy": statistics.fmean(v["sae_top_1_test_accuracy"] for v in per.values())})
    log = [{"tokens": t, "fvu": 1 - fve * t / 4000, **spec.extra.get("log", {})} for t in (1000, 2000, 3000, 4000)]
    (d / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    write_json(d / "training_cfg.json", {"normalize_activations": spec.extra.get("normalize", True)})
    if spec.extra.get("cosine"):
        torch.manual_seed(s)
        sae = SAE(SAEConfig(d_in=8, d_sae=16, activation="topk", k=4, encoder="cosine_per_feature"))
        with torch.no_grad():
            sae.encoder.a.copy_(torch.tensor(A_PER_FEATURE + 0.01 * s, dtype=torch.float32))
        save_sae(sae, d)


ARMS: dict[tuple[str, tuple], Spec] = {
    ("baseline", (("k", 8),)): Spec(8), ("baseline", (("k", 16),)): Spec(16), ("baseline", (("k", 32),)): Spec(32),
    # C2R: no effect at lambda 1 (noise only), a planted improvement of both metrics at lambda 5
    ("c2r", (("c2r.lambda", 1),)): Spec(20), ("c2r", (("c2r.lambda", 5),)): Spec(20, d_abs=-0.1, d_top1=0.12),
    ("masked", ()): Spec(12, d_abs=+0.1),  # planted harm
    ("cosine", ()): Spec(24, d_abs=-0.1, d_fve=-0.1, extra={"cosine": True, "normalize": False,
                                                             "log": {"a_mean": 0.2, "a_min": 0.0, "a_max": 0.4}}),
    ("nocore", ()): Spec(16, d_abs=-0.1, core=(0, 1)),  # seed 2 has no eval_core.json
}
CLAIMS = [
    {"paper": "C2R (Smith 2025)", "arm": "c2r", "match": "fve", "expect": {ABS: "down", TOP1: "up"}},
    {"paper": "Masking <b>&</b>", "arm": "masked", "expect": {ABS: "down"}},  # markup must render as text
    {"paper": "Cosine SAE", "arm": "cosine", "expect": {ABS: "down"}, "fve_tolerance": 0.02},
    {"paper": "No core", "arm": "nocore", "expect": {ABS: "down"}},
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_report")
    runs = []
    for (arm, point), spec in ARMS.items():
        for s in SEEDS:
            sub = ",".join(f"{k}={v}" for k, v in point) or "."
            r = FakeRun(arm, dict(point), s, root / "arms" / arm / sub / f"seed{s}")
            _write(r, spec, noise=0.02)
            runs.append(r)
    exp = ExperimentConfig(name="fake", out=str(root), seeds=list(SEEDS),
                           evals=["core", "absorption", "sparse_probing"],
                           arms={a: {} for a, _ in ARMS}, claims=CLAIMS, browsers=False)
    path = write_report(exp, runs)
    return path.read_text(), path.parent


def _claim_table(md: str, after: str = "### Every claim row") -> tuple[list[str], list[list[str]]]:
    lines = md.splitlines()
    start = next(j for j, line in enumerate(lines) if line.startswith(after))
    i = next(j for j, line in enumerate(lines) if j > start and line.startswith("|"))
    header = [c.strip() for c in lines[i].strip("|").split(" | ")]
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return header, rows


def _row(rows, arm: str, metric_start: str) -> dict[str, str]:
    hits = [r for r in rows if r[1] == arm and r[3].startswith(metric_start)]
    assert len(hits) == 1, (arm, metric_start, rows)
    return dict(zip(["claim", "arm", "op", "metric", "ci", "method", "verdict", "reason"], hits[0]))


def test_claim_table_comes_first_with_the_planted_verdicts(report):
    md, _ = report
    assert md.index("## Paper claims") < md.index("## Seed-to-seed spread") < md.index("## Headline metrics")
    header, rows = _claim_table(md)
    assert header == ["claim", "arm", "operating point", "metric", "Δ [95 % CI]", "CI method", "verdict", "reason"]
    # 2 c2r points x 2 metrics (match fve: no reconstruction row) + masked, cosine, nocore x (1 metric + FVE row)
    assert len(rows) == 4 + 3 * 2
    good = _row(rows, "c2r[c2r.lambda=5]", "absorption fraction")
    assert good["verdict"] == "reproduced" and good["ci"].startswith("-0.09")
    assert "bootstrap over 20 items × 3 seeds" in good["method"]
    assert "FVE" in good["op"] and "interpolated" in good["op"]
    assert _row(rows, "c2r[c2r.lambda=5]", "sparse probing top-1")["verdict"] == "reproduced"
    noise = _row(rows, "c2r[c2r.lambda=1]", "absorption fraction")
    assert noise["verdict"] == "inconclusive" and "includes 0" in noise["reason"]
    harm = _row(rows, "masked", "absorption fraction")
    assert harm["verdict"] == "contradicted" and harm["ci"].startswith(("+0.1", "+0.09"))
    assert "L0" in harm["op"] and "reconstruction: ΔFVE at matched L0" in harm["reason"]
    assert _row(rows, "masked", "FVE (reconstruction condition)")["verdict"] == "condition met"
    # the cosine arm improves absorption but loses 0.1 FVE at matched L0: the condition fails, so no "reproduced"
    cos = _row(rows, "cosine", "absorption fraction")
    assert cos["verdict"] == "inconclusive" and "reconstruction condition failed" in cos["reason"]
    assert "< −0.02" in cos["reason"]
    recon = _row(rows, "cosine", "FVE (reconstruction condition)")
    assert recon["verdict"] == "condition failed" and recon["ci"].startswith(("-0.1", "-0.09"))
    nocore = _row(rows, "nocore", "absorption fraction")
    assert nocore["verdict"] == "inconclusive" and nocore["reason"].startswith("nocore seed 2 has no core metrics")
    assert _row(rows, "nocore", "FVE (reconstruction condition)")["verdict"] == "condition failed"
    # per-claim sentences
    assert ("C2R (Smith 2025) (c2r vs baseline, matched fve): reproduced at c2r.lambda=5; "
            "inconclusive at c2r.lambda=1.") in md
    assert "Masking <b>&</b> (masked vs baseline, matched l0): contradicted." in md


def test_each_claim_has_a_table_at_a_glance(report):
    md, _ = report
    assert md.index("### C2R (Smith 2025): c2r vs baseline, matched FVE") < md.index("### Every claim row")
    header, rows = _claim_table(md, "### C2R (Smith 2025)")
    assert header[:2] == ["arm point", "matched at"] and header[2].startswith("absorption fraction (down)")
    assert "ΔFVE (condition)" not in header  # matched on FVE: no reconstruction column
    good = next(r for r in rows if r[0] == "c2r[c2r.lambda=5]")
    _, full = _claim_table(md)
    detail = _row(full, "c2r[c2r.lambda=5]", "absorption fraction")
    assert good[1].startswith("FVE ") and good[2] == f"{detail['ci']} {detail['verdict']}"
    header, rows = _claim_table(md, "### Masking")
    assert header[-1] == "ΔFVE (condition)" and rows[0][1].startswith("L0 ")
    assert rows[0][-1].endswith("condition met") and "contradicted" in rows[0][2]


def test_delta_matches_the_hand_computation(report):
    _, out = report
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    comps = summary["comparisons"]
    assert len(comps) == 10 and all(c["verdict"] and c["reason"] for c in comps)
    # masked sits between baseline k 8 and 16 on each seed's frontier: interpolate the baseline in log L0 by hand
    root = out.parent / "arms"

    def ev(arm: str, sub: str, s: int, suite: str) -> dict:
        return json.loads((root / arm / sub / f"seed{s}" / f"eval_{suite}.json").read_text())

    diffs = []
    for s in SEEDS:
        l0 = {k: ev("baseline", f"k={k}", s, "core")["l0"] for k in (8, 16)}
        x = ev("masked", ".", s, "core")["l0"]
        w16 = math.log(x / l0[8]) / math.log(l0[16] / l0[8])
        base = {k: ev("baseline", f"k={k}", s, "absorption")[ABS.split(".")[1]] for k in (8, 16)}
        diffs.append(ev("masked", ".", s, "absorption")[ABS.split(".")[1]] - ((1 - w16) * base[8] + w16 * base[16]))
    c = next(c for c in comps if c["label"] == "masked" and c["metric"] == ABS)["comparison"]
    assert c["delta"] == pytest.approx(statistics.fmean(diffs), abs=1e-9) and c["delta"] == pytest.approx(0.1, abs=0.02)
    assert c["ci_low"] > 0.05 and c["n_seeds"] == 3 and c["n_items"] == 20
    f = next(c for c in comps if c["label"] == "cosine" and c["metric"] == "core.fve")["comparison"]
    assert f["delta"] == pytest.approx(-0.1, abs=0.01) and f["method"] == "paired t over 3 seeds"
    assert f["ci_low"] < f["delta"] < f["ci_high"]
    assert summary["stats"]["baseline[k=16]"]["core.fve"]["n"] == 3
    assert summary["claims"][0]["verdict"] == "mixed" and summary["claims"][1]["verdict"] == "contradicted"


def test_human_names_figures_spread_and_learned_a(report):
    text, out = report
    assert metric_name(ABS) == "absorption fraction" and metric_name(TOP1) == "sparse probing top-1"
    assert metric_name("ood_probing.ood_gap") == "OOD gap (oracle − SAE AUC)"
    assert metric_name("x.unknown") == "x.unknown"
    headline = text[text.index("## Headline metrics"):text.index("## All metrics")]
    assert "| absorption fraction |" in headline and "| FVE |" in headline and ABS not in headline
    assert f"| {ABS} |" in text[text.index("## All metrics"):]  # the full dump shows keys
    figs = sorted(p.name for p in (out / "plots").glob("claim*.png"))
    assert figs == ["claim1_c2r.png", "claim2_masked.png", "claim3_cosine.png", "claim4_nocore.png"]
    assert all((out / "plots" / f).stat().st_size > 5000 for f in figs)
    assert (out / "plots" / "fve_vs_l0.png").stat().st_size > 5000 and (out / "plots" / "learned_a.png").is_file()
    # seed spread: the sample std over seeds of baseline[k=16]'s FVE
    spread = text[text.index("## Seed-to-seed spread"):text.index("## Learned")]
    row = next(line for line in spread.splitlines() if line.startswith("| baseline[k=16] |"))
    hdr = next(line for line in spread.splitlines() if line.startswith("| arm point |"))
    col = [c.strip() for c in hdr.strip("|").split("|")].index("FVE")
    want = statistics.stdev(json.loads((out.parent / "arms" / "baseline" / "k=16" / f"seed{s}" / "eval_core.json")
                                       .read_text())["fve"] for s in SEEDS)
    assert [c.strip() for c in row.strip("|").split("|")][col] == f"{want:.2g}"
    # learned a of the cosine arm vs the planted values (a + 0.01 seed)
    a_sec = text[text.index("## Learned"):text.index("## Headline metrics")]
    line = next(line for line in a_sec.splitlines() if line.startswith("| cosine |"))
    row = [c.strip() for c in line.strip("|").split("|")]
    means = [float(np.mean(A_PER_FEATURE + 0.01 * s)) for s in SEEDS]
    assert float(row[4].split(" ± ")[0]) == pytest.approx(statistics.fmean(means), rel=1e-3)
    assert float(row[6]) == pytest.approx(-0.02, abs=1e-4) and float(row[7]) == pytest.approx(0.42, abs=1e-4)
    small = statistics.fmean(float((np.abs(A_PER_FEATURE + 0.01 * s) < 0.05).mean()) for s in SEEDS)
    assert row[8] == f"{100 * small:.0f} %" and row[9] == "no (raw)"
    assert "0.258 ± 0.0007" in a_sec and "23 %" in a_sec


def test_learned_a_reads_each_cosine_layout(tmp_path):
    for enc, setup, want in [
        ("cosine_global", lambda e: e.a.fill_(0.25), np.full(12, 0.25)),
        ("cosine_grouped", lambda e: e.a.copy_(torch.tensor([0.0, 0.1, 0.2, 0.3])), np.repeat([0.0, 0.1, 0.2, 0.3], 3)),
        ("cosine_base_delta", lambda e: (e.a_base.fill_(0.1), e.delta.copy_(torch.arange(12) * 0.01)),
         0.1 + np.arange(12) * 0.01),
    ]:
        sae = SAE(SAEConfig(d_in=8, d_sae=12, activation="topk", k=2, encoder=enc, n_groups=4))
        with torch.no_grad():
            setup(sae.encoder)
        got = learned_a(save_sae(sae, tmp_path / enc))
        assert got["n"] == 12 and got["mean"] == pytest.approx(want.mean(), abs=1e-6), enc
        assert got["std"] == pytest.approx(want.std(), abs=1e-6)
        assert got["frac_small"] == pytest.approx((np.abs(want) < 0.05).mean())
    assert learned_a(save_sae(SAE(SAEConfig(d_in=8, d_sae=12, activation="topk", k=2)), tmp_path / "linear")) is None


def test_metric_items_only_when_their_mean_is_the_reported_value():
    rows = [{"letter": "a", "absorption_fraction": 0.2}, {"letter": "b", "absorption_fraction": 0.4}]
    assert metric_items(ABS, {"mean_absorption_fraction_score": 0.3, "per_letter": rows}) == {"a": 0.2, "b": 0.4}
    assert metric_items(ABS, {"mean_absorption_fraction_score": 0.31, "per_letter": rows}) is None
    per_task = {"t1": {"id": {"gap": 0.1}, "ood_a": {"gap": 0.2}, "ood_b": {"gap": 0.4}, "_probe": {}},
                "t2": {"id": {"gap": 0.3}, "ood_a": {"gap": 0.0}}}
    got = metric_items("ood_probing.ood_gap", {"ood_gap": 0.15, "per_task": per_task})
    assert got == pytest.approx({"t1": 0.3, "t2": 0.0})
    got = metric_items("ood_probing.id_gap", {"id_gap": 0.2, "per_task": per_task})
    assert got == pytest.approx({"t1": 0.1, "t2": 0.3})
    assert metric_items("core.fve", {"fve": 0.5}) is None
    # SCR: one item per (dataset, pair) run that chose a direction; TPP: one per dataset
    pairs = [{"dataset": "d", "pair": ["a", "b"], "scr_metric_threshold_20": 0.1},
             {"dataset": "d", "pair": ["c", "e"], "scr_metric_threshold_20": 0.3},
             {"dataset": "w", "pair": ["f", "g"], "scr_metric_threshold_20": None}]
    assert metric_items("scr.scr_metric_threshold_20", {"scr_metric_threshold_20": 0.2, "per_pair": pairs}) == \
        {"d:a/b": 0.1, "d:c/e": 0.3}
    per_ds = {"bbc": {"tpp_threshold_20_total_metric": 0.1}, "pos": {"tpp_threshold_20_total_metric": 0.5}}
    assert metric_items("tpp.tpp_threshold_20_total_metric", {"tpp_threshold_20_total_metric": 0.3,
                                                              "per_dataset": per_ds}) == {"bbc": 0.1, "pos": 0.5}
    assert metric_name("scr.scr_metric_threshold_20") == "SCR, 20 latents ablated"
    assert metric_name("tpp.tpp_threshold_5_total_metric") == "TPP, 5 latents ablated"


def _chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return run_chromium(tmp_path, url, *extra, budget_ms=3000)


def test_html_renders_in_headless_chromium(report, tmp_path):
    _, out = report
    page = out / "report.html"
    doc = page.read_text()
    assert "<script" not in doc and "http://" not in doc and "https://" not in doc  # no external assets
    assert "Masking &lt;b&gt;&amp;&lt;/b&gt;" in doc and "<b>&" not in doc  # escaped text
    dom = _chromium(tmp_path, page.as_uri(), "--dump-dom").stdout
    claims = dom[dom.index("<table class=\"claims\">"):]
    claims = claims[:claims.index("</table>")]
    assert claims.count('class="v-reproduced"') == 2 and claims.count('class="v-contradicted"') == 1
    assert claims.count('class="v-inconclusive"') == 4 and "C2R (Smith 2025)" in claims
    assert dom.index('class="claims"') < dom.index('class="spread"') < dom.index('class="metrics"')
    shot = tmp_path / "report.png"
    _chromium(tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1400,1600", "--hide-scrollbars")
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert shot.stat().st_size > 20_000 and img.std() > 10  # text, coloured cells and figures, not a blank page
