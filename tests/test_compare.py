"""saelab compare: shared caches, arms x seeds, evals, resumability and the report, on the tiny model."""

from __future__ import annotations

import json

import pytest

from saelab.compare import ExperimentConfig, load_experiment, plan, run_experiment
from saelab.activations.harvest import DataConfig
from saelab.report_compare import check_claim, Stat


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
        arms={"baseline": {}, "c2r": {"regularizers": ["c2r:lambda=0.5,every=1"]}, "masked": {"mask_prob": 0.15}},
        seeds=[0, 1], evals=["core"], eval_overrides={"core": {"n_tokens": 200, "context_size": 32}},
        claims=[{"paper": "C2R", "arm": "c2r", "expect": {"core.average_max_decoder_cosine_sim": "down"}, "fve_tolerance": 1.0}],
        browsers=False,
    )


def test_default_experiment_file_is_valid():
    exp = load_experiment()
    arms = {r.arm: r for r in plan(exp)}
    assert {"baseline", "c2r", "masked", "cosine_global", "cosine_base_delta", "magnitude_bypass"} <= set(arms)
    assert arms["masked"].mask_prob == 0.15 and arms["masked"].cache.name == "masked_p0.15"
    assert arms["c2r"].cache == arms["baseline"].cache  # one clean harvest shared by every clean arm


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
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stats"]) == {"baseline", "c2r", "masked"}
    assert summary["stats"]["baseline"]["core.fve"]["n"] == 2 and summary["stats"]["baseline"]["core.fve"]["std"] is not None
    md = report.read_text()
    assert "± " in md and "(Δ " in md and "C2R (c2r vs baseline)" in md
    assert (out / "report.html").read_text().count("<table>") == 2
    assert (out / "plots" / "fve_vs_l0.png").stat().st_size > 5000
    assert (out / "plots" / "training_curves.png").is_file()
    # resuming: nothing is trained or evaluated again
    import saelab.compare as cmp

    monkeypatch.setattr(cmp, "train_many", lambda cfgs: pytest.fail(f"retrained {[c.out for c in cfgs]}"))
    monkeypatch.setattr(cmp, "harvest", lambda cfg, lm=None: None)
    import saelab.evals as ev

    monkeypatch.setattr(ev, "run_suite", lambda *a, **k: pytest.fail("re-evaluated"))
    assert run_experiment(experiment) == report


def test_claim_verdicts():
    st = {"base": {"m.x": Stat(1.0, 0.1, 3), "core.fve": Stat(0.8, 0.01, 3)},
          "arm": {"m.x": Stat(0.5, 0.1, 3), "core.fve": Stat(0.79, 0.01, 3)}}
    c = check_claim({"paper": "P", "arm": "arm", "expect": {"m.x": "down"}}, st, "base")
    assert c["verdict"] == "reproduced" and "x -0.5" in c["sentence"] and "FVE -0.01" in c["sentence"]
    c = check_claim({"paper": "P", "arm": "arm", "expect": {"m.x": "up"}}, st, "base")
    assert c["verdict"] == "not reproduced"
    st["arm"]["core.fve"] = Stat(0.7, 0.01, 3)  # FVE dropped beyond the tolerance
    assert check_claim({"paper": "P", "arm": "arm", "expect": {"m.x": "down"}}, st, "base")["verdict"] == "not reproduced"
    c = check_claim({"paper": "P", "arm": "arm", "expect": {"m.x": "down"}}, st, "base")
    assert "FVE fell by more than the 0.02 tolerance" in c["sentence"]
    noisy = {"base": {"m.x": Stat(1.0, 0.5, 3)}, "arm": {"m.x": Stat(0.8, 0.5, 3)}}
    c = check_claim({"paper": "P", "arm": "arm", "expect": {"m.x": "down"}}, noisy, "base")
    assert c["verdict"] == "not reproduced" and "beyond the seed noise" in c["sentence"]
    # one seed: the right direction is reported as such, never as "reproduced"
    one = {"base": {"m.x": Stat(1.0, None, 1), "core.fve": Stat(0.8, None, 1)},
           "arm": {"m.x": Stat(0.9, None, 1), "core.fve": Stat(0.8, None, 1)}}
    c = check_claim({"paper": "P", "arm": "arm", "expect": {"m.x": "down"}}, one, "base")
    assert c["verdict"] == "direction matches (1 seed)" and "add seeds" in c["sentence"]
    one["arm"]["m.x"] = Stat(1.2, None, 1)
    c = check_claim({"paper": "P", "arm": "arm", "expect": {"m.x": "down"}}, one, "base")
    assert c["verdict"] == "not reproduced" and "x +0.2" in c["sentence"] and "did not go down" in c["sentence"]
