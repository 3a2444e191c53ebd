"""The switch between the sparse kernels and the dense autograd reference, per thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


_state = threading.local()


@contextmanager
def dense_reference() -> Iterator[None]:
    """Within this block (in this thread) :meth:`SAE.encode_code` uses the dense autograd reference path.

    The reference path differentiates through the full ``(N, d_sae)`` pre-activations and returns the codes of
    the activation's ``forward`` (dense for BatchTopK); the parity tests compare it with the sparse path.
    """
    old = getattr(_state, "dense", False)
    _state.dense = True
    try:
        yield
    finally:
        _state.dense = old


def sparse_path_enabled() -> bool:
    """False inside :func:`dense_reference`."""
    return not getattr(_state, "dense", False)
