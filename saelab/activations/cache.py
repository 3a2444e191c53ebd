"""On-disk, sharded cache of language-model activations, written incrementally and read as shuffled batches.

The harvester pushes activations with :class:`ActivationCacheWriter`; the trainer reads them back with
:class:`ActivationCache` without ever holding more than a few shards in memory.

This module is the public face of three smaller ones, and re-exports their public names:

* :mod:`saelab.activations.cache_format`: the on-disk layout shared by both sides (directory layout and
  manifest schema, file names, dtype handling, manifest checks) and the errors.
* :mod:`saelab.activations.cache_writer`: :class:`ActivationCacheWriter` (checkpoints, crash-safe resume).
* :mod:`saelab.activations.cache_reader`: :class:`ActivationCache` (random access, shuffled batch streams, each
  shard file checked against its manifest SHA-256 on its first read in the process: ``verified_files``) and
  the public seam the stream follower (:mod:`saelab.activations.stream`) builds on:
  :meth:`ActivationCache.load_window`, :func:`window_batches`, :func:`check_batch_args`, :func:`check_pos_int`;
  and :func:`hook_cache_dirs`, the per-hook caches of a multi-hook harvest.

The writer imports the reader (``finalize`` returns a reader); the reader and the writer import the format;
nothing imports back.
"""

from __future__ import annotations

from .cache_format import (
    BASE_COLUMNS,
    FORMAT,
    MANIFEST,
    VERSION,
    CacheMismatchError,
    CorruptCacheError,
    IncompleteCacheError,
)
from .cache_reader import (
    ActivationCache,
    check_batch_args,
    check_pos_int,
    hook_cache_dirs,
    verified_files,
    window_batches,
)
from .cache_writer import ActivationCacheWriter

__all__ = [
    "FORMAT",
    "VERSION",
    "MANIFEST",
    "BASE_COLUMNS",
    "CacheMismatchError",
    "CorruptCacheError",
    "IncompleteCacheError",
    "ActivationCacheWriter",
    "ActivationCache",
    "window_batches",
    "check_batch_args",
    "check_pos_int",
    "verified_files",
    "hook_cache_dirs",
]
