"""Read-ahead of an iterator on a background thread, so loading the next activation batch overlaps the SAE step.

The cache reader spends its time in numpy I/O and copies (which release the GIL), so one producer thread is
enough to hide it behind the step. Order and content are unchanged: the consumer sees exactly the items the
iterator yields, and an exception raised by the iterator is re-raised in the consumer at the same position.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetcher(Iterator[T]):
    """Iterate ``it`` on a daemon thread, keeping up to ``depth`` items ready.

    Args:
        it: any iterator (e.g. :meth:`saelab.activations.cache.ActivationCache.iter_batches`).
        depth: items read ahead (memory: ``depth`` batches).

    Use as an iterator; call :meth:`close` (or use it as a context manager) to stop the thread early.

    Raises:
        ValueError: ``depth < 1``.
        Whatever ``it`` raises, in the consumer, after the items yielded before it.
    """

    def __init__(self, it: Iterator[T], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(it,), name="saelab-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator[T]) -> None:
        try:
            for item in it:
                if not self._put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(_Raised(e))
            return
        self._put(_END)

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._q.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            raise item.exc
        return item

    def close(self) -> None:
        """Stop the producer thread (pending items are dropped)."""
        self._stop.set()
        self._done = True
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
