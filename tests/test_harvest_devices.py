"""Harvest off the CPU, checked on a CPU-only machine: device placement, LM precision, host copies, batch size.

A machine without a GPU cannot run the CUDA path, but it can run the harvest with the LM on the ``meta`` device
(shapes, no data) under :class:`StrictDevices`, which raises whenever one op mixes tensors of two devices (CUDA's
rule: only 0-dim CPU tensors may join device tensors). That is the failure a CUDA harvest had when ``_hook_widths``
built its token ids on the CPU: an embedding lookup with CPU ids and device weights. The meta device alone does not
catch it (``F.embedding`` of meta weights accepts CPU ids), hence the strict mode.
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import saelab.activations.harvest as hv
from saelab.activations.cache import ActivationCache, ActivationCacheWriter, CacheMismatchError
from saelab.activations.harvest import (CPU_BATCH_SIZE, HarvestConfig, HostCopies, cache_lm_dtype, default_batch_size,
                                        harvest)
from saelab.activations.stream import BackgroundHarvest
from saelab.data.split import DataConfig, iter_contexts, split_documents
from saelab.models.hooks import capture, resolve_hook
from saelab.models.lm import load_lm

from device_audit import FactoryAudit, saelab_caller

HOOK = "blocks.1.hook_resid_post"
CTX = 32


class StrictDevices(TorchDispatchMode):
    """Raise ``RuntimeError`` when an ATen op gets tensors on two devices (0-dim CPU tensors excepted, as on CUDA;
    copies excepted). :attr:`device_ops` counts the ops on non-CPU tensors by the saelab ``file:line`` that ran them
    (the innermost saelab frame: a transformers op inside :func:`capture` counts as ``models/hooks.py``)."""

    def __init__(self) -> None:
        super().__init__()
        self.device_ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devs = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                and not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devs) > 1 and func is not torch.ops.aten._to_copy.default and "copy" not in func.__name__:
            raise RuntimeError(f"{func} mixes devices {sorted(map(str, devs))}")
        if any(d.type != "cpu" for d in devs):
            self.device_ops[(saelab_caller() or "torch").rsplit(":", 1)[0]] += 1
        return func(*args, **kwargs)


@pytest.fixture
def meta_lm(tiny_llama_dir, monkeypatch):
    """The tiny Llama with its weights on the meta device; transformers' packed-sequence probe (a value read of the
    position ids, which meta tensors have none of) is skipped as it is under tracing."""
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "is_tracing", lambda *a, **k: True)
    lm = load_lm(str(tiny_llama_dir))
    lm.model.to("meta")
    return lm


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


def _cfg(tiny_llama_dir, text_dir, out, **kw):
    base = dict(model=str(tiny_llama_dir), hook_name=HOOK, out=str(out), n_tokens=600, context_size=CTX,
                batch_size=4, checkpoint_every=2, progress=False,
                data=DataConfig(corpora=[], text_files=[str(text_dir)], eval_fraction=0.1))
    base.update(kw)
    return HarvestConfig(**base)


def _zeros_from_meta(monkeypatch):
    """Host copies of meta tensors: zeros of the same shape and dtype (meta tensors hold no values)."""
    def copy(self, slot, t):
        assert t.device == self.device, f"a {t.device} tensor copied as if from {self.device}"
        return torch.zeros(t.shape, dtype=t.dtype, device="cpu")

    monkeypatch.setattr(HostCopies, "copy", copy)


# -- placement -------------------------------------------------------------------------------------------------


def test_strict_devices_catches_cpu_ids_for_a_device_model(meta_lm):
    """The check that would have caught blocker 1: CPU ids into a device LM raise; ids on its device do not."""
    hook = resolve_hook(meta_lm.model, HOOK)
    with StrictDevices(), pytest.raises(RuntimeError, match="mixes devices"):
        capture(meta_lm.model, hook, torch.tensor([[meta_lm.prefix_id] * 2]))
    with StrictDevices():
        assert hv._hook_widths(meta_lm, [hook], torch.device("meta")) == {hook.hook_name: 32}


def test_harvest_runs_on_a_non_cpu_device(meta_lm, tiny_llama_dir, text_dir, tmp_path, monkeypatch):
    """A whole clean harvest with the LM off the CPU: every tensor that meets the LM is on its device, the rest is
    host work, the default batch size is the device's, and the progress records it (so a resume keeps it)."""
    _zeros_from_meta(monkeypatch)
    cfg = _cfg(tiny_llama_dir, text_dir, tmp_path / "c", device="meta", batch_size=None)
    with StrictDevices() as strict:
        cache = harvest(cfg, lm=meta_lm)
    # the device runs the LM forward (capture) and nothing else: no row filter, gather or conversion there
    assert set(strict.device_ops) == {"models/hooks.py"}, strict.device_ops
    assert cache.n_tokens == 600 and cache.d_in == 32 and cache.manifest["complete"]
    assert "lm_dtype" not in cache.manifest  # fp32
    bs = default_batch_size(torch.device("meta"), CTX)
    assert bs == 8192 // CTX and cache.manifest["progress"]["batch_size"] == bs


def test_background_paired_masked_harvest_on_a_non_cpu_device(meta_lm, tiny_llama_dir, text_dir, tmp_path, monkeypatch):
    """The masked harvest with its paired clean cache, on the stream's background thread, with the LM off the CPU."""
    _zeros_from_meta(monkeypatch)
    real = hv.harvest

    def strict_harvest(*a, **k):  # torch modes are per thread: enter it on the harvest's thread
        with StrictDevices():
            return real(*a, **k)

    monkeypatch.setattr(hv, "harvest", strict_harvest)
    cfg = _cfg(tiny_llama_dir, text_dir, tmp_path / "m", device="meta", mask_prob=0.2,
               paired_clean_out=str(tmp_path / "p"))
    cache = BackgroundHarvest(cfg, meta_lm).start().join()
    assert cache.n_tokens == 600 and ActivationCache.open(tmp_path / "p").n_tokens == 600
    assert cache.meta_column("masked").any()


def test_harvest_makes_no_device_less_tensors(tiny, tiny_llama_dir, text_dir, tmp_path):
    """Every tensor factory saelab calls on the harvest path (packing, masking, forward, filter, writes) names its
    device: a device-less one makes a CPU tensor that a CUDA LM would then meet."""
    cfg = _cfg(tiny_llama_dir, text_dir, tmp_path / "m", mask_prob=0.2, paired_clean_out=str(tmp_path / "p"))
    with FactoryAudit() as audit:
        harvest(cfg, lm=tiny)
    assert dict(audit.calls) == {}


# -- host copies -------------------------------------------------------------------------------------------------


class _Staged(HostCopies):
    """The asynchronous path on the CPU (plain buffers, ``non_blocking=True`` copies), counting waits and copies."""

    waits = copies = 0

    def __init__(self, device, pin=None):
        super().__init__(device, pin=False)

    def copy(self, slot, t):
        type(self).copies += 1
        return super().copy(slot, t)

    def wait(self):
        type(self).waits += 1
        super().wait()


def test_staged_host_copies_give_the_same_caches(tiny, tiny_llama_dir, text_dir, tmp_path, monkeypatch):
    """The copy path of a GPU harvest (reused host buffers, copies queued then one wait a batch) stores exactly
    what the CPU path stores, for a masked harvest and its paired clean cache."""
    kw = dict(mask_prob=0.2, n_tokens=900)
    ref = harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "m0", paired_clean_out=str(tmp_path / "p0"), **kw), lm=tiny)
    monkeypatch.setattr(hv, "HostCopies", _Staged)
    got = harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "m1", paired_clean_out=str(tmp_path / "p1"), **kw), lm=tiny)
    batches = got.manifest["progress"]["contexts_done"] // 4
    assert _Staged.waits == batches and _Staged.copies == 2 * batches  # masked + clean forward, one wait
    for a, b in ((ref, got), (ActivationCache.open(tmp_path / "p0"), ActivationCache.open(tmp_path / "p1"))):
        rows = np.arange(a.n_tokens)
        assert a.n_tokens == b.n_tokens
        torch.testing.assert_close(b.read_rows(rows), a.read_rows(rows), rtol=0, atol=0)
        for col in ("token_ids", "positions", "input_ids", "masked"):
            np.testing.assert_array_equal(b.meta_column(col), a.meta_column(col))


def test_host_copies_on_cpu_are_the_tensor_itself():
    t = torch.randn(2, 3)
    hc = HostCopies(torch.device("cpu"))
    assert hc.copy(0, t) is t and not hc.staged
    hc.wait()


def test_staged_host_copies_reuse_their_buffer():
    hc = HostCopies(torch.device("cpu"), pin=False)
    a = hc.copy(0, torch.ones(2, 3, dtype=torch.bfloat16))
    hc.wait()
    b = hc.copy(0, torch.full((2, 3), 2.0, dtype=torch.bfloat16))
    hc.wait()
    assert a.data_ptr() == b.data_ptr() and b.dtype == torch.bfloat16 and (b == 2).all()
    c = hc.copy(0, torch.zeros(1, 3, dtype=torch.bfloat16))  # a shorter last batch gets its own buffer
    assert c.shape == (1, 3)


# -- LM precision ------------------------------------------------------------------------------------------------


def test_bf16_lm_harvest_stores_the_bf16_forward_and_records_it(tiny_llama_dir, text_dir, tmp_path):
    """--lm_dtype bf16 loads the LM in bf16; the rows are that forward's activations in float32 (the cache dtype),
    and the manifest says bf16."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no native bf16 on this CPU is a warning, tested below
        cache = harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "c", lm_dtype="bf16", n_tokens=200))
    assert cache.manifest["lm_dtype"] == "bf16" and cache_lm_dtype(cache.manifest) == "bf16"
    assert cache.manifest["dtype"] == "float32"
    lm = load_lm(str(tiny_llama_dir), dtype="bf16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    docs = split_documents(DataConfig(corpora=[], text_files=[str(text_dir)], eval_fraction=0.1))[0].shuffle(0)
    ctx = next(iter_contexts(lm, docs, CTX))[0]
    h = capture(lm.model, resolve_hook(lm.model, HOOK), ctx[None])[0].float()
    pos = cache.meta_column("positions")[:5]
    torch.testing.assert_close(cache.read_rows(np.arange(5)), h[torch.as_tensor(pos).long()], rtol=0, atol=0)


def test_resume_with_another_lm_dtype_is_refused(tiny, tiny_llama_dir, text_dir, tmp_path):
    harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "c", n_tokens=100), lm=tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CacheMismatchError, match=r'lm_dtype: cached "fp32", requested "bf16"'):
            harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "c", n_tokens=100, lm_dtype="bf16"))
        harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "b", n_tokens=100, lm_dtype="bf16"))
    with pytest.raises(CacheMismatchError, match=r'lm_dtype: cached "bf16", requested "fp32"'):
        harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "b", n_tokens=100), lm=tiny)


def test_a_given_lm_runs_where_it_is_and_its_dtype_is_recorded(tiny_llama_dir, text_dir, tmp_path):
    lm = load_lm(str(tiny_llama_dir), dtype=torch.float16)
    with pytest.warns(UserWarning, match="in fp16, not --device cpu / --lm_dtype fp32"):
        cache = harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "c", n_tokens=100), lm=lm)
    assert cache.manifest["lm_dtype"] == "fp16"


def test_bf16_without_native_support_warns(monkeypatch):
    monkeypatch.setattr(hv, "bf16_native", lambda device: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        hv.check_lm_dtype(torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(hv, "bf16_native", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hv.check_lm_dtype(torch.bfloat16, torch.device("cpu"))
        hv.check_lm_dtype(torch.float16, torch.device("cpu"))


@pytest.mark.parametrize("kw, match", [
    (dict(lm_dtype="int8"), "unknown dtype 'int8'"),
    (dict(batch_size=0), "batch_size must be a positive int"),
    (dict(device="cuda:7" if torch.cuda.is_available() else "cuda"), "cuda"),
    (dict(device="gpu"), "not a device name"),
])
def test_bad_device_settings_fail_before_anything_is_written(tiny_llama_dir, text_dir, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "c", **kw))
    assert not (tmp_path / "c").exists()


def test_load_lm_checks_the_device_before_loading(monkeypatch):
    import saelab.models.lm as lm_mod

    monkeypatch.setattr(lm_mod, "resolve_model_path", lambda *a: pytest.fail("loaded before checking the device"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="is_available"):
            load_lm("anything", device="cuda")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_lm("anything", dtype="fp8")


# -- batch size --------------------------------------------------------------------------------------------------


def test_default_batch_size_per_device():
    assert default_batch_size(torch.device("cpu"), 128) == CPU_BATCH_SIZE == 8
    assert default_batch_size(torch.device("meta"), 128) == 64
    assert default_batch_size(torch.device("meta"), 4096) == CPU_BATCH_SIZE  # never below the CPU's


def _cache_with_progress(path, progress):
    w = ActivationCacheWriter(path, model="m", hook_name="h", d_in=2)
    w.add(torch.ones(3, 2), token_ids=[1, 2, 3], doc_ids=[0, 0, 0], positions=[1, 2, 3])
    w.checkpoint(progress)
    w.close()


def test_a_resume_keeps_the_batch_size_it_was_started_with(tmp_path):
    """Unset, the batch size of a resumed cache is the recorded one (absent: the CPU default), whatever the device;
    an explicit other one is used with a warning; a new cache gets the device's default."""
    meta = torch.device("meta")
    _cache_with_progress(tmp_path / "gpu", {"contexts_done": 64, "max_doc": 1, "batch_size": 64})
    _cache_with_progress(tmp_path / "cpu", {"contexts_done": 8, "max_doc": 1})
    assert hv._resolve_batch_size(HarvestConfig(out=str(tmp_path / "gpu"), batch_size=None), torch.device("cpu")) == 64
    assert hv._resolve_batch_size(HarvestConfig(out=str(tmp_path / "cpu"), batch_size=None), meta) == CPU_BATCH_SIZE
    new = HarvestConfig(out=str(tmp_path / "new"), batch_size=None, context_size=128)
    assert hv._resolve_batch_size(new, meta) == 64 and hv._resolve_batch_size(new, torch.device("cpu")) == 8
    with pytest.warns(UserWarning, match="harvested with --batch_size 64"):
        assert hv._resolve_batch_size(HarvestConfig(out=str(tmp_path / "gpu"), batch_size=16), meta) == 16
