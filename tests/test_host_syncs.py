"""Host-device syncs of one training step, per arm: the budget a GPU run pays in waits for the device.

Each arm trains a few steps on a small synthetic cache; step :data:`STEP` (steady state: after the step-0
initialisation and the warm-up, with dead latents so that AuxK runs, and a C²R step of the default schedule
``every=5``) is watched by :class:`~device_audit.HostSyncCounter` and :class:`~device_audit.FactoryAudit`. The
kernels run with the GPU's choices (:func:`saelab.kernels.blocks.host_sized` patched to False: memory-bounded
blocks, no value-dependent row compaction; the screened bf16 selection that ``selection_gemm="auto"`` picks on a
GPU), so the count is what a GPU step would wait for. The trainer's own reads (``saelab/train.py``: the NaN check of
each batch) are the lead's and not counted here.
"""

from __future__ import annotations

import pytest
import torch

from device_audit import FactoryAudit, HostSyncCounter
from synthetic import sparse_dictionary_data, write_cache

from saelab.config_files import from_dict
from saelab.kernels import blocks
from saelab.train import TrainConfig, _Run, train

STEP = 5
"""The watched step (0-based): past the step-0 initialisation and the 2-step LR warm-up; C²R (every 5) runs on it."""

AUXK = 1  # auxk_loss: int(dead.sum()): k_aux = min(k_aux, n_dead) and the dead block's shape follow from the count
SCREEN = 1  # TopK.select_from_candidates: which tokens the bf16 certificate fails (their exact rows are recomputed)
BATCH_ROUNDS = 2  # BatchTopK._select: one read per round of its candidate search (here one widening round + the last)
PADDED_WIDTH = 1  # FlatCode.to_code: the padded width of variable rows, max(tokens' pair counts)
C2R_L0 = 1  # c2r_loss, scale="invariant": the batch's L0, a Python float in c2r_size_factor (C²R steps only)
GROUP_SLICES = 1  # matryoshka_prefix_losses: pairs per group, the slices of the fused kernel (counts.sum(1).tolist())
# Not seen by the counter: _MatryoshkaPrefixes.backward reads its G prefix-loss gradients once (.tolist()) to use them
# as the scalar alpha of fused in-place adds (a Python-level read inside autograd's backward).

BUDGETS = {
    ("topk", "linear", ()): SCREEN + AUXK,
    ("topk", "linear", ("c2r",)): SCREEN + AUXK + C2R_L0,
    ("topk", "cosine_per_feature", ()): SCREEN + AUXK,
    ("topk", "cosine_per_feature", ("c2r",)): SCREEN + AUXK + C2R_L0,
    ("batchtopk", "linear", ()): BATCH_ROUNDS + PADDED_WIDTH + AUXK,
    ("batchtopk", "cosine_global", ()): BATCH_ROUNDS + PADDED_WIDTH + AUXK,
    ("matryoshka_batchtopk", "linear", ()): BATCH_ROUNDS + PADDED_WIDTH + AUXK + GROUP_SLICES,
    ("relu", "linear", ()): 0,  # dense forward and L1 penalty: nothing read
    ("jumprelu", "linear", ()): 0,  # dense forward and STE L0 penalty: nothing read
}
"""Syncs of one step outside ``saelab/train.py``, by ``(activation, encoder, regularizers)``."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    x, _, _ = sparse_dictionary_data(4096, d_in=32, n_features=64, k=4, noise=0.01, scale=50.0)
    return write_cache(tmp_path_factory.mktemp("sync_cache") / "cache", x)


def _watched_step(monkeypatch, tmp_path, cache, activation: str, encoder: str, regs: tuple[str, ...],
                  d_sae: int = 512) -> dict:
    """Train ``STEP + 2`` steps (the watched one is not the last, which logs) with the GPU's kernel choices and return what step ``STEP`` did."""
    monkeypatch.setattr(blocks, "host_sized", lambda device: False)
    seen: dict = {}
    orig = _Run.train_step

    def step(self, batch):
        if self.step != STEP:
            return orig(self, batch)
        seen["dead"] = int((self.since_fired >= self.dead_tokens).sum())
        seen["reg_due"] = all(STEP % spec.every == 0 for spec in self.regs)
        with HostSyncCounter() as syncs, FactoryAudit() as factories:
            orig(self, batch)
        seen["syncs"], seen["factories"] = syncs, factories
        return None

    monkeypatch.setattr(_Run, "train_step", step)
    cfg = dict(cache=str(cache.path), out=str(tmp_path / "run"), activation=activation, encoder=encoder,
               regularizers=list(regs), d_sae=d_sae, k=8, batch_size=256, n_tokens=256 * (STEP + 2), lr=3e-3,
               warmup_steps=2, checkpoint_every=100, log_every=100, progress=False, dead_tokens=256,
               selection_gemm="bf16", threads=1)
    train(from_dict(TrainConfig, cfg))
    assert "syncs" in seen, f"step {STEP} was not taken"
    return seen


def _table(where) -> str:
    return "\n".join(f"  {n:3d}  {k}" for k, n in sorted(where.items())) or "  (none)"


@pytest.mark.parametrize("arm", list(BUDGETS), ids=lambda a: "-".join([a[0], a[1], *a[2]]))
def test_step_sync_budget(monkeypatch, tmp_path, cache, arm):
    """Each arm's step waits for the device at most its budget's times (outside the trainer), and every tensor
    factory it calls names its device."""
    activation, encoder, regs = arm
    seen = _watched_step(monkeypatch, tmp_path, cache, *arm)
    if activation in ("topk", "batchtopk", "matryoshka_batchtopk"):
        assert seen["dead"] > 0, "the watched step must run AuxK on dead latents"
    assert seen["reg_due"], "the watched step must compute the regularizers"
    where = {k: n for k, n in seen["syncs"].where.items() if "train.py" not in k}
    total = sum(where.values())
    assert total <= BUDGETS[arm], f"{arm}: {total} host syncs > budget {BUDGETS[arm]}:\n{_table(where)}"
    assert not seen["factories"].calls, f"{arm}: device-less tensor factories:\n{_table(seen['factories'].calls)}"


SCREENED_NEIGHBOURS = 3  # _nearest_in_chunk_screened, per chunk: the certificate is finite; the (row, group) pairs to
# recompute (their number); pairs per group (the sizes of the exact fp32 GEMMs)


def test_screened_c2r_step_sync_budget(monkeypatch, tmp_path, cache):
    """A C²R step whose neighbour search is screened by a bf16 GEMM (chunks of >= 1024 latents on a GPU) adds a fixed
    number of reads per chunk, not one per block."""
    from saelab.kernels import neighbours

    monkeypatch.setattr(neighbours, "bf16_native", lambda device: True)
    seen = _watched_step(monkeypatch, tmp_path, cache, "topk", "linear", ("c2r",), d_sae=2048)
    where = {k: n for k, n in seen["syncs"].where.items() if "train.py" not in k}
    assert any("neighbours.py" in k for k in where), _table(where)  # the screened search ran
    budget = SCREEN + AUXK + C2R_L0 + SCREENED_NEIGHBOURS
    assert sum(where.values()) <= budget, _table(where)
    assert not seen["factories"].calls, _table(seen["factories"].calls)


def test_budgets_are_tight(monkeypatch, tmp_path, cache):
    """The counter sees the reads the budgets name (a budget left above the real count would hide a new sync):
    TopK's step makes exactly its screen read and its AuxK read."""
    seen = _watched_step(monkeypatch, tmp_path, cache, "topk", "linear", ())
    where = {k: n for k, n in seen["syncs"].where.items() if "train.py" not in k}
    assert sum(where.values()) == SCREEN + AUXK, _table(where)
    assert any("losses.py" in k for k in where) and any("activations.py" in k for k in where), _table(where)


def test_cpu_compaction_matches_device_path():
    """AuxK's two ways to drop each row's scores outside its top k (CPU: compact the rows that need a top-k; GPU: a
    top-k of every row, masked) give the same loss and gradients."""
    from saelab.sae.losses import auxk_loss
    from saelab.kernels.sparse_step import encode_sparse
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, k=4, activation="topk"))
    x = torch.randn(128, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::6] = True  # 11 dead latents, k_aux 4: the dense block; 96 of 128 rows hold more than 4 positive dead scores
    out = []
    for host in (True, False):
        sae.zero_grad()
        blocks_host = blocks.host_sized
        blocks.host_sized = lambda device, host=host: host
        try:
            code, pre = encode_sparse(sae, x)
            residual = (x - sae.decode_code(code)).detach()
            loss = auxk_loss(residual, pre, dead, sae.W_dec, 4)
            loss.backward()
        finally:
            blocks.host_sized = blocks_host
        out.append((loss.detach(), sae.W_enc.grad.clone(), sae.W_dec.grad.clone()))
    assert out[0][0] > 0
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_block_sizes_by_device():
    """CPU: today's cache-sized blocks exactly; a GPU: memory-bounded blocks (whole tensors for small ones), aligned
    bf16 operand widths, no row compaction."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [blocks.block_rows(cpu, k, 65536) for k in ("scale_law", "row_dots", "norms", "neighbour", "panel",
                                                       "panel_sub")] == [32, 1024, 1024, 1024, 8192, 128]
    assert blocks.padded_width(cpu, 33) == 33 and blocks.compacts_rows(cpu)
    assert blocks.block_rows(gpu, "scale_law", 16384) == 4096  # 2^26 entries a block
    assert blocks.block_rows(gpu, "row_dots", 2**27) == 1 and blocks.block_rows(gpu, "neighbour") == 8192
    assert [blocks.padded_width(gpu, w) for w in (33, 40, 1)] == [40, 40, 8] and not blocks.compacts_rows(gpu)
    with pytest.raises(KeyError, match="scale_law"):
        blocks.block_rows(cpu, "rows")


def test_fp32_accumulation_pins_tf32_off_and_restores():
    """On CUDA the exact-fp32 block switches TF32 (matmul, cuDNN) and bf16 reduced-precision reductions off, nests,
    and restores the caller's flags at the last exit; on a CPU it changes nothing."""
    from saelab.kernels.screen import _cuda_precision_flags, _set_cuda_precision_flags, fp32_accumulation

    saved = _cuda_precision_flags()
    try:
        _set_cuda_precision_flags(True, True, True)
        with fp32_accumulation(torch.device("cpu")):
            assert _cuda_precision_flags() == (True, True, True)
        with fp32_accumulation(torch.device("cuda", 0)):
            assert _cuda_precision_flags() == (False, False, False)
            with fp32_accumulation(torch.device("cuda", 0)):
                assert _cuda_precision_flags() == (False, False, False)
            assert _cuda_precision_flags() == (False, False, False)  # the outer block is still open
        assert _cuda_precision_flags() == (True, True, True)
    finally:
        _set_cuda_precision_flags(*saved)


def test_bucket_counts_is_bincount():
    """The read-free count equals ``torch.bincount(minlength=n)`` (dtype and values) and refuses out-of-range keys."""
    from saelab.codes import Code, bucket_counts

    keys = torch.randint(0, 37, (1000,), generator=torch.Generator().manual_seed(0))
    got = bucket_counts(keys, 40)
    assert got.dtype == torch.long and torch.equal(got, torch.bincount(keys, minlength=40))
    with pytest.raises(IndexError):
        bucket_counts(torch.tensor([40]), 40)
    vals = torch.tensor([[1.0, 0.0, 2.0], [0.5, 3.0, 0.0]])
    idx = torch.tensor([[4, 0, 2], [4, 1, 0]])
    assert Code(vals, idx).active_mask_counts(6).tolist() == [0, 1, 1, 0, 2, 0]  # zeros (padding) do not count
