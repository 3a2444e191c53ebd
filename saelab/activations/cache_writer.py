"""Writing an activation cache: :class:`ActivationCacheWriter`, incremental, crash-safe and resumable.

The harvester pushes activations with :class:`ActivationCacheWriter`; the on-disk layout is described in
:mod:`saelab.activations.cache_format`, and :class:`~saelab.activations.cache_reader.ActivationCache` reads it.

Resume semantics
----------------
Shards are *committed* only by :meth:`ActivationCacheWriter.checkpoint` (and ``finalize``): a checkpoint
first writes the buffered rows as a (possibly short) shard, then atomically replaces ``manifest.json``
with a version that lists every shard written since the previous checkpoint *and* the caller's
``progress``, in one ``os.replace``. Shards written by automatic flushes between checkpoints (to keep
memory bounded) are files on disk that no manifest mentions yet. After a crash the reopened writer
reads the manifest, deletes every shard or temporary file the manifest does not list, and exposes the
last checkpointed ``progress``. The rows in the cache are therefore *exactly* the rows added before
that checkpoint, whatever moment the process died at: before the shard write, between the shard
write and the manifest write, or in the middle of either (all writes go to a temporary file that is
``fsync``-ed and renamed into place).

If a committed shard later goes missing (e.g. the user deleted a shard that :meth:`ActivationCache.verify`
reported as corrupt), the reopened writer rolls the cache back to the last checkpoint before that shard
(its ``progress`` is recorded in the shard entries) with a warning, so re-running the harvest
re-creates the lost rows and everything after them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.io import json_default, atomic_write, read_json, sha256_file

from .cache_format import (
    BASE_COLUMNS,
    FORMAT,
    LOCK_FILE,
    MANIFEST,
    RESERVED_KEYS,
    SHARD_FILE_RE,
    TMP_FILE_RE,
    VERSION,
    CacheMismatchError,
    CorruptCacheError,
    check_format,
    check_shard_files,
    differences,
    norm_dtype,
    norm_stats,
    normalise_json,
)
from .cache_reader import ActivationCache

try:  # POSIX only; on other platforms the single-writer lock is skipped.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["ActivationCacheWriter"]


class ActivationCacheWriter:
    """Append activations to a sharded on-disk cache, with crash-safe checkpoints and resume.

    Args:
        path: cache directory (created if missing).
        model: name of the model the activations come from (identity key).
        hook_name: hook point, e.g. ``"blocks.6.hook_resid_post"`` (identity key).
        d_in: activation width; every row is ``[d_in]`` (identity key).
        dtype: on-disk dtype, ``"float32"`` or ``"float16"`` (identity key). Readers always return float32.
        meta: extra identity keys stored at the top level of the manifest (context_size, filters, seed,
            corpus names, ...). Values must be JSON-serialisable. Reopening with any differing value (or a
            different set of keys) raises :class:`CacheMismatchError`.
        shard_rows: rows per shard (the last shard before each checkpoint may be shorter).
        fsync: ``fsync`` shards and manifest before renaming them into place (durability on power loss).

    Attributes:
        path: the cache directory (:class:`~pathlib.Path`).
        progress: the caller's resume cursor from the last checkpoint (``{}`` for a new cache).
        complete: whether the cache was finalized.
        n_tokens: rows accepted so far, committed or not (``n_committed + n_pending``).
        n_committed: rows listed in the manifest (survive a crash).
        n_pending: rows added since the last checkpoint (lost on a crash).

    Raises:
        CacheMismatchError: the directory holds a cache made with other identity keys.
        CorruptCacheError: a committed shard is truncated or has the wrong shape (a *missing* committed
            shard instead rolls the cache back to the checkpoint before it, with a warning).
        RuntimeError: another process holds the cache's write lock.
        ValueError: bad arguments (unknown dtype, non-positive ``d_in``/``shard_rows``, reserved meta key,
            a directory that holds something other than an activation cache).

    Example::

        w = ActivationCacheWriter(path, model="gpt2", hook_name="blocks.6.hook_resid_post", d_in=768)
        start = w.progress.get("docs_done", 0)             # 0 for a new cache, else resume
        for k, doc in enumerate(docs[start:], start + 1):
            w.add(acts, token_ids=toks, doc_ids=ids, positions=pos)
            if k % 100 == 0:
                w.checkpoint({"docs_done": k})
        cache = w.finalize({"docs_done": len(docs)})
    """

    def __init__(
        self,
        path: str | Path,
        *,
        model: str,
        hook_name: str,
        d_in: int,
        dtype: Any = "float32",
        meta: Mapping[str, Any] | None = None,
        shard_rows: int = 65536,
        fsync: bool = True,
    ) -> None:
        self.path = Path(path)
        if not isinstance(d_in, (int, np.integer)) or isinstance(d_in, bool) or d_in <= 0:
            raise ValueError(f"d_in must be a positive int, got {d_in!r}")
        if not isinstance(shard_rows, (int, np.integer)) or isinstance(shard_rows, bool) or shard_rows <= 0:
            raise ValueError(f"shard_rows must be a positive int, got {shard_rows!r}")
        meta = normalise_json(dict(meta or {}), "meta")
        bad = sorted(set(meta) & RESERVED_KEYS)
        if bad:
            raise ValueError(f"meta keys {bad} are reserved by the cache manifest; rename them")
        self.d_in = int(d_in)
        self.dtype = norm_dtype(dtype)
        self.shard_rows = int(shard_rows)
        self.fsync = bool(fsync)
        self._meta = meta
        self._identity: dict[str, Any] = {
            "model": str(model), "hook_name": str(hook_name), "d_in": self.d_in, "dtype": self.dtype, **meta
        }
        self._np_dtype = np.dtype(self.dtype)
        self._lock_fd: int | None = None
        self._closed = False
        self._failed = False  # an I/O error left pending state unknown; only reopening recovers
        self._buf: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        self._buf_rows = 0
        self._pending: list[dict[str, Any]] = []  # shard entries written but not yet committed

        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} exists and is not a directory; choose another --cache path")
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._open_or_create()
        except BaseException:
            self._release_lock()
            raise

    # -- setup ---------------------------------------------------------------------------------------

    def _open_or_create(self) -> None:
        mpath = self.path / MANIFEST
        if mpath.exists():
            m = read_json(mpath)
            check_format(m, self.path)
            diffs = differences(m, self._identity, extra_cached_keys=m.get("meta_keys", []))
            if diffs:
                raise CacheMismatchError(self.path, diffs)
            self._shards: list[dict[str, Any]] = list(m["shards"])
            self.progress: dict[str, Any] = dict(m.get("progress") or {})
            self.complete = bool(m.get("complete", False))
            self._columns: dict[str, str] | None = m.get("columns")
            self._ckpt = int(m.get("checkpoints", max((s["checkpoint"] for s in self._shards), default=0)))
            if self._check_committed():  # rolled back: persist before deleting the orphaned files
                self._write_manifest(self._shards, self.progress, self.complete)
        else:
            self._shards, self.progress, self.complete, self._columns, self._ckpt = [], {}, False, None, 0
            self._write_manifest([], {}, False)
        self._remove_unreferenced()

    def _check_committed(self) -> bool:
        """Check every committed shard's files exist with the recorded size and header.

        Returns True if a missing shard forced a rollback (``self._shards``/``progress`` updated).
        Raises CorruptCacheError for present-but-damaged shards.
        """
        first_missing = next(
            (i for i, s in enumerate(self._shards)
             if not ((self.path / s["file"]).is_file() and (self.path / s["meta_file"]).is_file())),
            None,
        )
        keep = len(self._shards) if first_missing is None else first_missing
        if first_missing is not None:  # shards from the missing one's checkpoint group on are dropped
            group = self._shards[first_missing]["checkpoint"]
            while keep > 0 and self._shards[keep - 1]["checkpoint"] == group:
                keep -= 1
        problems: list[tuple[str, str]] = []
        for s in self._shards[:keep]:
            problems += check_shard_files(self.path, s, self.d_in, self._np_dtype)
        if problems:
            raise CorruptCacheError(self.path, problems)
        if first_missing is None:
            return False
        lost = self._shards[keep:]
        self._shards = self._shards[:keep]
        self.progress = dict(self._shards[-1]["progress"]) if keep else {}
        self.complete = False
        warnings.warn(
            f"activation cache {self.path}: shard {lost[first_missing - keep]['file']} is missing; rolled back "
            f"to the checkpoint before it, dropping {len(lost)} shard(s) / {sum(s['n_rows'] for s in lost)} "
            f"rows; progress is now {self.progress}. Re-running the harvest re-creates them.",
            stacklevel=3,
        )
        return True

    def _remove_unreferenced(self) -> None:
        """Delete shard/temp files that the manifest does not list (left by a killed run)."""
        keep = {s["file"] for s in self._shards} | {s["meta_file"] for s in self._shards}
        for p in self.path.iterdir():
            if p.name in keep or not p.is_file():
                continue
            if SHARD_FILE_RE.match(p.name) or TMP_FILE_RE.match(p.name):
                p.unlink(missing_ok=True)

    def _acquire_lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(
                f"another process is writing the activation cache at {self.path} (it holds {self.path / LOCK_FILE}); "
                f"wait for it to finish or use another --cache path"
            ) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            try:
                os.close(fd)  # closing the descriptor drops the flock
            except OSError:  # pragma: no cover
                pass

    # -- properties ----------------------------------------------------------------------------------

    @property
    def n_committed(self) -> int:
        """Rows listed in the manifest, i.e. that survive a crash."""
        return sum(s["n_rows"] for s in self._shards)

    @property
    def n_pending(self) -> int:
        """Rows added since the last checkpoint (buffered or in uncommitted shards)."""
        return sum(s["n_rows"] for s in self._pending) + self._buf_rows

    @property
    def n_tokens(self) -> int:
        """All rows accepted so far: ``n_committed + n_pending``. Equals ``n_committed`` right after (re)opening."""
        return self.n_committed + self.n_pending

    @property
    def columns(self) -> dict[str, str] | None:
        """Per-row column name -> numpy dtype name, or None before the first :meth:`add` of a new cache."""
        return None if self._columns is None else dict(self._columns)

    # -- writing -------------------------------------------------------------------------------------

    def add(
        self,
        acts: torch.Tensor | np.ndarray,
        *,
        token_ids: Any,
        doc_ids: Any,
        positions: Any,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Buffer ``N`` activation rows; write a shard whenever ``shard_rows`` rows are buffered.

        Args:
            acts: ``[N, d_in]`` floating-point tensor/array (any float dtype, any device); stored as the
                cache ``dtype``. The data is copied, so the caller may reuse its buffer.
            token_ids: ``[N]`` integer token ids (stored int32).
            doc_ids: ``[N]`` integer document ids (stored int64).
            positions: ``[N]`` integer positions within the context (stored int32).
            extra: further per-row ``[N]`` int/bool columns, e.g. ``{"masked": bool_array}``. The first
                ``add`` of a cache fixes the set of extra columns and their dtypes; later calls must pass
                the same names, with values representable in those dtypes.

        Rows only become durable at the next :meth:`checkpoint`/:meth:`finalize`.

        Raises:
            ValueError: ``acts`` not 2-D or ``shape[1] != d_in``; non-float ``acts``; rows containing NaN/Inf
                (the message says how many, and whether float16 storage overflowed); a column whose length
                differs from ``N``, that is not 1-D integer (or bool, for extras), whose values overflow its
                dtype, or whose name set differs from the cache's.
            RuntimeError: the writer is closed, the cache is already complete, or an earlier write failed
                (reopen the writer to resume from the last checkpoint).
        """
        self._check_writable()
        x = _acts_to_numpy(acts, self.d_in)
        n = x.shape[0]
        nonfinite = _count_nonfinite_rows(x)
        if nonfinite:
            raise ValueError(
                f"acts contains NaN/Inf in {nonfinite} of {n} rows; refusing to cache them (check the model's "
                f"dtype/overflow, or drop those rows before add())"
            )
        with np.errstate(over="ignore"):  # float16 overflow is reported below
            x = np.array(x, dtype=self._np_dtype, copy=True, order="C")
        if self._np_dtype != np.float32:
            overflow = _count_nonfinite_rows(x)
            if overflow:
                raise ValueError(
                    f"{overflow} of {n} rows overflow {self.dtype} storage (|value| > "
                    f"{float(np.finfo(self._np_dtype).max):g}); use dtype='float32' for this cache"
                )
        cols = self._columns_for(n, token_ids=token_ids, doc_ids=doc_ids, positions=positions, extra=extra)
        if n == 0:
            return
        self._buf.append((x, cols))
        self._buf_rows += n
        try:
            while self._buf_rows >= self.shard_rows:
                self._flush(self.shard_rows)
        except BaseException:
            self._failed = True
            raise

    def _columns_for(self, n: int, *, extra: Mapping[str, Any] | None, **base: Any) -> dict[str, np.ndarray]:
        extra = dict(extra or {})
        clash = sorted(set(extra) & set(BASE_COLUMNS))
        if clash:
            raise ValueError(f"extra columns {clash} clash with the built-in per-row columns; rename them")
        for name in extra:
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"extra column name {name!r} must be a valid identifier")
        out: dict[str, np.ndarray] = {}
        for name, dt in BASE_COLUMNS.items():
            out[name] = _column(name, base[name], n, dt, allow_bool=False)
        if self._columns is None:
            schema = dict(BASE_COLUMNS)
            for name, v in extra.items():
                arr = _column(name, v, n, None, allow_bool=True)
                schema[name] = arr.dtype.name
                out[name] = arr
            self._columns = schema
        else:
            want = sorted(k for k in self._columns if k not in BASE_COLUMNS)
            if sorted(extra) != want:
                raise ValueError(
                    f"extra columns {sorted(extra)} differ from this cache's extra columns {want}; pass the same "
                    f"per-row columns on every add()"
                )
            for name in want:
                out[name] = _column(name, extra[name], n, self._columns[name], allow_bool=True)
        return out

    def _flush(self, rows: int) -> None:
        """Write the first ``rows`` buffered rows as an (uncommitted) shard."""
        acts = np.concatenate([a for a, _ in self._buf]) if len(self._buf) > 1 else self._buf[0][0]
        cols = {k: np.concatenate([c[k] for _, c in self._buf]) for k in self._buf[0][1]}
        entry = self._write_shard(acts[:rows], {k: v[:rows] for k, v in cols.items()})
        rest = acts.shape[0] - rows  # the buffer changes only once the shard is safely on disk
        self._buf = [(acts[rows:].copy(), {k: v[rows:].copy() for k, v in cols.items()})] if rest else []
        self._buf_rows = rest
        self._pending.append(entry)

    def _write_shard(self, acts: np.ndarray, cols: dict[str, np.ndarray]) -> dict[str, Any]:
        idx = len(self._shards) + len(self._pending)
        name = f"shard_{idx:05d}"
        entry: dict[str, Any] = {"file": f"{name}.acts.npy", "meta_file": f"{name}.meta.npz", "n_rows": len(acts)}

        def write_acts(p: Path) -> None:
            with open(p, "wb") as f:
                np.save(f, np.ascontiguousarray(acts), allow_pickle=False)
                self._sync(f)
            entry["bytes"] = p.stat().st_size
            entry["sha256"] = sha256_file(p)

        def write_meta(p: Path) -> None:
            with open(p, "wb") as f:
                np.savez(f, **cols)
                self._sync(f)
            entry["meta_bytes"] = p.stat().st_size
            entry["meta_sha256"] = sha256_file(p)

        atomic_write(self.path / entry["meta_file"], write_meta)
        atomic_write(self.path / entry["file"], write_acts)
        a32 = acts.astype(np.float32, copy=False)
        sq = np.einsum("ij,ij->i", a32, a32).astype(np.float64)
        norms = np.sqrt(sq)
        entry["sum_norm"] = float(norms.sum())
        entry["sum_sq_norm"] = float(sq.sum())
        entry["max_norm"] = float(norms.max()) if len(norms) else 0.0
        return entry

    def _sync(self, f: Any) -> None:
        if self.fsync:
            f.flush()
            os.fsync(f.fileno())

    def checkpoint(self, progress: Mapping[str, Any]) -> None:
        """Make every row added so far durable, together with the caller's resume cursor.

        Writes the buffered rows as a (possibly short) shard, then atomically replaces the manifest so that
        it lists all shards written since the previous checkpoint and records ``progress``. After a crash,
        a reopened writer's :attr:`progress` equals the last checkpointed value and its rows are exactly
        those added before that checkpoint.

        Args:
            progress: JSON-serialisable dict describing how far the harvest got (e.g. ``{"docs_done": 1234}``).

        Raises:
            TypeError: ``progress`` is not a dict or not JSON-serialisable.
            RuntimeError: the writer is closed, the cache is already complete, or an earlier write failed
                (reopen the writer to resume from the last checkpoint).
        """
        self._check_writable()
        self._commit(progress, complete=False)

    def _commit(self, progress: Mapping[str, Any], *, complete: bool) -> None:
        if not isinstance(progress, Mapping):
            raise TypeError(f"progress must be a dict, got {type(progress).__name__}")
        progress = normalise_json(dict(progress), "progress")
        try:
            if self._buf_rows:
                self._flush(self._buf_rows)
            seq = self._ckpt + 1
            new = [dict(e, checkpoint=seq, progress=progress) for e in self._pending]
            shards = self._shards + new
            self._fsync_dir()  # the new shards' directory entries are durable before the manifest names them
            self._write_manifest(shards, progress, complete, checkpoints=seq)
        except BaseException:
            self._failed = True
            raise
        self._shards, self._pending, self._ckpt = shards, [], seq
        self.progress, self.complete = progress, complete

    def finalize(self, progress: Mapping[str, Any] | None = None) -> ActivationCache:
        """Checkpoint, mark the cache complete, release the lock and return a reader.

        Args:
            progress: final resume cursor; defaults to the last checkpointed one.

        Returns:
            :class:`ActivationCache` opened on the finished cache. Calling ``finalize`` on an already
            complete cache just returns the reader.

        Raises:
            RuntimeError: the writer is closed or an earlier write failed.
        """
        if self._closed:
            raise RuntimeError(f"the writer for {self.path} is closed")
        if not self.complete:
            self._check_writable()
            self._commit(self.progress if progress is None else progress, complete=True)
        self.close()
        return ActivationCache.open(self.path)

    def close(self) -> None:
        """Release the write lock without committing; rows added since the last checkpoint are discarded
        (with a warning) and their shard files deleted. Idempotent."""
        if self._closed:
            return
        self._closed = True
        lost = self.n_pending
        for e in self._pending:
            for f in (e["file"], e["meta_file"]):
                (self.path / f).unlink(missing_ok=True)
        self._pending, self._buf, self._buf_rows = [], [], 0
        self._release_lock()
        if lost:
            warnings.warn(
                f"activation cache {self.path}: closed without checkpoint; discarded {lost} rows added after "
                f"the last checkpoint (progress {self.progress})",
                stacklevel=2,
            )

    def __enter__(self) -> ActivationCacheWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a dropped writer (e.g. crash simulation) must not keep the lock
        try:
            self._release_lock()
        except Exception:  # pragma: no cover
            pass

    def _check_writable(self) -> None:
        if self._closed:
            raise RuntimeError(f"the writer for {self.path} is closed")
        if self._failed:
            raise RuntimeError(
                f"an earlier write to the activation cache at {self.path} failed; the rows added since the last "
                f"checkpoint are in an unknown state. Close this writer and open a new one: it resumes from the "
                f"last checkpoint (progress {self.progress})."
            )
        if self.complete:
            raise RuntimeError(
                f"the activation cache at {self.path} is complete; it cannot be appended to (open it with "
                f"ActivationCache.open, or delete it to harvest again)"
            )

    def _write_manifest(
        self, shards: list[dict[str, Any]], progress: dict[str, Any], complete: bool, checkpoints: int | None = None
    ) -> None:
        n = sum(s["n_rows"] for s in shards)
        m: dict[str, Any] = {"format": FORMAT, "version": VERSION, **self._identity}
        m["meta_keys"] = list(self._meta)
        m["columns"] = self._columns if self._columns is not None else None
        m["n_tokens"] = n
        m["shards"] = shards
        m["checkpoints"] = self._ckpt if checkpoints is None else checkpoints
        m["progress"] = progress
        m["complete"] = complete
        m["stats"] = norm_stats(shards)
        text = json.dumps(m, indent=2, default=json_default) + "\n"

        def write(p: Path) -> None:
            with open(p, "w") as f:
                f.write(text)
                self._sync(f)

        atomic_write(self.path / MANIFEST, write)
        self._fsync_dir()  # make the rename itself durable

    def _fsync_dir(self) -> None:
        if not self.fsync or not hasattr(os, "O_DIRECTORY"):
            return
        try:
            dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:  # pragma: no cover - some filesystems refuse directory fsync
            pass


# ----------------------------------------------------------------------------------------------- helpers


def _acts_to_numpy(acts: Any, d_in: int) -> np.ndarray:
    if isinstance(acts, torch.Tensor):
        t = acts.detach()
        if not t.is_floating_point():
            raise ValueError(f"acts must be floating point, got {t.dtype}")
        if t.dtype not in (torch.float32, torch.float16, torch.float64):
            t = t.float()  # e.g. bfloat16, which numpy cannot hold
        x = t.cpu().numpy()
    else:
        x = np.asarray(acts)
        if x.dtype.kind != "f":
            raise ValueError(f"acts must be floating point, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != d_in:
        raise ValueError(f"acts must have shape [N, d_in={d_in}], got {list(x.shape)}")
    return x


def _count_nonfinite_rows(x: np.ndarray) -> int:
    # Fast path: a float64 sum of finite float16/32/64 values cannot overflow, and NaN/Inf propagate.
    if x.size == 0 or np.isfinite(x.sum(dtype=np.float64)):
        return 0
    return int((~np.isfinite(x)).any(axis=1).sum())


def _column(name: str, v: Any, n: int, dtype: str | None, *, allow_bool: bool) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    arr = np.asarray(v)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape [N={n}] to match acts, got {list(arr.shape)}")
    kinds = "iub" if allow_bool else "iu"
    if n and arr.dtype.kind not in kinds:
        raise ValueError(f"{name} must be an integer{' or bool' if allow_bool else ''} array, got {arr.dtype}")
    if dtype is None:
        return arr.copy()
    target = np.dtype(dtype)
    out = arr.astype(target)
    if n and (target.kind == "b") != (arr.dtype.kind == "b"):
        raise ValueError(f"{name} must be {target} like the cache's earlier rows, got {arr.dtype}")
    if n and not np.array_equal(out, arr):
        raise ValueError(f"{name} has values that do not fit its on-disk dtype {target} "
                         f"(range {arr.min()}..{arr.max()})")
    return out
