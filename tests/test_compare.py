"""saelab compare: experiment files and sweeps, bundled experiments, the plan, shared caches, arms x sweep points x
seeds, evals, resumability and the report (on the tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saelab.data.split import DataConfig
from saelab.compare import (ExperimentConfig, _train_config, bundled_experiments, describe, experiment_claims,
                            first_runs, load_experiment, plan, run_experiment, sweep_points, train_passes, validate)
from saelab.regularizers import parse_regularizer


@pytest.fixture()
def experiment(tmp_path, tiny_llama_dir):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(40):
        (texts / f"{i}.txt").write_text(" ".join(f"token{(i * 13 + j) % 70} goes here" for j in range(50)))
    return ExperimentConfig(
        name="tiny", out=str(tmp_path / "cmp"), model=str(tiny_llama_dir), hook_name="blocks.1.hook_resid_post",
        n_tokens=2000, context_size=32, data=DataConfig(corpora=[], text_files=[str(texts)], eval_fraction=0.2),
        base={"activation": "batchtopk", "k": 4, "expansion_factor": 2, "n_tokens": 4000, "batch_size": 200, "lr": 3e-3},
        arms={"baseline": {"sweep": {"k": [2, 4]}}, "c2r": {"regularizers": ["c2r:lambda=0.5,every=1"]},
              "masked": {"mask_prob": 0.15}},
        seeds=[0, 1], evals=["core"], eval_overrides={"core": {"n_tokens": 200, "context_size": 32}},
        claims=[{"paper": "C2R", "arm": "c2r", "expect": {"core.average_max_decoder_cosine_sim": "down"}, "fve_tolerance": 1.0}],
        browsers=False,
    )


def _labels(runs) -> list[str]:
    return list(dict.fromkeys(r.label for r in runs))


def test_bundled_experiments_resolve_by_name(tmp_path, monkeypatch):
    assert bundled_experiments() == ["default", "paper", "paper_gpu"]
    assert load_experiment() == load_experiment("default")
    with pytest.raises(FileNotFoundError, match="not a bundled experiment; bundled: default, paper, paper_gpu"):
        load_experiment("nope")
    # an existing file wins over a bundled name
    monkeypatch.chdir(tmp_path)
    Path("paper").write_text("name: mine\n")
    with pytest.raises(ValueError, match="config files must end in"):
        load_experiment("paper")
    Path("mine.yaml").write_text("name: mine\nseeds: [3]\n")
    assert load_experiment("mine.yaml").seeds == [3] and load_experiment("mine.yaml", out="x").out == "x"


def test_default_experiment_plan():
    exp = load_experiment("default")
    runs = plan(exp)
    assert _labels(runs) == ["baseline[k=16]", "baseline[k=32]", "baseline[k=64]", "c2r", "masked", "cosine_global",
                             "magnitude_bypass"]
    assert len(runs) == 14 and exp.seeds == [0, 1]
    by = {(r.label, r.seed): r for r in runs}
    assert by["baseline[k=16]", 1].sae_dir == Path("runs/compare/arms/baseline/k=16/seed1")
    assert by["c2r", 0].sae_dir == Path("runs/compare/arms/c2r/seed0") and by["c2r", 0].point == {}
    assert [_train_config(exp, by[f"baseline[k={k}]", 0]).sae.k for k in (16, 32, 64)] == [16, 32, 64]
    assert by["masked", 0].mask_prob == 0.15 and by["masked", 0].cache.name == "masked_p0.15"
    assert by["c2r", 0].cache == by["baseline[k=16]", 0].cache  # one clean harvest shared by every clean arm
    c2r = parse_regularizer(_train_config(exp, by["c2r", 0]).regularizers[0])
    assert c2r.name == "c2r" and c2r.every == 5 and c2r.params["alpha"] == 1
    # 6 clean SAEs per seed in one pass each, the masked arm alone on its cache
    assert [len(g) for g in train_passes(exp, runs)] == [6, 6, 1, 1]
    assert {c.arm: c.match for c in experiment_claims(exp)} == {"c2r": "fve", "masked": "l0", "cosine_global": "fve"}
    assert exp.eval_overrides["core"]["n_tokens"] == 4096
    assert {a: r.label for a, r in first_runs(runs).items()}["baseline"] == "baseline[k=16]"


@pytest.mark.parametrize("name", ["paper", "paper_gpu"])
def test_paper_experiment_plans(name):
    exp = load_experiment(name)
    runs = plan(exp)
    labels = _labels(runs)
    lams = (0.5, 5, 50) if name == "paper" else (0.5, 1.5, 5, 15, 50)
    n_conf = 3 + 3 * len(lams) + 6 + 3 + 6
    assert len(labels) == n_conf and len(runs) == 3 * n_conf and exp.seeds == [0, 1, 2]
    assert [lab for lab in labels if lab.startswith("c2r")] == [
        f"c2r[k={k},c2r.lambda={v:g}]" for k in (16, 32, 64) for v in lams]
    # every arm that a claim names runs at three sparsities (a frontier per claim)
    for c in experiment_claims(exp):
        assert {_train_config(exp, r).sae.k for r in runs if r.arm == c.arm} == {16, 32, 64}, c.arm
    assert "masked[mask_prob=0.25,k=64]" in labels
    by = {(r.label, r.seed): r for r in runs}
    specs = [parse_regularizer(_train_config(exp, by[lab, 2]).regularizers[0]) for lab in labels if "c2r.lambda" in lab]
    assert [s.coefficient for s in specs] == [float(v) for _ in range(3) for v in lams] and {s.every for s in specs} == {5}
    assert {s.params["alpha"] for s in specs} == {1} and {s.params["scale"] for s in specs} == {"invariant"}
    assert {r.cache.name: r.mask_prob for r in runs} == {"clean": 0.0, "masked_p0.1": 0.1, "masked_p0.25": 0.25}
    assert exp.n_tokens >= 1_000_000 and exp.n_tokens_masked >= 500_000
    raw = {r.label for r in runs if not _train_config(exp, r).normalize_activations}
    assert raw == {f"{arm}[k={k}]" for arm in ("baseline_raw", "cosine_global", "cosine_base_delta") for k in (16, 32, 64)}
    # per seed: the normalised clean SAEs in passes of at most 12, one pass of the 9 raw ones, one per masked cache
    clean = 3 + 3 * len(lams)
    assert sorted(len(g) for g in train_passes(exp, runs)) == sorted(
        [3] * 6 + [9] * 3 + [12] * 3 * (clean // 12) + ([clean % 12] * 3 if clean % 12 else []))
    claims = {c.arm: c for c in experiment_claims(exp)}
    assert claims["cosine_global"].baseline == "baseline_raw" and claims["c2r"].baseline == "baseline"
    assert claims["masked"].match == "l0" and claims["c2r"].match == "fve"
    if name == "paper":
        assert exp.eval_overrides["core"]["n_tokens"] == 16384 and exp.device == "cpu"
    else:
        assert exp.device == "cuda" and exp.base["device"] == "cuda" and exp.base["expansion_factor"] >= 16
        assert exp.n_tokens >= 50_000_000


def test_sweep_grid_labels_and_regularizer_params(tmp_path):
    assert sweep_points(None) == [{}]
    assert sweep_points({"k": [8, 16], "c2r.lambda": [0.5, 2]}) == [
        {"k": 8, "c2r.lambda": 0.5}, {"k": 8, "c2r.lambda": 2}, {"k": 16, "c2r.lambda": 0.5}, {"k": 16, "c2r.lambda": 2}]
    exp = ExperimentConfig(out=str(tmp_path), base={"regularizers": ["c2r:lambda=5,alpha=0.5,every=3"]},
                           arms={"baseline": {"regularizers": []},
                                 "c2r": {"sweep": {"k": [8, 16], "c2r.lambda": [0.5, 2e-05]}},
                                 "m": {"sweep": {"mask_prob": [0.1, 0.25], "normalize_activations": [True, False]}}},
                           seeds=[0, 7])
    validate(exp)
    runs = plan(exp)
    assert _labels(runs) == ["baseline", "c2r[k=8,c2r.lambda=0.5]", "c2r[k=8,c2r.lambda=2e-05]",
                             "c2r[k=16,c2r.lambda=0.5]", "c2r[k=16,c2r.lambda=2e-05]",
                             "m[mask_prob=0.1,normalize_activations=True]", "m[mask_prob=0.1,normalize_activations=False]",
                             "m[mask_prob=0.25,normalize_activations=True]", "m[mask_prob=0.25,normalize_activations=False]"]
    assert [r.seed for r in runs[:4]] == [0, 7, 0, 7]
    r = next(r for r in runs if r.label == "c2r[k=16,c2r.lambda=2e-05]" and r.seed == 7)
    assert r.sae_dir == tmp_path / "arms" / "c2r" / "k=16,c2r.lambda=2e-05" / "seed7"
    cfg = _train_config(exp, r)
    spec = parse_regularizer(cfg.regularizers[0])
    # only the swept parameter changes; the arm's (here: base's) alpha and every are kept
    assert (cfg.sae.k, cfg.seed, spec.coefficient, spec.params["alpha"], spec.every) == (16, 7, 2e-05, 0.5, 3)
    assert _train_config(exp, runs[0]).regularizers == []
    m = [r for r in runs if r.arm == "m"]
    assert {r.cache.name for r in m} == {"masked_p0.1", "masked_p0.25"}
    assert {_train_config(exp, r).normalize_activations for r in m} == {True, False}
    # normalisation is a data field: the masked SAEs split into one pass per (cache, seed, normalisation)
    assert sorted(len(g) for g in train_passes(exp, m)) == [1] * 8
    text = describe(exp)
    assert "SAEs (18 = 9 configurations x 2 seeds" in text and "masked_p0.25" in text


@pytest.mark.parametrize("arms, match", [
    ({"x": {"sweep": {"learning_rate": [1, 2]}}}, r"unknown key 'learning_rate'.*c2r\.lambda"),
    ({"x": {"sweep": {"k": []}}}, r"sweep\.k must be a non-empty list"),
    ({"x": {"sweep": {"k": 16}}}, r"sweep\.k must be a non-empty list"),
    ({"x": {"sweep": {}}}, r"non-empty mapping"),
    ({"x": {"sweep": {"c2r.lambda": [1, 2]}}}, r"sweeps regularizer 'c2r', which the arm does not have"),
    ({"x": {"regularizers": ["c2r"], "sweep": {"c2r.lamda": [1, 2]}}}, r"unknown parameter 'lamda' of 'c2r'"),
    ({"x": {"regularizers": ["c2r"], "sweep": {"c2r.lambda": [-1.0]}}}, r"lambda=-1.0 must be >= 0"),
    ({"x": {"sweep": {"nope.lambda": [1]}}}, r"unknown regularizer 'nope'"),
    ({"x": {"sweep": {"lr": [0.1, 0.10000001]}}}, r"values \['0.1'\] repeat"),
    ({"x": {"k": 8, "sweep": {"k": [8, 16]}}}, r"'k' is both set and swept"),
    ({"x": {"sweep": {"seed": [1, 2]}}}, r"'seed' cannot be swept .*seeds"),
    ({"x": {"sweep": {"lr": ["1e-3"]}}}, r"lr = '1e-3' is not a float .*1\.0e-3"),
    ({"x": {"sweep": {"mask_prob": [0.1, 1.5]}}}, r"mask_prob = 1\.5 must be a number in \[0, 1\)"),
    ({"x": {"sweep": {"encoder": ["a/b"]}}}, r"folder name"),
    ({"x/y": {}}, r"arm name 'x/y'"),
    ({"x": {"seed": 3}}, r"set by the experiment per run"),
])
def test_bad_sweeps_name_the_problem(arms, match):
    with pytest.raises(ValueError, match=match):
        validate(ExperimentConfig(arms={"baseline": {}, **arms}))


def test_base_may_not_sweep():
    with pytest.raises(ValueError, match="base may not sweep"):
        validate(ExperimentConfig(base={"sweep": {"k": [8, 16]}}))


@pytest.mark.parametrize("claim, match", [
    ({"arm": "x", "expect": {"core.fve": "up"}, "match": "L0"}, r"match 'L0' must be one of l0, fve, none"),
    ({"arm": "x", "expect": {"core.fve": "up"}, "baseline": "nope"}, r"baseline 'nope' is not among the arms"),
    ({"arm": "nope", "expect": {"core.fve": "up"}}, r"arm 'nope' is not among the arms"),
    ({"arm": "baseline", "expect": {"core.fve": "up"}}, r"its own baseline"),
    ({"arm": "x", "expect": {"core.fve": "higher"}}, r"direction 'higher' must be up or down"),
    ({"arm": "x", "expect": {}}, r"expect must map at least one metric"),
    ({"arm": "x", "expect": {"absorption.mean_absorption_fraction_score": "down"}}, r"suite in evals \['core'\]"),
    ({"arm": "x", "expect": {"core.fve": "up"}, "fve_tolerance": -1}, r"fve_tolerance must be a number >= 0"),
    ({"arm": "x", "expect": {"core.fve": "up"}, "expected": 1}, r"unknown keys \['expected'\]"),
    ({"expect": {"core.fve": "up"}}, r"missing keys \['arm'\]"),
])
def test_bad_claims_name_the_problem(claim, match):
    with pytest.raises(ValueError, match=match):
        validate(ExperimentConfig(arms={"baseline": {}, "x": {}}, claims=[{"paper": "P", **claim}]))


def test_eval_arms_and_overrides_are_checked():
    with pytest.raises(ValueError, match=r"eval_arms\.core: unknown arms \['nope'\]"):
        validate(ExperimentConfig(eval_arms={"core": ["nope"]}))
    with pytest.raises(ValueError, match=r"eval_overrides\.core: unknown keys \['n_token'\]"):
        validate(ExperimentConfig(eval_overrides={"core": {"n_token": 5}}))
    with pytest.raises(ValueError, match=r"not measured on arm 'x' \(eval_arms\.core\)"):
        validate(ExperimentConfig(arms={"baseline": {}, "x": {}}, eval_arms={"core": ["baseline"]},
                                  claims=[{"paper": "P", "arm": "x", "expect": {"core.fve": "up"}}]))
    with pytest.raises(ValueError, match="harvest: keys \\['n_tokens'\\] are unknown or set by the experiment"):
        validate(ExperimentConfig(harvest={"n_tokens": 5}))


def test_compare_plan_cli_loads_nothing(tmp_path, monkeypatch, capsys):
    import saelab.compare as cmp
    from saelab.cli import main

    monkeypatch.setattr(cmp, "load_lm", lambda *a, **k: pytest.fail("--plan loaded the model"))
    monkeypatch.setattr(cmp, "run_experiment", lambda *a, **k: pytest.fail("--plan ran the experiment"))
    assert main(["compare", "--experiment", "paper", "--plan", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "SAEs (81 = 27 configurations x 3 seeds; 0 already trained)" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("masked_p0.25"))
    assert line.split()[1:5] == ["500,000", "tokens", "mask_prob", "0.25"] and str(tmp_path / "p" / "caches") in line
    assert "c2r[k=16,c2r.lambda=0.5]" in out and "cosine_global vs baseline_raw, match fve" in out
    assert "training passes (12;" in out and "core               81 SAEs {'n_tokens': 16384}" in out
    assert main(["compare", "--experiment", "nope", "--plan"]) == 2
    assert "bundled: default, paper, paper_gpu" in capsys.readouterr().err


def test_bad_experiment_files_name_the_problem(tmp_path):
    bad = tmp_path / "e.yaml"
    bad.write_text("arms: {baseline: {}, x: {learning_rate: 1}}\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_experiment(bad)
    bad.write_text("arms: {a: {}}\n")
    with pytest.raises(ValueError, match="baseline arm 'baseline'"):
        load_experiment(bad)
    bad.write_text("evals: [core, nope]\n")
    with pytest.raises(KeyError, match="nope"):
        load_experiment(bad)


def test_compare_runs_resumes_and_reports(experiment, monkeypatch):
    report = run_experiment(experiment)
    out = report.parent
    caches = sorted(p.name for p in (out.parent / "caches").iterdir())
    assert caches == ["clean", "masked_p0.15"]
    runs = plan(experiment)
    assert _labels(runs) == ["baseline[k=2]", "baseline[k=4]", "c2r", "masked"]
    for r in runs:  # every SAE of the sweep trained in its own folder and evaluated
        assert json.loads((r.sae_dir / "training_cfg.json").read_text())["sae"]["k"] == (r.point.get("k") or 4)
        assert json.loads((r.sae_dir / "eval_core.json").read_text())["l0"] > 0
    l0 = {r.label: json.loads((r.sae_dir / "eval_core.json").read_text())["l0"] for r in runs if r.seed == 0}
    assert l0["baseline[k=2]"] < l0["baseline[k=4]"]  # the sweep value reached the trainer
    assert report.is_file() and (out / "report.html").is_file() and (out / "summary.json").is_file()
    assert "C2R" in report.read_text()
    # resuming: nothing is trained or evaluated again
    import saelab.compare as cmp

    monkeypatch.setattr(cmp, "train_many", lambda cfgs: pytest.fail(f"retrained {[c.out for c in cfgs]}"))
    monkeypatch.setattr(cmp, "harvest", lambda cfg, lm=None: None)
    import saelab.evals as ev

    monkeypatch.setattr(ev, "run_suite", lambda *a, **k: pytest.fail("re-evaluated"))
    timings = json.loads((out.parent / "timings.json").read_text())
    stages = {k: v for k, v in timings.items() if k != "total"}
    assert {"harvest_p0", "harvest_p0.15", "eval_core"} <= set(stages) and all(v > 0 for v in stages.values())
    assert timings["total"] == pytest.approx(sum(stages.values()))
    assert run_experiment(experiment) == report
    assert json.loads((out.parent / "timings.json").read_text()) == timings  # a resumed run with no work adds nothing


def test_multi_hook_experiment_plans_one_harvest_and_one_pass_for_every_hook(experiment):
    import dataclasses

    hooks = ["blocks.0.hook_resid_post", "model.layers.1.mlp"]
    exp = dataclasses.replace(experiment, hook_name=hooks)
    validate(exp)
    runs = plan(exp)
    assert len(runs) == 2 * len(plan(experiment))
    root = Path(exp.out)
    by = {(r.hook, r.label, r.seed): r for r in runs}
    r = by["model.layers.1.mlp", "c2r", 1]
    assert r.sae_dir == root / "hooks" / "model.layers.1.mlp" / "arms" / "c2r" / "seed1"
    assert r.cache == root / "caches" / "clean" / "model.layers.1.mlp"
    assert by["blocks.0.hook_resid_post", "masked", 0].cache == root / "caches" / "masked_p0.15" / "blocks.0.hook_resid_post"
    # per seed and harvest: one pass for the SAEs of both hooks (3 clean SAEs per hook, 1 masked)
    passes = train_passes(exp, runs)
    assert sorted(len(g) for g in passes) == [2, 2, 6, 6]
    assert all({r.hook for r, _ in g} == set(hooks) for g in passes)
    text = describe(exp)
    assert "hooks blocks.0.hook_resid_post, model.layers.1.mlp" in text and "clean/model.layers.1.mlp" in text
    for bad, match in ((["blocks.*.hook_resid_post", "x"], "one by one"), ([hooks[0], hooks[0]], "distinct")):
        with pytest.raises(ValueError, match=match):
            validate(dataclasses.replace(experiment, hook_name=bad))


def test_multi_hook_experiment_runs_and_reports_per_hook(experiment, monkeypatch):
    """Two hooks, two arms, two seeds: one harvest, one training pass per seed over both hooks' caches, the evals
    and a report per hook, an index; each SAE equals the one trained alone on its hook's cache."""
    import dataclasses

    import saelab.compare as cmp
    from saelab.sae.saving import load_sae
    from saelab.train import train

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    exp = dataclasses.replace(experiment, hook_name=hooks, arms={"baseline": {}, "c2r": experiment.arms["c2r"]},
                              threads=1)
    with pytest.raises(ValueError, match="name the hooks as the harvest does"):
        run_experiment(dataclasses.replace(exp, hook_name=["model.layers.0", hooks[1]]))
    passes = []
    real = cmp.train_many
    monkeypatch.setattr(cmp, "train_many", lambda cfgs: passes.append(len(cfgs)) or real(cfgs))
    index = run_experiment(exp)
    root = Path(exp.out)
    assert passes == [4, 4] and sorted(p.name for p in (root / "caches" / "clean").iterdir()) == hooks
    text = index.read_text()
    for h in hooks:
        rep = root / "hooks" / h / "report" / "report.md"
        assert rep.is_file() and f"hooks/{h}/report/report.md" in text and f"hook `{h}`" in rep.read_text()
    for r in plan(exp):
        assert json.loads((r.sae_dir / "cfg.json").read_text())["hook_name"] == r.hook
        assert json.loads((r.sae_dir / "eval_core.json").read_text())["l0"] > 0
    r = next(r for r in plan(exp) if r.hook == hooks[1] and r.arm == "c2r" and r.seed == 1)
    alone = train(dataclasses.replace(_train_config(exp, r), out=str(root / "alone")))
    a, b = load_sae(alone.sae_dir), load_sae(r.sae_dir)
    assert all(torch.equal(p, b.state_dict()[k]) for k, p in a.state_dict().items())
    # resuming finds every hook's cache, SAE and eval done: nothing runs and no stage time is added
    timings = json.loads((root / "timings.json").read_text())
    monkeypatch.setattr(cmp, "train_many", lambda cfgs: pytest.fail(f"retrained {[c.out for c in cfgs]}"))
    monkeypatch.setattr(cmp, "harvest", lambda cfg, lm=None: None)
    import saelab.evals as ev

    monkeypatch.setattr(ev, "run_suite", lambda *a, **k: pytest.fail("re-evaluated"))
    assert run_experiment(exp) == index
    assert json.loads((root / "timings.json").read_text()) == timings
