"""End to end on the real bundled SmolLM2-135M and bundled text, with a tiny budget, through the CLI."""

from __future__ import annotations

import json
import math

import pytest

from saelab.cli import main


@pytest.mark.slow
def test_demo_cli_on_bundled_model(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--hook_name", "blocks.6.hook_resid_post", "--n_tokens", "6000",
            "--train_tokens", "12000", "--expansion_factor", "2", "--k", "16", "--batch_size", "512",
            "--eval_tokens", "600", "--limit_per_corpus", "200"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fve" in printed and "ce_loss_score" in printed and str(out / "sae") in printed
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 576 and cfg["d_sae"] == 1152 and cfg["k"] == 16
    assert cfg["metadata"]["model_name"] == "smollm2-135m" and cfg["metadata"]["hook_name"] == "blocks.6.hook_resid_post"
    m = json.loads((out / "results.json").read_text())["metrics"]
    assert m["n_tokens"] >= 600
    assert all(math.isfinite(m[k]) for k in ("fve", "mse", "ce_clean", "ce_sae", "ce_zero", "kl_sae"))
    assert m["ce_clean"] < m["ce_zero"]  # zero-ablating a residual layer hurts
    assert 0.0 < m["fve"] < 1.0 and m["l0"] <= 16
    assert m["ce_loss_score"] > 0.0  # even a barely trained SAE beats zero ablation
    # a second run resumes everything and does no new work
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["metrics"]["fve"] == pytest.approx(m["fve"])
    assert again["timings_s"]["harvest"] < 30


def test_cli_help_shows_field_docs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--expansion_factor" in text and "d_sae = expansion_factor * d_in" in text


def test_cli_config_file_and_bad_inputs(tmp_path, capsys):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("cache: /nonexistent/cache\nk: 7\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "/nonexistent/cache" in err and "saelab harvest" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("kk: 7\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown config key 'kk'" in capsys.readouterr().err
    assert main(["eval", "--sae", str(tmp_path / "missing")]) == 2
    assert "cfg.json" in capsys.readouterr().err


def test_one_command_line_combines_all_three_methods(tmp_path, tiny_llama_dir, capsys):
    """BatchTopK k=8, per-feature base+delta cosine encoder, C²R lambda=5, masked harvest p=0.15: one command."""
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(30):
        (texts / f"{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 50} and more text" for j in range(40)))
    out = tmp_path / "combo"
    args = ["run", "--out", str(out), "--model", str(tiny_llama_dir), "--hook_name", "blocks.1.hook_resid_post",
            "--corpora", "--text_files", str(texts), "--eval_fraction", "0.2", "--n_tokens", "3000",
            "--train_tokens", "6000", "--batch_size", "256", "--expansion_factor", "4", "--k", "8",
            "--activation", "batchtopk", "--encoder", "cosine_base_delta", "--regularizers", "c2r:lambda=5",
            "--mask_prob", "0.15", "--eval_tokens", "300"]
    assert main(args) == 0, capsys.readouterr().err
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    sae_cfg = cfg["saelab"]["config"]
    assert sae_cfg["activation"] == "batchtopk" and sae_cfg["encoder"] == "cosine_base_delta" and sae_cfg["k"] == 8
    assert sae_cfg["extra"]["regularizers"] == ["c2r:lambda=5.0,every=5,alpha=1.0,chunk=8192,search=exact,scale=invariant"] or \
        sae_cfg["extra"]["regularizers"][0].startswith("c2r:lambda=5")
    assert sae_cfg["extra"]["masking"]["mask_prob"] == 0.15
    assert cfg["saelens_compatible"] is False and "a_mean" in cfg["saelab"]["encoder_stats"]
    manifest = json.loads((out / "cache_masked_p0.15" / "manifest.json").read_text())
    assert manifest["mask_prob"] == 0.15 and manifest["mask_token_id"] == 2026
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert metrics["n_tokens"] >= 300 and math.isfinite(metrics["fve"])
    log = [json.loads(line) for line in open(out / "sae" / "train_log.jsonl")]
    assert "a_mean" in log[-1] and "c2r" in log[-1]
