"""The trainer's GPU path, tested on a CPU: device mapping under torchrun, resume through a non-CPU device, only this
rank's shard copied to the device, few collectives per step, and no op that CUDA's deterministic mode refuses.

None of these needs a GPU: the ``meta`` device stands in for one where a code path only has to place tensors
(resume), CUDA's presence is faked where only the device arithmetic is tested (the local-rank mapping), and the
ops a step issues are recorded on CPU (``tests/device_audit.py``). ``scripts/gpu_check.sh`` runs the real thing when
a GPU is available.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

import saelab.train as tr
from saelab.checkpoint import read_checkpoint
from saelab.config_files import from_dict
from saelab.devices import deterministic_algorithms, resolve_device
from saelab.distributed import BUCKET_BYTES, DistInfo
from saelab.sae.saving import load_sae
from device_audit import DeterminismAudit
from synthetic import sparse_dictionary_data, train_interrupted, write_cache

ARMS = {
    "topk": {},
    "topk_c2r": dict(regularizers=["c2r:every=2"]),
    "batchtopk": dict(activation="batchtopk"),
    "matryoshka": dict(activation="matryoshka_batchtopk"),
    "relu": dict(activation="relu", l1_coefficient=0.3),
    "jumprelu": dict(activation="jumprelu", l0_coefficient=0.05),
    "cos_topk": dict(encoder="cosine_per_feature"),
    "cos_topk_c2r": dict(encoder="cosine_per_feature", regularizers=["c2r:every=2"]),
    "cos_batchtopk": dict(activation="batchtopk", encoder="cosine_base_delta"),
}
"""The nine training arms: every activation, the cosine encoders, with and without C²R."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    x, _, _ = sparse_dictionary_data(4096, d_in=32, n_features=64, k=4, noise=0.01, scale=20.0)
    return write_cache(tmp_path_factory.mktemp("devpath") / "cache", x, shard_rows=1024)


def _cfg(cache, out, **kw) -> tr.TrainConfig:
    base = dict(cache=str(cache.path), out=str(out), activation="topk", d_sae=128, k=4, batch_size=256,
                n_tokens=256 * 8, lr=3e-3, warmup_steps=2, checkpoint_every=4, log_every=2, progress=False, seed=1,
                dead_tokens=512, threshold_start_step=2)
    base.update(kw)
    return from_dict(tr.TrainConfig, base)


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_no_training_op_is_refused_by_cuda_deterministic_mode(tmp_path, cache, arm):
    """Every op of a whole run (init, AuxK and C²R steps, log lines with the encoders' statistics, checkpoints) has
    a deterministic CUDA kernel, so ``--deterministic`` runs on a GPU instead of raising mid-run."""
    with DeterminismAudit() as audit:
        tr.train(_cfg(cache, tmp_path / arm, **ARMS[arm]))
    assert not audit.ops, f"ops without a deterministic CUDA kernel: {dict(audit.ops)}"


def test_deterministic_flag_keeps_cpu_weights_and_restores_the_global_setting(tmp_path, cache):
    """On CPU the deterministic mode changes no result (it also fills uninitialised memory with NaN, so a step
    reading memory it never wrote would differ or fail here), and the process-wide flag is restored afterwards."""
    arm = ARMS["cos_topk_c2r"]
    plain = tr.train(_cfg(cache, tmp_path / "plain", **arm))
    assert not torch.are_deterministic_algorithms_enabled()
    det = tr.train(_cfg(cache, tmp_path / "det", deterministic=True, **arm))
    assert not torch.are_deterministic_algorithms_enabled()
    a, b = load_sae(plain.sae_dir), load_sae(det.sae_dir)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name


def test_deterministic_context_restores_previous_state():
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        with deterministic_algorithms(False):
            assert torch.are_deterministic_algorithms_enabled()  # False changes nothing
    assert not torch.are_deterministic_algorithms_enabled()


def test_resume_onto_another_device_keeps_the_rng_on_the_cpu(tmp_path, cache):
    """Blocker: a checkpoint read onto the training device put the RNG state there, and
    ``torch.Generator.set_state`` only takes a CPU byte tensor. The ``meta`` device stands in for a GPU: the SAE and
    optimiser state go there, the RNG state must not."""
    cfg = _cfg(cache, tmp_path / "run", regularizers=["c2r:every=2,chunk=32"])
    train_interrupted(cfg, 4)
    state = read_checkpoint(tmp_path / "run" / "checkpoint")
    assert all(t.device.type == "cpu" for t in state["sae"].values()) and state["rng"].device.type == "cpu"
    ac = tr.ActivationCache.open(cfg.cache)
    run = tr._Run(cfg, ac, 8, tr._norm_scale(ac, cfg), torch.device("meta"), DistInfo())
    assert run.step == 4 and run.sae.W_enc.device.type == "meta" and run.since_fired.device.type == "meta"
    assert torch.equal(run.gen.get_state(), state["rng"])
    assert all(v.device.type == "meta" for s in run.opt.state.values() for k, v in s.items() if k != "step")


def _fake_gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_torchrun_ranks_get_their_local_gpu_whatever_index_was_typed(monkeypatch):
    """Blocker: only the exact string ``cuda`` was mapped to the local rank; ``--device cuda:0`` put every rank on
    GPU 0."""
    _fake_gpus(monkeypatch, 8)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:5") == torch.device("cuda", 5)
    for typed in ("cuda", "cuda:0", "cuda:7"):
        assert resolve_device(typed, local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")
    with pytest.raises(ValueError, match="names GPU 9, but this machine has 8"):
        resolve_device("cuda:9")


def test_missing_gpu_and_bad_names_are_one_clear_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"asks for CUDA but torch.cuda.is_available\(\) is False.*use --device cpu"):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu0")


def test_each_rank_copies_only_its_shard():
    """Blocker: each rank moved the whole global batch to its GPU, then sliced it. The host batch keeps the whole
    batch (NaN check, step-0 init); ``x``/``y`` are this rank's rows only."""
    xb, yb = torch.randn(8, 3), torch.randn(8, 3)
    rank1 = DistInfo(rank=1, world_size=2)
    (b,) = tr._host_batches([(xb, yb)], 2.0, rank1, pin=False)
    assert torch.equal(b.host_x, xb / 2.0) and torch.equal(b.x, xb[4:] / 2.0) and torch.equal(b.y, yb[4:] / 2.0)
    (b,) = tr._host_batches([(xb, None)], 2.0, rank1, pin=False)
    assert b.y is b.x and b.host_y is b.host_x  # no target cache: one tensor, one copy
    (b,) = tr._host_batches([(xb, None)], 1.0, DistInfo(), pin=False)
    assert b.x is b.host_x  # single process: the batch itself


def test_small_gradients_share_one_collective(monkeypatch):
    """Blocker: one all-reduce per parameter. Small gradients now go in one flat buffer (one collective per dtype),
    large ones alone; every gradient ends as its mean over ranks."""
    big = BUCKET_BYTES // 4 + 1  # float32 elements just over the bucket size
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (big, 3, 5, 7)] + [torch.nn.Parameter(torch.zeros(4, 6))]
    for i, p in enumerate(params):
        p.grad = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) + i
    params[-1].grad = params[-1].grad.t().contiguous().t()  # column-major, like W_enc's gradient
    want = [(p.grad + 1) / 2 for p in params]
    calls = []

    def all_reduce(t, op=None):  # a world of two ranks, the other one's gradients all ones
        calls.append(t.numel())
        t.add_(1)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    DistInfo(rank=0, world_size=2).average_gradients(params)
    assert sorted(calls) == [3 + 5 + 7 + 24, big]
    for p, w in zip(params, want):
        assert torch.equal(p.grad, w)


def test_nonfinite_losses_are_read_in_one_batch_and_name_the_first_bad_step():
    """Off CPU the loss flags stay on the device until a log line or checkpoint; the check then names the first
    non-finite step and its loss terms, and clears the pile."""
    run = types.SimpleNamespace(out="runs/x", loss_checks=[])
    for step, value in [(3, 1.0), (4, float("nan")), (5, float("inf"))]:
        run.loss_checks.append((step, torch.isfinite(torch.tensor(value)), {"mse": torch.tensor(value)}))
    with pytest.raises(ValueError, match=r"non-finite loss at step 4 \({'mse': nan}\)"):
        tr._Run._check_losses(run)
    assert run.loss_checks == []
    tr._Run._check_losses(run)  # nothing pending: no error
