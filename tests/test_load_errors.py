"""Issue 20: every damaged, missing or malformed file on a load path is ONE line naming the file, what is wrong and
the fix (SAE directory, experiment / config file, judge cache), also through the ``saelab`` CLI; and a NaN batch
stops training before the step, leaving the last checkpoint as it was, from which a re-run resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import saelab.train as tr
from saelab.compare import load_experiment
from saelab.config_files import from_dict, read_config_file
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE
from saelab.sae.saving import CFG_FILENAME, WEIGHTS_FILENAME, SAEFileMissingError, SAELoadError, load_sae, save_sae
from synthetic import sparse_dictionary_data, write_cache

REPO = Path(__file__).resolve().parents[1]
RESAVE = "re-save or re-train the SAE"
NOT_SAE = "this is not an SAE directory"


@pytest.fixture()
def sae_dir(tmp_path) -> Path:
    return save_sae(SAE(SAEConfig(d_in=8, d_sae=16, k=2)), tmp_path / "sae")


def _edit_weights(d: Path, edit) -> None:
    tensors = load_file(str(d / WEIGHTS_FILENAME))
    edit(tensors)
    save_file(tensors, str(d / WEIGHTS_FILENAME))


def _edit_cfg(d: Path, edit) -> None:
    doc = json.loads((d / CFG_FILENAME).read_text())
    edit(doc)
    (d / CFG_FILENAME).write_text(json.dumps(doc))


def _truncate(p: Path, keep: float = 0.5) -> None:
    os.truncate(p, int(p.stat().st_size * keep))


# damage name -> (what it does to an SAE directory, file it must name, words of the problem, words of the fix)
DAMAGES = {
    "truncated_weights": (lambda d: _truncate(d / WEIGHTS_FILENAME), WEIGHTS_FILENAME, "truncated", RESAVE),
    "empty_weights": (lambda d: _truncate(d / WEIGHTS_FILENAME, 0.0), WEIGHTS_FILENAME, "truncated", RESAVE),
    "wrong_shape": (lambda d: _edit_weights(d, lambda t: t.update(W_dec=torch.zeros(16, 9))), WEIGHTS_FILENAME,
                    "W_dec has shape (16, 9)", "fix d_in/d_sae"),
    "missing_key": (lambda d: _edit_weights(d, lambda t: t.pop("b_enc")), WEIGHTS_FILENAME, "lacks tensor 'b_enc'",
                    RESAVE),
    "no_weights_file": (lambda d: (d / WEIGHTS_FILENAME).unlink(), WEIGHTS_FILENAME, "not found", RESAVE),
    "no_cfg_file": (lambda d: (d / CFG_FILENAME).unlink(), CFG_FILENAME, "not found", NOT_SAE),
    "truncated_cfg": (lambda d: _truncate(d / CFG_FILENAME), CFG_FILENAME, "not valid JSON", RESAVE),
    "cfg_not_object": (lambda d: (d / CFG_FILENAME).write_text("[1, 2]"), CFG_FILENAME, "JSON list", NOT_SAE),
    "unknown_activation": (lambda d: _edit_cfg(d, lambda c: c["saelab"]["config"].update(activation="gelu")),
                           CFG_FILENAME, "unknown activation 'gelu'", "fix the name in cfg.json"),
    "unknown_encoder": (lambda d: _edit_cfg(d, lambda c: c["saelab"]["config"].update(encoder="cosine_x")),
                        CFG_FILENAME, "unknown encoder 'cosine_x'", "fix the value in cfg.json"),
    "saelens_without_d_in": (lambda d: _edit_cfg(d, lambda c: [c.pop("saelab"), c.pop("d_in")]), CFG_FILENAME,
                             "lacks the key 'd_in'", RESAVE),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_sae_directory_is_one_line_naming_file_problem_and_fix(sae_dir, damage):
    make, fname, problem, fix = DAMAGES[damage]
    make(sae_dir)
    with pytest.raises(SAELoadError) as info:
        load_sae(sae_dir)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{sae_dir / fname}: "), msg
    assert problem in msg and fix in msg, msg
    assert info.value.file == sae_dir / fname
    assert isinstance(info.value, ValueError)
    # a missing file is also a FileNotFoundError (callers that catch it keep working); nothing else is
    assert isinstance(info.value, FileNotFoundError) == damage.endswith("_file")


def test_path_that_is_no_directory(tmp_path, sae_dir):
    with pytest.raises(SAEFileMissingError, match="no such directory; check the path"):
        load_sae(tmp_path / "nope")
    with pytest.raises(SAELoadError, match=f"is a file, not a directory; {NOT_SAE}"):
        load_sae(sae_dir / CFG_FILENAME)


def test_undamaged_directory_still_loads(sae_dir):
    sae = load_sae(sae_dir)
    ref = load_file(str(sae_dir / WEIGHTS_FILENAME))
    torch.testing.assert_close(sae.W_dec.detach(), ref["W_dec"])
    torch.testing.assert_close(sae.W_enc.detach(), ref["W_enc"])


def _saelab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "saelab", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("damage", ["truncated_weights", "wrong_shape", "missing_key"])
def test_saelab_eval_on_a_damaged_sae_prints_one_line_and_fails(sae_dir, damage):
    make, fname, problem, fix = DAMAGES[damage]
    make(sae_dir)
    res = _saelab("eval", "--sae", str(sae_dir), cwd=sae_dir.parent)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"saelab: error: {sae_dir / fname}: ")
    assert problem in lines[0] and fix in lines[0]


# ------------------------------------------------------------------------------------------ experiment / config files

BAD_FILES = {  # name -> (text, words of the parse error with its 1-based position)
    "bad.yaml": ("model: x\narms: [1, 2\nout: y\n", "line 3, column 4"),
    "bad.json": ('{"model": "x",, }', "line 1, column 15"),
    "bad.toml": ("model = \n", "line 1, column 9"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_malformed_experiment_file_is_one_line_with_position(tmp_path, name):
    text, where = BAD_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_experiment(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg and where in msg and "fix the syntax" in msg, msg


def test_other_config_file_errors_are_one_line(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "c.txt").write_text("k: 1\n")
    (tmp_path / "empty.yaml").write_text("")
    cases = {"list.yaml": "top level must be a mapping", "bin.json": "cannot be read as UTF-8",
             "c.txt": "config files must end in .yaml, .yml, .toml, .json"}
    for name, words in cases.items():
        with pytest.raises(ValueError, match=words) as info:
            read_config_file(tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)
    assert read_config_file(tmp_path / "empty.yaml") == {}
    with pytest.raises(FileNotFoundError, match="not found; check the path"):
        read_config_file(tmp_path / "missing.yaml")


def test_saelab_compare_on_a_malformed_experiment_prints_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_FILES["bad.yaml"][0])
    res = _saelab("compare", "--experiment", str(path), cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml" in lines[0] and "line 3, column 4" in lines[0], res.stderr


# ------------------------------------------------------------------------------------------------- judge cache


def test_truncated_judge_cache_entry_is_asked_again_with_a_warning(tmp_path, monkeypatch):
    from saelab.evals.autointerp import AutoInterpConfig
    from saelab.evals.judges import OpenAIJudge

    cfg = AutoInterpConfig(judge="openai", judge_model="m", base_url="http://127.0.0.1:9/v1",
                           judge_cache=str(tmp_path / "jc"), api_key_env="SAELAB_TEST_NO_KEY")
    posts = []

    def fake_post(self, payload):
        posts.append(payload)
        return {"choices": [{"message": {"content": f"reply {len(posts)}"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2}}

    monkeypatch.setattr(OpenAIJudge, "_post", fake_post)
    conv = [[{"role": "user", "content": "hi"}]]
    assert OpenAIJudge(cfg).complete(conv, max_tokens=4) == ["reply 1"]
    (entry,) = (tmp_path / "jc").rglob("*.json")
    assert OpenAIJudge(cfg).complete(conv, max_tokens=4) == ["reply 1"] and len(posts) == 1  # a cache hit
    _truncate(entry)
    with pytest.warns(UserWarning, match=f"judge cache entry {entry} is unreadable or not valid JSON.*asking the "
                                         "judge again"):
        assert OpenAIJudge(cfg).complete(conv, max_tokens=4) == ["reply 2"]
    assert len(posts) == 2
    assert json.loads(entry.read_text())["content"] == "reply 2"  # the damaged entry is replaced
    entry.write_text('{"content": 5}')
    with pytest.warns(UserWarning, match="is not a cached reply"):
        OpenAIJudge(cfg).complete(conv, max_tokens=4)
    assert len(posts) == 3


# ------------------------------------------------------------------------------------------------- NaN batches

N_STEPS, EVERY, BAD_STEP = 60, 20, 50


@pytest.fixture()
def cache(tmp_path):
    x, _, _ = sparse_dictionary_data(256 * N_STEPS, d_in=32, n_features=64, k=4, noise=0.01, scale=5.0)
    return write_cache(tmp_path / "cache", x)


def _cfg(tmp_path, cache, out: str) -> tr.TrainConfig:
    return from_dict(tr.TrainConfig, dict(
        cache=str(cache.path), out=str(tmp_path / out), activation="topk", d_sae=64, k=4, batch_size=256,
        n_tokens=256 * N_STEPS, lr=3e-3, warmup_steps=5, checkpoint_every=EVERY, log_every=10, progress=False,
        seed=0))


def _poison(mp: pytest.MonkeyPatch, bad_step: int) -> None:
    """Make the training stream's batch ``bad_step`` hold one NaN (row 7) and one Inf (row 9)."""
    real = tr.ActivationCache.iter_batches

    def poisoned(self, batch_size, *a, start_batch=0, epochs=1, **k):
        for i, xb in enumerate(real(self, batch_size, *a, start_batch=start_batch, epochs=epochs, **k), start_batch):
            if epochs is None and i == bad_step:  # the training stream (the norm-scale sample reads one epoch)
                xb = xb.clone()
                xb[7, 3], xb[9, 0] = float("nan"), float("inf")
            yield xb

    mp.setattr(tr.ActivationCache, "iter_batches", poisoned)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_nan_batch_stops_training_keeps_last_checkpoint_and_resume_finishes(tmp_path, cache):
    full = tr.train(_cfg(tmp_path, cache, "full"))
    cfg = _cfg(tmp_path, cache, "run")
    ckpt_dir = Path(cfg.out) / "checkpoint"
    written: list[tuple[int, dict[str, bytes]]] = []  # (step, checkpoint files) after each checkpoint
    real_ckpt = tr._Run._checkpoint

    def spy(self):
        real_ckpt(self)
        written.append((self.step, _files(ckpt_dir)))

    with pytest.MonkeyPatch.context() as mp:
        _poison(mp, BAD_STEP)
        mp.setattr(tr._Run, "_checkpoint", spy)
        with pytest.raises(ValueError) as info:
            tr.train(cfg)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{cache.path}: NaN/Inf activations in 2 of 256 rows of the batch of step {BAD_STEP};"), msg
    assert "nothing was written" in msg and "re-harvest" in msg and "--max_norm_multiple" in msg
    # the last checkpoint is the one of the last multiple of checkpoint_every before the bad step, untouched
    assert [s for s, _ in written] == [20, 40] == list(range(EVERY, BAD_STEP, EVERY))
    assert _files(ckpt_dir) == written[-1][1]
    assert not (Path(cfg.out) / WEIGHTS_FILENAME).exists()  # no SAE saved from a failed run
    rows = [json.loads(line) for line in (Path(cfg.out) / "train_log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40

    resumed = tr.train(cfg)  # the NaN gone (a repaired cache): resumes from step 40 and finishes
    assert resumed.steps == N_STEPS
    a, b = load_sae(full.sae_dir), load_sae(resumed.sae_dir)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)


def test_nan_in_the_first_batch_stops_before_any_checkpoint(tmp_path, cache):
    cfg = _cfg(tmp_path, cache, "first")
    with pytest.MonkeyPatch.context() as mp:
        _poison(mp, 0)
        with pytest.raises(ValueError, match="batch of step 0; nothing was written \\(no checkpoint was written yet\\)"):
            tr.train(cfg)
    assert not (Path(cfg.out) / "checkpoint").exists() or not any((Path(cfg.out) / "checkpoint").iterdir())


def test_finite_check_flags_nan_and_inf_rows_but_not_a_finite_batch_whose_sum_overflows(tmp_path):
    x = torch.full((4, 3), 3e38)  # every value finite, their float32 sum is +Inf
    assert torch.isinf(x.sum())
    tr._check_finite_batch(x, "c", 0, tmp_path / "state.json")  # no error
    x[1, 2], x[3, 0], x[3, 1] = float("inf"), float("-inf"), float("nan")
    with pytest.raises(ValueError, match="^c: NaN/Inf activations in 2 of 4 rows of the batch of step 7;"):
        tr._check_finite_batch(x, "c", 7, tmp_path / "state.json")


@pytest.mark.parametrize("damage", [lambda m: m.pop("shards"), lambda m: m.pop("d_in"), lambda m: m.update(shards=3)])
def test_a_damaged_manifest_is_one_clear_line(tmp_path, damage):
    """A manifest that parses but lacks its shard list or width is reported as damaged, with the fix."""
    import json

    from saelab.activations.cache import ActivationCache
    from synthetic import write_cache

    write_cache(tmp_path / "c", torch.randn(64, 8))
    mpath = tmp_path / "c" / "manifest.json"
    m = json.loads(mpath.read_text())
    damage(m)
    mpath.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"manifest.json is damaged .*re-run the harvest") as e:
        ActivationCache.open(tmp_path / "c")
    assert "\n" not in str(e.value)
