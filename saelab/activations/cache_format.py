"""On-disk layout of an activation cache, shared by its writer and its reader.

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

This module holds the names of that layout, the manifest checks, dtype handling and the errors both sides
raise. :mod:`saelab.activations.cache_writer` writes a cache, :mod:`saelab.activations.cache_reader` reads it;
:mod:`saelab.activations.cache` is the public face that re-exports all three.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.io import json_default

__all__ = [
    "FORMAT",
    "VERSION",
    "MANIFEST",
    "LOCK_FILE",
    "BASE_COLUMNS",
    "RESERVED_KEYS",
    "SHARD_FILE_RE",
    "TMP_FILE_RE",
    "CacheMismatchError",
    "CorruptCacheError",
    "IncompleteCacheError",
    "norm_dtype",
    "normalise_json",
    "check_format",
    "differences",
    "npy_header",
    "check_shard_files",
    "norm_stats",
]

#: ``manifest["format"]`` of every activation cache.
FORMAT = "saelab-activation-cache"
#: Newest manifest version this code reads and the one it writes.
VERSION = 1
#: Name of the manifest file inside a cache directory.
MANIFEST = "manifest.json"
#: Name of the file the one writer allowed at a time holds ``flock()``-ed.
LOCK_FILE = ".lock"

#: Per-row columns every cache has, with their on-disk dtypes.
BASE_COLUMNS = {"token_ids": "int32", "doc_ids": "int64", "positions": "int32"}

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16"}

#: Manifest keys owned by the cache itself; ``meta`` may not use them.
RESERVED_KEYS = frozenset(
    {"format", "version", "model", "hook_name", "d_in", "dtype", "meta_keys", "columns", "n_tokens",
     "shards", "progress", "complete", "stats"}
)

#: Names of shard files (``shard_00000.acts.npy``, ``shard_00000.meta.npz``).
SHARD_FILE_RE = re.compile(r"^shard_\d+\.(acts\.npy|meta\.npz)$")
#: Names of the temporary files an interrupted atomic write leaves behind (see :func:`saelab.io.atomic_write`).
TMP_FILE_RE = re.compile(r"^\.(shard_\d+\.(acts\.npy|meta\.npz)|manifest\.json)\..*\.tmp$")
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
    """A shard is missing, truncated, has the wrong shape/dtype, or fails its SHA-256 check (at open with
    ``verify=True``, or on the first read of the file in a process; see :mod:`saelab.activations.cache_reader`).

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


# ----------------------------------------------------------------------------------------------- helpers


def _show(v: Any) -> str:
    return "<absent>" if v is _ABSENT else json.dumps(v, default=json_default)


def norm_dtype(dtype: Any) -> str:
    """Canonical on-disk dtype name of a cache.

    Args:
        dtype: a name (``"float32"``, ``"fp32"``, ``"float16"``, ``"fp16"``, ``"half"``, any case), a numpy dtype
            or a ``torch.dtype`` (``torch.float32`` / ``torch.float16``).

    Returns:
        ``"float32"`` or ``"float16"``.

    Raises:
        ValueError: any other dtype (names the two supported ones).
    """
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


def normalise_json(obj: dict[str, Any], what: str) -> dict[str, Any]:
    """Round-trip through JSON so values compare equal to what a manifest read back holds (tuples -> lists).

    Raises:
        TypeError: ``obj`` is not JSON-serialisable (the message starts with ``what``).
    """
    try:
        return json.loads(json.dumps(obj, default=json_default))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from e


def check_format(m: Any, path: Path) -> None:
    """Check that a parsed manifest is an activation-cache manifest this code can read.

    Args:
        m: the parsed ``manifest.json``.
        path: the cache directory (for the message).

    Raises:
        ValueError: ``m`` is not a dict with ``format == FORMAT``, or its ``version`` is newer than
            :data:`VERSION` (says to use another path, or to upgrade saelab / re-harvest).
    """
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
    if not isinstance(m.get("shards"), list) or not isinstance(m.get("d_in"), int):
        raise ValueError(
            f"{path / MANIFEST} is damaged (its 'shards' list or 'd_in' is missing or malformed); delete {path} and "
            "re-run the harvest"
        )


def differences(cached: Mapping[str, Any], requested: Mapping[str, Any],
                 extra_cached_keys: Any = ()) -> dict[str, tuple[Any, Any]]:
    """Identity keys whose cached and requested values differ.

    Args:
        cached: the manifest (or any mapping of cached values).
        requested: the values the caller wants; every key is compared.
        extra_cached_keys: further keys to compare (e.g. the manifest's ``meta_keys``), so that a key the cache
            has and the request lacks counts as a difference.

    Returns:
        ``{key: (cached_value, requested_value)}`` (a missing value is a private sentinel that
        :class:`CacheMismatchError` shows as ``"<absent>"``); JSON ``true`` and ``1`` differ.
    """
    diffs: dict[str, tuple[Any, Any]] = {}
    keys = list(requested) + [k for k in extra_cached_keys if k not in requested]
    for k in keys:
        c = cached.get(k, _ABSENT)
        r = requested.get(k, _ABSENT)
        if c != r or (type(c) is bool) != (type(r) is bool):  # JSON true != 1
            diffs[k] = (c, r)
    return diffs


def npy_header(p: Path) -> tuple[int, tuple[int, ...], bool, np.dtype]:
    """Parse the header of a ``.npy`` file (NumPy format spec, versions 1.0 and 2.0; ``numpy.lib.format``).

    Returns:
        ``(data_offset_bytes, shape, fortran_order, dtype)``.

    Raises:
        OSError: the file cannot be opened. ValueError: the magic string or header is malformed.
    """
    with open(p, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        return f.tell(), shape, fortran, dtype


def check_shard_files(root: Path, s: Mapping[str, Any], d_in: int, dtype: np.dtype) -> list[tuple[str, str]]:
    """Cheap structural check of one shard's two files (sizes and the .npy header).

    Args:
        root: the cache directory.
        s: the shard's manifest entry.
        d_in: activation width; the ``.npy`` must hold C-order ``[n_rows, d_in]`` of ``dtype``.
        dtype: the cache's on-disk numpy dtype.

    Returns:
        ``[(file_name, description), ...]``, empty when both files look right.

    Raises:
        FileNotFoundError: a file is missing (callers check existence first).
    """
    problems: list[tuple[str, str]] = []
    p = root / s["file"]
    size = p.stat().st_size
    try:
        off, shape, fortran, dt = npy_header(p)
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


def norm_stats(shards: list[Mapping[str, Any]]) -> dict[str, float]:
    """Norm statistics of the cache's rows from the per-shard sums the manifest records.

    Args:
        shards: manifest shard entries with ``n_rows``, ``sum_norm`` (sum of row L2 norms), ``sum_sq_norm``
            (sum of squared norms) and ``max_norm``, in activation units.

    Returns:
        ``n_tokens``, ``mean_norm`` = E||x||, ``mean_sq_norm`` = E||x||^2, ``std_norm`` =
        sqrt(E||x||^2 - (E||x||)^2) (population standard deviation, clamped at 0 against rounding) and
        ``max_norm``; all zero for no rows.
    """
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
