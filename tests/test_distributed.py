"""Several SAEs from one pass over the stream, and torchrun data-parallel training (2 CPU ranks, gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from saelab.activations.prefetch import Prefetcher
from saelab.config_files import from_dict
from saelab.sae.saving import load_sae
from saelab.train import TrainConfig, train, train_many
from synthetic import sparse_dictionary_data, train_interrupted, write_cache

PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    x, _, _ = sparse_dictionary_data(8192, d_in=32, n_features=64, k=4, noise=0.01, scale=20.0)
    return write_cache(tmp_path_factory.mktemp("dist") / "cache", x, shard_rows=1024)


def _cfg(cache, out, **kw) -> TrainConfig:
    base = dict(cache=str(cache.path), out=str(out), activation="topk", d_sae=96, k=4, batch_size=256, n_tokens=256 * 24,
                lr=3e-3, warmup_steps=4, checkpoint_every=10, log_every=5, progress=False, seed=3)
    base.update(kw)
    return from_dict(TrainConfig, base)  # flat keys (activation, k, d_sae) go into TrainConfig.sae


def _assert_same(a_dir, b_dir, atol=0.0):
    a, b = load_sae(a_dir), load_sae(b_dir)
    for name in PARAMS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0 if atol == 0 else 1e-5, atol=atol, msg=name)


def test_prefetcher_keeps_order_and_reraises():
    def gen():
        yield from range(5)
        raise RuntimeError("boom at 5")

    it = Prefetcher(gen(), depth=2)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="boom at 5"):
        next(it)
    assert list(Prefetcher(iter(range(100)), depth=3)) == list(range(100))
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(iter([]), depth=0)


def test_train_many_gives_each_sae_the_weights_of_a_separate_run(tmp_path, cache):
    arms = {
        "topk": {},
        "c2r": dict(regularizers=["c2r:lambda=5,every=2,chunk=32"]),  # chunk < d_sae: uses the per-SAE RNG
        "batchtopk_cos": dict(activation="batchtopk", encoder="cosine_global"),
    }
    alone = {n: train(_cfg(cache, tmp_path / "alone" / n, **kw)).sae_dir for n, kw in arms.items()}
    together = train_many([_cfg(cache, tmp_path / "together" / n, **kw) for n, kw in arms.items()])
    for (name, a), res in zip(alone.items(), together):
        _assert_same(a, res.sae_dir)
        assert (res.sae_dir / "train_log.jsonl").read_text().count("\n") == 24 // 5 + 1


def test_train_many_resumes_saes_that_stopped_at_different_steps(tmp_path, cache):
    ref = train_many([_cfg(cache, tmp_path / "ref" / n, k=k) for n, k in (("a", 4), ("b", 8))])
    # "a" was interrupted at step 10, "b" at step 20: the stream restarts at 10 and "b" skips batches 10..19
    for n, k, stop in (("a", 4, 10), ("b", 8, 20)):
        part = _cfg(cache, tmp_path / "run" / n, k=k, checkpoint_every=stop)
        train_interrupted(part, stop)
    resumed = train_many([_cfg(cache, tmp_path / "run" / n, k=k) for n, k in (("a", 4), ("b", 8))])
    for r, s in zip(ref, resumed):
        _assert_same(r.sae_dir, s.sae_dir)


def test_train_many_refuses_configs_that_cannot_share_a_stream(tmp_path, cache):
    with pytest.raises(ValueError, match="share 'seed'"):
        train_many([_cfg(cache, tmp_path / "a"), _cfg(cache, tmp_path / "b", seed=4)])
    with pytest.raises(ValueError, match="output folder"):
        train_many([_cfg(cache, tmp_path / "a"), _cfg(cache, tmp_path / "a", k=8)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(cache, out, **kw):
    cfg = dict(cache=str(cache.path), out=str(out), activation="topk", d_sae="96", k="4", batch_size="256",
               n_tokens=str(256 * 24), lr="3e-3", warmup_steps="4", checkpoint_every="10", progress="false", seed="3",
               aux_coefficient="0", threads="1")
    cfg.update(kw)
    return [a for k, v in cfg.items() for a in (f"--{k}", v)]


@pytest.mark.parametrize("extra", [{}, {"encoder": "cosine_base_delta", "normalize_activations": "false"}])
def test_torchrun_two_ranks_equals_single_process(tmp_path, cache, extra):
    """DDP (gloo, 2 CPU ranks, each on half of every batch, gradients averaged) == one process on the whole batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    single = subprocess.run([sys.executable, "-m", "saelab", "train", *_train_args(cache, tmp_path / "single", **extra)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), "-m", "saelab", "train", *_train_args(cache, tmp_path / "ddp", **extra)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("SAE written") == 1  # rank 0 speaks and writes
    _assert_same(tmp_path / "single", tmp_path / "ddp", atol=2e-5)
