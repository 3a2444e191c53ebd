"""Reading an activation cache: :class:`ActivationCache`, random access and shuffled batch streams.

The trainer reads a cache written by :class:`~saelab.activations.cache_writer.ActivationCacheWriter` (layout in
:mod:`saelab.activations.cache_format`) without ever holding more than a few shards in memory. The pieces that
:mod:`saelab.activations.stream` builds on to follow a cache still being written are public here:
:meth:`ActivationCache.load_window` (read whole shards into one array), :func:`window_batches` (cut a stream of
windows into shuffled batches), :func:`check_batch_args` and :func:`check_pos_int` (argument checks).

Every read of a shard file is checked against the SHA-256 (FIPS 180-4, via :mod:`hashlib`) that the manifest records
for it, the first time the process reads that file (:data:`verified_files`);
``ActivationCache.open(..., verify_checksums=False)`` skips the check.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.io import read_json, sha256_file

from .cache_format import (
    BASE_COLUMNS,
    MANIFEST,
    CacheMismatchError,
    CorruptCacheError,
    IncompleteCacheError,
    check_format,
    check_shard_files,
    differences,
    norm_dtype,
    norm_stats,
    normalise_json,
    npy_header,
)

__all__ = ["ActivationCache", "window_batches", "check_batch_args", "check_pos_int", "verified_files"]

#: Shard files this process has read and found to match their manifest SHA-256, keyed by
#: ``(path, st_dev, st_ino, st_size, st_mtime_ns, expected_sha256)``: a file is hashed on its first read only, by
#: every :class:`ActivationCache` of the process (the stream follower opens a new one per manifest snapshot), and a
#: file replaced or rewritten since (new inode, size or mtime) is hashed again.
verified_files: set[tuple[str, int, int, int, int, str]] = set()

#: Bytes read, then hashed, per ``readinto`` while a shard is verified: large blocks keep the per-call overhead
#: negligible, and the stream never holds a second copy of the shard for hashing.
_HASH_CHUNK = 1 << 23

#: Manifest key of the SHA-256 of each of a shard's two files.
_DIGEST_KEY = {"file": "sha256", "meta_file": "meta_sha256"}


class ActivationCache:
    """Read-only view of a finished (or, on request, partial) activation cache.

    Use :meth:`open` to construct one.

    Attributes:
        path: the cache directory.
        manifest: the parsed ``manifest.json`` (snapshot taken at open time).
        n_tokens: number of rows (int).
        d_in: activation width (int).
        dtype: on-disk numpy dtype (float32 or float16); everything returned is float32.
        n_shards: number of shards.
        shard_rows: rows per shard, ``np.ndarray[int64]`` of length ``n_shards``.
        offsets: global row index of each shard's first row, ``np.ndarray[int64]`` of length ``n_shards + 1``.
        stats: ``manifest["stats"]`` (``mean_norm``, ``mean_sq_norm``, ``std_norm``, ``max_norm``).
        verify_checksums: check each shard file against its manifest SHA-256 the first time the process reads it
            (:meth:`open`).
    """

    def __init__(self, path: str | Path, manifest: dict[str, Any], *, verify_checksums: bool = True) -> None:
        self.path = Path(path)
        self.verify_checksums = bool(verify_checksums)
        self.manifest = manifest
        self.d_in = int(manifest["d_in"])
        self.dtype = np.dtype(norm_dtype(manifest["dtype"]))
        self._shards: list[dict[str, Any]] = manifest["shards"]
        self.n_shards = len(self._shards)
        self.shard_rows = np.array([s["n_rows"] for s in self._shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        self.n_tokens = int(self.offsets[-1])
        self.stats: dict[str, float] = manifest.get("stats") or norm_stats(self._shards)
        self._header: list[int] = [0] * self.n_shards  # byte offset of the data in each .npy
        self._mmaps: dict[int, np.memmap] = {}
        self._meta_cache: dict[str, np.ndarray] = {}

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        expect: Mapping[str, Any] | None = None,
        verify: bool = False,
        allow_incomplete: bool = False,
        verify_checksums: bool = True,
    ) -> ActivationCache:
        """Open a cache directory for reading.

        Checks, in order: the directory and manifest exist; ``expect`` matches; the harvest finished; every
        shard file exists with the size, shape and dtype the manifest records (cheap: headers only); and,
        with ``verify=True``, every file's SHA-256.

        With ``verify_checksums`` (the default) every later read of a shard file (:meth:`load_window`, hence
        :meth:`iter_batches`; :meth:`read_rows`, :meth:`shard_arrays`, :meth:`meta_column`) first checks that file
        against its manifest SHA-256, once per process and file (:data:`verified_files`). The stream reads a shard's
        ``.npy`` anyway and hashes the bytes as it reads them (plus the small meta file); a memory-mapped read
        hashes the ``.npy`` once when it maps it. A flipped bit thus fails the first read of its shard with
        :class:`CorruptCacheError`, before any row of that shard is returned.

        Args:
            path: cache directory.
            expect: identity keys the caller requires, e.g. ``{"model": ..., "hook_name": ..., "d_in": ...}``.
            verify: also check every shard's SHA-256 (reads the whole cache).
            allow_incomplete: open a cache whose harvest has not finished (reads the committed rows).
            verify_checksums: check each shard file's SHA-256 on its first read; ``False`` skips the check (a
                damaged shard is then read as it is).

        Raises:
            FileNotFoundError: no directory or no manifest at ``path`` (says how to create the cache).
            CacheMismatchError: a key of ``expect`` differs from the manifest (lists each difference).
            IncompleteCacheError: the harvest did not finish and ``allow_incomplete`` is false.
            CorruptCacheError: a shard is missing, truncated, of the wrong shape/dtype, or (``verify``) fails
                its checksum (with ``verify_checksums``, reads raise it too, naming the file that fails).
            ValueError: the manifest is not an activation-cache manifest or is of a newer version.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"no activation cache at {path} (directory does not exist); create it with "
                f"`saelab harvest ... --out {path}`"
            )
        mpath = path / MANIFEST
        if not mpath.is_file() and (hooks := hook_cache_dirs(path)):
            raise FileNotFoundError(
                f"{path} is the folder of a multi-hook harvest, not one activation cache: it holds the caches of "
                f"{', '.join(hooks)}; pass one of them (e.g. {hooks[next(iter(hooks))]})"
            )
        if not mpath.is_file():
            raise FileNotFoundError(
                f"{path} has no {MANIFEST}, so it is not an activation cache (or its harvest never started); "
                f"create it with `saelab harvest ... --out {path}`"
            )
        m = read_json(mpath)
        check_format(m, path)
        if expect:
            exp = normalise_json(dict(expect), "expect")
            if "dtype" in exp:
                exp["dtype"] = norm_dtype(exp["dtype"])
            diffs = differences(m, exp)
            if diffs:
                raise CacheMismatchError(path, diffs)
        if not m.get("complete", False) and not allow_incomplete:
            raise IncompleteCacheError(
                f"the harvest into {path} did not finish ({m.get('n_tokens', 0)} rows committed, progress "
                f"{m.get('progress')}). Re-run the same `saelab harvest` command (--out {path}) to resume "
                f"it, or pass allow_incomplete=True to read the rows committed so far."
            )
        cache = cls(path, m, verify_checksums=verify_checksums)
        cache._check_structure()
        if verify:
            cache.verify()
        return cache

    def _check_structure(self) -> None:
        problems: list[tuple[str, str]] = []
        for i, s in enumerate(self._shards):
            missing = [f for f in (s["file"], s["meta_file"]) if not (self.path / f).is_file()]
            if missing:
                problems += [(f, "missing") for f in missing]
                continue
            bad = check_shard_files(self.path, s, self.d_in, self.dtype)
            if not bad:
                self._header[i] = npy_header(self.path / s["file"])[0]
            problems += bad
        if problems:
            raise CorruptCacheError(self.path, problems)

    def verify(self) -> None:
        """Check every shard and meta file against the SHA-256 in the manifest (reads the whole cache).

        Files that match are added to :data:`verified_files`, so later reads in this process do not hash them again.

        Raises:
            CorruptCacheError: naming every missing or mismatching file and the fix.
        """
        problems: list[tuple[str, str]] = []
        for i, s in enumerate(self._shards):
            for field in _DIGEST_KEY:
                p = self.path / s[field]
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    problems.append((s[field], "missing"))
                    continue
                bad = self._settle(i, field, self._file_key(i, field, st), sha256_file(p))
                if bad:
                    problems.append(bad)
        if problems:
            raise CorruptCacheError(self.path, problems)

    # -- checksums on read ---------------------------------------------------------------------------

    def _file_key(self, i: int, field: str, st: os.stat_result) -> tuple[str, int, int, int, int, str]:
        s = self._shards[i]
        return (str(self.path / s[field]), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, s[_DIGEST_KEY[field]])

    def _unverified(self, i: int, field: str, st: os.stat_result) -> tuple | None:
        """The :data:`verified_files` key of shard ``i``'s ``field`` file ("file" or "meta_file") when it still needs
        its SHA-256 check, else ``None`` (checked already, or ``verify_checksums`` is off)."""
        if not self.verify_checksums:
            return None
        key = self._file_key(i, field, st)
        return None if key in verified_files else key

    def _settle(self, i: int, field: str, key: tuple, digest: str) -> tuple[str, str] | None:
        """Record a matching file as verified; the ``(file, problem)`` of a mismatch."""
        s = self._shards[i]
        want = s[_DIGEST_KEY[field]]
        if digest == want:
            verified_files.add(key)
            return None
        return (s[field], f"SHA-256 mismatch (manifest {want[:12]}..., file {digest[:12]}...): its bytes changed "
                          f"after the harvest wrote it")

    def _check(self, i: int, field: str, key: tuple, digest: str) -> None:
        bad = self._settle(i, field, key, digest)
        if bad:
            raise CorruptCacheError(self.path, [bad])

    def _check_file(self, i: int, field: str) -> None:
        """Hash shard ``i``'s ``field`` file if it is not verified yet (one sequential read of it)."""
        p = self.path / self._shards[i][field]
        key = self._unverified(i, field, os.stat(p))
        if key is not None:
            self._check(i, field, key, sha256_file(p))

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationCache({str(self.path)!r}, model={m.get('model')!r}, hook_name={m.get('hook_name')!r}, "
                f"n_tokens={self.n_tokens}, d_in={self.d_in}, dtype={self.dtype.name}, shards={self.n_shards})")

    def __getstate__(self) -> dict[str, Any]:  # picklable for DataLoader workers without copying mmaps
        state = self.__dict__.copy()
        state["_mmaps"], state["_meta_cache"] = {}, {}
        return state

    @property
    def columns(self) -> list[str]:
        """Names of the per-row meta columns (``token_ids``, ``doc_ids``, ``positions`` and any extras)."""
        cols = self.manifest.get("columns")
        return list(cols) if cols else list(BASE_COLUMNS)

    # -- random access -------------------------------------------------------------------------------

    def _mmap(self, i: int) -> np.memmap:
        mm = self._mmaps.get(i)
        if mm is None:
            s = self._shards[i]
            self._check_file(i, "file")  # a memory map reads lazily: hash the whole file once, before mapping it
            self._check_file(i, "meta_file")
            mm = np.memmap(self.path / s["file"], dtype=self.dtype, mode="r", offset=self._header[i],
                           shape=(s["n_rows"], self.d_in))
            self._mmaps[i] = mm
        return mm

    def shard_arrays(self, i: int) -> tuple[np.memmap, dict[str, np.ndarray]]:
        """Shard ``i``'s activations and per-row columns.

        Returns:
            ``(acts, meta)``: ``acts`` is a read-only ``np.memmap`` ``[n_rows, d_in]`` in the on-disk dtype;
            ``meta`` maps column name to a ``[n_rows]`` array (token_ids int32, doc_ids int64, positions
            int32, extras in their stored dtype).

        Raises:
            IndexError: ``i`` out of range.
            CorruptCacheError: the meta file cannot be read or has the wrong number of rows, or (``verify_checksums``)
                a file of the shard fails its SHA-256 check.
        """
        i = self._shard_index(i)
        return self._mmap(i), self._load_meta(i)

    def _shard_index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.n_shards
        if not 0 <= i < self.n_shards:
            raise IndexError(f"shard index out of range (cache has {self.n_shards} shards)")
        return i

    def _load_meta(self, i: int) -> dict[str, np.ndarray]:
        s = self._shards[i]
        p = self.path / s["meta_file"]
        try:
            with open(p, "rb") as f:
                key = self._unverified(i, "meta_file", os.fstat(f.fileno()))
                raw = f.read()
        except OSError as e:
            raise CorruptCacheError(self.path, [(s["meta_file"], f"unreadable ({e})")]) from e
        if key is not None:  # hash the bytes that are parsed below
            self._check(i, "meta_file", key, hashlib.sha256(raw).hexdigest())
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                meta = {k: z[k] for k in z.files}
        except Exception as e:
            raise CorruptCacheError(self.path, [(s["meta_file"], f"unreadable ({e})")]) from e
        bad = [k for k, v in meta.items() if v.shape != (s["n_rows"],)]
        if bad:
            raise CorruptCacheError(self.path, [(s["meta_file"], f"columns {bad} do not have {s['n_rows']} rows")])
        return meta

    def read_rows(self, idx: Any) -> torch.Tensor:
        """Gather rows by global index (across shards).

        Args:
            idx: ``[K]`` integer indices in ``[0, n_tokens)``, any order, duplicates allowed.

        Returns:
            float32 tensor ``[K, d_in]`` with row ``k`` = cached row ``idx[k]``.

        Raises:
            IndexError: an index is negative or ``>= n_tokens``.
            ValueError: ``idx`` is not a 1-D integer array.
            CorruptCacheError: (``verify_checksums``) a file of a shard read from fails its SHA-256 check.
        """
        idx = np.asarray(idx)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise ValueError(f"idx must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        out = np.empty((idx.size, self.d_in), dtype=np.float32)
        if idx.size == 0:
            return torch.from_numpy(out)
        if idx.min() < 0 or idx.max() >= self.n_tokens:
            raise IndexError(f"row index out of range [0, {self.n_tokens}) (min {idx.min()}, max {idx.max()})")
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        shard_of = np.searchsorted(self.offsets, sidx, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, sidx.size]):
            sh = int(shard_of[lo])
            out[order[lo:hi]] = self._mmap(sh)[sidx[lo:hi] - self.offsets[sh]]
        return torch.from_numpy(out)

    def meta_column(self, name: str) -> np.ndarray:
        """Concatenate one per-row column over all shards, in global row order.

        Args:
            name: ``"token_ids"`` (int32), ``"doc_ids"`` (int64), ``"positions"`` (int32) or an extra column.

        Returns:
            ``[n_tokens]`` array (cached on the object; do not modify it in place).

        Raises:
            KeyError: unknown column (lists the valid ones).
            CorruptCacheError: a meta file cannot be read or (``verify_checksums``) fails its SHA-256 check.
        """
        if name not in self._meta_cache:
            if name not in self.columns:
                raise KeyError(f"unknown meta column {name!r}; this cache has {self.columns}")
            parts = [self._load_meta(i)[name] for i in range(self.n_shards)]
            dt = (self.manifest.get("columns") or BASE_COLUMNS).get(name, "int64")
            self._meta_cache[name] = np.concatenate(parts) if parts else np.empty(0, dtype=dt)
        return self._meta_cache[name]

    # -- streaming -----------------------------------------------------------------------------------

    def num_batches(self, batch_size: int, drop_last: bool = True) -> int:
        """Batches per epoch of :meth:`iter_batches` with these settings (``n // b`` or ``ceil(n / b)``)."""
        check_pos_int("batch_size", batch_size)
        return self.n_tokens // batch_size if drop_last else -(-self.n_tokens // batch_size)

    def check_batch_span(self, batch_size: int, drop_last: bool, epochs: int | None, start_batch: int) -> int:
        """Batches per epoch (:meth:`num_batches`), after checking that there is one and that ``start_batch`` lies
        within ``epochs`` epochs.

        Raises:
            ValueError: fewer rows than one batch, or ``start_batch`` past the end (naming the likely cause).
        """
        nb = self.num_batches(batch_size, drop_last)
        if nb == 0:
            raise ValueError(
                f"the cache at {self.path} has {self.n_tokens} rows, fewer than batch_size={batch_size} "
                f"(with drop_last={drop_last}), so there is no batch to yield"
            )
        if epochs is not None and start_batch > nb * epochs:
            raise ValueError(
                f"start_batch={start_batch} is past the end ({nb} batches/epoch x {epochs} epochs = {nb * epochs}); "
                f"was the run resumed with a different batch_size or cache?"
            )
        return nb

    def iter_batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = 1,
        start_batch: int = 0,
        drop_last: bool = True,
        shuffle_window_shards: int = 4,
        stream_order: bool = False,
    ) -> Iterator[torch.Tensor]:
        """Stream (shuffled) batches of activations with bounded memory.

        Each epoch permutes the shard order (RNG seeded by ``(seed, epoch)``), cuts it into windows of
        ``shuffle_window_shards`` consecutive shards, loads one window at a time into RAM, permutes the
        window's rows (RNG seeded by ``(seed, epoch, window)``) and emits them in ``batch_size`` chunks. The
        epoch is thus one long row stream; batches straddle window boundaries, so every batch is full except
        (with ``drop_last=False``) the last of each epoch, and each row appears exactly once per epoch.
        Rows are mixed within a window only; the shard order changes every epoch. With ``shuffle=False``
        rows come in cache order.

        Args:
            batch_size: rows per batch.
            seed: non-negative int; the stream is a pure function of ``(seed, epoch)`` and the settings.
            shuffle: shuffle shard order and rows within each window.
            epochs: number of passes; ``None`` loops forever.
            start_batch: global batch index (counting across epochs) to start at. Yields exactly the batches
                an uninterrupted iterator would yield from that point; skipped epochs and windows are not
                read (only the window holding the first batch is).
            drop_last: drop the final partial batch of each epoch.
            shuffle_window_shards: shards held in memory at once (memory ~ this x shard size, in the
                on-disk dtype, plus one batch).
            stream_order: epoch 0 takes the shards in cache (harvest) order instead of a permuted order:
                windows of consecutive shards ``[0, w), [w, 2w), ...``, rows still permuted within each window
                with the same RNG rule; later epochs are unchanged. This is the order in which a trainer that
                follows a harvest still in progress reads the cache
                (:func:`saelab.activations.stream.follow_batches` yields exactly these batches).

        Yields:
            float32 tensors ``[batch_size, d_in]`` (the last of an epoch smaller if ``drop_last=False``);
            each is a fresh tensor the caller may keep or modify.

        Raises:
            ValueError: non-positive ``batch_size``/``shuffle_window_shards``/``epochs``, negative ``seed``
                or ``start_batch``, ``start_batch`` beyond the last batch, or a cache with no batch to yield.
            CorruptCacheError: from :meth:`load_window` (a shard fails its SHA-256 check), at the batch that needs
                the shard.
        """
        check_batch_args(batch_size, epochs, seed, start_batch)
        check_pos_int("shuffle_window_shards", shuffle_window_shards)
        nb = self.check_batch_span(batch_size, drop_last, epochs, start_batch)
        return self._iter(int(batch_size), int(seed), bool(shuffle), epochs, int(start_batch), bool(drop_last),
                          int(shuffle_window_shards), nb, bool(stream_order))

    def _iter(self, bs: int, seed: int, shuffle: bool, epochs: int | None, start: int, drop_last: bool,
              window: int, nb: int, stream_order: bool = False) -> Iterator[torch.Tensor]:
        epoch, skip = divmod(start, nb)
        # One window buffer, reused for every window: re-filling warm memory is ~2x faster than faulting in
        # a fresh allocation. Sized for the `window` largest shards, allocated on first use.
        cap = int(np.sort(self.shard_rows)[::-1][:window].sum())
        buf: list[np.ndarray] = []
        while epochs is None or epoch < epochs:
            yield from self._epoch(bs, seed, epoch, shuffle, drop_last, window, skip * bs, buf, cap, stream_order)
            epoch, skip = epoch + 1, 0

    def _epoch(self, bs: int, seed: int, epoch: int, shuffle: bool, drop_last: bool, window: int,
               cursor: int, buf: list[np.ndarray], cap: int, stream_order: bool = False) -> Iterator[torch.Tensor]:
        end = (self.n_tokens // bs) * bs if drop_last else self.n_tokens  # rows emitted this epoch
        in_order = not shuffle or (stream_order and epoch == 0)
        order = np.arange(self.n_shards) if in_order else np.random.default_rng([seed, epoch, 0]).permutation(self.n_shards)
        windows = ((int(self.shard_rows[order[wi:wi + window]].sum()), order[wi:wi + window], wi // window)
                   for wi in range(0, self.n_shards, window))

        def load(shards: np.ndarray, m: int) -> np.ndarray:
            if not buf:
                buf.append(np.empty((cap, self.d_in), dtype=self.dtype))
            return self.load_window(shards, m, buf[0])

        yield from window_batches(windows, load, bs, seed, epoch, shuffle, cursor, end, drop_last)

    def load_window(self, shards: np.ndarray, m: int, buf: np.ndarray | None = None) -> np.ndarray:
        """Read whole shards, in the given order, into one contiguous array (the stream follower's read primitive).

        The shards' data bytes are read straight from their ``.npy`` files (``readinto``, no memory map), so a
        window costs one sequential read per shard. With ``verify_checksums``, a shard read for the first time in
        this process is hashed as it is read (its ``.npy`` header and data bytes, block by block) and its meta file
        is hashed too; both must match the manifest's ``sha256`` / ``meta_sha256`` (:data:`verified_files`).

        Args:
            shards: ``[S]`` integer shard indices in ``[0, n_shards)``; their rows are concatenated in this order.
            m: total rows of those shards, ``sum(shard_rows[shards])``; the caller computes it (not re-checked:
                a smaller ``m`` reads as a truncated shard, a larger one leaves the tail rows unwritten).
            buf: optional C-contiguous ``[>= m, d_in]`` array of the on-disk dtype (:attr:`dtype`) to fill, so a
                caller streaming many windows reuses one allocation; ``buf[:m]`` is returned.

        Returns:
            ``[m, d_in]`` array in the on-disk dtype (float32 or float16, *not* converted to float32): ``buf[:m]``
            when ``buf`` is given, else a new array.

        Raises:
            CorruptCacheError: a shard file ends before its recorded rows (truncated after the cache was opened), or
                (``verify_checksums``) a shard's ``.npy`` or meta file does not match its manifest SHA-256 (names the
                file and the fix).
            IndexError: a shard index ``>= n_shards``.
            OSError: a shard file cannot be opened (e.g. deleted after the cache was opened).
        """
        out = buf[:m] if buf is not None else np.empty((m, self.d_in), dtype=self.dtype)
        flat = memoryview(out.reshape(-1).view(np.uint8))
        pos = 0
        for i in shards:
            i = int(i)
            s = self._shards[i]
            nbytes = s["n_rows"] * self.d_in * self.dtype.itemsize
            with open(self.path / s["file"], "rb", buffering=0) as f:
                key = self._unverified(i, "file", os.fstat(f.fileno()))
                h = None
                if key is None:
                    f.seek(self._header[i])
                else:  # the digest covers the whole file: header, then the data bytes as they arrive
                    h = hashlib.sha256(_read_exact(f, self._header[i], self.path, s["file"]))
                step = nbytes if h is None else _HASH_CHUNK
                got = 0
                while got < nbytes:
                    r = f.readinto(flat[pos + got:pos + min(got + step, nbytes)])
                    if not r:
                        what = f"truncated while reading ({got} of {nbytes} data bytes)"
                        raise CorruptCacheError(self.path, [(s["file"], what)])
                    if h is not None:
                        h.update(flat[pos + got:pos + got + r])
                    got += r
                if h is not None:
                    h.update(f.read())  # bytes past the recorded rows (none in a sound shard) count too
            if h is not None:
                self._check(i, "file", key, h.hexdigest())
            if self.verify_checksums:  # the rows' meta file belongs to the shard (one stat once it is verified)
                self._check_file(i, "meta_file")
            pos += nbytes
        return out


def hook_cache_dirs(root: str | Path) -> dict[str, Path]:
    """The caches of a multi-hook harvest (``saelab harvest --hook_name A B ... --out ROOT``): ``hook_name`` ->
    ``ROOT/<hook_name>/`` for every sub-folder holding a cache manifest, in name order; ``{}`` when ``root`` is a
    single cache (it has its own manifest) or holds none.

    The hook name is the one each manifest records (the folder is named after it).
    """
    root = Path(root)
    if not root.is_dir() or (root / MANIFEST).is_file():
        return {}
    out: dict[str, Path] = {}
    for sub in sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()):
        try:
            out[str(read_json(sub / MANIFEST).get("hook_name") or sub.name)] = sub
        except (OSError, ValueError):  # an unreadable manifest: the cache's own open() reports it
            out[sub.name] = sub
    return out


def _read_exact(f: Any, n: int, root: Path, name: str) -> bytes:
    """``n`` bytes from the binary file ``f``; :class:`CorruptCacheError` (naming ``name``) if it ends first."""
    parts, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            raise CorruptCacheError(root, [(name, f"truncated while reading ({got} of {n} header bytes)")])
        parts.append(b)
        got += len(b)
    return b"".join(parts)


# ----------------------------------------------------------------------------------------------- batches


def window_batches(
    windows: Iterator[tuple[int, np.ndarray, int]],
    load: Any,
    bs: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    cursor: int,
    end: int | None,
    drop_last: bool,
) -> Iterator[torch.Tensor]:
    """Cut one epoch's row stream into batches (shared by :meth:`ActivationCache.iter_batches` and the stream follower).

    The epoch's stream is the concatenation of its windows, each window's rows permuted by the RNG seeded with
    ``(seed, epoch, 1, window index)`` (identity when ``shuffle`` is false).

    Args:
        windows: ``(m, shards, w)`` per window, in stream order: its row count, its shard indices (in the order
            their rows are concatenated) and its window index ``w``. Consumed lazily, so a follower may block in it.
        load: ``load(shards, m)`` -> the window's rows ``[m, d_in]`` (on-disk dtype; may be a reused buffer),
            typically :meth:`ActivationCache.load_window` of the cache (or snapshot) the windows come from.
        bs: batch size.
        seed, epoch: the RNG seed parts of the row permutation.
        shuffle: permute each window's rows; ``False`` keeps them in shard order.
        cursor: first row of the epoch's stream to emit (``start_batch * bs`` within the epoch); windows that end
            before it are never loaded.
        end: rows of the stream emitted (``None``: up to the end of the last window).
        drop_last: drop the final partial batch instead of yielding it.

    Yields:
        float32 tensors ``[bs, d_in]`` (the last one smaller when ``drop_last`` is false), fresh copies.

    Raises:
        Whatever ``windows`` or ``load`` raise (e.g. :class:`CorruptCacheError`), at the batch that needed them.
    """
    carry: np.ndarray | None = None  # < bs float32 rows left over from the previous window
    wstart = 0
    for m, shards, w in windows:
        wend = wstart + m
        if wend <= cursor:  # entirely skipped: never read
            wstart = wend
            continue
        if end is not None and wstart >= end:
            break
        data = load(shards, m)
        perm = np.random.default_rng([seed, epoch, 1, w]).permutation(m) if shuffle else None
        lo, lim = cursor - wstart, (wend if end is None else min(wend, end)) - wstart

        def take(a: int, b: int) -> np.ndarray:
            if perm is None:
                return data[a:b].astype(np.float32, copy=True)
            out = data[perm[a:b]]  # row gather from RAM (fresh array: `data` is reused)
            return out if out.dtype == np.float32 else out.astype(np.float32)

        if carry is not None:
            k = min(bs - len(carry), lim - lo)
            carry = np.concatenate([carry, take(lo, lo + k)])
            lo += k
            if len(carry) == bs:
                yield torch.from_numpy(carry)
                carry = None
        while lim - lo >= bs:
            yield torch.from_numpy(take(lo, lo + bs))
            lo += bs
        if lo < lim:
            piece = take(lo, lim)
            carry = piece if carry is None else np.concatenate([carry, piece])
        cursor = wstart + lim
        wstart = wend
        del data, perm, take
    if carry is not None and len(carry) and not drop_last:
        yield torch.from_numpy(carry)


def check_batch_args(batch_size: int, epochs: int | None, seed: int, start_batch: int) -> None:
    """The argument checks of :meth:`ActivationCache.iter_batches` (also used by the stream follower).

    Raises:
        ValueError: non-positive ``batch_size``/``epochs``, or negative/non-int ``seed``/``start_batch``.
    """
    check_pos_int("batch_size", batch_size)
    if epochs is not None:
        check_pos_int("epochs", epochs)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(start_batch, (int, np.integer)) or start_batch < 0:
        raise ValueError(f"start_batch must be a non-negative int, got {start_batch!r}")


def check_pos_int(name: str, v: Any) -> None:
    """Check that ``v`` is a positive int (Python or numpy integer, not bool).

    Args:
        name: the argument's name, for the message.
        v: the value.

    Raises:
        ValueError: ``v`` is not a positive int (names the argument and the value).
    """
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
