"""Regularizers on the sparse code and the decoder, chosen by name from ``REGULARIZERS``.

Each regularizer is a pure function of tensors; :class:`RegularizerSpec` adds its weight and schedule, parsed
from one string (``"c2r:lambda=5,every=5"``) or a YAML mapping (``{name: c2r, lambda: 5}``).

* ``c2r``: Cross-sample Consistency Regularization (Jin et al., ICML 2026, arXiv 2606.30609), exactly as
  ``dictionary_learning_demo/.../trainers/standard.py::compute_c2r_loss`` of the authors' repository
  (hr-jin/Cross-sample-Consistency-Regularization): each latent's nearest decoder neighbour inside a random
  chunk of latents, its squared positive cosine, weighted by the pair's batch activation norms (loss: appendix
  Eq. 19 and ``compute_c2r_loss``; schedule: the authors' ``batch_top_k.py`` trainer). By default the loss is
  rescaled so that its lambda is size-invariant (:func:`c2r_size_factor`); ``scale=raw`` keeps the authors' scaling.
* ``ortho``: the OrtSAE orthogonality penalty (dictionary_learning ``trainers/ort.py::get_orthogonal_loss``):
  the same nearest-neighbour cosine term without the activation weights.

Conventions: codes ``F (B, M)`` are the post-sparsification latent activations (what the decoder sees);
``W_dec (M, d)`` has the dictionary atoms as rows (saelab/SAELens layout; do not pass ``W_dec.T``, the
transposed-decoder bug of the C²R authors' ``trainers/jumprelu.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry
from .sae.activations import take_rows
from .sae.sparse import bag_sums, fast_bf16_gemm, fp32_accumulation, pair_dots

Codes = Tensor | tuple[Tensor, Tensor | None]
"""What the activation-weighted regularizers accept as the code of a batch, in any of three forms:
dense codes ``(B, M)``; a sparse code ``(values (B, k), indices (B, k))`` (e.g. a TopK
:class:`saelab.sae.activations.Code`; a ``Code`` with ``indices=None`` counts as dense); or the
precomputed column norms ``n (M,)`` (see :func:`column_norms`)."""


# -- activation norms ---------------------------------------------------------------------------------
def _safe_sqrt(sq: Tensor) -> Tensor:
    """``sqrt(sq)`` with gradient 0 (not inf/NaN) where ``sq == 0``."""
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def column_norms(code_values: Tensor, code_indices: Tensor | None, M: int) -> Tensor:
    """Per-latent L2 norm over the batch, ``n_j = ||F[:, j]||_2 = sqrt(sum_b F_bj^2)``.

    This is the ``sqrt(sum_i (z^(i))^2)`` term of C²R (Jin et al. 2026, appendix Eq. 19;
    ``compute_c2r_loss``'s ``feature_acts.norm(p=2, dim=0)``).

    Args:
        code_values: ``(B, k)`` active values with ``code_indices (B, k)`` their latent ids, or dense codes
            ``(B, M)`` when ``code_indices`` is None.
        code_indices: ``(B, k)`` latent ids or None.
        M: number of latents.

    Returns:
        ``(M,)`` column norms, summed over the non-zero entries with ``index_add`` (the sparse form is
        never densified). A column with no activation (a dead latent) has norm 0 and receives gradient 0,
        not NaN.
    """
    if code_indices is None:
        if code_values.dim() != 2 or code_values.shape[1] != M:
            raise ValueError(f"dense codes must have shape (B, M={M}), got {tuple(code_values.shape)}")
        # post-sparsification codes are mostly zeros: summing the non-zeros is faster than a dense column
        # reduction, and its backward writes one dense gradient instead of several passes over (B, M)
        rows, cols = code_values.detach().nonzero(as_tuple=True)
        code_values, code_indices = code_values[rows, cols], cols
    elif code_values.shape != code_indices.shape:
        raise ValueError(f"code values {tuple(code_values.shape)} and indices {tuple(code_indices.shape)} differ")
    sq = code_values.new_zeros(M).index_add(0, code_indices.flatten(), code_values.flatten().square())
    return _safe_sqrt(sq)


def _norms_of(codes: Codes, M: int) -> Tensor:
    if isinstance(codes, tuple):
        values, indices = codes[0], codes[1]  # Code, NormCode or a plain (values, indices) pair
        return column_norms(values, indices, M)
    if codes.dim() == 1:
        if codes.shape[0] != M:
            raise ValueError(f"column norms must have shape (M,)=({M},), got {tuple(codes.shape)}")
        return codes
    if codes.dim() == 2:
        return column_norms(codes, None, M)
    raise ValueError(
        f"codes must be dense (B, M), sparse (values, indices) or column norms (M,); got shape {tuple(codes.shape)}"
    )


# -- nearest decoder neighbour inside random chunks -----------------------------------------------------
_BLOCK = 1024
"""Rows per block of the neighbour search: one ``(1024, 1024)`` similarity block (4 MiB) exists at a time."""


@torch.no_grad()
def _nearest_in_chunk(D: Tensor) -> Tensor:
    """For unit rows ``D (C, d)``: ``(C,)`` index of each row's most cosine-similar *other* row.

    ``argmax_k S_jk`` of ``S = D D^T`` with the diagonal set to -2 (the reference's ``fill_diagonal_(-2)``),
    computed over the upper-triangular blocks only (``S`` is symmetric: each block updates the best
    neighbour of its rows and, transposed, of its columns), which halves the matmul work. Ties go to the
    lowest index. A chunk of one row returns itself (no other row). The mirrored (column) update takes the column
    maxima with ``amax`` and the argmax only for columns that improve, on a row-major copy of those columns: a
    ``max(dim=0)`` with indices is a strided reduction, ~25x slower on CPU than ``max(dim=1)``.
    """
    C = D.shape[0]
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
        val = S.amax(dim=0).to(dtype)
        better = (val > best[start : start + S.shape[1]]).nonzero().squeeze(1)
        if better.numel():
            best[start + better] = val[better]
            arg[start + better] = S.T.index_select(0, better).argmax(dim=1) + offset  # first maximum on ties

    for i in range(0, C, _BLOCK):
        for j in range(i, C, _BLOCK):
            S = D[i : i + _BLOCK] @ D[j : j + _BLOCK].T
            if i == j:
                S.fill_diagonal_(-2.0)
            update(i, S.max(dim=1), j)  # rows i.. against columns j..
            if j != i:
                update_columns(j, S, i)  # rows j.. against columns i.. (the mirrored block)
    return arg


# -- the same search, screened by one bf16 GEMM ---------------------------------------------------------
_GROUP = 64
"""Columns per group of the screened search: each row keeps the bf16 maximum of every group of 64 columns."""

_PANEL = 8192
"""Columns per GEMM of the screened search: ``(1024, 8192)`` bf16 panels (16 MiB) run the bf16 GEMM at about twice
the rate of ``1024 x 1024`` blocks on CPU (``benchmarks/RESULTS.md``); wider outputs would pass glibc's mmap threshold
(:func:`saelab.runtime.tune_cpu_memory`) and be page-faulted in on every call."""

_SUB = 128
"""Rows per reduction of a screened panel: the bf16 scores are reduced to group maxima in fp32 copies of 128 rows
(4 MiB, cache-resident), ~1.4x faster than reducing the bf16 panel itself (torch's bf16 reductions run ~3x slower
than its fp32 ones on CPU)."""

_BF16_U = 2.0**-8
"""Unit roundoff of bfloat16 (8 significant bits, round to nearest)."""


def _gamma(K: int) -> float:
    """``gamma_K = K u / (1 - K u)`` with the fp32 unit roundoff ``u = 2^-24``: the relative error bound of a K-term
    fp32 dot product (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Eq. 3.5)."""
    return K * 2.0**-24 / (1 - K * 2.0**-24)


def screen_margin(D: Tensor, hi: Tensor, top: Tensor) -> Tensor:
    """``(C,)`` per-row margin ``m_j`` of the screened neighbour search: the exact nearest neighbour of row ``j``
    lies in a column group whose bf16 maximum is at least ``top_j - m_j``.

    Derivation, for unit rows ``D (C, d)`` fp32, their bf16 roundings ``hi`` and ``lo = D - hi`` (exact in fp32):
    ``D_j . D_i = hi_j . hi_i + lo_j . hi_i + hi_j . lo_i + lo_j . lo_i``, so the bf16 GEMM (products exact in fp32,
    fp32 accumulation, output rounded to bf16) gives ``S~_ji`` with

        ``|S~_ji - D_j . D_i| <= e_j + 1.004 u |S~_ji|``,
        ``e_j = lam_j eta_max + eta_j lam_max + lam_j lam_max + gamma_d eta_j eta_max``

    (Cauchy-Schwarz on each cross term; ``eta = ||hi||``, ``lam = ||lo||`` per row, maxima over the chunk;
    ``u = 2^-8``; the ``1.004 u |S~|`` term is the output rounding, ``u |A| <= u |S~| / (1 - u)``). The fp32 values
    that decide the winner carry ``gamma_d ||D_j|| ||D_i||`` each. If ``w`` wins on the fp32 values and ``y`` holds
    the row's bf16 maximum ``top_j = S~_jy``, chaining the bounds gives ``S~_jw >= top_j - m_j`` with

        ``m_j = 1.01 (1 + 3u) (2 e_j + 2 gamma_d n_j n_max + 2.008 u |top_j|)``, ``n = ||D||``,

    (the ``(1 + 3u)`` absorbs ``|S~_jw| <= |top_j| + m_j``; 1.01 covers the rounding of the norms). Checked against
    float64 for every row of random, clustered and spiky decoders in ``tests/test_regularizers.py``.

    Args:
        D: ``(C, d)`` fp32 rows.
        hi: ``(C, d)`` their bf16 roundings.
        top: ``(C,)`` fp32 per-row maxima of the bf16 scores.
    """
    C = D.shape[0]
    eta, lam, n = (torch.empty(C, dtype=torch.float32, device=D.device) for _ in range(3))
    for b in range(0, C, _BLOCK):  # per block of rows, in cache: ||hi||, ||D - hi|| (exact in fp32), ||D||
        rows = slice(b, b + _BLOCK)
        hi32 = hi[rows].float()
        torch.linalg.vector_norm(hi32, dim=1, out=eta[rows])
        torch.linalg.vector_norm(D[rows], dim=1, out=n[rows])
        torch.linalg.vector_norm(hi32.sub_(D[rows]), dim=1, out=lam[rows])
    g = _gamma(D.shape[1])
    e = lam * eta.max() + eta * lam.max() + lam * lam.max() + g * eta * eta.max()
    return (1.01 * (1 + 3 * _BF16_U)) * (2 * e + 2 * g * n * n.max() + 2.008 * _BF16_U * top.abs())


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
    Cp = -(-C // G) * G
    hi = torch.zeros(Cp, d, dtype=torch.bfloat16, device=dev)
    hi[:C] = D
    groups = torch.empty(Cp, Cp // G, dtype=torch.float32, device=dev)
    sub = torch.empty(_SUB, min(_PANEL, Cp), dtype=torch.float32, device=dev)
    with fp32_accumulation(dev):
        for i in range(0, Cp, _BLOCK):  # row panel i: rows i..i+r against columns i.. (upper triangle), in pieces
            A = hi[i : i + _BLOCK]
            r = A.shape[0]
            for j in range(i, Cp, _PANEL):
                S = A @ hi[j : j + _PANEL].T
                c = S.shape[1]
                if i == j:
                    S[:, :r].fill_diagonal_(-2.0)
                if j + c > C:
                    S[:, C - j :] = -2.0  # padding columns
                if i + r > C:
                    S[C - i :] = -2.0  # padding rows: the mirrored columns
                m = r if i == j else 0  # the diagonal block is symmetric: its rows already hold it
                for b in range(0, r, _SUB):  # fp32 copies of a few rows, reduced while in cache
                    h = min(_SUB, r - b)
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
    per_group = torch.bincount(grp, minlength=n_groups).tolist()
    # exact fp32 scores of every (row, group) pair: one GEMM per group into a (pairs, 64) buffer, one argmax
    S = torch.empty(rows.shape[0], G, dtype=D.dtype, device=dev)
    tail = C - (n_groups - 1) * G  # columns of the last group (the rest is padding)
    if tail < G:
        S[:, tail:] = -2.0
    start = 0
    for g, n in enumerate(per_group):
        if n:
            lo = g * G
            cols = min(G, C - lo)
            R = D.index_select(0, rows[start : start + n])  # a few hundred rows: cache-resident
            torch.mm(R, D[lo : lo + cols].T, out=S[start : start + n, :cols])
            start += n
    own = (rows // G == grp).nonzero().squeeze(1)  # pairs whose group holds the row itself
    S[own, rows[own] % G] = -2.0
    val, idx = S.max(dim=1)  # first maximum on ties: the lowest column
    col = grp * G + idx
    # per row: the largest exact value, the lowest column among equal values (max/min reductions: deterministic)
    best = torch.full((C,), -3.0, dtype=D.dtype, device=dev).scatter_reduce_(0, rows, val, "amax")
    tie = val == best[rows]
    arg = torch.full((C,), C, dtype=torch.long, device=dev).scatter_reduce_(0, rows[tie], col[tie], "amin")
    return arg


def _nearest(D: Tensor, search: str) -> Tensor:
    """Each row's nearest other row in ``D (C, d)`` (unit rows, no gradient) by the ``search`` method of
    :func:`c2r_loss`."""
    if search == "bf16":
        return _nearest_in_chunk(D.to(torch.bfloat16))
    screened = search == "exact" and D.dtype == torch.float32 and D.shape[0] >= _BLOCK and fast_bf16_gemm(D.device)
    return _nearest_in_chunk_screened(D) if screened else _nearest_in_chunk(D)


def _neighbour_cos_sq(W_dec: Tensor, chunk_size: int, generator: torch.Generator | None, search: str) -> tuple[Tensor, Tensor]:
    """``(s, nu)``: ``nu (M,)`` each latent's nearest decoder neighbour inside its random chunk (no gradient)
    and ``s_j = max(0, cos(d_j, d_nu(j)))^2 (M,)`` (gradient into ``W_dec``; 0 for a chunk of one latent).

    The chunks are ``torch.randperm(M, generator=generator)`` (drawn on ``generator``'s device, CPU by
    default, so ``generator=None`` uses and advances torch's global CPU RNG) cut into pieces of
    ``chunk_size``; with ``chunk_size >= M`` there is one chunk, no permutation is drawn and the result is
    deterministic. The search follows ``search`` (see :func:`c2r_loss`); ``s`` is always recomputed in
    ``W_dec``'s dtype from the chosen pairs, which gives the same value and gradient as ``max`` over the chunk's
    similarity row (the max passes its gradient to the argmax entry only).

    Raises:
        ValueError: ``chunk_size < 1`` or an unknown ``search``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if search not in SEARCHES:
        raise ValueError(f"unknown neighbour search {search!r}; valid: {', '.join(SEARCHES)}")
    M = W_dec.shape[0]
    Ds = F.normalize(W_dec.detach(), dim=-1)
    if chunk_size >= M:
        nu = _nearest(Ds, search)
    else:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        perm = torch.randperm(M, generator=generator, device=gen_device).to(W_dec.device)
        nu = torch.empty(M, dtype=torch.long, device=W_dec.device)
        for idx in perm.split(chunk_size):
            nu[idx] = idx[_nearest(Ds.index_select(0, idx), search)]
    return _PairCosSq.apply(W_dec, nu), nu


class _PairCosSq(torch.autograd.Function):
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
    :func:`~saelab.sae.sparse.bag_sums`, a fixed summation order: deterministic). It replaces ~6 memory-bound
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


SEARCHES = ("exact", "fp32", "bf16")
"""Neighbour-search methods of :func:`c2r_loss` / :func:`ortho_loss` (the regularizer spec's ``search`` key)."""


# -- losses -------------------------------------------------------------------------------------------
C2R_REFERENCE = {"d_sae": 65_536, "l0": 60.0, "batch_size": 2048}
"""The operating point at which the authors set lambda = 5 (C²R paper run: dictionary 65,536, target L0 60, SAE batch
2,048; the authors' ``pipeline.sh``). The size-invariant scaling equals their raw loss exactly there."""

C2R_SCALES = ("invariant", "raw")
"""How :func:`c2r_loss` scales the penalty: ``invariant`` multiplies the authors' loss by :func:`c2r_size_factor`
(the default of the ``c2r`` regularizer), ``raw`` is ``compute_c2r_loss`` unchanged."""


def c2r_size_factor(d_sae: int, batch_size: int, l0: float, alpha: float = 1.0) -> float:
    """The factor that makes one C²R ``lambda`` mean the same strength at any dictionary size, sparsity and batch.

    Derivation (per code entry, relative to the reconstruction gradient). Let latent j fire on about
    ``c = B L0 / M`` of the batch's ``B`` tokens with values of order ``f``. Its column norm is then
    ``n_j = ||F[:, j]|| ~ f sqrt(B L0 / M)``. The authors' loss ``(1/M) sum_j s_j (n_j + n_nu(j))^alpha`` has, on an
    active entry ``F_bj``,

        dL/dF_bj = (alpha / M) (s_j + sum_{i: nu(i) = j} s_i) (n_j + n_nu(j))^(alpha - 1) F_bj / n_j
                 ~ s f^(alpha - 1) M^(-1) (B L0 / M)^((alpha - 2) / 2),

    while the reconstruction loss ``(1/B) sum_b ||x_b - x_hat_b||^2`` has ``dMSE/dF_bj = -(2/B) e_b . d_j ~ 1/B``.
    Their ratio scales as ``R(M, B, L0) = (B / M)^(alpha / 2) L0^(alpha / 2 - 1)`` (for alpha = 1:
    ``sqrt(B / (M L0))``: the same lambda acts about 7x stronger at M 2,304, L0 32, B 2,048 than at the authors'
    M 65,536, L0 60, B 2,048). Multiplying the loss by ``R(reference) / R(M, B, L0)`` keeps the ratio at its value
    at the authors' operating point (:data:`C2R_REFERENCE`), where the factor is exactly 1.

    The derivation assumes most latents fire several times per batch (``B L0 / M`` of a few or more); where many
    fire at most once per batch, the total gradient norm over the batch falls further, by about the square root of
    the fraction of latents that fire at all.

    Args:
        d_sae: dictionary size ``M``.
        batch_size: tokens per batch ``B`` over which the column norms are taken.
        l0: mean active latents per token (measured on the batch).
        alpha: the exponent of the pair weight (paper default 1).

    Returns:
        The positive factor (1.0 at the reference point).

    Raises:
        ValueError: a non-positive size, batch or L0.
    """
    if d_sae <= 0 or batch_size <= 0 or not l0 > 0:
        raise ValueError(f"c2r_size_factor needs d_sae, batch_size and l0 > 0, got {d_sae}, {batch_size}, {l0}")

    def ratio(M: float, B: float, L0: float) -> float:
        return (B / M) ** (alpha / 2) * L0 ** (alpha / 2 - 1)

    ref = C2R_REFERENCE
    return ratio(ref["d_sae"], ref["batch_size"], ref["l0"]) / ratio(d_sae, batch_size, l0)


def _batch_and_l0(codes: Codes, batch_size: int | None, l0: float | None) -> tuple[int, float]:
    """``(B, L0)`` of the batch: given, or measured on dense / sparse codes (column norms carry neither)."""
    if batch_size is not None and l0 is not None:
        return batch_size, l0
    values = codes[0] if isinstance(codes, tuple) else codes
    if values.dim() != 2:
        raise ValueError("scale='invariant' with precomputed column norms needs batch_size= and l0= (the batch's "
                         "token count and mean active latents per token); or pass the codes themselves")
    B = values.shape[0]
    return (batch_size or B), (l0 if l0 is not None else float(torch.count_nonzero(values.detach())) / max(B, 1))


def c2r_loss(
    codes: Codes,
    W_dec: Tensor,
    *,
    alpha: float = 1.0,
    chunk_size: int = 8192,
    generator: torch.Generator | None = None,
    search: str = "exact",
    scale: str = "raw",
    batch_size: int | None = None,
    l0: float | None = None,
) -> Tensor:
    """C²R, Cross-sample Consistency Regularization (Jin et al., ICML 2026, arXiv 2606.30609).

    ``L = (1/M) sum_j s_j (n_j + n_nu(j))^alpha`` with

    * ``n_j = ||F[:, j]||_2`` the latent's activation norm over the batch (appendix Eq. 19);
    * ``nu(j) = argmax_{k in C(j), k != j} cos(d_j, d_k)``, the nearest decoder row inside ``j``'s chunk
      ``C(j)`` of a random permutation of the latents cut into chunks of ``chunk_size`` (no gradient);
    * ``s_j = max(0, cos(d_j, d_nu(j)))^2`` with ``d_j`` the decoder rows, normalised here.

    ``compute_c2r_loss`` of the authors' code (``dictionary_learning_demo/.../trainers/standard.py``), value and
    gradients, except that no permutation is drawn when ``chunk_size >= M`` (the result does not depend on it) and a
    dead latent (``n_j = 0``) gets gradient 0 where ``torch.norm`` would too. Gradients flow into the codes through
    ``n`` and into ``W_dec`` through ``s`` (and the row normalisation); ``nu`` passes none.

    Args:
        codes: the batch's post-sparsification codes, dense ``(B, M)``, sparse ``(values, indices)`` or
            precomputed column norms ``n (M,)`` (:data:`Codes`, :func:`column_norms`).
        W_dec: ``(M, d)`` decoder, one atom per row.
        alpha: exponent of the activation weight (paper default 1).
        chunk_size: neighbours are searched inside random chunks of this many latents (paper: 8192).
        generator: RNG of the chunk permutation (see :func:`_neighbour_cos_sq`); None: torch's global RNG.
        search: how the nearest neighbours are found (:data:`SEARCHES`):

            * ``"exact"`` (default): the argmax of the similarities in ``W_dec``'s dtype. For fp32 chunks of at
              least one 1024-row block on a device with a fast bf16 GEMM (:func:`saelab.sae.sparse.fast_bf16_gemm`:
              CUDA, AVX-512 BF16 / AMX CPUs) it is screened by a bf16 GEMM with a certified error bound
              (:func:`_nearest_in_chunk_screened`, several times faster there); the pairs are those of ``"fp32"`` up to
              fp32 rounding of the similarities.
            * ``"fp32"``: the plain blocked search in ``W_dec``'s dtype (the reference for ``"exact"``).
            * ``"bf16"``: the search matmul in bfloat16, no certificate: a near-tie may pick another neighbour
              whose cosine is lower by at most about 4e-3 (bf16 rounding); the paper's runs used bf16 autocast.

        scale: ``"raw"`` (this function's default): the authors' loss, whose strength relative to reconstruction
            grows like ``sqrt(B / (M L0))``; ``"invariant"`` (the ``c2r`` regularizer's default): the raw loss times
            :func:`c2r_size_factor`, so that a lambda means what it means at the authors' operating point
            (:data:`C2R_REFERENCE`) at any ``d_sae``, L0 and batch size.
        batch_size, l0: the batch's token count and mean active latents per token for ``scale="invariant"``;
            measured on the codes when omitted (required with precomputed column norms).

    Raises:
        ValueError: unknown ``search`` or ``scale``, ``chunk_size < 1``, or codes of the wrong shape.

    Returns:
        Scalar loss in ``W_dec``'s dtype. Cost: ``O(M * chunk_size * d)`` for the search (no gradient),
        ``O(M d)`` plus the norms for the differentiable part.
    """
    if scale not in C2R_SCALES:
        raise ValueError(f"unknown C²R scale {scale!r}; valid: {', '.join(C2R_SCALES)}")
    M = W_dec.shape[0]
    factor = c2r_size_factor(M, *_batch_and_l0(codes, batch_size, l0), alpha) if scale == "invariant" else 1.0
    n = _norms_of(codes, M).to(W_dec.dtype)
    s, nu = _neighbour_cos_sq(W_dec, chunk_size, generator, search)
    pair = n + take_rows(n, nu)
    if alpha != 1.0:  # (0)^alpha has an infinite derivative for alpha < 1: give pairs of dead latents weight 0
        live = pair > 0
        pair = torch.where(live, torch.where(live, pair, torch.ones_like(pair)).pow(alpha), torch.zeros_like(pair))
    return (s * pair).sum() * (factor / M)


def ortho_loss(
    W_dec: Tensor,
    *,
    chunk_size: int = 8192,
    generator: torch.Generator | None = None,
    search: str = "exact",
) -> Tensor:
    """OrtSAE orthogonality penalty ``L = (1/M) sum_j max(0, cos(d_j, d_nu(j)))^2``.

    ``nu(j)`` is the nearest decoder row inside ``j``'s random chunk, as in :func:`c2r_loss` (same
    arguments); OrtSAE (dictionary_learning ``trainers/ort.py::get_orthogonal_loss``, paper weight 0.25).
    C²R is this term weighted by ``(n_j + n_nu(j))^alpha``: with equal column norms ``n``,
    ``c2r_loss = (2 n)^alpha * ortho_loss``.

    Note: ``get_orthogonal_loss`` averages the per-chunk means, which weights the latents of a short last
    chunk more when ``chunk_size`` does not divide ``M``; this is the plain mean over latents (identical
    when ``chunk_size`` divides ``M`` or exceeds it).

    Returns:
        Scalar loss in ``W_dec``'s dtype; gradient into ``W_dec``.

    Raises:
        ValueError: unknown ``search`` or ``chunk_size < 1``.
    """
    s, _ = _neighbour_cos_sq(W_dec, chunk_size, generator, search)
    return s.mean()


# -- registry and specs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Regularizer:
    """A ``REGULARIZERS`` entry.

    Attributes:
        fn: the loss; called as ``fn(codes, W_dec, **kw)`` when ``needs_codes`` else ``fn(W_dec, **kw)``.
        defaults: every valid spec key with its default: ``lambda`` (coefficient), ``every`` (T) and the
            keyword parameters of ``fn`` under their spec keys (see ``_KWARGS``).
        needs_codes: whether ``fn`` reads the batch's codes.
    """

    fn: Callable[..., Tensor]
    defaults: dict[str, Any]
    needs_codes: bool


REGULARIZERS: Registry[Regularizer] = Registry("regularizer")
REGULARIZERS.register("c2r")(
    Regularizer(c2r_loss, {"lambda": 5.0, "every": 5, "alpha": 1.0, "chunk": 8192, "search": "exact", "scale": "invariant"},
                needs_codes=True)
)
REGULARIZERS.register("ortho")(
    Regularizer(ortho_loss, {"lambda": 0.25, "every": 1, "chunk": 8192, "search": "exact"}, needs_codes=False)
)

_KWARGS = {"alpha": "alpha", "chunk": "chunk_size", "search": "search", "scale": "scale"}
"""Spec key -> keyword argument of the loss function."""


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    """``value`` (a string from the one-line form, or a YAML scalar) converted to the type of ``default``."""
    where = f"regularizer {name!r}: {key}={value!r}"
    if isinstance(value, bool):
        raise ValueError(f"{where} must be a number")
    if isinstance(default, str):
        value = str(value).strip()
        valid = {"search": SEARCHES, "scale": C2R_SCALES}.get(key, (value,))
        if value not in valid:
            raise ValueError(f"{where}: valid values: {', '.join(valid)}")
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where} must be finite")
    if isinstance(default, int):
        if number != int(number):
            raise ValueError(f"{where} must be an integer")
        number = int(number)
    lower = {"every": 1, "chunk": 2}.get(key, 0)  # chunks of one latent have no neighbour: the loss would be 0
    if number < lower:
        raise ValueError(f"{where} must be >= {lower}")
    return number


@dataclass(frozen=True)
class RegularizerSpec:
    """A regularizer with its weight and schedule: ``loss += coefficient * every * fn(...)`` every ``every`` steps.

    Written as ``"c2r"``, ``"c2r:lambda=5,alpha=1,every=5,chunk=8192"`` or ``"ortho:lambda=0.25"``
    (:func:`parse_regularizer`), or as a mapping ``{name: c2r, lambda: 5}`` (:meth:`from_dict`). Keys missing
    take the registry defaults (the C²R paper run, authors' ``pipeline.sh``: c2r lambda 5, alpha 1, every 5, chunk
    8192; OrtSAE: ortho lambda 0.25, every 1, chunk 8192). ``search`` is ``exact`` (default), ``fp32`` or ``bf16``
    (the neighbour-search methods of :func:`c2r_loss`). C²R's ``scale`` is ``invariant`` (default: lambda means the
    strength it has at the authors' operating point, at any size; :func:`c2r_size_factor`) or ``raw`` (the authors'
    loss unchanged, whose strength grows like ``sqrt(B / (d_sae L0))``).

    Attributes:
        name: a ``REGULARIZERS`` name.
        coefficient: the weight ``lambda`` (on the training scale, i.e. E||x||^2 = 1 when inputs are normalised).
        every: ``T``: the loss is computed on steps ``0, T, 2T, ...`` and multiplied by ``T`` (the authors'
            ``trainers/batch_top_k.py``, ``aux_loss_interval``), so its average weight per step stays ``lambda``.
        params: the loss function's parameters under their spec keys (``alpha``, ``chunk``, ``search``).
    """

    name: str
    coefficient: float
    every: int = 1
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_codes(self) -> bool:
        """Whether :meth:`compute` needs the batch's codes (False: pass None)."""
        return REGULARIZERS.get(self.name).needs_codes

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RegularizerSpec:
        """Build from ``{name: c2r, lambda: 5, every: 5, alpha: 1, chunk: 8192}`` (only ``name`` required).

        Raises:
            ValueError: no or unknown name (lists the valid names), unknown key (lists the valid keys), or
                a value of the wrong type or range.
        """
        if not isinstance(d, Mapping) or "name" not in d:
            raise ValueError(f"a regularizer mapping needs a 'name' (one of {', '.join(REGULARIZERS.names())}), got {d!r}")
        name = str(d["name"]).strip()
        if name not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {name!r}; valid regularizers: {', '.join(REGULARIZERS.names())}")
        defaults = REGULARIZERS.get(name).defaults
        values = dict(defaults)
        for key, value in d.items():
            if key == "name":
                continue
            if key not in defaults:
                raise ValueError(f"unknown key {key!r} for regularizer {name!r}; valid keys: {', '.join(defaults)}")
            values[key] = _coerce(name, key, value, defaults[key])
        coefficient, every = values.pop("lambda"), values.pop("every")
        return cls(name=name, coefficient=float(coefficient), every=int(every), params=values)

    def to_dict(self) -> dict[str, Any]:
        """The mapping form (inverse of :meth:`from_dict`), with every key spelled out."""
        return {"name": self.name, "lambda": self.coefficient, "every": self.every, **self.params}

    def __str__(self) -> str:
        """The one-line form (inverse of :func:`parse_regularizer`), e.g. ``c2r:lambda=5.0,every=5,alpha=1.0,chunk=8192,search=exact``."""
        d = self.to_dict()
        return d.pop("name") + ":" + ",".join(f"{k}={v}" for k, v in d.items())

    def loss(self, codes: Codes | None, W_dec: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The unweighted loss ``fn(codes, W_dec, **params)`` (for logging); ``codes`` is ignored unless :attr:`needs_codes`."""
        entry = REGULARIZERS.get(self.name)
        kw = {_KWARGS[k]: v for k, v in self.params.items()}
        if entry.needs_codes:
            if codes is None:
                raise ValueError(f"regularizer {self.name!r} needs the batch's codes")
            return entry.fn(codes, W_dec, generator=generator, **kw)
        return entry.fn(W_dec, generator=generator, **kw)

    def compute(self, step: int, codes: Codes | None, W_dec: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
        """The term to add to the training loss at ``step`` (counted from 0).

        Returns:
            None when ``step % every != 0`` (nothing is computed), else ``coefficient * every * loss``
            (the authors' ``BatchTopKTrainer.loss``: ``c2r_penalty * compute_c2r_loss(f, W_dec) * aux_loss_interval`` on
            steps ``0, T, 2T, ...``).
        """
        if step % self.every != 0:
            return None
        return self.coefficient * self.every * self.loss(codes, W_dec, generator)


def parse_regularizer(spec: str) -> RegularizerSpec:
    """Parse ``"name"`` or ``"name:key=value,key=value"``, e.g. ``"c2r:lambda=5,every=5"``.

    Raises:
        ValueError: unknown name (lists the valid names), unknown key (lists the valid keys), an item
            without ``=``, a repeated key, or a bad value.
    """
    name, _, rest = spec.strip().partition(":")
    d: dict[str, Any] = {"name": name.strip()}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"regularizer spec {spec!r}: expected key=value, got {item!r}")
        if key in d:
            raise ValueError(f"regularizer spec {spec!r}: key {key!r} given twice")
        d[key] = value.strip()
    return RegularizerSpec.from_dict(d)


def as_regularizer_spec(obj: str | Mapping[str, Any] | RegularizerSpec) -> RegularizerSpec:
    """A :class:`RegularizerSpec` from its one-line form, its mapping form, or itself."""
    if isinstance(obj, RegularizerSpec):
        return obj
    if isinstance(obj, str):
        return parse_regularizer(obj)
    return RegularizerSpec.from_dict(obj)
