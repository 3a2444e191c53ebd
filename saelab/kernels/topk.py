"""Row-wise selections and reductions of the sparse step: ``row_topk`` (a two-stage exact top-k for wide rows),
``row_dots`` (blocked row-wise dot products), ``take_rows`` (a gather with a deterministic backward)."""

from __future__ import annotations

import torch
from torch import Tensor

from .blocks import block_rows


def take_rows(t: Tensor, idx: Tensor) -> Tensor:
    """``t[idx]`` along dim 0 (``idx`` any shape; result ``idx.shape + t.shape[1:]``) through ``index_select``.

    Use it wherever the result needs a gradient: the backward of advanced indexing accumulates into ``t``'s
    gradient with atomic adds across CPU threads, so its float sums (and then the trained weights) changed from
    run to run with 2 threads; ``index_select``'s backward (``index_add_``) adds in a fixed order.
    """
    return t.index_select(0, idx.reshape(-1)).view(*idx.shape, *t.shape[1:])


@torch.no_grad()
def row_dots(a: Tensor, b: Tensor, rows: int | None = None) -> Tensor:
    """``(N,)`` row-wise dot products ``sum_j a[n, j] b[n, j]`` of ``a, b (N, d)``, without gradient.

    ``torch.linalg.vecdot`` in blocks of ``rows`` rows written into one output (default
    :func:`~saelab.kernels.blocks.block_rows` of the device: 1,024 on a CPU, where each block's elementwise product
    stays in cache, whereas one CPU ``vecdot`` call over many thousand rows slows down sharply and
    ``(a * b).sum(-1)`` materialises the whole ``(N, d)`` product (``benchmarks/RESULTS.md``); on a GPU blocks of up
    to 2^26 entries, one launch for most tensors).

    Raises:
        RuntimeError: ``a`` and ``b`` are not two ``(N, d)`` tensors of one shape.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise RuntimeError(f"row_dots needs two (N, d) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    out = a.new_empty(a.shape[0], dtype=torch.promote_types(a.dtype, b.dtype))
    rows = block_rows(a.device, "row_dots", a.shape[1]) if rows is None else rows
    for i in range(0, a.shape[0], rows):
        torch.linalg.vecdot(a[i : i + rows], b[i : i + rows], out=out[i : i + rows])
    return out


def row_topk(x: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """``x.topk(m, dim=-1, sorted=False)`` for wide rows, in two cheaper stages: ``(values, indices)``, each
    ``(..., m)``.

    torch's CPU ``topk`` costs time proportional to the row width whatever ``m``, so on wide rows it is a large
    share of the sparse training step. Here each row is cut into ``G = d / S`` strided groups of ``S`` entries (group
    ``g`` holds columns ``g, g + G, g + 2G, ...``; ``S`` in {4, 8, 16} minimises ``G + 1.25 S m``, the widths of the
    two ``topk`` below, fitted to CPU timings); one vectorised ``amax`` gives each group's maximum, ``topk`` picks
    the ``m`` groups with the largest maxima, and a last ``topk`` runs over their ``S m`` members only.
    Exact: the ``m`` chosen maxima are ``m`` entries ``>= tau`` (the ``m``-th largest group maximum), and every
    entry outside the chosen groups is ``<=`` its group's maximum ``<= tau``, so the ``m`` largest values are
    the same multiset as ``topk``'s (the last ``d mod S`` columns, outside every group, are candidates
    themselves); the indices differ only among tied values (``topk`` leaves their order
    unspecified too). Differentiable in ``values`` (gathers). Faster than ``topk`` on CPU for d = 4,608 to
    32,768 and m = 32 to 288 (``benchmarks/RESULTS.md``); rows where it would save little use ``topk`` itself.

    Args:
        x: ``(..., d)`` scores (any float dtype).
        m: entries kept per row, ``0 <= m <= d``.

    Raises:
        RuntimeError: as ``topk`` when ``m > d``.
    """
    d = x.shape[-1]
    cost, S = min((d // S + 1.25 * S * m, S) for S in (4, 8, 16))  # per row: stage-2 width + stage-3 width
    if x.dim() != 2 or m < 8 or cost > 0.7 * d or d // S < m:
        return x.topk(m, dim=-1, sorted=False)
    n, G = x.shape[0], d // S
    body = G * S
    groups = x[:, :body].unflatten(1, (S, G))  # groups[r, s, g] = x[r, s G + g]
    top_g = row_topk(groups.amax(1), m)[1]  # (n, m); itself two-stage when G is wide
    members = groups.gather(2, top_g.unsqueeze(1).expand(n, S, m)).view(n, S * m)  # [r, s m + j]
    if body < d:  # the last d mod S columns are candidates as they are
        members = torch.cat([members, x[:, body:]], 1)
    vals, j = members.topk(m, dim=1, sorted=False)
    cols = torch.div(j, m, rounding_mode="floor") * G + top_g.gather(1, j % m)
    if body < d:
        cols = torch.where(j < S * m, cols, j - S * m + body)
    return vals, cols


def top_with_floor(pre: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, cols (r, width), floor (r,))``: each row's ``width`` largest entries and their minimum (every entry
    left out is ``<=`` it)."""
    vals, cols = row_topk(pre, width)
    return vals, cols, vals.min(1).values
