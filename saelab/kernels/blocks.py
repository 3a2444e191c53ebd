"""Block sizes and loop shapes of the kernels, chosen by device.

The CPU kernels cut their work into cache-sized blocks (32 rows of the scale law, 1,024-row dot products and
similarity blocks, 8,192-column panels) and compact rows before a costly op when a value read says few rows need
it: on a CPU both cost nothing extra. On a GPU each block is a kernel launch and each value read makes the host wait
for the device, so there the blocks are as large as memory allows (one block for most tensors) and the kernels
compute on every row instead of reading which rows need it.

:func:`host_sized` is the one switch; :func:`block_rows`, :func:`padded_width` and :func:`compacts_rows` read it.
CPU results do not depend on this module's device rules (they keep the CPU sizes exactly).
"""

from __future__ import annotations

import torch

CPU_BLOCK_ROWS = {
    "scale_law": 32,  # saelab.kernels.scores.apply_scale_law_: two (32, d_sae) fp32 scratch blocks stay in cache
    "row_dots": 1024,  # saelab.kernels.topk.row_dots: one block's elementwise product stays in cache
    "norms": 1024,  # saelab.kernels.screen.screen_margin: fp32 copies of 1,024 bf16 rows
    "neighbour": 1024,  # saelab.kernels.neighbours: (1024, 1024) similarity blocks, 1,024-row screened panels
    "panel": 8192,  # saelab.kernels.neighbours: columns per screened bf16 GEMM (16 MiB bf16 panels)
    "panel_sub": 128,  # saelab.kernels.neighbours: rows of a panel reduced at a time, in an fp32 copy
}
"""Rows (columns for ``panel``) per block on a CPU, by kind."""

DEVICE_BLOCK_ELEMENTS = 2**26
"""Elements of one block's scratch on a GPU (256 MiB in fp32): the row-wise kernels take ``2^26 // width`` rows a
block, i.e. the whole tensor for batches of up to ``2^26`` entries."""

DEVICE_SQUARE_BLOCK = 8192
"""Rows and columns of a similarity block on a GPU (``8192^2`` fp32 entries: 256 MiB): a whole default C²R chunk of
8,192 latents is one block."""

DEVICE_GEMM_ALIGN = 8
"""bf16 GEMM operands on a GPU get a row length (leading dimension) that is a multiple of 8 elements (16 bytes), the
alignment cuBLAS's tensor-core kernels need."""


def host_sized(device: torch.device) -> bool:
    """Whether the kernels use the CPU's cache-sized blocks and value-dependent shortcuts on ``device`` (CPU), or
    memory-bounded blocks and read-free loops (any other device)."""
    return torch.device(device).type == "cpu"


def block_rows(device: torch.device, kind: str, width: int = 1) -> int:
    """Rows per block of a blocked kernel ``kind`` (a key of :data:`CPU_BLOCK_ROWS`) on ``device``, for rows of
    ``width`` elements: the CPU size of :data:`CPU_BLOCK_ROWS` on a CPU; elsewhere ``DEVICE_BLOCK_ELEMENTS // width``
    (at least 1) for the row-wise kinds and :data:`DEVICE_SQUARE_BLOCK` for the similarity blocks and panels.

    Raises:
        KeyError: an unknown ``kind`` (names the known ones).
    """
    if kind not in CPU_BLOCK_ROWS:
        raise KeyError(f"unknown block kind {kind!r}; known: {', '.join(CPU_BLOCK_ROWS)}")
    if host_sized(device):
        return CPU_BLOCK_ROWS[kind]
    if kind in ("neighbour", "panel", "panel_sub"):
        return DEVICE_SQUARE_BLOCK
    return max(1, DEVICE_BLOCK_ELEMENTS // max(1, width))


def padded_width(device: torch.device, width: int) -> int:
    """Row length of a bf16 GEMM operand of ``width`` used columns: ``width`` on a CPU, rounded up to a multiple of
    :data:`DEVICE_GEMM_ALIGN` elsewhere (the extra columns are zeros: they add exact zeros to the fp32
    accumulation, so the products and their error bounds are unchanged)."""
    if host_sized(device):
        return width
    return -(-width // DEVICE_GEMM_ALIGN) * DEVICE_GEMM_ALIGN


def compacts_rows(device: torch.device) -> bool:
    """Whether a kernel first reads which rows need a costly op (a top-k, an argmax) and runs it on those only (a CPU:
    the read is free and the op is the cost), or runs it on every row and masks the result (elsewhere: no wait for
    the device; same values)."""
    return host_sized(device)
