"""Tests for saelab.activations.cache: round-trip, shuffling, resume, mismatch, corruption, bad input."""

from __future__ import annotations

import gc
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.activations.cache import (
    ActivationCache,
    ActivationCacheWriter,
    CacheMismatchError,
    CorruptCacheError,
    IncompleteCacheError,
)

D = 6
IDENT = dict(model="tiny-lm", hook_name="blocks.2.hook_resid_post", d_in=D)


def rows(n: int, start: int = 0, seed: int = 0) -> dict:
    """n synthetic rows; column 0 holds the global row id (exact in float32) so rows can be traced."""
    rng = np.random.default_rng(seed + start)
    acts = rng.standard_normal((n, D)).astype(np.float32)
    ids = np.arange(start, start + n)
    acts[:, 0] = ids
    return dict(
        acts=acts,
        token_ids=(ids * 7) % 50257,
        doc_ids=ids // 4,
        positions=ids % 4,
        extra={"masked": ids % 3 == 0},
    )


def add(w: ActivationCacheWriter, r: dict) -> None:
    w.add(r["acts"], token_ids=r["token_ids"], doc_ids=r["doc_ids"], positions=r["positions"], extra=r["extra"])


def build(path: Path, n: int, shard_rows: int, *, chunk: int = 13, **kw) -> ActivationCache:
    w = ActivationCacheWriter(path, **IDENT, shard_rows=shard_rows, **kw)
    for s in range(0, n, chunk):
        add(w, rows(min(chunk, n - s), s))
    return w.finalize({"docs_done": n})


def sort_rows(x: np.ndarray) -> np.ndarray:
    return x[np.lexsort(x.T[::-1])]


# --------------------------------------------------------------------------------------------- round trip


def test_round_trip_rows_meta_and_layout(tmp_path):
    path = tmp_path / "c"
    w = ActivationCacheWriter(path, **IDENT, shard_rows=16, meta={"context_size": 32, "corpora": ["a", "b"]})
    sizes = [5, 20, 1, 33, 0, 14]
    start, parts = 0, []
    for k, n in enumerate(sizes):
        r = rows(n, start)
        if k == 1:  # torch input, including a non-contiguous bf16-free float64 view
            r["acts"] = torch.from_numpy(r["acts"].astype(np.float64))
        w.add(r["acts"], token_ids=r["token_ids"], doc_ids=r["doc_ids"], positions=r["positions"], extra=r["extra"])
        parts.append(rows(n, start))
        start += n
    assert w.n_tokens == 73 and w.n_committed == 0  # nothing durable before a checkpoint
    cache = w.finalize({"docs_done": 19})
    x = np.concatenate([p["acts"] for p in parts])

    assert cache.n_tokens == 73 and cache.d_in == D and cache.n_shards == 5  # 16 x 4 + 9
    assert list(cache.shard_rows) == [16, 16, 16, 16, 9]
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "saelab-activation-cache" and m["version"] == 1 and m["complete"] is True
    assert (m["model"], m["hook_name"], m["d_in"], m["dtype"]) == ("tiny-lm", IDENT["hook_name"], D, "float32")
    assert m["context_size"] == 32 and m["corpora"] == ["a", "b"] and m["progress"] == {"docs_done": 19}
    assert m["n_tokens"] == 73 and sum(s["n_rows"] for s in m["shards"]) == 73
    mm = np.load(path / m["shards"][2]["file"], mmap_mode="r")
    assert mm.dtype == np.float32 and mm.shape == (16, D)
    np.testing.assert_array_equal(mm, x[32:48])
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    assert m["stats"]["mean_norm"] == pytest.approx(norms.mean(), rel=1e-5)
    assert m["stats"]["mean_sq_norm"] == pytest.approx((norms**2).mean(), rel=1e-5)

    cache = ActivationCache.open(path, expect={"model": "tiny-lm", "d_in": D}, verify=True)
    batches = list(cache.iter_batches(10, drop_last=False, shuffle=True, seed=3))
    assert [b.shape[0] for b in batches] == [10] * 7 + [3]
    assert all(b.dtype == torch.float32 and b.shape[1] == D for b in batches)
    got = torch.cat(batches).numpy()
    np.testing.assert_array_equal(sort_rows(got), sort_rows(x))
    assert cache.num_batches(10) == 7 and cache.num_batches(10, drop_last=False) == 8
    assert sum(b.shape[0] for b in cache.iter_batches(10)) == 70  # drop_last drops the 3-row tail

    for name in ("token_ids", "doc_ids", "positions"):
        np.testing.assert_array_equal(cache.meta_column(name), np.concatenate([p[name] for p in parts]))
    assert cache.meta_column("token_ids").dtype == np.int32 and cache.meta_column("doc_ids").dtype == np.int64
    masked = cache.meta_column("masked")
    assert masked.dtype == np.bool_
    np.testing.assert_array_equal(masked, np.concatenate([p["extra"]["masked"] for p in parts]))
    acts3, meta3 = cache.shard_arrays(3)
    assert isinstance(acts3, np.memmap) and set(meta3) == {"token_ids", "doc_ids", "positions", "masked"}
    np.testing.assert_array_equal(meta3["positions"], (np.arange(48, 64) % 4))

    idx = np.array([72, 0, 15, 16, 40, 40, 5])
    np.testing.assert_array_equal(cache.read_rows(idx).numpy(), x[idx])
    with pytest.raises(IndexError):
        cache.read_rows(np.array([73]))
    with pytest.raises(KeyError, match="token_ids"):
        cache.meta_column("nope")


# --------------------------------------------------------------------------------------------- shuffling


def test_shuffle_mixes_shards_and_is_deterministic(tmp_path):
    cache = build(tmp_path / "c", 128, shard_rows=16)  # 8 shards
    shard_of = lambda b: set((b[:, 0].numpy().astype(int) // 16).tolist())  # noqa: E731

    first = next(cache.iter_batches(16, seed=0, shuffle_window_shards=4))
    assert len(shard_of(first)) > 1
    # window of one shard: a batch the size of a shard comes from exactly one shard
    per_shard = list(cache.iter_batches(16, seed=0, epochs=2, shuffle_window_shards=1))
    assert all(len(shard_of(b)) == 1 for b in per_shard)
    order = [shard_of(b).pop() for b in per_shard]
    assert sorted(order[:8]) == list(range(8)) and order[:8] != order[8:]  # shard order reshuffled per epoch
    assert order[:8] != list(range(8))

    a = [b.clone() for b in cache.iter_batches(16, seed=0, epochs=2)]
    b = list(cache.iter_batches(16, seed=0, epochs=2))
    c = list(cache.iter_batches(16, seed=1, epochs=2))
    assert len(a) == 16 and all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    assert not torch.equal(torch.cat(a[:8]), torch.cat(a[8:]))  # epochs are shuffled differently
    np.testing.assert_array_equal(np.sort(torch.cat(a[8:])[:, 0].numpy()), np.arange(128))

    ordered = torch.cat(list(cache.iter_batches(16, shuffle=False)))
    np.testing.assert_array_equal(ordered[:, 0].numpy(), np.arange(128))


def test_start_batch_matches_uninterrupted_stream(tmp_path):
    # 11 shards of 10 rows + batch 7 + window 3: batches straddle shard and window boundaries
    cache = build(tmp_path / "c", 110, shard_rows=10)
    for drop_last in (True, False):
        nb = cache.num_batches(7, drop_last)
        full = list(cache.iter_batches(7, seed=5, epochs=3, drop_last=drop_last, shuffle_window_shards=3))
        assert len(full) == 3 * nb
        for n in (0, 1, 4, nb - 1, nb, nb + 6, 3 * nb - 1, 3 * nb):
            got = list(cache.iter_batches(7, seed=5, epochs=3, drop_last=drop_last, start_batch=n,
                                          shuffle_window_shards=3))
            assert len(got) == len(full) - n
            assert all(torch.equal(p, q) for p, q in zip(got, full[n:])), (drop_last, n)
    with pytest.raises(ValueError, match="past the end"):
        cache.iter_batches(7, epochs=1, start_batch=16)

    # infinite stream: resuming deep into epoch 5 gives the same batches
    it = cache.iter_batches(7, seed=2, epochs=None)
    stream = [next(it) for _ in range(80)]
    resumed = cache.iter_batches(7, seed=2, epochs=None, start_batch=73)
    assert all(torch.equal(next(resumed), stream[k]) for k in range(73, 80))


def test_start_batch_skips_without_reading(tmp_path, monkeypatch):
    cache = build(tmp_path / "c", 80, shard_rows=10)  # 8 shards, 2 windows of 4
    loads = []
    orig = cache.load_window
    monkeypatch.setattr(cache, "load_window", lambda shards, *a: loads.append(list(shards)) or orig(shards, *a))
    it = cache.iter_batches(10, epochs=50, start_batch=40 * 8 + 5)  # epoch 40, batch 5 -> second window
    next(it)
    assert len(loads) == 1 and len(loads[0]) == 4  # only the one window holding the batch was read


# --------------------------------------------------------------------------------------------- resume


def test_resume_after_crash_equals_uninterrupted_run(tmp_path):
    path = tmp_path / "c"
    data = [rows(n, s) for n, s in ((12, 0), (13, 12), (9, 25), (14, 34))]  # "docs" 0..3
    w = ActivationCacheWriter(path, **IDENT, shard_rows=10, meta={"seed": 1})
    assert w.progress == {} and w.n_tokens == 0
    add(w, data[0])
    add(w, data[1])
    w.checkpoint({"docs_done": 2})  # commits 10 + 10 + 5 rows
    with pytest.raises(RuntimeError, match="another process"):
        ActivationCacheWriter(path, **IDENT, shard_rows=10, meta={"seed": 1})
    add(w, data[2])
    add(w, data[3])  # 23 more rows -> two automatic flushes, 3 rows buffered, never checkpointed
    assert w.n_committed == 25 and w.n_tokens == 48
    flushed = sorted(p.name for p in path.glob("shard_*.acts.npy"))
    assert len(flushed) == 5  # the two auto-flushed shards are on disk ...
    (path / ".shard_00005.acts.npy.k3j2.tmp").write_bytes(b"\x93NUMPY partial")  # ... plus a killed write
    del w  # crash: no finalize, no close
    gc.collect()

    w = ActivationCacheWriter(path, **IDENT, shard_rows=10, meta={"seed": 1})
    assert w.progress == {"docs_done": 2}
    assert w.n_tokens == 25 and w.n_committed == 25 and not w.complete
    assert sorted(p.name for p in path.glob("shard_*.acts.npy")) == flushed[:3]
    assert not list(path.glob(".*.tmp"))
    part = ActivationCache.open(path, allow_incomplete=True)
    assert part.n_tokens == 25
    np.testing.assert_array_equal(part.read_rows(np.arange(25)).numpy()[:, 0], np.arange(25))
    for r in data[w.progress["docs_done"]:]:
        add(w, r)
    resumed = w.finalize({"docs_done": 4})

    w = ActivationCacheWriter(tmp_path / "ref", **IDENT, shard_rows=10, meta={"seed": 1})  # uninterrupted
    for r in data:
        add(w, r)
    ref = w.finalize({"docs_done": 4})
    assert resumed.n_tokens == ref.n_tokens == 48
    np.testing.assert_array_equal(resumed.read_rows(np.arange(48)).numpy(), ref.read_rows(np.arange(48)).numpy())
    for name in ("token_ids", "doc_ids", "positions", "masked"):
        np.testing.assert_array_equal(resumed.meta_column(name), ref.meta_column(name))
    assert resumed.manifest["progress"] == {"docs_done": 4}
    assert resumed.stats["mean_sq_norm"] == pytest.approx(ref.stats["mean_sq_norm"], rel=1e-9)
    resumed.verify()

    # a finished cache reopens as complete and refuses further rows
    w = ActivationCacheWriter(path, **IDENT, shard_rows=10, meta={"seed": 1})
    assert w.complete and w.n_tokens == 48
    with pytest.raises(RuntimeError, match="complete"):
        add(w, rows(1, 48))
    w.close()


def test_missing_committed_shard_rolls_back_to_previous_checkpoint(tmp_path):
    path = tmp_path / "c"
    w = ActivationCacheWriter(path, **IDENT, shard_rows=10)
    add(w, rows(20, 0))
    w.checkpoint({"docs_done": 5})  # shards 0, 1
    add(w, rows(15, 20))
    w.checkpoint({"docs_done": 9})  # shards 2, 3
    add(w, rows(10, 35))
    w.finalize({"docs_done": 12})  # shard 4
    (path / "shard_00003.acts.npy").unlink()

    with pytest.raises(CorruptCacheError, match="shard_00003.acts.npy"):
        ActivationCache.open(path)
    with pytest.warns(UserWarning, match="shard_00003.acts.npy is missing"):
        w = ActivationCacheWriter(path, **IDENT, shard_rows=10)
    assert w.progress == {"docs_done": 5} and w.n_tokens == 20 and not w.complete
    assert sorted(p.name for p in path.glob("shard_*")) == [
        "shard_00000.acts.npy", "shard_00000.meta.npz", "shard_00001.acts.npy", "shard_00001.meta.npz"]
    add(w, rows(25, 20))
    cache = w.finalize({"docs_done": 12})
    np.testing.assert_array_equal(cache.read_rows(np.arange(45)).numpy()[:, 0], np.arange(45))


def test_failed_write_poisons_writer_and_reopen_resumes(tmp_path, monkeypatch):
    path = tmp_path / "c"
    w = ActivationCacheWriter(path, **IDENT, shard_rows=10)
    add(w, rows(12, 0))
    w.checkpoint({"docs_done": 1})
    add(w, rows(5, 12))

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w, "_write_shard", disk_full)
    with pytest.raises(OSError):
        w.checkpoint({"docs_done": 2})
    with pytest.raises(RuntimeError, match="earlier write .* failed"):
        add(w, rows(1, 17))
    with pytest.raises(RuntimeError, match="earlier write .* failed"):
        w.finalize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w.close()
    w = ActivationCacheWriter(path, **IDENT, shard_rows=10)
    assert w.progress == {"docs_done": 1} and w.n_tokens == 12
    w.close()


# --------------------------------------------------------------------------------------------- mismatch


def test_mismatch_names_each_key(tmp_path):
    path = tmp_path / "c"
    build(path, 20, shard_rows=10, meta={"context_size": 128})
    before = (path / "manifest.json").read_text()

    with pytest.raises(CacheMismatchError) as e:
        ActivationCacheWriter(path, **{**IDENT, "hook_name": "blocks.3.hook_resid_post"}, meta={"context_size": 128})
    msg = str(e.value)
    assert "hook_name" in msg and "blocks.2.hook_resid_post" in msg and "blocks.3.hook_resid_post" in msg
    assert "--cache" in msg and str(path) in msg and "d_in" not in msg

    with pytest.raises(CacheMismatchError) as e:
        ActivationCacheWriter(path, **{**IDENT, "d_in": 8}, meta={"context_size": 64})
    assert set(e.value.differences) == {"d_in", "context_size"}
    assert e.value.differences["d_in"] == (D, 8)
    with pytest.raises(CacheMismatchError, match="context_size: cached 128, requested <absent>"):
        ActivationCacheWriter(path, **IDENT)
    with pytest.raises(CacheMismatchError, match="dtype"):
        ActivationCacheWriter(path, **IDENT, dtype="float16", meta={"context_size": 128})
    assert (path / "manifest.json").read_text() == before  # a refused open touches nothing

    with pytest.raises(CacheMismatchError, match="model: cached \"tiny-lm\", requested \"gpt2\""):
        ActivationCache.open(path, expect={"model": "gpt2", "hook_name": IDENT["hook_name"], "d_in": D})
    with pytest.raises(CacheMismatchError, match="d_in"):
        ActivationCache.open(path, expect={"d_in": 768})
    assert ActivationCache.open(path, expect={**IDENT, "context_size": 128}).n_tokens == 20


# --------------------------------------------------------------------------------------------- corruption


def test_corruption_detected(tmp_path):
    path = tmp_path / "c"
    build(path, 40, shard_rows=10)
    shard = path / "shard_00001.acts.npy"
    raw = bytearray(shard.read_bytes())
    raw[-7] ^= 0x10
    shard.write_bytes(bytes(raw))

    cache = ActivationCache.open(path)  # same size: only the checksum can tell
    with pytest.raises(CorruptCacheError) as e:
        cache.verify()
    assert "shard_00001.acts.npy" in str(e.value) and "shard_00002" not in str(e.value)
    assert "delete" in str(e.value) and "harvest" in str(e.value)
    with pytest.raises(CorruptCacheError, match="shard_00001.acts.npy"):
        ActivationCache.open(path, verify=True)

    meta = path / "shard_00002.meta.npz"
    raw = bytearray(meta.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    meta.write_bytes(bytes(raw))
    with pytest.raises(CorruptCacheError, match="shard_00002.meta.npz"):
        cache.verify()

    trunc = path / "shard_00003.acts.npy"
    trunc.write_bytes(trunc.read_bytes()[:-40])
    with pytest.raises(CorruptCacheError, match="shard_00003.acts.npy.*truncated"):
        ActivationCache.open(path)
    with pytest.raises(CorruptCacheError, match="shard_00003.acts.npy"):
        ActivationCacheWriter(path, **IDENT, shard_rows=10)


# --------------------------------------------------------------------------------------------- input checks


def test_bad_input_rejected_without_side_effects(tmp_path):
    w = ActivationCacheWriter(tmp_path / "c", **IDENT, shard_rows=4)
    r = rows(5)
    cols = dict(token_ids=r["token_ids"], doc_ids=r["doc_ids"], positions=r["positions"], extra=r["extra"])
    with pytest.raises(ValueError, match=r"d_in=6.*\[5, 7\]"):
        w.add(np.zeros((5, 7), np.float32), **cols)
    with pytest.raises(ValueError, match=r"got \[30\]"):
        w.add(np.zeros(D * 5, np.float32), **cols)
    bad = r["acts"].copy()
    bad[1, 2] = np.nan
    bad[3, 0] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf in 2 of 5 rows"):
        w.add(bad, **cols)
    with pytest.raises(ValueError, match=r"token_ids must have shape \[N=5\].*\[4\]"):
        w.add(r["acts"], **{**cols, "token_ids": r["token_ids"][:4]})
    with pytest.raises(ValueError, match="doc_ids must be an integer"):
        w.add(r["acts"], **{**cols, "doc_ids": np.zeros(5)})
    with pytest.raises(ValueError, match="positions .*int32"):
        w.add(r["acts"], **{**cols, "positions": np.full(5, 2**40)})
    with pytest.raises(ValueError, match="floating point"):
        w.add(r["acts"].astype(np.int64), **cols)
    assert w.n_tokens == 0 and w.columns is None  # nothing was buffered by the failed calls

    add(w, r)
    with pytest.raises(ValueError, match="extra columns"):
        w.add(r["acts"], **{**cols, "extra": None})
    with pytest.raises(ValueError, match="masked must be bool"):
        w.add(r["acts"], **{**cols, "extra": {"masked": np.ones(5, np.int64)}})
    assert w.n_tokens == 5
    with pytest.raises(ValueError, match="reserved"):
        ActivationCacheWriter(tmp_path / "d", **IDENT, meta={"n_tokens": 3})
    with pytest.raises(ValueError, match="float16"):
        ActivationCacheWriter(tmp_path / "e", **IDENT, dtype="int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w.close()


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="saelab harvest"):
        ActivationCache.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ActivationCache.open(tmp_path / "empty")
    w = ActivationCacheWriter(tmp_path / "c", **IDENT, shard_rows=10)
    add(w, rows(12))
    w.checkpoint({"docs_done": 3})
    with pytest.raises(IncompleteCacheError, match="did not finish.*resume"):
        ActivationCache.open(tmp_path / "c")
    assert ActivationCache.open(tmp_path / "c", allow_incomplete=True).n_tokens == 12
    c = w.finalize()
    assert c.manifest["progress"] == {"docs_done": 3}
    with pytest.raises(ValueError, match="fewer than batch_size"):
        c.iter_batches(13)
    assert len(list(c.iter_batches(13, drop_last=False))) == 1


# --------------------------------------------------------------------------------------------- float16


def test_float16_storage(tmp_path):
    path = tmp_path / "c"
    cache = build(path, 50, shard_rows=16, dtype="float16")
    x = np.concatenate([rows(min(13, 50 - s), s)["acts"] for s in range(0, 50, 13)])
    assert np.load(path / "shard_00000.acts.npy", mmap_mode="r").dtype == np.float16
    assert cache.dtype == np.float16
    got = torch.cat(list(cache.iter_batches(8, shuffle=False, drop_last=False)))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), x, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(got.numpy(), x.astype(np.float16).astype(np.float32))
    shuffled = torch.cat(list(cache.iter_batches(8, seed=1, drop_last=False)))
    assert shuffled.dtype == torch.float32
    np.testing.assert_array_equal(sort_rows(shuffled.numpy()), sort_rows(got.numpy()))
    assert cache.read_rows(np.array([3, 1])).dtype == torch.float32

    w = ActivationCacheWriter(tmp_path / "h", **IDENT, dtype=torch.float16)
    big = rows(3)
    big["acts"][1, 1] = 1e5
    with pytest.raises(ValueError, match="1 of 3 rows overflow float16"):
        add(w, big)
    w.close()
