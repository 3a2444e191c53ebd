"""Each decoder row's most cosine-similar other row (C²R's and OrtSAE's nearest neighbour inside a chunk), exact or
screened by one bf16 GEMM (:func:`saelab.kernels.screen.screen_margin`), and the squared positive cosine of chosen
pairs with a one-pass backward (:class:`PairCosSq`)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..codes import bucket_counts
from ..devices import bf16_native
from .blocks import block_rows, compacts_rows
from .pairs import bag_sums, pair_dots
from .screen import fp32_accumulation, screen_margin


# -- nearest decoder neighbour inside random chunks -----------------------------------------------------
_BLOCK = 1024
"""Rows per block of the neighbour search on a CPU (:func:`~saelab.kernels.blocks.block_rows` ``"neighbour"``): one
``(1024, 1024)`` similarity block (4 MiB) exists at a time; a GPU takes blocks of 8,192 (one block per default
chunk). Also the smallest chunk that the screened search takes."""


@torch.no_grad()
def _nearest_in_chunk(D: Tensor) -> Tensor:
    """For unit rows ``D (C, d)``: ``(C,)`` index of each row's most cosine-similar *other* row.

    ``argmax_k S_jk`` of ``S = D D^T`` with the diagonal set to -2 (the reference's ``fill_diagonal_(-2)``),
    computed over the upper-triangular blocks only (``S`` is symmetric: each block updates the best
    neighbour of its rows and, transposed, of its columns), which halves the matmul work. Ties go to the
    lowest index. A chunk of one row returns itself (no other row). On a CPU the mirrored (column) update takes the
    column maxima with ``amax`` and the argmax only for columns that improve, on a row-major copy of those columns: a
    ``max(dim=0)`` with indices is a strided reduction, ~25x slower on CPU than ``max(dim=1)``; on a GPU it takes
    ``max(dim=0)`` of every column (no read of which columns improve). Blocks: :func:`~saelab.kernels.blocks.block_rows`.
    """
    C = D.shape[0]
    block = block_rows(D.device, "neighbour")
    compact = compacts_rows(D.device)
    dtype = torch.promote_types(D.dtype, torch.float32)  # compare bf16 similarities in float32
    best = torch.full((C,), -3.0, dtype=dtype, device=D.device)
    arg = torch.zeros(C, dtype=torch.long, device=D.device)

    def update(start: int, found: torch.return_types.max, offset: int) -> None:
        rows = slice(start, start + found.values.shape[0])
        val = found.values.to(dtype)
        better = val > best[rows]
        best[rows] = torch.where(better, val, best[rows])
        arg[rows] = torch.where(better, found.indices + offset, arg[rows])

    def update_columns(start: int, S: Tensor, offset: int) -> None:
        if not compact:
            update(start, S.max(dim=0), offset)  # first maximum on ties, as the argmax below
            return
        val = S.amax(dim=0).to(dtype)
        better = (val > best[start : start + S.shape[1]]).nonzero().squeeze(1)
        if better.numel():
            best[start + better] = val[better]
            arg[start + better] = S.T.index_select(0, better).argmax(dim=1) + offset  # first maximum on ties

    for i in range(0, C, block):
        for j in range(i, C, block):
            S = D[i : i + block] @ D[j : j + block].T
            if i == j:
                S.fill_diagonal_(-2.0)
            update(i, S.max(dim=1), j)  # rows i.. against columns j..
            if j != i:
                update_columns(j, S, i)  # rows j.. against columns i.. (the mirrored block)
    return arg


# -- the same search, screened by one bf16 GEMM ---------------------------------------------------------
_GROUP = 64
"""Columns per group of the screened search: each row keeps the bf16 maximum of every group of 64 columns."""


# The screened search's panels (saelab.kernels.blocks.block_rows "panel", "panel_sub"). On a CPU: (1024, 8192) bf16
# panels (16 MiB) run the bf16 GEMM at about twice the rate of 1024 x 1024 blocks (benchmarks/RESULTS.md), and wider
# outputs would pass glibc's mmap threshold (saelab.runtime.tune_cpu_memory) and be page-faulted in on every call;
# each panel is reduced to group maxima in fp32 copies of 128 rows (4 MiB, cache-resident), ~1.4x faster than
# reducing the bf16 panel itself (torch's bf16 reductions run ~3x slower than its fp32 ones on CPU). On a GPU: 8,192
# rows and columns a panel, reduced whole.


@torch.no_grad()
def _nearest_in_chunk_screened(D: Tensor) -> Tensor:
    """:func:`_nearest_in_chunk` of fp32 rows ``D (C, d)``, ``C >= 2``, screened by one bf16 GEMM: same result up to
    fp32 rounding of the similarities (equal fp32 values go to the lowest index).

    1. The upper-triangular row panels (1024 rows, up to 8192 columns) of ``S~ = bf16(D) bf16(D)^T`` (bf16 GEMM,
       fp32 accumulation; the diagonal set to -2) give, for every row, the maximum of each group of 64 columns, read
       from each panel both ways as ``S`` is symmetric: ``(C, C / 64)`` group maxima.
    2. A row's exact neighbour lies in a group whose maximum is within :func:`screen_margin` of the row's best group
       (about 2.5 u for unit rows); the fp32 similarities of those (row, group) pairs are computed exactly (one
       small fp32 GEMM per group: about two groups per row on decoder-like data), and their argmax is the result.

    Faster than the fp32 search on a device with a fast bf16 GEMM: the bf16 GEMM does the bulk of the work and only
    about two groups per row are recomputed in fp32 (benchmarks/RESULTS.md).
    """
    C, d = D.shape
    G, dev = _GROUP, D.device
    block, panel, sub_rows = (block_rows(dev, kind) for kind in ("neighbour", "panel", "panel_sub"))
    Cp = -(-C // G) * G
    hi = torch.zeros(Cp, d, dtype=torch.bfloat16, device=dev)
    hi[:C] = D
    groups = torch.empty(Cp, Cp // G, dtype=torch.float32, device=dev)
    sub = torch.empty(min(sub_rows, block, Cp), min(panel, Cp), dtype=torch.float32, device=dev)
    with fp32_accumulation(dev):
        for i in range(0, Cp, block):  # row panel i: rows i..i+r against columns i.. (upper triangle), in pieces
            A = hi[i : i + block]
            r = A.shape[0]
            for j in range(i, Cp, panel):
                S = A @ hi[j : j + panel].T
                c = S.shape[1]
                if i == j:
                    S[:, :r].fill_diagonal_(-2.0)
                if j + c > C:
                    S[:, C - j :] = -2.0  # padding columns
                if i + r > C:
                    S[C - i :] = -2.0  # padding rows: the mirrored columns
                m = r if i == j else 0  # the diagonal block is symmetric: its rows already hold it
                for b in range(0, r, sub_rows):  # fp32 copies of a few rows, reduced while in cache
                    h = min(sub_rows, r - b)
                    Sf = sub[:h, :c]
                    Sf.copy_(S[b : b + h])
                    groups[i + b : i + b + h, j // G : (j + c) // G] = Sf.view(h, c // G, G).amax(-1)
                    if c > m:
                        groups[j + m : j + c, (i + b) // G : (i + b + h) // G] = Sf[:, m:].view(h // G, G, c - m).amax(1).T
    gmax = groups[:C]
    top = gmax.amax(1)
    margin = screen_margin(D, hi[:C], top)
    if not bool(torch.isfinite(margin).all()):  # NaN/inf rows: no certificate; the plain search says what it says
        return _nearest_in_chunk(D)
    rows, grp = (gmax >= (top - margin).unsqueeze(1)).nonzero(as_tuple=True)
    order = grp.argsort(stable=True)  # by group; rows stay ascending inside a group
    rows, grp = rows[order], grp[order]
    n_groups = Cp // G
    per_group = bucket_counts(grp, n_groups).tolist()  # pairs per group: the sizes of the GEMMs below
    # exact fp32 scores of every (row, group) pair: one GEMM per group into a (pairs, 64) buffer, one argmax
    S = torch.empty(rows.shape[0], G, dtype=D.dtype, device=dev)
    tail = C - (n_groups - 1) * G  # columns of the last group (the rest is padding)
    if tail < G:
        S[:, tail:] = -2.0
    start = 0
    with fp32_accumulation(dev):  # the exact fp32 similarities the certificate relies on
        for g, n in enumerate(per_group):
            if n:
                lo = g * G
                cols = min(G, C - lo)
                R = D.index_select(0, rows[start : start + n])  # a few hundred rows: cache-resident
                torch.mm(R, D[lo : lo + cols].T, out=S[start : start + n, :cols])
                start += n
    # pairs whose group holds the row itself: -2 at the row's own column (the diagonal), written through masks
    # (no read of which pairs those are)
    own_col = (rows % G).unsqueeze(1)
    S.scatter_(1, own_col, torch.where((rows // G == grp).unsqueeze(1), -2.0, S.gather(1, own_col)))
    val, idx = S.max(dim=1)  # first maximum on ties: the lowest column
    col = grp * G + idx
    # per row: the largest exact value, the lowest column among equal values (max/min reductions: deterministic;
    # pairs below the row's best value offer C, which never wins the minimum)
    best = torch.full((C,), -3.0, dtype=D.dtype, device=dev).scatter_reduce_(0, rows, val, "amax")
    tie = val == best.index_select(0, rows)
    arg = torch.full((C,), C, dtype=torch.long, device=dev).scatter_reduce_(0, rows, torch.where(tie, col, C), "amin")
    return arg


def nearest(D: Tensor, search: str) -> Tensor:
    """Each row's nearest other row in ``D (C, d)`` (unit rows, no gradient) by the ``search`` method of
    :func:`saelab.regularizers.c2r_loss`."""
    if search == "bf16":
        return _nearest_in_chunk(D.to(torch.bfloat16))
    screened = search == "exact" and D.dtype == torch.float32 and D.shape[0] >= _BLOCK and bf16_native(D.device)
    if screened:
        return _nearest_in_chunk_screened(D)
    with fp32_accumulation(D.device):  # "exact"/"fp32": full fp32 similarities, not TF32
        return _nearest_in_chunk(D)


class PairCosSq(torch.autograd.Function):
    """``s_j = max(0, cos(W_j, W_nu(j)))^2 (M,)`` for decoder rows ``W (M, d)`` and partners ``nu (M,)`` (0 where
    ``nu(j) = j``), with a hand-written backward that makes one pass over ``(M, d)`` instead of autograd through
    ``F.normalize``, the gathered rows and their product.

    ``cos = W_j . W_nu / (n_j n_nu)`` with ``n = max(||W||, 1e-12)`` (``F.normalize``'s eps). Forward: the dots
    ``W_j . W_nu(j)`` as one gather-dot kernel (embedding_bag's per-sample-weight gradient), without forming the
    gathered ``W_nu``. Backward, with ``g_j = 2 cos_j grad_s_j`` where ``cos_j > 0``, ``a_j = g_j / (n_j n_nu(j))``:

        ``grad W_j = (-g_j cos_j / n_j^2 - sum_{i: nu(i) = j} g_i cos_i / n_j^2) W_j + a_j W_nu(j)
        + sum_{i: nu(i) = j} a_i W_i``,

    i.e. ``grad W = alpha * W + P W`` for a sparse ``P`` of ``2 M`` entries: ONE ``F.embedding_bag`` over the rows
    of ``W`` with a bag per row (its own row, its partner, the latents whose partner it is;
    :func:`~saelab.kernels.pairs.bag_sums`, a fixed summation order: deterministic). It replaces ~6 memory-bound
    passes over ``(M, d)`` (the gathered ``W_nu``, two scaled copies, two ``addcmul``, an ``index_add_``), which
    shortens the OrtSAE step (benchmarks/RESULTS.md, 2026-12-05).
    """

    @staticmethod
    def forward(ctx, W: Tensor, nu: Tensor) -> Tensor:
        W = W.detach().contiguous()
        M = W.shape[0]
        n = torch.linalg.vector_norm(W, dim=-1).clamp_min(1e-12)
        ar = torch.arange(M, device=nu.device)
        dots = pair_dots(W, W, nu.unsqueeze(1)).squeeze(1)  # W_j . W_nu(j), without gathering W_nu
        inv = 1.0 / (n * n.index_select(0, nu))
        cos = dots * inv
        keep = (nu != ar) & (cos > 0)
        cos = torch.where(keep, cos, torch.zeros_like(cos))
        ctx.save_for_backward(W, nu, n, inv, cos)
        return cos.square()

    @staticmethod
    def backward(ctx, grad_s: Tensor):
        W, nu, n, inv, cos = ctx.saved_tensors
        M = W.shape[0]
        g = 2 * cos * grad_s  # 0 where the pair was dropped
        a = g * inv
        c = g * cos
        alpha = -(c + torch.zeros_like(c).index_add_(0, nu, c)) / n.square()  # own row: as j, and as nu(i) = j
        ar = torch.arange(M, device=nu.device)
        # row j's bag: (j, alpha_j), (nu(j), a_j), and (i, a_i) for every i with nu(i) = j
        grad = bag_sums(W, torch.cat([ar, nu, ar]), torch.cat([ar, ar, nu]), torch.cat([alpha, a, a]), M)
        return grad, None
