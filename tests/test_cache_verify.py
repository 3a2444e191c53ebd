"""The cache's SHA-256 checksums are checked on read (issue 20): a flipped byte fails training before any output is
replaced, ``verify_cache=False`` opts out, and a file is hashed once per process, not once per epoch.

No eval suite reads an activation cache (they harvest their own LM activations through ``LMActivationStore``); the
feature browser does, through :meth:`ActivationCache.read_rows` / :meth:`ActivationCache.meta_column`, which are
checked here at the reader level.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import saelab.activations.cache_reader as cache_reader
from saelab.activations.cache import ActivationCache, ActivationCacheWriter, CorruptCacheError
from saelab.activations.cache_format import npy_header
from saelab.activations.stream import follow_batches
from saelab.config_files import from_dict
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE
from saelab.sae.saving import load_sae, save_sae
from saelab.train import TrainConfig, train
from synthetic import write_cache

D = 16
ROWS, SHARD_ROWS = 2048, 256  # 8 shards; the default stream window holds 4 of them


def _x(n: int = ROWS) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(0))


def _flip(path: Path, which: str = "acts") -> None:
    """XOR one byte in the middle of a shard file (same size, so only its checksum can tell). In an ``.npy`` the byte
    is the lowest mantissa byte of a float32 (little-endian), so the value stays finite and close."""
    raw = bytearray(path.read_bytes())
    if which == "acts":
        off = npy_header(path)[0]
        pos = off + ((len(raw) - off) // 2) // 4 * 4
    else:
        pos = len(raw) // 2
    raw[pos] ^= 0x01
    path.write_bytes(bytes(raw))


def _cfg(tmp_path: Path, cache: Path, **kw) -> TrainConfig:
    base = dict(cache=str(cache), out=str(tmp_path / "sae"), activation="topk", d_sae=32, k=4, batch_size=128,
                lr=3e-3, warmup_steps=2, checkpoint_every=4, log_every=2, progress=False, seed=0,
                normalize_activations=False)
    base.update(kw)
    return from_dict(TrainConfig, base)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("shard", [2, 7])  # seed 0: shard 2 is in the first window, 7 in the second (mid-run)
@pytest.mark.parametrize("which,suffix", [("acts", "acts.npy"), ("meta", "meta.npz")])
def test_flipped_byte_fails_training_and_keeps_the_previous_sae(tmp_path, shard, which, suffix):
    cache = write_cache(tmp_path / "cache", _x(), shard_rows=SHARD_ROWS).path
    bad = cache / f"shard_{shard:05d}.{suffix}"
    _flip(bad, which)
    cfg = _cfg(tmp_path, cache)
    old = save_sae(SAE(SAEConfig(d_in=D, d_sae=32, activation="topk", k=4)), cfg.out)
    before = _snapshot(old)

    with pytest.raises(CorruptCacheError) as e:
        train(cfg)
    msg = str(e.value)
    assert bad.name in msg and "SHA-256 mismatch" in msg
    assert sum(f"shard_{i:05d}" in msg for i in range(8)) == 1  # only the damaged shard is named
    assert "delete" in msg and "saelab harvest" in msg  # the fix
    assert e.value.problems == [(bad.name, e.value.problems[0][1])]
    after = _snapshot(old)
    assert {k: v for k, v in after.items() if k in before} == before  # the SAE written before is untouched
    if shard == 7:  # a later shard: the run got past its first window before it stopped
        assert (Path(cfg.out) / "train_log.jsonl").read_text().strip()


def test_verify_cache_false_trains_on_the_damaged_cache(tmp_path):
    """The opt-out: the damaged rows are read as they are (the flip changes one float by ~1e-7 relative)."""
    x = _x()
    cache = write_cache(tmp_path / "cache", x, shard_rows=SHARD_ROWS).path
    _flip(cache / "shard_00003.acts.npy")
    _flip(cache / "shard_00005.meta.npz", "meta")
    res = train(_cfg(tmp_path, cache, verify_cache=False))
    sae = load_sae(res.sae_dir)
    assert sae.W_dec.shape == (32, D) and torch.isfinite(sae.W_dec).all()
    with pytest.raises(CorruptCacheError):  # the same cache with the default still refuses
        train(_cfg(tmp_path, cache, out=str(tmp_path / "other")))


def test_verify_cache_is_not_part_of_the_checkpoint_identity(tmp_path):
    """Turning the check off (or on) resumes the same run: it does not change the weights."""
    from synthetic import train_interrupted

    cache = write_cache(tmp_path / "cache", _x(), shard_rows=SHARD_ROWS).path
    full = train(_cfg(tmp_path, cache, out=str(tmp_path / "full"), n_tokens=128 * 12))
    part = _cfg(tmp_path, cache, out=str(tmp_path / "part"), n_tokens=128 * 12)
    train_interrupted(part, 8)
    resumed = train(_cfg(tmp_path, cache, out=str(tmp_path / "part"), n_tokens=128 * 12, verify_cache=False))
    assert torch.equal(load_sae(full.sae_dir).W_dec, load_sae(resumed.sae_dir).W_dec)


class _Counter:
    """Counts the files :mod:`cache_reader` hashes: ``hashlib.sha256`` objects (the stream) and ``sha256_file``."""

    def __init__(self, monkeypatch):
        self.stream, self.files = [], []
        real_file = cache_reader.sha256_file

        def sha256(data=b""):
            self.stream.append(len(data))
            return hashlib.sha256(data)

        def sha256_file(p, *a):
            self.files.append(Path(p).name)
            return real_file(p, *a)

        monkeypatch.setattr(cache_reader, "hashlib", SimpleNamespace(sha256=sha256))
        monkeypatch.setattr(cache_reader, "sha256_file", sha256_file)


def test_each_file_is_hashed_once_per_process_not_once_per_epoch(tmp_path, monkeypatch):
    cache = write_cache(tmp_path / "cache", _x(), shard_rows=SHARD_ROWS)
    n = cache.n_shards
    count = _Counter(monkeypatch)
    batches = list(cache.iter_batches(128, seed=1, epochs=3))
    assert len(batches) == 3 * ROWS // 128
    assert len(count.stream) == n  # each .npy hashed while its first read streams it
    assert sorted(count.files) == sorted(f"shard_{i:05d}.meta.npz" for i in range(n))
    # another reader of the same files in this process (the stream follower's snapshots) does not hash them again
    again = ActivationCache.open(cache.path)
    list(again.iter_batches(128, seed=2, epochs=1))
    again.read_rows(np.arange(ROWS))
    again.meta_column("doc_ids")
    assert len(count.stream) == n and len(count.files) == n
    # a file replaced since (new inode) is hashed on its next read
    p = cache.path / "shard_00002.acts.npy"
    data = p.read_bytes()
    p.unlink()
    p.write_bytes(data)
    list(again.iter_batches(128, seed=2, epochs=1))
    assert len(count.stream) == n + 1


def test_verify_at_open_counts_as_the_first_read(tmp_path, monkeypatch):
    cache = write_cache(tmp_path / "cache", _x(), shard_rows=SHARD_ROWS)
    ActivationCache.open(cache.path, verify=True)
    count = _Counter(monkeypatch)
    list(ActivationCache.open(cache.path).iter_batches(128, epochs=1))
    assert count.stream == [] and count.files == []


def test_hashing_while_loading_returns_the_same_rows(tmp_path, monkeypatch):
    """The verified read (block by block, hashed) yields exactly the batches of the unchecked read; a block size that
    is not a multiple of a row exercises the block loop."""
    x = _x(1000)
    cache = write_cache(tmp_path / "cache", x, shard_rows=300)
    monkeypatch.setattr(cache_reader, "_HASH_CHUNK", 1000)
    on = list(ActivationCache.open(cache.path).iter_batches(64, seed=3, epochs=2, drop_last=False))
    off = list(ActivationCache.open(cache.path, verify_checksums=False).iter_batches(64, seed=3, epochs=2,
                                                                                     drop_last=False))
    assert len(on) == len(off) == 2 * 16
    for a, b in zip(on, off):
        assert torch.equal(a, b)
    assert torch.equal(torch.cat(on[:16]).sort(0).values, x.sort(0).values)  # one epoch = every row once


def test_the_stream_digest_is_the_manifest_digest(tmp_path):
    """The header + data bytes hashed by load_window give the SHA-256 of the whole file, as the writer records it."""
    cache = write_cache(tmp_path / "cache", _x(600), shard_rows=200)
    for s in cache.manifest["shards"]:
        assert hashlib.sha256((cache.path / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    cache.load_window(np.arange(3), 600)
    keys = {k[0] for k in cache_reader.verified_files if k[0].startswith(str(cache.path))}
    assert keys == {str(cache.path / f"shard_{i:05d}.{e}") for i in range(3) for e in ("acts.npy", "meta.npz")}


@pytest.mark.parametrize("read", ["read_rows", "shard_arrays", "meta_column", "load_window"])
def test_every_read_path_checks(tmp_path, read):
    cache = write_cache(tmp_path / "cache", _x(600), shard_rows=200).path
    which, suffix = ("meta", "meta.npz") if read == "meta_column" else ("acts", "acts.npy")
    _flip(cache / f"shard_00001.{suffix}", which)
    do = {
        "read_rows": lambda c: c.read_rows(np.array([5, 250])),
        "shard_arrays": lambda c: c.shard_arrays(1),
        "meta_column": lambda c: c.meta_column("positions"),
        "load_window": lambda c: c.load_window(np.array([0, 1]), 400),
    }[read]
    c = ActivationCache.open(cache)  # opening checks sizes and headers only
    with pytest.raises(CorruptCacheError, match=f"shard_00001.{suffix}: SHA-256 mismatch"):
        do(c)
    with pytest.raises(CorruptCacheError):  # a failed check is not remembered as passed
        do(c)
    unchecked = ActivationCache.open(cache, verify_checksums=False)
    if read == "meta_column":  # the zip's own CRC-32 still catches a flipped byte in the parsed meta file
        with pytest.raises(CorruptCacheError, match="unreadable"):
            do(unchecked)
    else:
        do(unchecked)  # the opt-out reads the damaged rows as they are


def _partial_cache(path: Path, x: torch.Tensor, committed: int) -> ActivationCacheWriter:
    """A harvest in progress: ``committed`` rows checkpointed (whole shards), the writer still open."""
    w = ActivationCacheWriter(path, model="synthetic", hook_name="blocks.0.hook_resid_post", d_in=D, shard_rows=100)
    n = committed
    w.add(x[:n], token_ids=torch.zeros(n, dtype=torch.int32), doc_ids=torch.arange(n),
          positions=torch.ones(n, dtype=torch.int32))
    w.checkpoint({"rows": n})
    return w


def test_the_stream_follower_checks_committed_shards(tmp_path):
    x = _x(400)
    w = _partial_cache(tmp_path / "cache", x, 400)
    snap = ActivationCache.open(tmp_path / "cache", allow_incomplete=True)
    assert not snap.manifest["complete"] and snap.n_shards == 4
    _flip(tmp_path / "cache" / "shard_00001.acts.npy")

    def follow(**kw):
        return follow_batches(tmp_path / "cache", 50, epochs=1, window_shards=2, producer_alive=lambda: True, **kw)

    it = follow()
    with pytest.raises(CorruptCacheError, match="shard_00001.acts.npy"):
        next(it)
    it = follow(verify_checksums=False)
    got = [next(it) for _ in range(4)]  # window 0 (shards 0 and 1), read as it is
    assert sum(len(b) for b in got) == 200
    w.close()
