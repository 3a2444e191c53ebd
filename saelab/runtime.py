"""Process-wide CPU memory settings for the hot loops (SAE training step, activation harvest).

A training step allocates and frees tensors of tens of MB (gradients of ``(d_sae, d_in)`` weights, norms, loss
terms) and an LM forward allocates per-layer activations of several MB. With glibc's default malloc, blocks above
the (dynamic) mmap threshold go back to the OS on ``free`` and come back as fresh zero pages on the next
allocation, so every step pays a page fault per 4 KiB touched: a fresh temporary of tens of MB can cost more in
page faults than in arithmetic (measurements in ``benchmarks/RESULTS.md``).

:func:`tune_cpu_memory` applies two settings:

* glibc ``mallopt``: ``M_MMAP_THRESHOLD`` = 32 MiB (the largest glibc accepts on 64-bit) so blocks up to that size
  come from the heap, and ``M_TRIM_THRESHOLD`` = 1 GiB so freed heap memory is kept for reuse instead of being
  returned to the OS. The process keeps its peak heap; nothing else changes.
* ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's own switch, read once at torch's first CPU allocation): CPU tensors of
  2 MiB or more are 2 MiB-aligned and ``madvise(MADV_HUGEPAGE)``'d, so a fresh 150 MB block faults in 512x
  fewer pages. It only takes effect when set before torch is imported (an explicit value is never overridden).

The library applies neither by itself: the ``saelab`` command calls :func:`tune_cpu_memory` first thing, and a
script that wants the same calls it once before importing torch. Both are opt-out with ``SAELAB_TUNE_MEMORY=0``. Other platforms (macOS, musl, Windows) are left untouched.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD = -1
"""glibc ``mallopt`` parameter: free top-of-heap memory above this many bytes is returned to the OS."""
M_MMAP_THRESHOLD = -3
"""glibc ``mallopt`` parameter: allocations of at least this many bytes are served by ``mmap``."""
MMAP_THRESHOLD = 32 * 2**20
"""32 MiB, glibc's ``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit (larger values are rejected)."""
TRIM_THRESHOLD = 2**30
"""1 GiB of free heap kept for reuse before glibc trims."""

_applied: dict[str, bool] | None = None


def tune_cpu_memory() -> dict[str, bool]:
    """Apply the module's allocator settings once per process (later calls return the first result).

    Returns:
        ``{"mallopt": bool, "thp": bool}``: whether glibc accepted the malloc thresholds, and whether
        ``THP_MEM_ALLOC_ENABLE`` is ``1`` for a torch not yet imported (False when torch was already loaded, when
        the variable was set to another value, or when ``SAELAB_TUNE_MEMORY=0``).
    """
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("SAELAB_TUNE_MEMORY", "1") == "0":
        _applied = {"mallopt": False, "thp": False}
        return _applied
    thp = False
    if "torch" not in sys.modules:
        thp = os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1") == "1"
    ok = False
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL("libc.so.6")
            settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            ok = all(libc.mallopt(param, value) for param, value in settings)
        except (OSError, AttributeError):
            ok = False
    _applied = {"mallopt": ok, "thp": thp}
    return _applied

