"""Training checkpoints without pickle (saelab.checkpoint): the safetensors + JSON pair, its atomic commit, exact
resumes, refusal of pickles that would run code, conversion of old plain pickles, and clear errors for broken pairs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import saelab.checkpoint as ck
from saelab.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from saelab.config_files import from_dict
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE
from saelab.train import TrainConfig, _match_state_layout, train
from synthetic import sparse_dictionary_data, train_interrupted, write_cache

STEPS, EVERY, BATCH = 30, 10, 128


def _cfg(cache, out) -> TrainConfig:
    return from_dict(TrainConfig, dict(cache=str(cache), out=str(out), activation="topk", d_sae=64, k=3,
                                       batch_size=BATCH, n_tokens=BATCH * STEPS, lr=3e-3, warmup_steps=4,
                                       checkpoint_every=EVERY, log_every=5, progress=False, seed=1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(cache path, the uninterrupted run's SAE weights by name)."""
    d = tmp_path_factory.mktemp("ckfmt")
    x, _, _ = sparse_dictionary_data(BATCH * STEPS, d_in=16, n_features=32, k=3, noise=0.01, seed=4)
    cache = write_cache(d / "cache", x).path
    full = train(_cfg(cache, d / "full"))
    return cache, load_file(full.sae_dir / "sae_weights.safetensors")


def _assert_same_weights(out: Path, ref: dict) -> None:
    got = load_file(Path(out) / "sae_weights.safetensors")
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), f"{name} differs after resume"


def test_new_checkpoint_holds_no_pickle_and_resumes_bit_identically(setup, tmp_path):
    cache, ref = setup
    cfg = _cfg(cache, tmp_path / "run")
    train_interrupted(cfg, 20)
    d = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in d.iterdir()) == ["state.json", "state.safetensors"]
    for p in d.iterdir():  # neither a pickle (protocol >= 2 starts with 0x80) nor a torch zip archive
        assert p.read_bytes()[:2] not in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05"), p
    meta = json.loads((d / "state.json").read_text())
    tensors = load_file(d / "state.safetensors")
    assert meta["step"] == 20 and meta["token"]
    assert {"since_fired", "rng", "sae.W_enc", "sae.W_dec"} <= set(tensors)
    assert any(k.startswith("opt.") and k.endswith(".exp_avg_sq") for k in tensors)
    assert all(isinstance(v, list) for v in meta["opt_tensors"].values())
    train(cfg)
    _assert_same_weights(tmp_path / "run", ref)


class _RunsCode:
    """Unpickling this runs ``touch <marker>`` (what a hostile state.pt could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_would_run_code_is_refused_without_running_it(setup, tmp_path):
    cache, _ = setup
    marker = tmp_path / "pwned"
    d = tmp_path / "run" / "checkpoint"
    d.mkdir(parents=True)
    torch.save({"identity": _RunsCode(marker), "step": 10}, d / "state.pt")
    with pytest.raises(CheckpointError) as e:
        train(_cfg(cache, tmp_path / "run"))
    assert not marker.exists(), "the pickle's payload ran"
    msg = str(e.value)
    assert str(d / "state.pt") in msg and "old pickle format" in msg and f"delete {d}" in msg
    assert (d / "state.pt").exists()  # refused, not deleted: the user decides


def test_old_plain_pickle_checkpoint_is_converted_and_resumes_bit_identically(setup, tmp_path):
    cache, ref = setup
    cfg = _cfg(cache, tmp_path / "run")
    train_interrupted(cfg, 20)
    d = tmp_path / "run" / "checkpoint"
    state = read_checkpoint(d)
    # the layout the old trainer pickled: tensors, dicts, lists, numbers, strings; W_enc's moments with its strides
    w_enc = state["sae"]["W_enc"]
    state["sae"]["W_enc"] = torch.empty_strided(w_enc.shape, (1, w_enc.shape[0])).copy_(w_enc)
    old = {k: state[k] for k in ("identity", "sae", "opt", "sched", "since_fired", "step", "scale", "rng",
                                 "last_reg", "log_bytes")}
    old["opt"]["param_groups"] = [{**g, "betas": tuple(g["betas"])} for g in old["opt"]["param_groups"]]
    for name in ("state.json", "state.safetensors"):
        (d / name).unlink()
    torch.save(old, d / "state.pt")
    assert read_checkpoint(d)["step"] == 20  # the safe loader accepts it
    train(cfg)
    assert not (d / "state.pt").exists()
    assert sorted(p.name for p in d.iterdir()) == ["state.json", "state.safetensors"]
    _assert_same_weights(tmp_path / "run", ref)


@pytest.fixture()
def two_checkpoints(setup, tmp_path):
    """Checkpoint dirs of one configuration interrupted at steps 10 and 20."""
    cache, _ = setup
    dirs = []
    for stop in (10, 20):
        cfg = _cfg(cache, tmp_path / f"run{stop}")
        train_interrupted(cfg, stop)
        dirs.append((cfg, tmp_path / f"run{stop}" / "checkpoint"))
    return dirs


def test_mismatched_pair_is_refused_with_one_line_naming_the_files(two_checkpoints):
    (_, d10), (cfg20, d20) = two_checkpoints
    shutil.copy(d10 / "state.json", d20 / "state.json")
    with pytest.raises(CheckpointError) as e:
        train(cfg20)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(d20 / "state.json") in msg and str(d20 / "state.safetensors") in msg and f"delete {d20}" in msg
    assert "another checkpoint" in msg


def test_truncated_tensors_file_is_refused_with_one_line_naming_it(two_checkpoints):
    _, (cfg20, d20) = two_checkpoints
    path = d20 / "state.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(CheckpointError) as e:
        train(cfg20)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and f"delete {d20}" in msg


def _tiny_state(step: int, seed: int) -> dict:
    """A training state of the trainer's layout from a small SAE after ``step`` fused-Adam steps."""
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=8, d_sae=16, activation="topk", k=2)).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    x = torch.randn(16, 8)
    for _ in range(step):
        opt.zero_grad(set_to_none=True)
        (x - sae(x)).pow(2).sum().backward()
        opt.step()
        sched.step()
    return {"identity": {"seed": seed, "regularizers": ["c2r"]}, "sae": sae.state_dict(), "opt": opt.state_dict(),
            "sched": sched.state_dict(), "since_fired": torch.arange(16), "step": step, "scale": 1.5,
            "rng": torch.Generator().manual_seed(seed).get_state(), "last_reg": {"c2r": 0.25}, "log_bytes": 7}


def test_roundtrip_is_exact_and_restores_the_parameter_strides(tmp_path):
    torch.manual_seed(0)
    a = SAE(SAEConfig(d_in=8, d_sae=16, activation="topk", k=2)).train()
    assert a.W_enc.stride() == (1, 8)  # column-major: the case fused Adam needs matched strides for
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2, fused=True)
    x = torch.randn(16, 8)

    def step(sae, opt):
        opt.zero_grad(set_to_none=True)
        (x - sae(x)).pow(2).sum().backward()
        opt.step()

    for _ in range(3):
        step(a, opt_a)
    state = _tiny_state(0, 0)
    state.update(sae=a.state_dict(), opt=opt_a.state_dict())
    write_checkpoint(tmp_path, state)
    back = read_checkpoint(tmp_path)
    assert back["identity"] == state["identity"] and back["last_reg"] == state["last_reg"]
    assert torch.equal(back["rng"], state["rng"]) and torch.equal(back["since_fired"], state["since_fired"])
    for i, per in state["opt"]["state"].items():
        for k, v in per.items():
            assert torch.equal(back["opt"]["state"][i][k], v) and back["opt"]["state"][i][k].dtype == v.dtype
    torch.manual_seed(0)
    c = SAE(SAEConfig(d_in=8, d_sae=16, activation="topk", k=2)).train()
    c.load_state_dict(back["sae"])
    opt_c = torch.optim.Adam(c.parameters(), lr=1e-2, fused=True)
    opt_c.load_state_dict(back["opt"])
    _match_state_layout(opt_c)
    for p in c.parameters():
        for k, v in opt_c.state[p].items():
            if v.dim():
                assert v.stride() == p.stride(), (k, v.stride(), p.stride())
    step(a, opt_a)
    step(c, opt_c)
    assert torch.equal(a.W_enc, c.W_enc) and torch.equal(a.W_dec, c.W_dec) and torch.equal(a.b_enc, c.b_enc)


def test_kill_before_the_commit_keeps_the_previous_pair(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, _tiny_state(1, 0))

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, _tiny_state(2, 0))
    monkeypatch.undo()
    assert (tmp_path / ck.PENDING).exists()  # the new tensors, not committed
    assert read_checkpoint(tmp_path)["step"] == 1


def test_kill_after_the_commit_rolls_forward(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, _tiny_state(1, 0))
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == ck.TENSORS:
            raise KeyboardInterrupt  # killed after state.json was committed, before the rename of the tensors
        return real(src, dst, *a, **k)

    monkeypatch.setattr(ck.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, _tiny_state(2, 0))
    monkeypatch.undo()
    new = _tiny_state(2, 0)
    got = read_checkpoint(tmp_path)
    assert got["step"] == 2 and torch.equal(got["sae"]["W_dec"], new["sae"]["W_dec"])
    assert (tmp_path / ck.PENDING).exists()  # reading alone renames nothing
    assert read_checkpoint(tmp_path, roll_forward=True)["step"] == 2
    assert not (tmp_path / ck.PENDING).exists() and read_checkpoint(tmp_path)["step"] == 2


def test_not_a_checkpoint_json_is_refused(tmp_path):
    write_checkpoint(tmp_path, _tiny_state(1, 0))
    (tmp_path / "state.json").write_text("{\"step\": 1")
    with pytest.raises(CheckpointError, match=r"state\.json is not valid JSON.*delete"):
        read_checkpoint(tmp_path)
