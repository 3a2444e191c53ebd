"""Cost of checking the cache's SHA-256 on read: `ActivationCache.iter_batches` with `verify_checksums` on vs off.

Each measurement is a fresh process (the set of verified files is per process), alternating off/on, twice: with the
shard files as the OS page cache holds them (read from disk when evicted) and pre-read into the page cache by the
process before timing (the CPU cost of hashing alone). Each process streams ``--epochs`` epochs of shuffled
batches (what the trainer's data thread does) and reports seconds per epoch: with verification on, epoch 1 hashes
every shard file as it reads it and later epochs hash nothing. Also prints hashlib's SHA-256 throughput on one
in-memory shard, the floor of the extra cost, and times the read primitive alone (``load_window`` over every shard
from the page cache: unchecked, first checked read, checked again). Usage:

    nice -n 19 flock /tmp/saelab-cpu.lock .venv/bin/python benchmarks/bench_cache_verify.py \
        [--cache runs/compare/caches/clean] [--batch_size 4096] [--epochs 2] [--repeats 2]

Without ``--cache`` (or when it does not exist) a synthetic cache of ``--rows`` x ``--d_in`` float32 rows is written
to a temporary folder first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(cache: str, verify: bool, batch_size: int, epochs: int, prewarm: bool) -> None:
    """One process: open the cache, time each epoch of ``iter_batches``; prints a JSON line. ``prewarm`` reads every
    shard file once first (plain reads, not checked), so epoch 1 finds them in the page cache."""
    from saelab.activations.cache import ActivationCache

    c = ActivationCache.open(cache, verify_checksums=verify)
    if prewarm:
        for f in sorted(Path(cache).glob("shard_*")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    it = c.iter_batches(batch_size, seed=0, epochs=epochs)
    per_epoch, nb = [], c.num_batches(batch_size)
    for _ in range(epochs):
        t = time.perf_counter()
        for _ in range(nb):
            next(it)
        per_epoch.append(time.perf_counter() - t)
    print(json.dumps({"epochs_s": per_epoch, "rows": c.n_tokens, "d_in": c.d_in, "bytes": int(c.n_tokens) * c.d_in
                      * c.dtype.itemsize, "shards": c.n_shards}))


def child_reads(cache: str, repeats: int) -> None:
    """One process: the read primitive alone. Every shard file pre-read into the page cache and the destination buffer
    touched, then :meth:`ActivationCache.load_window` over all shards, best of ``repeats``: unchecked; checked for the
    first time (hashing; the verified set is cleared before each try); checked again (already verified). JSON line."""
    import numpy as np

    from saelab.activations import cache_reader
    from saelab.activations.cache import ActivationCache

    on, off = ActivationCache.open(cache), ActivationCache.open(cache, verify_checksums=False)
    for f in sorted(Path(cache).glob("shard_*")):
        Path(f).read_bytes()
    shards, m = np.arange(on.n_shards), on.n_tokens
    buf = np.ones((m, on.d_in), dtype=on.dtype)

    def best(c: ActivationCache, clear: bool) -> float:
        ts = []
        for _ in range(repeats):
            if clear:
                cache_reader.verified_files.clear()
            t = time.perf_counter()
            c.load_window(shards, m, buf)
            ts.append(time.perf_counter() - t)
        return min(ts)

    print(json.dumps({"off": best(off, False), "first": best(on, True), "again": best(on, False)}))


def synthetic(path: Path, rows: int, d_in: int) -> None:
    import torch

    from saelab.activations.cache import ActivationCacheWriter

    w = ActivationCacheWriter(path, model="synthetic", hook_name="blocks.0.hook_resid_post", d_in=d_in)
    g = torch.Generator().manual_seed(0)
    for lo in range(0, rows, 32768):
        n = min(32768, rows - lo)
        w.add(torch.randn(n, d_in, generator=g), token_ids=torch.zeros(n, dtype=torch.int32),
              doc_ids=torch.arange(lo, lo + n), positions=torch.zeros(n, dtype=torch.int32))
    w.finalize({"done": True})


def sha256_rate(cache: Path) -> float:
    """GB/s of hashlib SHA-256 over the first shard's bytes, already in memory (best of 3)."""
    data = (cache / "shard_00000.acts.npy").read_bytes()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        best = min(best, time.perf_counter() - t)
    return len(data) / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="runs/compare/caches/clean", help="cache to read (synthetic if absent)")
    p.add_argument("--rows", type=int, default=200_000, help="synthetic cache: rows")
    p.add_argument("--d_in", type=int, default=576, help="synthetic cache: width")
    p.add_argument("--batch_size", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="processes per mode (alternating off/on)")
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    p.add_argument("--prewarm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child_reads", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_reads:
        return child_reads(args.cache, 3)
    if args.child:
        return child(args.cache, args.child == "on", args.batch_size, args.epochs, args.prewarm)
    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
        cache = REPO / args.cache
        if not (cache / "manifest.json").is_file():
            cache = Path(tmp) / "cache"
            print(f"writing a synthetic cache of {args.rows:,} x {args.d_in} float32 rows to {cache}", flush=True)
            synthetic(cache, args.rows, args.d_in)
        base = [sys.executable, __file__, "--cache", str(cache), "--epochs", str(args.epochs), "--batch_size",
                str(args.batch_size)]
        runs: dict[tuple[str, str], list[dict]] = {}
        for _ in range(args.repeats):
            for page in ("as found", "warm"):
                for mode in ("off", "on"):
                    cmd = base + ["--child", mode] + (["--prewarm"] if page == "warm" else [])
                    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
                    out = json.loads(res.stdout.splitlines()[-1])
                    runs.setdefault((page, mode), []).append(out)
                    print(f"  page cache {page}, verify {mode}: "
                          + ", ".join(f"epoch {i + 1} {t:.2f} s" for i, t in enumerate(out["epochs_s"])), flush=True)
        res = subprocess.run([sys.executable, __file__, "--cache", str(cache), "--child_reads"], check=True,
                             capture_output=True, text=True)
        reads = json.loads(res.stdout.splitlines()[-1])
        info = runs[("warm", "on")][0]
        rate = sha256_rate(cache)
    gb = info["bytes"] / 1e9
    print(f"\n{info['rows']:,} rows x {info['d_in']} ({gb:.2f} GB, {info['shards']} shards), batch {args.batch_size}, "
          f"medians of {args.repeats} processes per row; hashlib SHA-256 alone: {rate:.2f} GB/s")
    print("| shard files | verify_checksums | " + " | ".join(f"epoch {i + 1} (s)" for i in range(args.epochs))
          + " | epoch 1 GB/s |")
    print("|---|---|" + "---:|" * (args.epochs + 1))
    med = {k: [statistics.median(r["epochs_s"][i] for r in v) for i in range(args.epochs)] for k, v in runs.items()}
    for page, mode in runs:
        name = "in page cache" if page == "warm" else "as found (read from disk if evicted)"
        print(f"| {name} | {mode} | " + " | ".join(f"{t:.2f}" for t in med[(page, mode)])
              + f" | {gb / med[(page, mode)][0]:.2f} |")
    for page in ("as found", "warm"):
        on, off = med[(page, "on")], med[(page, "off")]
        print(f"first-read cost of verification ({page}): {on[0] - off[0]:+.2f} s per pass over the cache "
              f"({(on[0] - off[0]) / off[0]:+.0%} of an unchecked epoch 1); later epochs {on[-1] - off[-1]:+.2f} s")

    print(f"\nload_window over all {info['shards']} shards from the page cache into a touched buffer (best of 3): "
          f"unchecked {reads['off']:.2f} s, first checked read {reads['first']:.2f} s "
          f"({gb / (reads['first'] - reads['off']):.2f} GB/s of hashing), checked again {reads['again']:.2f} s")


if __name__ == "__main__":
    main()
