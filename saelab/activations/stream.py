"""Train while the harvest is still running: follow a growing activation cache, run the harvest on a thread.

The harvest keeps writing the ordinary on-disk cache (:mod:`saelab.activations.cache`: sharded, checkpointed,
resumable, reusable by evals). A trainer that *follows* it reads each shard as soon as a checkpoint commits it
to ``manifest.json``, in **stream order**: epoch 0 takes the shards in harvest order, cut into windows of
``window_shards`` consecutive shards ``[0, w), [w, 2w), ...``, each window's rows permuted with the RNG seeded by
``(seed, 0, 1, window index)``; later epochs (when training runs past the cache's size) are the ordinary shuffled
epochs of :meth:`ActivationCache.iter_batches` on the finished cache. A window is read once all its shards are
committed (the last one once the harvest has finished), never earlier, so the batches are a pure function of the
cached rows and the seed, never of timing: :func:`follow_batches` on a harvest in progress yields exactly what
``ActivationCache.iter_batches(..., stream_order=True)`` yields on the finished cache, and a killed run (the
harvest resuming from its checkpoint, the trainer from its own) sees the same batches as an uninterrupted one,
because committed shards never change and a resumed harvest re-creates the same later shards.

Readers only ever see committed shards (the manifest is replaced atomically), so following also works across
processes: ``saelab train --stream`` next to a ``saelab harvest`` writing the same ``--cache``. In one process,
:class:`BackgroundHarvest` runs :func:`saelab.activations.harvest.harvest` on a thread (the LM forward spends its
time in torch ops, which release the GIL) and tells the follower whether it is alive; its failure is re-raised in
the trainer as :class:`HarvestFailedError`.

This is the streamed activation store of SAELens (``ActivationsStore``, harvest and train interleaved) and
sparsify (activations computed on the fly), with the cache kept on disk, as dictionary_learning's
``ActivationBuffer`` refills a buffer while training runs, but resumable.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .cache_format import MANIFEST
from .cache_reader import ActivationCache, check_batch_args, check_pos_int, window_batches

if TYPE_CHECKING:  # pragma: no cover
    from ..models.lm import LoadedLM
    from .harvest import HarvestConfig

__all__ = [
    "POLL_S",
    "HarvestFailedError",
    "StreamCancelled",
    "CacheFollower",
    "follow_batches",
    "stream_norm_scale",
    "BackgroundHarvest",
]

POLL_S = 0.05
"""Seconds between two looks at ``manifest.json`` (one ``os.stat``; the manifest is re-read only when it changed)."""


class HarvestFailedError(RuntimeError):
    """The harvest that a streamed training run was following failed; ``__cause__`` is its exception."""


class StreamCancelled(RuntimeError):
    """The follower's ``cancel`` event was set while it waited for a shard (the consumer stopped)."""


class CacheFollower:
    """Read an activation cache in stream order while its harvest is still writing it.

    Args:
        path: the cache directory (it and its manifest may not exist yet: the follower waits for them).
        window_shards: consecutive shards per window of epoch 0 (also the window of later epochs).
        producer_alive: called while waiting; returns whether the harvest writing the cache is still running
            and raises if it failed (:meth:`BackgroundHarvest.alive`). ``None``: the harvest runs elsewhere
            (another process) and only ``timeout_s`` bounds the wait.
        timeout_s: with ``producer_alive=None``, give up when the manifest has not changed for this many seconds
            (``None`` or 0: wait forever). Ignored when ``producer_alive`` is given.
        cancel: once set, a waiting follower raises :class:`StreamCancelled` (lets a consumer that stops early
            end the prefetch thread that runs the follower).
        poll_s: seconds between looks at the manifest.
        verify_checksums: check each committed shard against the SHA-256 its snapshot manifest records the first
            time it is read (:meth:`ActivationCache.load_window`); ``False`` skips the check.

    Raises:
        ValueError: ``window_shards`` is not a positive int.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        window_shards: int = 2,
        producer_alive: Callable[[], bool] | None = None,
        timeout_s: float | None = 600.0,
        cancel: threading.Event | None = None,
        poll_s: float = POLL_S,
        verify_checksums: bool = True,
    ) -> None:
        check_pos_int("window_shards", window_shards)
        self.path = Path(path)
        self.window = int(window_shards)
        self.producer_alive = producer_alive
        self.timeout_s = timeout_s or None
        self.cancel = cancel
        self.poll_s = float(poll_s)
        self.verify_checksums = bool(verify_checksums)
        self._snap: ActivationCache | None = None
        self._key: tuple | None = None
        self._changed = time.monotonic()

    # -- snapshots -----------------------------------------------------------------------------------

    def snapshot(self) -> ActivationCache | None:
        """The cache as its manifest lists it now (committed shards only), or ``None`` before the manifest exists.

        Raises:
            RuntimeError: the manifest no longer starts with the shards of the previous snapshot (the cache was
                rolled back or re-harvested under the reader).
            CorruptCacheError / ValueError: from :meth:`ActivationCache.open`.
        """
        try:
            st = os.stat(self.path / MANIFEST)
        except FileNotFoundError:
            return self._snap
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._key:
            return self._snap
        snap = ActivationCache.open(self.path, allow_incomplete=True, verify_checksums=self.verify_checksums)
        if self._snap is not None:
            old = self._snap.manifest["shards"]
            if snap.manifest["shards"][: len(old)] != old:
                raise RuntimeError(
                    f"the activation cache at {self.path} changed under the training run that follows it (its first "
                    f"{len(old)} shards are no longer those already read): was it rolled back, deleted or harvested "
                    f"again? Train again from scratch (delete the SAE's checkpoint folder)"
                )
        self._snap, self._key, self._changed = snap, key, time.monotonic()
        return snap

    @staticmethod
    def _complete(snap: ActivationCache | None) -> bool:
        return snap is not None and bool(snap.manifest.get("complete", False))

    def wait_for_window(self, w: int) -> ActivationCache | None:
        """Block until window ``w`` of epoch 0 (shards ``[w*window, (w+1)*window)``) is committed, or the harvest has
        finished (the last window may then be shorter).

        Returns:
            A snapshot holding the window, or ``None`` if the finished cache has fewer than ``w + 1`` windows.

        Raises:
            HarvestFailedError (or whatever ``producer_alive`` raises): the harvest failed while we waited.
            RuntimeError: the harvest stopped without finishing the cache.
            TimeoutError: no new shard for ``timeout_s`` seconds (``producer_alive=None`` only).
            StreamCancelled: ``cancel`` was set.
        """
        need = (w + 1) * self.window
        while True:
            snap = self.snapshot()
            if snap is not None and (snap.n_shards >= need or self._complete(snap)):
                return snap if w * self.window < snap.n_shards else None
            if self.cancel is not None and self.cancel.is_set():
                raise StreamCancelled(f"stopped waiting for shards of {self.path}: the consumer was closed")
            if self.producer_alive is not None:
                if not self.producer_alive():  # finished (or stopped) just now: look once more
                    snap = self.snapshot()
                    if snap is not None and (snap.n_shards >= need or self._complete(snap)):
                        continue
                    raise RuntimeError(
                        f"the harvest writing {self.path} stopped before finishing the cache ("
                        f"{0 if snap is None else snap.n_tokens} rows committed); re-run the same command to resume it"
                    )
            elif self.timeout_s is not None and time.monotonic() - self._changed > self.timeout_s:
                have = "no manifest yet" if snap is None else f"{snap.n_shards} shards / {snap.n_tokens} rows committed"
                raise TimeoutError(
                    f"no new shard in {self.path} for {self.timeout_s:g} s ({have}, waiting for shard {need - 1}); is "
                    f"the `saelab harvest --out {self.path}` writing it still running? Resume it, or raise "
                    f"--stream_timeout (0 waits forever)"
                )
            time.sleep(self.poll_s)

    def wait_complete(self) -> ActivationCache:
        """Block until the harvest has finished; the finished cache (same errors as :meth:`wait_for_window`)."""
        w = 0
        while True:
            snap = self.wait_for_window(w)
            if snap is None or self._complete(snap):
                return snap if snap is not None else self.snapshot()  # type: ignore[return-value]
            w = snap.n_shards // self.window

    # -- batches -------------------------------------------------------------------------------------

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = 1,
        start_batch: int = 0,
        drop_last: bool = True,
    ) -> Iterator[torch.Tensor]:
        """The batches of ``ActivationCache.iter_batches(batch_size, ..., shuffle_window_shards=window_shards,
        stream_order=True)`` on the finished cache, each yielded as soon as its window is committed.

        Args, yields: as :meth:`ActivationCache.iter_batches` (``start_batch`` counts across epochs; windows before
        it are waited for but not read).

        Raises:
            ValueError: bad arguments; once the cache is finished, ``start_batch`` past the end or no batch at all.
            Whatever :meth:`wait_for_window` raises, at the batch that waited.
        """
        check_batch_args(batch_size, epochs, seed, start_batch)
        return self._batches(int(batch_size), int(seed), bool(shuffle), epochs, int(start_batch), bool(drop_last))

    def _batches(self, bs: int, seed: int, shuffle: bool, epochs: int | None, start: int,
                 drop_last: bool) -> Iterator[torch.Tensor]:
        holder: dict[str, Any] = {}
        buf: list[np.ndarray] = []

        def windows() -> Iterator[tuple[int, np.ndarray, int]]:
            w = 0
            while True:
                snap = self.wait_for_window(w)
                if snap is None:
                    return
                shards = np.arange(w * self.window, min((w + 1) * self.window, snap.n_shards))
                holder["snap"] = snap
                yield int(snap.shard_rows[shards].sum()), shards, w
                w += 1

        def load(shards: np.ndarray, m: int) -> np.ndarray:
            if not buf or len(buf[0]) < m:
                buf[:] = [np.empty((m, holder["snap"].d_in), dtype=holder["snap"].dtype)]
            return holder["snap"].load_window(shards, m, buf[0])

        # epoch 0 in stream order; rows [start * bs, ...) of it (nothing when the start lies in a later epoch)
        yield from window_batches(windows(), load, bs, seed, 0, shuffle, start * bs, None, drop_last)
        final = self.wait_complete()
        nb = final.check_batch_span(bs, drop_last, epochs, start)
        if epochs == 1:
            return
        buf.clear()
        yield from final.iter_batches(bs, seed=seed, shuffle=shuffle, epochs=epochs, start_batch=max(start, nb),
                                      drop_last=drop_last, shuffle_window_shards=self.window, stream_order=True)


def follow_batches(
    path: str | Path,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    epochs: int | None = 1,
    start_batch: int = 0,
    drop_last: bool = True,
    window_shards: int = 2,
    producer_alive: Callable[[], bool] | None = None,
    timeout_s: float | None = 600.0,
    cancel: threading.Event | None = None,
    verify_checksums: bool = True,
) -> Iterator[torch.Tensor]:
    """Batches of a cache that is still being harvested, in stream order (module docstring); exactly the batches of
    ``ActivationCache.open(path).iter_batches(batch_size, ..., shuffle_window_shards=window_shards,
    stream_order=True)`` once the harvest has finished.

    Args: as :class:`CacheFollower` and :meth:`CacheFollower.batches`.

    Yields:
        float32 tensors ``[batch_size, d_in]``.

    Raises:
        As :meth:`CacheFollower.batches`.
    """
    follower = CacheFollower(path, window_shards=window_shards, producer_alive=producer_alive, timeout_s=timeout_s,
                             cancel=cancel, verify_checksums=verify_checksums)
    return follower.batches(batch_size, seed=seed, shuffle=shuffle, epochs=epochs, start_batch=start_batch,
                            drop_last=drop_last)


def stream_norm_scale(cache: ActivationCache, window_shards: int) -> float:
    """``sqrt(E||x||^2)`` over the rows of the first stream window (shards ``[0, window_shards)``), in activation units.

    The input scale of the "E||x||^2 = 1" normalisation (dictionary_learning ``get_norm_factor``), estimated from the
    first data a streamed run can see instead of the whole cache, so that it is known before the harvest ends and
    is the same, bit for bit, for a streamed run, its resume and a stream-order run on the finished cache. Uses the
    per-shard ``sum_sq_norm`` / ``n_rows`` the manifest records (float64 sums of float32 squared norms); reads the
    rows when a shard entry lacks them.

    Args:
        cache: a (possibly partial) snapshot holding at least the first window, or the whole cache if shorter.
        window_shards: shards per stream window.

    Raises:
        ValueError: the cache has no rows in its first window.
    """
    shards = cache.manifest["shards"][:window_shards]
    n = sum(int(s["n_rows"]) for s in shards)
    if n == 0:
        raise ValueError(f"the activation cache at {cache.path} has no rows in its first {window_shards} shard(s); "
                         f"cannot estimate the normalisation scale")
    if all("sum_sq_norm" in s for s in shards):
        sq = sum(float(s["sum_sq_norm"]) for s in shards)
    else:
        x = cache.load_window(np.arange(len(shards)), n).astype(np.float32)
        sq = float(np.einsum("ij,ij->i", x, x).astype(np.float64).sum())
    return math.sqrt(sq / n)


class BackgroundHarvest:
    """Run :func:`saelab.activations.harvest.harvest` on a daemon thread while the caller trains on its cache.

    Args:
        cfg: the harvest settings (``cfg.out`` is the cache the trainer follows).
        lm: an already loaded model (loaded by the thread from ``cfg.model`` otherwise).

    Use::

        bg = BackgroundHarvest(hcfg, lm).start()
        bg.wait_ready()                         # the cache is open (settings checked); raises if that failed
        train_many([tcfg], harvest_alive=bg.alive)
        cache = bg.join()

    or as a context manager, which stops the thread on the way out if it is still running.
    """

    def __init__(self, cfg: HarvestConfig, lm: LoadedLM | None = None) -> None:
        self.cfg, self.lm = cfg, lm
        self.error: BaseException | None = None
        self.result: ActivationCache | None = None
        self.finished_at: float | None = None
        """``time.perf_counter()`` when the thread ended (harvest finished, failed or stopped)."""
        self._stop, self._ready = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._target, name="saelab-harvest", daemon=True)

    def _target(self) -> None:
        from .harvest import harvest

        try:
            self.result = harvest(self.cfg, self.lm, stop=self._stop, ready=self._ready)
        except BaseException as e:  # noqa: BLE001 - handed to the trainer through alive()/join()
            self.error = e
        finally:
            self.finished_at = time.perf_counter()

    def start(self) -> BackgroundHarvest:
        """Start the thread; returns ``self``."""
        self._thread.start()
        return self

    def _failure(self) -> HarvestFailedError:
        e = self.error
        err = HarvestFailedError(
            f"the harvest into {self.cfg.out}, running alongside training, failed: {type(e).__name__}: {e}. Its "
            f"committed shards are kept: fix the cause and re-run the same command; the harvest and the training run "
            f"both resume from their last checkpoints"
        )
        err.__cause__ = e
        return err

    def alive(self) -> bool:
        """Whether the harvest is still running (``False`` once it has finished).

        Raises:
            HarvestFailedError: the harvest raised (its exception is the ``__cause__``).
        """
        running = self._thread.is_alive()
        if self.error is not None:
            raise self._failure()
        return running

    def wait_ready(self) -> None:
        """Block until the harvest has opened its cache (settings checked, a resumed cache cleaned up) or ended.

        Raises:
            HarvestFailedError: it failed before that (e.g. the cache was made with other settings).
        """
        while not self._ready.wait(POLL_S):
            if not self._thread.is_alive():
                break
        if self.error is not None:
            raise self._failure()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the harvest to stop before its next forward batch and wait for the thread (its committed checkpoints
        are kept; re-running resumes). A no-op once it has ended."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def join(self) -> ActivationCache:
        """Wait for the harvest to finish; the finished cache.

        Raises:
            HarvestFailedError: the harvest raised.
        """
        self._thread.join()
        if self.error is not None:
            raise self._failure()
        assert self.result is not None
        return self.result

    def __enter__(self) -> BackgroundHarvest:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread.is_alive():
            self.stop()
