"""The evals on a device: every suite keeps its tensors on one device, and ``--device`` reaches every model load.

A CPU-only machine cannot run CUDA, but it can see what would break there: a tensor factory called by saelab
without ``device=`` makes a CPU tensor that meets CUDA tensors in the next op (:class:`device_audit.FactoryAudit`).
Each suite runs on a tiny SAE and the tiny Llama under that audit, on the ``device`` fixture (``cpu`` here;
``pytest -m device --device cuda tests/test_eval_devices.py`` runs the same tests on a GPU and compares the core
metrics with the CPU's). The plumbing tests record the device that ``load_lm`` / ``load_sae`` / the training and
harvest configs receive from ``saelab eval``, ``saelab demo`` and ``saelab compare``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from device_audit import FactoryAudit

from saelab.cli import main
from saelab.data.split import DataConfig
from saelab.evals import EVAL_SUITES, run_suite
from saelab.evals.base import EvalConfig, LMActivationStore
from saelab.evals.judges import JudgeUsage
from saelab.models.lm import load_lm
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE
from saelab.sae.saving import save_sae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def sae_dirs(tiny_llama_dir, tmp_path_factory):
    """Two random SAEs at HOOK of the tiny Llama (A: TopK, B: ReLU), saved."""
    root = tmp_path_factory.mktemp("dev_saes")
    out = []
    for i, act in enumerate(("topk", "relu")):
        torch.manual_seed(i)
        sae = SAE(SAEConfig(d_in=32, d_sae=48, activation=act, k=4, model_name=str(tiny_llama_dir), hook_name=HOOK))
        out.append(save_sae(sae, root / f"sae_{act}"))
    return out


class _Judge:
    """Explains every latent as "the word cat" and says window 1 activates (an auto-interp judge without an LLM)."""

    description = "scripted"

    def __init__(self) -> None:
        self.usage = JudgeUsage()

    def complete(self, conversations, max_tokens):
        return ["1" if c[-1]["content"].startswith("Explanation:") else "the word cat" for c in conversations]


def _configs(text_dir: Path, sae_b: Path) -> dict[str, dict]:
    """Settings of every suite sized for the tiny model (each runs in about a second)."""
    data = DataConfig(corpora=[], text_files=[str(text_dir)], eval_fraction=0.5)
    diag = dict(n_tokens=300, context_size=32, batch_size=4, data=data)
    return {
        "core": dict(n_tokens=300, context_size=32, batch_size=4, data=data),
        "core_reference": dict(n_tokens=300, context_size=32, batch_size=4, data=data, reuse_lm=False),
        "norm_quartiles": diag,
        "feature_matching": {**diag, "sae_b": str(sae_b)},
        "cos_inner": {**diag, "n_latents": 3, "n_texts": 4, "text_size": 24, "ablation_batch": 4},
        "absorption": dict(n_words=300, batch_size=64, probe_batch_size=64, min_probe_f1=0.0, k_max=3),
        "sparse_probing": dict(datasets=["tweet_sentiment"], n_train_per_class=8, n_test_per_class=4),
        "ood_probing": dict(tasks=["sentiment"], n_train_per_class=8, n_id_test_per_class=4, n_ood_per_class=4, k=8),
        "scr": dict(datasets=["vader_domain_sentiment"], q_train=8, q_test=4, n_values=[2, 10]),
        "tpp": dict(datasets=["bbc_topic"], n_train_per_class=8, n_test_per_class=4, n_values=[2, 5]),
        "autointerp": dict(n_tokens=600, context_size=48, buffer=5, n_latents=2, n_bootstrap=50, data=data),
    }


SUITES = list(_configs(Path("."), Path(".")))


def _run(name: str, sae_dir: Path, kw: dict, device: torch.device, lm, store, tmp_path: Path, monkeypatch):
    suite = "core" if name == "core_reference" else name
    if suite == "autointerp":
        import saelab.evals.autointerp as ai

        monkeypatch.setattr(ai, "make_judge", lambda cfg, lm=None: _Judge())
    cfg = EVAL_SUITES.get(suite).config_cls(sae=str(sae_dir), out=str(tmp_path / f"{name}.json"), progress=False,
                                            device=str(device), **kw)
    return run_suite(suite, cfg, lm=lm, store=store)


@pytest.mark.parametrize("name", SUITES)
def test_every_suite_runs_without_device_less_factories(name, device, tiny_llama_dir, text_dir, sae_dirs, tmp_path,
                                                        monkeypatch):
    """Each suite, LM and SAE on ``device``: no tensor factory of saelab's code places a tensor on the default
    device (the calls that would make CPU tensors meet CUDA ones), and the result is a real one."""
    lm = load_lm(str(tiny_llama_dir), device=str(device))
    store = LMActivationStore(lm.name, HOOK, root=tmp_path / "store")
    kw = _configs(text_dir, sae_dirs[1])[name]
    for attempt in ("cache miss", "cache hit"):  # the LM stage computes, then reads the cached CPU tensors
        with FactoryAudit() as audit:
            res = _run(name, sae_dirs[0], kw, device, lm, store, tmp_path, monkeypatch)
        assert dict(audit.calls) == {}, (attempt, dict(audit.calls))
    d = res.to_dict()
    checks = {
        "core": lambda: 0 < d["l0"] <= 4 and d["n_tokens"] >= 300 and math.isfinite(d["kl_sae"]),
        "core_reference": lambda: 0 < d["l0"] <= 4 and math.isfinite(d["ce_sae"]),
        "norm_quartiles": lambda: sum(b["n_tokens"] for b in d["bins"]) == d["n_tokens"] > 0,
        "feature_matching": lambda: d["n_tokens"] > 0 and d["n_alive_a"] > 0 and d["d_sae_b"] == 48,
        "cos_inner": lambda: d["n_latents"] == 3 and all(r["mean_kl"] >= 0 for r in d["latents"]),
        "absorption": lambda: d["n_words"] == 300 and d["status"] in ("ok", "too_few_letters"),
        "sparse_probing": lambda: 0.0 <= d["llm_test_accuracy"] <= 1.0,
        "ood_probing": lambda: "sentiment" in d["per_task"],
        "scr": lambda: len(d["per_pair"]) == 4 and d["scr_metric_threshold_2"] is not None,
        "tpp": lambda: "tpp_threshold_2_total_metric" in d["tpp_metrics"],
        "autointerp": lambda: d["n_scored"] == len(d["latents"]) == 2,
    }
    assert checks[name](), d


CORE_KEYS = ("fve", "mse", "cossim", "l0", "l1", "ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero", "dead_frac")


def test_core_metrics_on_the_device_equal_the_cpu_ones(device, tiny_llama_dir, text_dir, sae_dirs, tmp_path,
                                                       monkeypatch):
    """The core eval gives the CPU's numbers on ``device`` (float32 rounding apart; identical on the CPU)."""
    kw = _configs(text_dir, sae_dirs[1])["core"]
    out = {}
    for dev in (torch.device("cpu"), device):
        lm = load_lm(str(tiny_llama_dir), device=str(dev))
        store = LMActivationStore(lm.name, HOOK, root=tmp_path / f"store_{dev.type}")
        out[dev] = _run("core", sae_dirs[0], kw, dev, lm, store, tmp_path, monkeypatch).to_dict()
    cpu, other = out[torch.device("cpu")], out[device]
    for k in CORE_KEYS:
        if device.type == "cpu":
            assert other[k] == cpu[k], k
        else:
            assert other[k] == pytest.approx(cpu[k], rel=1e-3, abs=1e-4), k


# -- the device reaches every load ------------------------------------------------------------------------------


@pytest.fixture()
def loads(monkeypatch, tiny_llama_dir):
    """Record the device each ``load_lm`` / ``load_sae`` call receives; both still load on the CPU, and
    ``resolve_device`` accepts any name (this machine has no GPU), so a ``cuda:1`` run can go through."""
    import saelab.devices as devices
    import saelab.models.lm as lm_mod
    import saelab.sae.saving as saving

    seen: dict[str, list[str]] = {"lm": [], "sae": []}
    real_lm, real_sae = lm_mod.load_lm, saving.load_sae

    def fake_lm(name, *, device="cpu", dtype=torch.float32):
        seen["lm"].append(str(device))
        return real_lm(str(tiny_llama_dir))

    def fake_sae(path, *, device="cpu"):
        seen["sae"].append(str(device))
        return real_sae(path)

    monkeypatch.setattr(lm_mod, "load_lm", fake_lm)
    monkeypatch.setattr(saving, "load_sae", fake_sae)
    monkeypatch.setattr(devices, "resolve_device", lambda d, local_rank=None: torch.device(d))
    return seen


@pytest.mark.parametrize("suite", ["core", "norm_quartiles"])
def test_saelab_eval_device_flag_reaches_the_lm_and_the_sae(suite, loads, sae_dirs, text_dir, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    out, conf = tmp_path / "r.json", tmp_path / "eval.json"
    conf.write_text(json.dumps({"n_tokens": 64, "context_size": 32, "progress": False,
                                "data": {"corpora": [], "text_files": [str(text_dir)], "eval_fraction": 0.5}}))
    rc = main(["eval", "--suite", suite, "--config", str(conf), "--sae", str(sae_dirs[0]), "--device", "cuda:1",
               "--out", str(out)])
    assert rc == 0
    assert loads == {"lm": ["cuda:1"], "sae": ["cuda:1"]}
    assert json.loads(out.read_text())["config"]["device"] == "cuda:1"


def test_saelab_eval_all_passes_the_device_to_every_suite(monkeypatch):
    from saelab import cli

    got = {}

    def record(cfg, suite="core"):
        if suite == "all":
            return real(cfg, suite)
        got[suite] = cfg.device

    real = cli._run_eval
    monkeypatch.setattr(cli, "_run_eval", record)
    real(cli.EvalAllConfig(sae="x", sae_b="y", device="cuda:2"), "all")
    expected = {n for n in EVAL_SUITES.names() if getattr(EVAL_SUITES.get(n).config_cls, "include_in_all", True)}
    assert set(got) == expected and set(got.values()) == {"cuda:2"}


def test_every_suite_config_has_the_device_field():
    for name in EVAL_SUITES.names():
        cls = EVAL_SUITES.get(name).config_cls
        assert issubclass(cls, EvalConfig) and cls().device == "cpu", name
        assert cls(device="cuda:3").device == "cuda:3"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_gpu_is_a_clear_error_before_anything_loads(sae_dirs, capsys, monkeypatch):
    import saelab.models.lm as lm_mod

    monkeypatch.setattr(lm_mod, "load_lm", lambda *a, **k: pytest.fail("loaded the LM"))
    cfg = EVAL_SUITES.get("core").config_cls(sae=str(sae_dirs[0]), device="cuda")
    with pytest.raises(ValueError, match=r"--device cuda asks for CUDA but torch.cuda.is_available\(\) is False"):
        run_suite("core", cfg)
    assert main(["eval", "--suite", "absorption", "--sae", str(sae_dirs[0]), "--device", "cuda"]) == 2
    assert "use --device cpu" in capsys.readouterr().err
    from saelab.demo import DemoConfig, run_demo

    monkeypatch.setattr("saelab.demo.load_lm", lambda *a, **k: pytest.fail("loaded the LM"))
    with pytest.raises(ValueError, match="torch.cuda.is_available"):
        run_demo(DemoConfig(device="cuda:0"))


def test_demo_device_reaches_the_lm_harvest_training_and_eval(monkeypatch, tmp_path):
    import saelab.demo as demo
    from saelab.evals.core import CoreMetrics

    seen = {}
    monkeypatch.setattr(demo, "resolve_device", lambda d: torch.device(d))
    monkeypatch.setattr(demo, "load_lm", lambda name, device="cpu": seen.setdefault("lm", device) and object())

    class _Cache:
        path, n_tokens = tmp_path / "cache", 10

    def fake_harvest_and_train(hcfg, tcfgs, lm=None, stream=False):
        seen["harvest"], seen["train"] = hcfg.device, [c.device for c in tcfgs]
        return _Cache(), [], {"harvest": 1.0, "train": 1.0, "harvest_train": 2.0}

    def fake_eval(cfg, lm=None):
        seen["eval"] = cfg.device
        return CoreMetrics(n_tokens=1, **dict.fromkeys(
            ("fve", "mse", "cossim", "l2_ratio", "relative_reconstruction_bias", "l0", "l1", "dead_frac",
             "dense_frac_1pct", "dense_frac_10pct", "average_max_decoder_cosine_sim"), 0.5))

    monkeypatch.setattr(demo, "harvest_and_train", fake_harvest_and_train)
    monkeypatch.setattr(demo, "run_core_eval", fake_eval)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cuda:1"]) == 0
    assert seen == {"lm": "cuda:1", "harvest": "cuda:1", "train": ["cuda:1"], "eval": "cuda:1"}


def test_compare_device_reaches_the_lm_harvests_training_and_evals(monkeypatch, tmp_path, tiny_llama_dir):
    import saelab.compare as cmp
    import saelab.evals as ev
    from saelab.compare import ExperimentConfig, _train_config, plan, run_experiment

    exp = ExperimentConfig(name="dev", out=str(tmp_path / "cmp"), model=str(tiny_llama_dir), device="cuda:1",
                           base={"activation": "topk", "k": 4}, arms={"baseline": {}, "cpu_arm": {"device": "cpu"}},
                           evals=["core", "norm_quartiles"], browsers=False)
    seen: dict[str, list] = {"lm": [], "harvest": [], "train": [], "eval": []}
    monkeypatch.setattr(cmp, "resolve_device", lambda d: torch.device(d))
    monkeypatch.setattr(cmp, "load_lm", lambda name, device="cpu", dtype="fp32": seen["lm"].append(device) or
                        type("LM", (), {"name": name})())
    monkeypatch.setattr(cmp, "harvest", lambda cfg, lm=None: seen["harvest"].append(cfg.device))
    monkeypatch.setattr(cmp, "train_many", lambda cfgs: seen["train"].extend((Path(c.out).parent.name, c.device)
                                                                             for c in cfgs))
    monkeypatch.setattr(ev, "run_suite", lambda name, cfg, **kw: seen["eval"].append((name, cfg.device)))
    monkeypatch.setattr(cmp, "write_report", lambda exp, runs, lm=None: tmp_path / "report.md")
    run_experiment(exp)
    assert seen["lm"] == ["cuda:1"] and seen["harvest"] == ["cuda:1"]
    assert sorted(seen["train"]) == [("baseline", "cuda:1"), ("cpu_arm", "cpu")]  # an arm's own device wins
    assert sorted(seen["eval"]) == [("core", "cuda:1")] * 2 + [("norm_quartiles", "cuda:1")] * 2
    # the --device override of `saelab compare` replaces the experiment's
    run = plan(exp)[0]
    assert _train_config(dataclasses.replace(exp, device="cuda:0"), run).device == "cuda:0"
    assert cmp.load_experiment("default", device="cuda:5").device == "cuda:5"


def test_run_suite_keeps_lm_activations_where_the_config_says(tiny_llama_dir, sae_dirs, tmp_path):
    """``activation_cache`` of a suite's config is the store's root when the caller passes no store."""
    lm = load_lm(str(tiny_llama_dir))
    cfg = EVAL_SUITES.get("tpp").config_cls(sae=str(sae_dirs[0]), out=str(tmp_path / "tpp.json"), progress=False,
                                            activation_cache=str(tmp_path / "acts"),
                                            **_configs(tmp_path, sae_dirs[1])["tpp"])
    run_suite("tpp", cfg, lm=lm)
    assert [p.name for p in (tmp_path / "acts").iterdir()], "nothing stored under the configured activation_cache"
