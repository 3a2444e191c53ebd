"""On-disk, sharded cache of language-model activations, written incrementally and read as shuffled batches.

The harvester pushes activations with :class:`ActivationCacheWriter`; the trainer reads them back with
:class:`ActivationCache` without ever holding more than a few shards in memory.

Layout of a cache directory::

    <cache>/manifest.json          # identity, shard list, resume cursor, stats; rewritten atomically
    <cache>/shard_00000.acts.npy   # float32 or float16 [n_rows, d_in], plain .npy (np.load(mmap_mode="r") works)
    <cache>/shard_00000.meta.npz   # per-row columns: token_ids int32, doc_ids int64, positions int32,
                                   # plus any extra int/bool columns the caller passes (e.g. "masked": bool)
    <cache>/.lock                  # flock()-ed by the one writer allowed at a time

``manifest.json`` holds ``format`` (``"saelab-activation-cache"``), ``version`` (1), the identity keys
``model``, ``hook_name``, ``d_in``, ``dtype`` and every key of the caller's ``meta`` (listed again in
``meta_keys``), ``columns`` (per-row column name -> numpy dtype), ``n_tokens`` (committed rows),
``shards`` (one entry per shard: ``file``, ``meta_file``, ``n_rows``, ``bytes``, ``meta_bytes``,
``sha256``, ``meta_sha256``, per-shard norm sums, and the ``checkpoint`` number and ``progress`` of the
checkpoint that committed it), ``progress`` (the caller's resume cursor), ``complete`` and ``stats``
(``mean_norm``, ``mean_sq_norm``, ``std_norm``, ``max_norm`` of the rows' L2 norms, in activation units).

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
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.io import json_default, atomic_write, read_json, sha256_file

try:  # POSIX only; on other platforms the single-writer lock is skipped.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT",
    "VERSION",
    "CacheMismatchError",
    "CorruptCacheError",
    "IncompleteCacheError",
    "ActivationCacheWriter",
    "ActivationCache",
]

FORMAT = "saelab-activation-cache"
VERSION = 1
MANIFEST = "manifest.json"
_LOCK = ".lock"

#: Per-row columns every cache has, with their on-disk dtypes.
BASE_COLUMNS = {"token_ids": "int32", "doc_ids": "int64", "positions": "int32"}

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16"}

#: Manifest keys owned by the cache itself; ``meta`` may not use them.
_RESERVED = frozenset(
    {"format", "version", "model", "hook_name", "d_in", "dtype", "meta_keys", "columns", "n_tokens",
     "shards", "progress", "complete", "stats"}
)

_SHARD_RE = re.compile(r"^shard_\d+\.(acts\.npy|meta\.npz)$")
_TMP_RE = re.compile(r"^\.(shard_\d+\.(acts\.npy|meta\.npz)|manifest\.json)\..*\.tmp$")
_ABSENT = object()


# ----------------------------------------------------------------------------------------------- errors


class CacheMismatchError(ValueError):
    """A cache exists at the path but was made with other settings (model, hook, ``d_in``, dtype, meta).

    Attributes:
        path: the cache directory.
        differences: ``{key: (cached_value, requested_value)}``; a missing value is the string ``"<absent>"``.
    """

    def __init__(self, path: Path, differences: dict[str, tuple[Any, Any]]) -> None:
        self.path = Path(path)
        self.differences = differences
        lines = [f"the activation cache at {self.path} was made with different settings:"]
        for key, (cached, requested) in differences.items():
            lines.append(f"  {key}: cached {_show(cached)}, requested {_show(requested)}")
        lines.append(
            f"Use another --cache path, or delete {self.path} to harvest again with the new settings."
        )
        super().__init__("\n".join(lines))


class CorruptCacheError(RuntimeError):
    """A shard is missing, truncated, has the wrong shape/dtype, or fails its SHA-256 check.

    The message names every bad file and the fix: delete the shard and re-run the harvest, which rolls the
    cache back to the last checkpoint before that shard and resumes from there.

    Attributes:
        path: the cache directory.
        problems: ``[(file_name, description), ...]``.
    """

    def __init__(self, path: Path, problems: list[tuple[str, str]]) -> None:
        self.path = Path(path)
        self.problems = problems
        lines = [f"activation cache at {self.path} is corrupt:"]
        lines += [f"  {name}: {what}" for name, what in problems]
        names = sorted({name.split(".", 1)[0] for name, _ in problems})
        files = " ".join(str(self.path / f"{n}.*") for n in names)
        lines.append(
            f"Fix: delete the damaged shard(s) ({files}) and re-run the same `saelab harvest` command; it "
            f"resumes from the last checkpoint before the first missing shard (later shards are re-made)."
        )
        super().__init__("\n".join(lines))


class IncompleteCacheError(RuntimeError):
    """The harvest writing this cache has not finished (``manifest["complete"]`` is false)."""


# ----------------------------------------------------------------------------------------------- writer


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
        meta = _normalise_json(dict(meta or {}), "meta")
        bad = sorted(set(meta) & _RESERVED)
        if bad:
            raise ValueError(f"meta keys {bad} are reserved by the cache manifest; rename them")
        self.d_in = int(d_in)
        self.dtype = _norm_dtype(dtype)
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
            _check_format(m, self.path)
            diffs = _differences(m, self._identity, extra_cached_keys=m.get("meta_keys", []))
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
            problems += _check_shard_files(self.path, s, self.d_in, self._np_dtype)
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
            if _SHARD_RE.match(p.name) or _TMP_RE.match(p.name):
                p.unlink(missing_ok=True)

    def _acquire_lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(
                f"another process is writing the activation cache at {self.path} (it holds {self.path / _LOCK}); "
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
        progress = _normalise_json(dict(progress), "progress")
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
        m["stats"] = _stats(shards)
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


# ----------------------------------------------------------------------------------------------- reader


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
    """

    def __init__(self, path: str | Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.d_in = int(manifest["d_in"])
        self.dtype = np.dtype(_norm_dtype(manifest["dtype"]))
        self._shards: list[dict[str, Any]] = manifest["shards"]
        self.n_shards = len(self._shards)
        self.shard_rows = np.array([s["n_rows"] for s in self._shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        self.n_tokens = int(self.offsets[-1])
        self.stats: dict[str, float] = manifest.get("stats") or _stats(self._shards)
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
    ) -> ActivationCache:
        """Open a cache directory for reading.

        Checks, in order: the directory and manifest exist; ``expect`` matches; the harvest finished; every
        shard file exists with the size, shape and dtype the manifest records (cheap: headers only); and,
        with ``verify=True``, every file's SHA-256.

        Args:
            path: cache directory.
            expect: identity keys the caller requires, e.g. ``{"model": ..., "hook_name": ..., "d_in": ...}``.
            verify: also check every shard's SHA-256 (reads the whole cache).
            allow_incomplete: open a cache whose harvest has not finished (reads the committed rows).

        Raises:
            FileNotFoundError: no directory or no manifest at ``path`` (says how to create the cache).
            CacheMismatchError: a key of ``expect`` differs from the manifest (lists each difference).
            IncompleteCacheError: the harvest did not finish and ``allow_incomplete`` is false.
            CorruptCacheError: a shard is missing, truncated, of the wrong shape/dtype, or (``verify``) fails
                its checksum.
            ValueError: the manifest is not an activation-cache manifest or is of a newer version.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"no activation cache at {path} (directory does not exist); create it with "
                f"`saelab harvest ... --out {path}`"
            )
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(
                f"{path} has no {MANIFEST}, so it is not an activation cache (or its harvest never started); "
                f"create it with `saelab harvest ... --out {path}`"
            )
        m = read_json(mpath)
        _check_format(m, path)
        if expect:
            exp = _normalise_json(dict(expect), "expect")
            if "dtype" in exp:
                exp["dtype"] = _norm_dtype(exp["dtype"])
            diffs = _differences(m, exp)
            if diffs:
                raise CacheMismatchError(path, diffs)
        if not m.get("complete", False) and not allow_incomplete:
            raise IncompleteCacheError(
                f"the harvest into {path} did not finish ({m.get('n_tokens', 0)} rows committed, progress "
                f"{m.get('progress')}). Re-run the same `saelab harvest` command (--out {path}) to resume "
                f"it, or pass allow_incomplete=True to read the rows committed so far."
            )
        cache = cls(path, m)
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
            bad = _check_shard_files(self.path, s, self.d_in, self.dtype)
            if not bad:
                self._header[i] = _npy_header(self.path / s["file"])[0]
            problems += bad
        if problems:
            raise CorruptCacheError(self.path, problems)

    def verify(self) -> None:
        """Check every shard and meta file against the SHA-256 in the manifest (reads the whole cache).

        Raises:
            CorruptCacheError: naming every missing or mismatching file and the fix.
        """
        problems: list[tuple[str, str]] = []
        for s in self._shards:
            for f, key in ((s["file"], "sha256"), (s["meta_file"], "meta_sha256")):
                p = self.path / f
                if not p.is_file():
                    problems.append((f, "missing"))
                    continue
                digest = sha256_file(p)
                if digest != s[key]:
                    problems.append((f, f"SHA-256 mismatch (manifest {s[key][:12]}..., file {digest[:12]}...)"))
        if problems:
            raise CorruptCacheError(self.path, problems)

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
            CorruptCacheError: the meta file cannot be read or has the wrong number of rows.
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
        try:
            with np.load(self.path / s["meta_file"], allow_pickle=False) as z:
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
        _check_pos_int("batch_size", batch_size)
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
        """
        check_batch_args(batch_size, epochs, seed, start_batch)
        _check_pos_int("shuffle_window_shards", shuffle_window_shards)
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
            return self._load_window(shards, m, buf[0])

        yield from _window_batches(windows, load, bs, seed, epoch, shuffle, cursor, end, drop_last)

    def _load_window(self, shards: np.ndarray, m: int, buf: np.ndarray | None = None) -> np.ndarray:
        """Read whole shards, in the given order, into one contiguous array [m, d_in] of the on-disk dtype
        (``buf[:m]`` when a buffer of at least ``m`` rows is given, else a new array)."""
        out = buf[:m] if buf is not None else np.empty((m, self.d_in), dtype=self.dtype)
        flat = memoryview(out.reshape(-1).view(np.uint8))
        pos = 0
        for i in shards:
            i = int(i)
            s = self._shards[i]
            nbytes = s["n_rows"] * self.d_in * self.dtype.itemsize
            with open(self.path / s["file"], "rb", buffering=0) as f:
                f.seek(self._header[i])
                got = 0
                while got < nbytes:
                    r = f.readinto(flat[pos + got:pos + nbytes])
                    if not r:
                        what = f"truncated while reading ({got} of {nbytes} data bytes)"
                        raise CorruptCacheError(self.path, [(s["file"], what)])
                    got += r
            pos += nbytes
        return out


# ----------------------------------------------------------------------------------------------- helpers


def _show(v: Any) -> str:
    return "<absent>" if v is _ABSENT else json.dumps(v, default=json_default)


def _norm_dtype(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        key = {torch.float32: "float32", torch.float16: "float16"}.get(dtype, str(dtype))
    else:
        try:
            key = np.dtype(dtype).name if not isinstance(dtype, str) else dtype.lower()
        except TypeError:
            key = str(dtype)
    if key not in _DTYPES:
        raise ValueError(f"unsupported cache dtype {dtype!r}; use 'float32' or 'float16'")
    return _DTYPES[key]


def _normalise_json(obj: dict[str, Any], what: str) -> dict[str, Any]:
    """Round-trip through JSON so values compare equal to what a manifest read back holds (tuples -> lists)."""
    try:
        return json.loads(json.dumps(obj, default=json_default))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from e


def _check_format(m: Any, path: Path) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        fmt = m.get("format") if isinstance(m, dict) else None
        raise ValueError(
            f"{path / MANIFEST} is not an activation-cache manifest (format {fmt!r}); use another --cache path"
        )
    if int(m.get("version", 0)) > VERSION:
        raise ValueError(
            f"activation cache {path} has format version {m['version']}, newer than this saelab supports "
            f"({VERSION}); upgrade saelab or re-harvest"
        )


def _differences(cached: Mapping[str, Any], requested: Mapping[str, Any],
                 extra_cached_keys: Any = ()) -> dict[str, tuple[Any, Any]]:
    diffs: dict[str, tuple[Any, Any]] = {}
    keys = list(requested) + [k for k in extra_cached_keys if k not in requested]
    for k in keys:
        c = cached.get(k, _ABSENT)
        r = requested.get(k, _ABSENT)
        if c != r or (type(c) is bool) != (type(r) is bool):  # JSON true != 1
            diffs[k] = (c, r)
    return diffs


def _window_batches(
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
        load: ``load(shards, m)`` -> the window's rows ``[m, d_in]`` (on-disk dtype; may be a reused buffer).
        bs: batch size.
        cursor: first row of the epoch's stream to emit (``start_batch * bs`` within the epoch); windows that end
            before it are never loaded.
        end: rows of the stream emitted (``None``: up to the end of the last window).
        drop_last: drop the final partial batch instead of yielding it.

    Yields:
        float32 tensors ``[bs, d_in]`` (the last one smaller when ``drop_last`` is false), fresh copies.
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
    _check_pos_int("batch_size", batch_size)
    if epochs is not None:
        _check_pos_int("epochs", epochs)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(start_batch, (int, np.integer)) or start_batch < 0:
        raise ValueError(f"start_batch must be a non-negative int, got {start_batch!r}")


def _check_pos_int(name: str, v: Any) -> None:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


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


def _npy_header(p: Path) -> tuple[int, tuple[int, ...], bool, np.dtype]:
    with open(p, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        return f.tell(), shape, fortran, dtype


def _check_shard_files(root: Path, s: Mapping[str, Any], d_in: int, dtype: np.dtype) -> list[tuple[str, str]]:
    """Cheap structural check of one shard's two files (sizes and the .npy header). Returns problems."""
    problems: list[tuple[str, str]] = []
    p = root / s["file"]
    size = p.stat().st_size
    try:
        off, shape, fortran, dt = _npy_header(p)
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged header
        problems.append((s["file"], f"unreadable .npy header ({e})"))
    else:
        want_shape = (s["n_rows"], d_in)
        if tuple(shape) != want_shape or dt != dtype or fortran:
            problems.append((s["file"], f"holds {dt} {list(shape)}, manifest says {dtype} {list(want_shape)}"))
        else:
            expected = off + s["n_rows"] * d_in * dtype.itemsize
            if size != expected or size != s.get("bytes", size):
                problems.append((s["file"], f"truncated or padded: {size} bytes, expected {expected}"))
    mp = root / s["meta_file"]
    msize = mp.stat().st_size
    if "meta_bytes" in s and msize != s["meta_bytes"]:
        problems.append((s["meta_file"], f"{msize} bytes, manifest says {s['meta_bytes']}"))
    return problems


def _stats(shards: list[Mapping[str, Any]]) -> dict[str, float]:
    n = sum(s["n_rows"] for s in shards)
    if n == 0:
        return {"n_tokens": 0, "mean_norm": 0.0, "mean_sq_norm": 0.0, "std_norm": 0.0, "max_norm": 0.0}
    mean = sum(s["sum_norm"] for s in shards) / n
    msq = sum(s["sum_sq_norm"] for s in shards) / n
    return {
        "n_tokens": n,
        "mean_norm": mean,
        "mean_sq_norm": msq,
        "std_norm": math.sqrt(max(msq - mean * mean, 0.0)),
        "max_norm": max(s["max_norm"] for s in shards),
    }
