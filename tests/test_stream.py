"""Training from a live activation stream: the harvest runs on a thread, training reads each window of shards as soon
as it is committed, and the result is a pure function of the data and the seed (never of timing).

Overlap is shown by observed events, not by timing: a gate in the harvest (a patched ``ActivationCacheWriter.add``)
holds the harvest until the trainer reports its first step, and the test records how many shards were committed
then. A harvest that finished first would leave the gate on its 60 s timeout and fail the assertion.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import saelab.train as tr
from saelab.activations.cache import ActivationCache, ActivationCacheWriter
from saelab.checkpoint import read_checkpoint
from saelab.activations.harvest import HarvestConfig, harvest
from saelab.activations.stream import (
    BackgroundHarvest,
    CacheFollower,
    HarvestFailedError,
    StreamCancelled,
    follow_batches,
    stream_norm_scale,
)
from saelab.data.split import DataConfig
from saelab.pipeline import harvest_and_train
from saelab.io import read_json
from saelab.config_files import from_dict
from saelab.sae.config import SAEConfig
from saelab.sae.saving import load_sae
from saelab.train import TrainConfig, train, train_many
from synthetic import sparse_dictionary_data, write_cache

PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec")
GATE_S = 60.0  # a gate that waits this long means the event it waits for never came: the test then fails


# ----------------------------------------------------------------------------------------------- the follower


def _row_cache_writer(path: Path, shard_rows: int = 37) -> ActivationCacheWriter:
    return ActivationCacheWriter(path, model="m", hook_name="h", d_in=4, shard_rows=shard_rows, fsync=False,
                                 meta={"n_tokens_requested": 600})


def _add(w: ActivationCacheWriter, lo: int, hi: int) -> None:
    """Rows ``lo..hi-1``; column 0 holds the row's index, so every yielded row can be traced back."""
    x = torch.randn(hi - lo, 4, generator=torch.Generator().manual_seed(lo))
    x[:, 0] = torch.arange(lo, hi, dtype=torch.float32)
    w.add(x, token_ids=np.zeros(hi - lo, int), doc_ids=np.arange(lo, hi), positions=np.ones(hi - lo, int))


def _write_in_steps(path: Path, gate: threading.Event, gate_at: int | None, log: list) -> None:
    """600 rows in 12 checkpoints of 50 (shards of 37 + 13 rows); after checkpoint ``gate_at + 1``, wait for ``gate``."""
    w = _row_cache_writer(path)
    for i in range(12):
        _add(w, 50 * i, 50 * (i + 1))
        w.checkpoint({"i": i})
        if i == gate_at:
            log.append(("gate", gate.wait(GATE_S)))
    w.finalize()


# gate_at: the checkpoint after which the writer waits for the first batch; the first batch needs the window holding
# row start * bs (windows of 3 shards = 1.5 checkpoints). Start 30 x 29 rows lies in epoch 1: no batch before the end.
@pytest.mark.parametrize("bs,start,drop_last,gate_at", [(32, 0, True, 1), (50, 7, False, 8), (29, 30, True, None)])
def test_follower_yields_the_stream_order_batches_while_the_cache_grows(tmp_path, bs, start, drop_last, gate_at):
    """follow_batches on a cache being written == iter_batches(stream_order=True) on the finished cache, batch for
    batch over 3 epochs (any start_batch); and the first batch came before the writer finished."""
    path = tmp_path / "c"
    gate, log = threading.Event(), []
    writer = threading.Thread(target=_write_in_steps, args=(path, gate, gate_at, log))
    writer.start()
    got, complete_at_first = [], None
    alive = writer.is_alive
    for x in follow_batches(path, bs, seed=5, epochs=3, start_batch=start, drop_last=drop_last, window_shards=3,
                            producer_alive=alive):
        if complete_at_first is None:
            complete_at_first = read_json(path / "manifest.json")["complete"]
            gate.set()
        got.append(x)
    writer.join()
    if gate_at is not None:  # the first batch came while the writer waited at its gate, i.e. before it finished
        assert log == [("gate", True)] and complete_at_first is False
    else:
        assert complete_at_first is True
    cache = ActivationCache.open(path)
    want = list(cache.iter_batches(bs, seed=5, epochs=3, start_batch=start, drop_last=drop_last,
                                   shuffle_window_shards=3, stream_order=True))
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_stream_order_reads_shards_in_harvest_order_then_shuffles(tmp_path):
    w = _row_cache_writer(tmp_path / "c")
    _add(w, 0, 600)
    cache = w.finalize()
    assert cache.n_shards == 17  # 16 x 37 + 8
    bs, win = 20, 3
    nb = cache.num_batches(bs)
    stream = torch.cat(list(cache.iter_batches(bs, seed=1, epochs=2, shuffle_window_shards=win, stream_order=True)))
    plain = torch.cat(list(cache.iter_batches(bs, seed=1, epochs=2, shuffle_window_shards=win)))
    rows = stream[:, 0].long().numpy()
    # epoch 0: window k holds exactly rows [111 k, 111 (k + 1)), permuted within the window
    for k in range(0, 5):
        part = rows[111 * k:111 * (k + 1)]
        assert sorted(part) == list(range(111 * k, 111 * (k + 1)))
        assert not np.array_equal(part, np.arange(111 * k, 111 * (k + 1)))
    # epoch 1 is the ordinary shuffled epoch (same as without stream_order)
    assert torch.equal(stream[nb * bs:], plain[nb * bs:])
    assert not torch.equal(stream[:nb * bs], plain[:nb * bs])


def test_follower_errors(tmp_path):
    path = tmp_path / "c"
    w = _row_cache_writer(path)
    _add(w, 0, 50)
    w.checkpoint({"i": 0})  # 2 shards of a cache that never finishes
    with pytest.raises(RuntimeError, match="stopped before finishing the cache.*re-run"):
        list(follow_batches(path, 8, window_shards=2, producer_alive=lambda: False))  # window 0 ok, window 1 never
    with pytest.raises(TimeoutError, match=r"no new shard .* for 0\.2 s.*stream_timeout"):
        CacheFollower(path, window_shards=4, timeout_s=0.2).wait_for_window(0)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(StreamCancelled):
        CacheFollower(path, window_shards=4, producer_alive=lambda: True, cancel=cancel).wait_for_window(0)

    def dead() -> bool:
        raise HarvestFailedError("harvest died")

    with pytest.raises(HarvestFailedError, match="harvest died"):
        CacheFollower(path, window_shards=4, producer_alive=dead).wait_for_window(0)
    w.close()


def test_stream_norm_scale_is_the_rms_norm_of_the_first_window(tmp_path):
    w = _row_cache_writer(tmp_path / "c")
    _add(w, 0, 600)
    cache = w.finalize()
    x = cache.read_rows(np.arange(74)).double()  # shards 0 and 1 (37 rows each)
    # the manifest's sums hold float32 squared norms: equal to float32 rounding
    assert stream_norm_scale(cache, 2) == pytest.approx(float(x.pow(2).sum(-1).mean().sqrt()), rel=1e-7)
    del cache.manifest["shards"][0]["sum_sq_norm"]  # an entry without the sums: the rows are read
    assert stream_norm_scale(cache, 2) == pytest.approx(float(x.pow(2).sum(-1).mean().sqrt()), rel=1e-6)


def test_resume_refuses_a_cache_whose_scale_changed(tmp_path):
    x, _, _ = sparse_dictionary_data(2048, d_in=16, n_features=32, k=3, scale=10.0)
    write_cache(tmp_path / "cache", x, shard_rows=512)
    cfg = TrainConfig(cache=str(tmp_path / "cache"), out=str(tmp_path / "sae"), sae=SAEConfig(d_sae=32, k=3), batch_size=256,
                      n_tokens=256 * 8, checkpoint_every=2, progress=False, stream=True)
    real = tr._Run.train_step

    def stop_at_3(self, *a, **k):
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    tr._Run.train_step = stop_at_3
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    finally:
        tr._Run.train_step = real
    shutil.rmtree(tmp_path / "cache")
    write_cache(tmp_path / "cache", x * 2, shard_rows=512)  # same path, other data
    with pytest.raises(ValueError, match="input scale .* its data changed"):
        train(cfg)


# ----------------------------------------------------------------------------------------------- harvest + train


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    from saelab.models.lm import load_lm

    return load_lm(str(tiny_llama_dir))


def _hcfg(tiny_llama_dir, text_dir, out: Path) -> HarvestConfig:
    # shards of ~244 rows (a checkpoint every 2 forward batches of 4 x 32-token contexts): 7 shards, 4 windows of 2
    return HarvestConfig(model=str(tiny_llama_dir), hook_name="blocks.1.hook_resid_post", out=str(out), n_tokens=1500,
                         context_size=32, batch_size=4, checkpoint_every=2, progress=False,
                         data=DataConfig(corpora=[], text_files=[str(text_dir)], eval_fraction=0.1))


def _tcfg(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(cache=str(cache), out=str(out), activation="topk", d_sae=64, k=4, batch_size=64, n_tokens=64 * 40,
                lr=3e-3, warmup_steps=4, checkpoint_every=5, log_every=5, progress=False, seed=2, stream=True)
    base.update(kw)
    return from_dict(TrainConfig, base)  # flat keys (activation, k, d_sae) go into TrainConfig.sae


def _assert_same(a_dir, b_dir):
    a, b = load_sae(a_dir), load_sae(b_dir)
    for name in PARAMS:
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x, y), f"{name} differs: max |diff| {(x - y).abs().max():.3g}"


class _Hooks:
    """Patches ``ActivationCacheWriter.add`` (harvest side) and ``_Run.train_step`` (trainer side) with callbacks."""

    def __init__(self, monkeypatch, on_add=None, on_step=None):
        self.adds, self.steps = 0, 0
        real_add, real_step = ActivationCacheWriter.add, tr._Run.train_step

        def add(w, *a, **k):
            self.adds += 1
            if on_add is not None:
                on_add(self.adds, w)
            return real_add(w, *a, **k)

        def step(run, *a, **k):
            self.steps += 1
            if on_step is not None:
                on_step(self.steps, run, "before")
            out = real_step(run, *a, **k)
            if on_step is not None:
                on_step(self.steps, run, "after")
            return out

        monkeypatch.setattr(ActivationCacheWriter, "add", add)
        monkeypatch.setattr(tr._Run, "train_step", step)


@pytest.fixture(scope="module")
def streamed_ref(tiny_llama_dir, text_dir, tiny_lm, tmp_path_factory):
    """An uninterrupted streamed run whose harvest waits (at its 5th forward batch, after the first window of 2 shards
    was committed) until the trainer has taken its first step; what the trainer saw then."""
    d = tmp_path_factory.mktemp("stream_ref")
    first_step, seen, gate_log = threading.Event(), {}, []

    def on_add(n, w):
        if n == 5:
            gate_log.append(first_step.wait(GATE_S))

    def on_step(n, run, when):
        if n == 1 and when == "before":
            m = read_json(d / "cache" / "manifest.json")
            seen.update(complete=m["complete"], shards=len(m["shards"]), rows=m["n_tokens"])
            first_step.set()

    mp = pytest.MonkeyPatch()
    _Hooks(mp, on_add, on_step)
    try:
        cache, (res,), timings = harvest_and_train(_hcfg(tiny_llama_dir, text_dir, d / "cache"),
                                                   [_tcfg(d / "cache", d / "sae")], lm=tiny_lm)
    finally:
        mp.undo()
    return {"dir": d, "cache": cache, "sae": res.sae_dir, "seen": seen, "gate": gate_log, "timings": timings}


def test_trainer_starts_before_the_harvest_ends(streamed_ref):
    seen = streamed_ref["seen"]
    assert streamed_ref["gate"] == [True], "the harvest's gate timed out: training never started during the harvest"
    assert seen["complete"] is False and seen["shards"] == 2  # exactly the first window
    cache = streamed_ref["cache"]
    assert cache.n_tokens == 1500 and cache.n_shards == 7 and seen["rows"] < cache.n_tokens


def test_streamed_run_equals_stream_order_run_on_the_finished_cache(streamed_ref, tiny_llama_dir, text_dir, tiny_lm,
                                                                    tmp_path):
    d = streamed_ref["dir"]
    (res,) = train_many([_tcfg(d / "cache", tmp_path / "after")])  # cache complete: iter_batches(stream_order=True)
    _assert_same(streamed_ref["sae"], res.sae_dir)
    # the cache is exactly what a plain harvest writes
    plain = harvest(_hcfg(tiny_llama_dir, text_dir, tmp_path / "plain"), lm=tiny_lm)
    assert plain.manifest["shards"] == streamed_ref["cache"].manifest["shards"]
    # and the scale came from the first window (recorded in the SAE's cfg.json)
    scale = load_sae(res.sae_dir).cfg.extra["train"]["norm_scale"]
    assert scale == stream_norm_scale(streamed_ref["cache"], 2) != pytest.approx(
        float(np.sqrt(streamed_ref["cache"].stats["mean_sq_norm"])), rel=1e-9)


def test_harvest_failure_surfaces_in_the_trainer_and_the_rerun_resumes(streamed_ref, tiny_llama_dir, text_dir, tiny_lm,
                                                                       tmp_path, monkeypatch):
    """The harvest raises at its 7th forward batch, once the trainer has checkpointed step 5 (all that window 0
    allows); the trainer, waiting for window 1, raises HarvestFailedError. Re-running resumes both."""
    step5 = threading.Event()

    def on_add(n, w):
        if n == 7:
            assert step5.wait(GATE_S)
            raise OSError("disk on fire")

    def on_step(n, run, when):
        if n == 5 and when == "after":
            step5.set()

    hooks = _Hooks(monkeypatch, on_add, on_step)
    hcfg, tcfg = _hcfg(tiny_llama_dir, text_dir, tmp_path / "cache"), _tcfg(tmp_path / "cache", tmp_path / "sae")
    with pytest.raises(HarvestFailedError, match=r"harvest into .*cache, running alongside training, failed: "
                                                 r"OSError: disk on fire.*resume") as e:
        harvest_and_train(hcfg, [tcfg], lm=tiny_lm)
    assert isinstance(e.value.__cause__, OSError)
    m = read_json(tmp_path / "cache" / "manifest.json")
    assert not m["complete"] and len(m["shards"]) == 3 and 5 <= hooks.steps < 10
    assert read_checkpoint(tmp_path / "sae" / "checkpoint")["step"] == 5
    monkeypatch.undo()
    _, (res,), _ = harvest_and_train(hcfg, [tcfg], lm=tiny_lm)
    _assert_same(streamed_ref["sae"], res.sae_dir)
    assert ActivationCache.open(tmp_path / "cache").manifest["shards"] == streamed_ref["cache"].manifest["shards"]


@pytest.mark.filterwarnings("ignore:.*closed without checkpoint")  # the stopped harvest drops its uncommitted rows
def test_interrupted_streamed_run_resumes_to_the_same_weights(streamed_ref, tiny_llama_dir, text_dir, tiny_lm,
                                                              tmp_path, monkeypatch):
    """Ctrl-C in the trainer at step 12 (checkpoint at 10) while the harvest is held at its 9th batch: the harvest is
    stopped with 4 of 7 shards committed; the re-run resumes both and ends with the uninterrupted run's weights."""
    stopping = threading.Event()  # set once harvest_and_train has asked the harvest to stop
    real_stop = BackgroundHarvest.stop

    def stop(self, timeout=None):
        self._stop.set()
        stopping.set()
        return real_stop(self, timeout)

    def on_add(n, w):
        if n == 9:
            assert stopping.wait(GATE_S)

    def on_step(n, run, when):
        if n == 12 and when == "before":
            raise KeyboardInterrupt

    monkeypatch.setattr(BackgroundHarvest, "stop", stop)
    _Hooks(monkeypatch, on_add, on_step)
    hcfg, tcfg = _hcfg(tiny_llama_dir, text_dir, tmp_path / "cache"), _tcfg(tmp_path / "cache", tmp_path / "sae")
    with pytest.raises(KeyboardInterrupt):
        harvest_and_train(hcfg, [tcfg], lm=tiny_lm)
    m = read_json(tmp_path / "cache" / "manifest.json")
    assert not m["complete"] and len(m["shards"]) == 4
    assert read_checkpoint(tmp_path / "sae" / "checkpoint")["step"] == 10
    monkeypatch.undo()
    _, (res,), _ = harvest_and_train(hcfg, [tcfg], lm=tiny_lm)
    _assert_same(streamed_ref["sae"], res.sae_dir)


def test_stale_cache_with_other_settings_is_never_followed(streamed_ref, tiny_llama_dir, text_dir, tiny_lm, tmp_path):
    """The harvest refuses the existing cache (other n_tokens); training must not start on that cache."""
    d = streamed_ref["dir"]
    hcfg = dataclasses.replace(_hcfg(tiny_llama_dir, text_dir, d / "cache"), n_tokens=1400)
    with pytest.raises(HarvestFailedError, match="different settings") as e:
        harvest_and_train(hcfg, [_tcfg(d / "cache", tmp_path / "sae")], lm=tiny_lm)
    assert type(e.value.__cause__).__name__ == "CacheMismatchError"
    assert not (tmp_path / "sae").exists()


def test_bad_stream_arguments(tmp_path, tiny_llama_dir, text_dir):
    hcfg = _hcfg(tiny_llama_dir, text_dir, tmp_path / "cache")
    with pytest.raises(ValueError, match="do not train on the harvested cache"):
        harvest_and_train(hcfg, [_tcfg(tmp_path / "other", tmp_path / "sae")])
    with pytest.raises(ValueError, match="stream=True"):
        harvest_and_train(hcfg, [_tcfg(tmp_path / "cache", tmp_path / "sae", stream=False)])
    with pytest.raises(ValueError, match="target_cache"):
        train(_tcfg(tmp_path / "cache", tmp_path / "sae", target_cache=str(tmp_path / "t")))
    with pytest.raises(ValueError, match="share 'stream'"):
        train_many([_tcfg(tmp_path / "cache", tmp_path / "a"), _tcfg(tmp_path / "cache", tmp_path / "b", stream=False)])


def test_cli_run_stream(tmp_path, tiny_llama_dir, text_dir, capsys):
    from saelab.cli import main

    out = tmp_path / "run"
    args = ["run", "--stream", "true", "--out", str(out), "--model", str(tiny_llama_dir), "--hook_name",
            "blocks.1.hook_resid_post", "--corpora", "--text_files", str(text_dir), "--eval_fraction", "0.1",
            "--n_tokens", "1200", "--train_tokens", "2048", "--batch_size", "128", "--expansion_factor", "2", "--k", "4",
            "--eval_tokens", "100"]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "(--stream)" in printed and "(overlapped)" in printed
    res = read_json(out / "results.json")
    assert res["stream"] is True and res["timings_s"]["harvest_train"] >= res["timings_s"]["train"] > 0
    assert read_json(out / "sae" / "training_cfg.json")["stream"] is True


# ----------------------------------------------------------------------------------------------- kill -9, two processes


@pytest.fixture(scope="module")
def kill_hooks(tmp_path_factory) -> Path:
    from test_kill_resume import _HOOK_SRC

    d = tmp_path_factory.mktemp("stream_killhooks")
    (d / "sitecustomize.py").write_text(_HOOK_SRC)
    return d


def test_kill9_of_harvest_and_following_trainer_resumes_to_the_same_weights(streamed_ref, kill_hooks, tiny_llama_dir,
                                                                            text_dir, tmp_path):
    """`saelab harvest` in one process and `saelab train --stream` following it in another (the test hooks of
    test_kill_resume.py): the harvest is SIGKILL-ed at its 9th forward batch (4 of 7 shards committed), the trainer,
    still reading the committed windows, right after its step-10 checkpoint. Both re-run concurrently (the trainer
    follows the resumed harvest): the cache and the weights equal the uninterrupted in-process streamed run's."""
    from test_kill_resume import Runner, _reap

    data = tmp_path / "data.json"
    data.write_text(json.dumps({"data": {"corpora": [], "text_files": [str(text_dir)], "eval_fraction": 0.1}}))
    cache, sae = tmp_path / "cache", tmp_path / "sae"
    h = ["harvest", "--config", str(data), "--model", str(tiny_llama_dir), "--hook_name", "blocks.1.hook_resid_post",
         "--out", str(cache), "--n_tokens", "1500", "--context_size", "32", "--batch_size", "4", "--checkpoint_every",
         "2", "--progress", "false"]
    t = ["train", "--cache", str(cache), "--out", str(sae), "--stream", "true", "--activation", "topk", "--d_sae", "64",
         "--k", "4", "--batch_size", "64", "--n_tokens", str(64 * 40), "--lr", "0.003", "--warmup_steps", "4",
         "--checkpoint_every", "5", "--log_every", "5", "--seed", "2", "--progress", "false"]
    run = Runner(kill_hooks, tmp_path / "logs", {})
    run.kill_at(h, {"on": "unit", "n": 9})
    m = read_json(cache / "manifest.json")
    assert not m["complete"] and len(m["shards"]) == 4
    run.kill_at(t, {"on": "replace", "name": "state.json", "n": 2, "phase": "after"})
    assert read_checkpoint(sae / "checkpoint")["step"] == 10
    assert not (sae / "sae_weights.safetensors").exists()
    proc, _, err = run._start(h)  # the resumed harvest, while the resumed trainer follows it
    try:
        run.complete(t)
        assert proc.wait(timeout=300) == 0, err.read_text()[-4000:]
    except subprocess.TimeoutExpired:
        pytest.fail("the resumed harvest did not finish")
    finally:
        _reap(proc)
    assert ActivationCache.open(cache).manifest["shards"] == streamed_ref["cache"].manifest["shards"]
    _assert_same(streamed_ref["sae"], sae)
