"""The certified bf16 screening shared by the TopK-style selection and C²R's neighbour search.

A bf16 GEMM (fp32 accumulation, output rounded to bf16) approximates fp32 scores; a bound on its error, derived
from the operands' rounding residues (Cauchy-Schwarz on the cross terms), the fp32 accumulation error ``gamma_K``
(Higham 2002, Eq. 3.5) and the output rounding (``BF16_U``), tells which entries can still be the exact winners.
Those few are recomputed in exact fp32, so the selection equals the fp32 one up to float ties:

* :func:`screen_candidates`: each token's candidate latents for TopK / BatchTopK / Matryoshka (bound:
  :func:`screen_slack`, :func:`screen_rel`);
* :func:`screen_margin`: each decoder row's candidate neighbour groups for C²R (:mod:`saelab.kernels.neighbours`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from .blocks import block_rows, padded_width
from .pairs import pair_dots
from .scores import ScoreOperands, apply_scale_law_
from .topk import row_topk

BF16_U = 2.0**-8
"""Unit roundoff of bfloat16 (8 significant bits, round to nearest)."""

def fp32_gamma(K: int) -> float:
    """``gamma_K = K u / (1 - K u)`` with the fp32 unit roundoff ``u = 2^-24``: the relative error bound of a K-term
    fp32 dot product (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Eq. 3.5)."""
    return K * 2.0**-24 / (1 - K * 2.0**-24)


def bf16_product_error(lo_a: Tensor, hi_a: Tensor, b_max: Tensor, lo_b: Tensor, hi_b: Tensor, K: int) -> Tensor:
    """Bound on the error of a bf16 GEMM before its output rounding, the one derivation both screenings use.

    For rows ``A_n`` and ``B_i`` (fp32, length ``K``) split as ``A = hi(A) + lo(A)`` with ``hi`` the bf16 rounding and
    ``lo`` its residue (exact in fp32), a GEMM of the bf16 factors with fp32 accumulation returns ``g~`` with

        ``|g~ - A_n . B_i| <= |lo(A_n) . B_i| + |hi(A_n) . lo(B_i)| + gamma_K ||hi(A_n)|| ||hi(B_i)||``
        ``<= lo_a b_max + hi_a lo_b + gamma_K hi_a hi_b``

    (Cauchy-Schwarz on the two residue terms; Higham 2002, Eq. 3.5 for the accumulation).

    Args:
        lo_a: ``(n,)`` ``||lo(A_n)||``.
        hi_a: ``(n,)`` bounds on ``||hi(A_n)||``.
        b_max: bound on every ``||B_i||``.
        lo_b: bound on every ``||lo(B_i)||``.
        hi_b: bound on every ``||hi(B_i)||``.
        K: terms per dot product (the accumulation length).

    Returns:
        ``(n,)`` the bound per row of ``A``.
    """
    return lo_a * b_max + hi_a * lo_b + fp32_gamma(K) * hi_a * hi_b


class Candidates(NamedTuple):
    """Per-token candidates for a pair selection, with a certificate for everything left out.

    Produced by the screened selection of :mod:`saelab.kernels.sparse_step` (a bf16 GEMM finds each token's likely top
    entries, their exact values are then recomputed) and consumed by the selecting activations'
    ``select_from_candidates``.

    Attributes:
        values: ``(N, m)`` exact pre-activations of the candidates.
        cols: ``(N, m)`` int64 their latent ids.
        bound: ``(N,)`` every pre-activation of token ``n`` that is not a candidate is ``<= bound[n]``.
        full_rows: ``rows (r,) -> (r, d_sae)`` the exact full pre-activations of some tokens (the fallback for
            tokens whose selection the candidates cannot certify).
        stats: filled by the selection (``redone_rows``: tokens that needed ``full_rows`` or ``more``).
        more: ``(rows (r,), width) -> (values, cols (r, width), bound (r,))`` a wider candidate set of some tokens,
            with the same guarantees (None: use ``full_rows``).
    """

    values: Tensor
    cols: Tensor
    bound: Tensor
    full_rows: Callable[[Tensor], Tensor]
    stats: dict
    more: Callable[[Tensor, int], tuple[Tensor, Tensor, Tensor]] | None = None


_FLAGS_LOCK = threading.Lock()
_flags_state: dict = {"depth": 0, "saved": None}
"""Nesting depth of :func:`fp32_accumulation` over all threads and the CUDA flags saved at the outermost entry."""


def _cuda_precision_flags() -> tuple[bool, bool, bool]:
    m = torch.backends.cuda.matmul
    return m.allow_tf32, torch.backends.cudnn.allow_tf32, m.allow_bf16_reduced_precision_reduction


def _set_cuda_precision_flags(tf32: bool, cudnn_tf32: bool, bf16_reduction: bool) -> None:
    m = torch.backends.cuda.matmul
    m.allow_tf32, torch.backends.cudnn.allow_tf32, m.allow_bf16_reduced_precision_reduction = tf32, cudnn_tf32, bf16_reduction


@contextmanager
def fp32_accumulation(device: torch.device) -> Iterator[None]:
    """Inside this block, GEMMs on a CUDA ``device`` accumulate in full fp32, as the error bounds of
    :func:`screen_candidates` and :func:`screen_margin` and the exact fp32 recomputations they certify assume: TF32 is
    off for fp32 matmuls and cuDNN (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``;
    TF32 keeps 10 mantissa bits, an error ~2^-11 the bounds do not cover) and bf16 GEMMs do not reduce in bf16
    (``allow_bf16_reduced_precision_reduction``). The flags are process-wide: they are saved when the first block
    (over all threads, e.g. :func:`saelab.train.train_many`'s concurrent SAEs) opens and restored when the last one
    closes. Other devices: no change (CPU fp32 GEMMs have no TF32 mode)."""
    if torch.device(device).type != "cuda":
        yield
        return
    with _FLAGS_LOCK:
        if _flags_state["depth"] == 0:
            _flags_state["saved"] = _cuda_precision_flags()
            _set_cuda_precision_flags(False, False, False)
        _flags_state["depth"] += 1
    try:
        yield
    finally:
        with _FLAGS_LOCK:
            _flags_state["depth"] -= 1
            if _flags_state["depth"] == 0:
                _set_cuda_precision_flags(*_flags_state["saved"])


def _post(ops: ScoreOperands, dots: Tensor, cols: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """Scores from dot products ``L . R_T[i]`` (in place): times the scale ``exp(a_i log_norm_n + b_i)`` when
    ``ops.a`` is set, ``+ bias``, then ReLU when ``ops.relu``. ``dots`` holds latents ``cols`` (broadcast like
    ``dots``; all latents when None) of tokens ``rows`` (all tokens when None)."""
    if ops.a is not None:
        log_norm = ops.log_norm if rows is None else ops.log_norm[rows]
        a, b = (ops.a, ops.b) if cols is None else (ops.a[cols], ops.b[cols])
        dots.mul_(torch.addcmul(b, log_norm.unsqueeze(1), a).exp_())
    if ops.bias is not None:
        dots.add_(ops.bias if cols is None else ops.bias[cols])
    return dots.relu_() if ops.relu else dots


Alloc = Callable[[str, tuple[int, ...], torch.dtype, torch.device], Tensor]
"""``(name, shape, dtype, device) -> tensor``: where the screened selection gets its scratch tensors."""


def _fresh(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _bf16_operand(t: Tensor, col: Tensor | float | None, out: Tensor, scratch: Tensor) -> Tensor:
    """Write the bf16 GEMM operand ``[bf16(t), col, 0...]`` (``t (n, K)`` fp32) into ``out (n, K')`` bf16,
    ``K' >= K + 1`` (:func:`~saelab.kernels.blocks.padded_width`: zero columns past ``K + 1``) and return the
    ``(n,)`` row norms ``||t - bf16(t)||`` of the rounding residue, which the error bound of :func:`screen_candidates`
    uses (``t - bf16(t)`` is exact in fp32). ``scratch (n, K)`` fp32 holds the residue: same-dtype passes only, no
    temporaries (a mixed-dtype ``t - hi`` takes a slow generic path). ``col`` (a bias, 1 or None for 0) is rounded to
    bf16."""
    K = t.shape[1]
    hi = out[:, :K]
    hi.copy_(t)
    scratch.copy_(hi)
    residue = torch.linalg.vector_norm(torch.sub(t, scratch, out=scratch), dim=1)
    out[:, K] = 0 if col is None else col
    if out.shape[1] > K + 1:
        out[:, K + 1 :] = 0
    return residue


def _screen(ops: ScoreOperands, alloc: Alloc = _fresh) -> tuple[Tensor, Tensor]:
    """``(s~ (N, d_sae) bf16, slack_n (N,))``: :func:`screen_scores` and :func:`screen_slack` sharing the operands."""
    (n, K), d_sae, dev, bf = ops.L.shape, ops.R_T.shape[0], ops.L.device, torch.bfloat16
    scaled = ops.a is not None
    width = padded_width(dev, K + 1)  # zero columns past K + 1 off CPU: an aligned leading dimension for the GEMM
    A = alloc("screen_L", (n, width), bf, dev)
    lo_L = _bf16_operand(ops.L, 1.0, A, alloc("screen_scratch_L", (n, K), ops.L.dtype, dev))
    B = alloc("screen_R", (d_sae, width), bf, dev)
    lo_R = _bf16_operand(ops.R_T, None if scaled else ops.bias, B, alloc("screen_scratch_R", (d_sae, K), ops.R_T.dtype, dev))
    with fp32_accumulation(dev):
        out = torch.mm(A, B.t(), out=alloc("screen_scores", (n, d_sae), bf, dev))
    if scaled:
        apply_scale_law_(out, ops.log_norm, ops.a, ops.b, ops.bias)
    return out, _slack(ops, lo_L, lo_R)


def _slack(ops: ScoreOperands, lo_L: Tensor, lo_R: Tensor) -> Tensor:
    """``slack_n`` of :func:`screen_slack` from the residue norms ``lo_L (N,)``, ``lo_R (d_sae,)``."""
    L, R_T, bias = ops.L, ops.R_T, ops.bias
    K = L.shape[1] + 1
    gamma = fp32_gamma(K)
    r_max, lo_r = R_T.norm(dim=1).max(), lo_R.max()
    hi_L = L.norm(dim=1) + lo_L  # >= ||bf16(L_n)||
    gemm = bf16_product_error(lo_L, hi_L, r_max, lo_r, r_max + lo_r, K)
    if ops.a is None:
        if bias is None:
            return 1.02 * gemm
        b_max = bias.abs().max()
        return 1.02 * (gemm + gamma * (1 + BF16_U) * b_max) + (bias - bias.to(torch.bfloat16).float()).abs().max()
    ln = ops.log_norm
    c_max = torch.exp(torch.maximum(ops.a.max() * ln, ops.a.min() * ln) + ops.b.max())
    slack = 1.01 * c_max * (1.02 * gemm)
    return slack + 2.1 * BF16_U * bias.abs().max() if bias is not None else slack


def screen_scores(ops: ScoreOperands, alloc: Alloc = _fresh) -> Tensor:
    """``(N, d_sae)`` bf16 approximation ``s~`` of the scores before ``post`` (see :func:`screen_candidates` for its
    error bound): one bf16 GEMM with fp32 accumulation, rounded to bf16. Without a scale law the bias is a column of
    the GEMM (``[L, 1] @ [R_T, bias]^T``); with one (``ops.a``) the GEMM gives ``L @ R_T^T`` and an fp32 epilogue
    over blocks of tokens applies ``exp(a_i log_norm_n + b_i) (.) + bias_i`` before the rounding
    (:func:`~saelab.kernels.scores.apply_scale_law_`)."""
    return _screen(ops, alloc)[0]


def screen_slack(ops: ScoreOperands) -> Tensor:
    """``(N,)`` the absolute part ``slack_n`` of the error bound ``|s~ - s| <= rel u |s~| + slack_n`` of
    :func:`screen_scores` (``rel`` from :func:`screen_rel`; derivation in :func:`screen_candidates`).

    Without a scale law: ``1.02 (lam_n r + (l_n + lam_n) rho + gamma_{K+1} (l_n + lam_n)(r + rho) + gamma_{K+1} (1 + u)
    max_i |bias_i|) + max_i |bias_i - bf16(bias_i)|`` with ``l_n = ||L_n||``, ``lam_n = ||L_n - bf16(L_n)||``,
    ``r = max_i ||R_i||``, ``rho = max_i ||R_i - bf16(R_i)||``. With one: ``2.1 u max_i |bias_i| + 1.01 C_n sigma_n``,
    where ``sigma_n`` is the first form without the bias terms (the GEMM's own slack) and
    ``C_n = exp(max(a_max l'_n, a_min l'_n) + b_max) >= max_i exp(a_i l'_n + b_i)`` with ``l'_n = log_norm_n``."""
    def residue(t: Tensor) -> Tensor:
        return (t - t.to(torch.bfloat16).float()).norm(dim=1)

    return _slack(ops, residue(ops.L), residue(ops.R_T))


def screen_rel(ops: ScoreOperands) -> float:
    """The relative coefficient ``rel`` of the bound ``|s~ - s| <= rel u |s~| + slack_n``: 2.05 for one rounding of
    the GEMM output, 3.1 with a scale law (the scaled value is rounded again)."""
    return 2.05 if ops.a is None else 3.1


def screen_candidates(ops: ScoreOperands, m: int, alloc: Alloc = _fresh) -> Candidates:
    """Each token's ``m`` candidate pairs from a bf16 GEMM, with exact fp32 values and a certified bound on the
    rest (the screened selection; see :func:`set_selection_gemm`).

    The scores ``s = [L, 1] @ [R_T, bias]^T`` are computed as ONE bf16 GEMM of the rounded operands
    (``L = L_hi + L_lo`` with ``L_hi = bf16(L)``, likewise ``R``; fp32 accumulation), rounded to bf16 on output.
    ``L_n . R_i - L_hi . R_hi = L_lo . R_i + L_hi . R_lo``, so by Cauchy-Schwarz on the two residue terms, with the
    exact residue norms (``||L_lo|| ~ 0.6 u ||L||`` for round-to-nearest, ``u = 2^-8``), ``gamma_n = n 2^-24 / (1 - n
    2^-24)`` for the accumulation (Higham 2002 §3.1) and one output rounding, an entry obeys ``|s~ - s| <= 2.05 u |s~|
    + slack_n`` (:func:`screen_slack`). On a trained SAE (the demo's, d_sae 9216, k 32, real activations) 3 k
    candidates certify every token; the bf16x3 split used before (``[L_hi, L_hi, L_lo] @ [R_hi, R_lo, R_hi]^T``,
    Henry et al. 2019) had a ~u^2 bound but a GEMM three times as long.

    With a per-latent scale law (``ops.a``; per-feature, base+delta and grouped cosine encoders) the GEMM gives
    ``g~`` for ``g = L @ R_T^T`` (no bias column), bounded as above with ``bias = 0``: ``|g~ - g| <= 2.05 u |g~| +
    sigma_n``. The epilogue forms ``t = c g~ + bias`` in fp32 (``c = exp(a_i l_n + b_i)``, relative error a few
    ``2^-24``) and rounds it to bf16, ``s~``: ``|s~ - t| <= u |t|``. Then ``|s - s~| <= c |g - g~| + |t - s~| + fp32
    terms <= 2.05 u (|s~| (1 + u) + |bias_i|) + c sigma_n + u |s~| (1 + u) + ... <= 3.1 u |s~| + 2.1 u max|bias| +
    1.01 C_n sigma_n`` with ``C_n >= max_i c`` (:func:`screen_slack`).

    Every entry outside the token's ``m`` largest ``s~`` has ``s~ <= e_n`` (the ``m``-th), so its exact score is
    ``<= bound[n] = e_n + rel u |e_n| + slack_n`` (increasing in ``e_n``; ``rel`` 2.05 or 3.1, :func:`screen_rel`).
    Callers certify a selection against ``bound`` and redo uncertified tokens on exact rows.

    Args:
        ops: the encoder's :class:`ScoreOperands` (fp32).
        m: candidates per token (``<= d_sae``).
        alloc: scratch tensors (default fresh; the training step reuses buffers kept on the SAE).

    Returns:
        :class:`Candidates` (``full_rows`` computes exact fp32 rows from ``ops``; ``more``
        screens more candidates of some tokens from the same bf16 scores).
    """
    L, R_T = ops.L, ops.R_T
    approx, slack = _screen(ops, alloc)
    rel = screen_rel(ops) * BF16_U

    def candidates(rows: Tensor | None, width: int) -> tuple[Tensor, Tensor, Tensor]:
        top, cols = row_topk(approx if rows is None else approx[rows], width)
        edge = top.min(1).values.float()
        bound = edge + rel * edge.abs() + (slack if rows is None else slack[rows])
        if width >= R_T.shape[0]:
            bound = torch.full_like(bound, float("-inf"))
        if ops.relu:
            bound = bound.clamp_min(0)
        vals = _post(ops, pair_dots(L if rows is None else L[rows], R_T, cols), cols, rows)
        return vals, cols, bound

    def full_rows(rows: Tensor) -> Tensor:
        with fp32_accumulation(L.device):  # exact fp32 rows: the certificate's fallback
            return _post(ops, L[rows] @ R_T.t(), rows=rows)

    return Candidates(*candidates(None, m), full_rows, {}, candidates)


def screen_margin(D: Tensor, hi: Tensor, top: Tensor) -> Tensor:
    """``(C,)`` per-row margin ``m_j`` of the screened neighbour search: the exact nearest neighbour of row ``j``
    lies in a column group whose bf16 maximum is at least ``top_j - m_j``.

    Derivation, for unit rows ``D (C, d)`` fp32, their bf16 roundings ``hi`` and ``lo = D - hi`` (exact in fp32):
    ``D_j . D_i = hi_j . hi_i + lo_j . hi_i + hi_j . lo_i + lo_j . lo_i``, so the bf16 GEMM (products exact in fp32,
    fp32 accumulation, output rounded to bf16) gives ``S~_ji`` with

        ``|S~_ji - D_j . D_i| <= e_j + 1.004 u |S~_ji|``,
        ``e_j = lam_j n_max + eta_j lam_max + gamma_d eta_j eta_max``

    (:func:`bf16_product_error`; ``eta = ||hi||``, ``lam = ||lo||``, ``n = ||D||`` per row, maxima over the chunk;
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
    step = block_rows(D.device, "norms", D.shape[1])
    for b in range(0, C, step):  # per block of rows (in cache on CPU): ||hi||, ||D - hi|| (exact in fp32), ||D||
        rows = slice(b, b + step)
        hi32 = hi[rows].float()
        torch.linalg.vector_norm(hi32, dim=1, out=eta[rows])
        torch.linalg.vector_norm(D[rows], dim=1, out=n[rows])
        torch.linalg.vector_norm(hi32.sub_(D[rows]), dim=1, out=lam[rows])
    g = fp32_gamma(D.shape[1])
    e = bf16_product_error(lam, eta, n.max(), lam.max(), eta.max(), D.shape[1])
    return (1.01 * (1 + 3 * BF16_U)) * (2 * e + 2 * g * n * n.max() + 2.008 * BF16_U * top.abs())
