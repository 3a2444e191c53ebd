"""Encoder score kernels without autograd: one-GEMM ``x @ W + bias``, the cosine encoders' per-latent scale law
applied in place, encoder column norms, and :class:`ScoreOperands`, the form of a score that the screened
selection (:mod:`saelab.kernels.screen`) can bound."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .blocks import block_rows


def column_norms(W_enc: Tensor) -> Tensor:
    """``(d_sae,)`` ``max(||W_enc[:, i]||, 1e-12)`` (``F.normalize``'s eps), differentiable.

    A column-major ``W_enc`` (the training layout, :class:`~saelab.sae.model.SAE`) takes ``vector_norm`` over its
    contiguous columns; a row-major one ``sqrt(max(sum_j W_ji^2, 1e-24))``, a row-wise accumulation several times
    faster than a strided column reduction over that layout. Each layout thus reads memory contiguously. Same value and
    gradient up to float rounding (0 for a zero column)."""
    if W_enc.dim() == 2 and W_enc.stride(0) == 1 and W_enc.shape[0] > 1:
        return torch.linalg.vector_norm(W_enc, dim=0).clamp_min(1e-12)
    return W_enc.square().sum(0).clamp_min(1e-24).sqrt()


def gemm_bias_into(x: Tensor, W: Tensor, bias: Tensor, out: Tensor) -> Tensor:
    """``out = x @ W + bias`` for ``x (N, d)``, ``W (d, M)``, ``bias (M,)``, as ONE GEMM ``[x, 1] @ [W; bias]``.

    ``torch.addmm(bias, x, W, out=out)`` first copies the broadcast bias into ``out`` and then runs the GEMM with
    beta = 1, two extra memory-bound passes over ``(N, M)``; appending a ones column and a bias row costs one copy of
    ``W`` instead. No autograd.
    """
    n, d = x.shape
    xa = x.new_empty(n, d + 1)
    xa[:, :d] = x
    xa[:, d] = 1
    Wa = W.new_empty(d + 1, W.shape[1])
    Wa[:d] = W
    Wa[d] = bias
    return torch.mm(xa, Wa, out=out)


def apply_scale_law_(out: Tensor, log_norm: Tensor, a: Tensor, b: Tensor, bias: Tensor | None,
                     rows: int | None = None) -> Tensor:
    """In place, ``out[n, i] = exp(a_i log_norm_n + b_i) out[n, i] + bias_i`` (the cosine encoders' per-latent scale
    law, paper Fig. 1) for ``out (N, d_sae)`` fp32 or bf16, ``log_norm (N,)``, ``a``, ``b``, ``bias (d_sae,)``.

    Computed in fp32 over blocks of ``rows`` tokens (``exp`` of one ``addr`` per block, into two ``(rows, d_sae)``
    scratch blocks; default :func:`~saelab.kernels.blocks.block_rows` of ``out``'s device: 32 rows on a CPU, which
    stay in cache, no ``(N, d_sae)`` temporary; on a GPU blocks of up to 2^26 entries, one block for most batches,
    instead of a kernel launch per 32 rows); a bf16 ``out`` is rounded once, at the end of each block (reused
    cache-resident scratch beats fresh per-block allocations). Used by
    :func:`scores_into` (fp32 scores) and the screened selection's epilogue
    (:func:`saelab.kernels.screen.screen_scores`, bf16). No autograd. Returns ``out``.
    """
    n, d = out.shape
    rows = block_rows(out.device, "scale_law", d) if rows is None else rows
    scale = out.new_empty((min(rows, n), d), dtype=b.dtype)  # the parameters' dtype (fp32; float64 in tests)
    same = out.dtype == b.dtype
    block32 = scale if same else torch.empty_like(scale)
    for i in range(0, n, rows):
        block = out[i : i + rows]
        r = block.shape[0]
        sc = torch.addr(b.expand(r, d), log_norm[i : i + rows], a, out=scale[:r]).exp_()
        if same:
            torch.addcmul(bias, sc, block, out=block) if bias is not None else block.mul_(sc)
        else:
            f = block32[:r]
            f.copy_(block)
            torch.addcmul(bias, sc, f, out=f) if bias is not None else f.mul_(sc)
            block.copy_(f)
    return out


class ScoreOperands(NamedTuple):
    """Scores written as one GEMM, an optional per-(token, latent) scale and a bias:
    ``s = post(c * (L @ R_T^T) + bias)`` with ``c[n, i] = exp(a_i log_norm_n + b_i)`` when ``a`` is given, else
    ``c = 1`` (:meth:`Encoder.score_operands`).

    Attributes:
        L: ``(N, K)`` left factor (a transform of ``x_c``).
        R_T: ``(d_sae, K)`` right factor, one contiguous row per latent (a transform of ``W_enc^T``).
        bias: ``(d_sae,)`` or None.
        relu: ``post`` is ReLU (else the identity).
        a, b: ``(d_sae,)`` per-latent scale law (the cosine encoders' ``a_i``, ``b_i``), or None (no scale).
        log_norm: ``(N,)`` ``ln ||x_c||`` of each token when ``a`` is given.
    """

    L: Tensor
    R_T: Tensor
    bias: Tensor | None
    relu: bool
    a: Tensor | None = None
    b: Tensor | None = None
    log_norm: Tensor | None = None


@torch.no_grad()
def scores_into(ops: ScoreOperands, out: Tensor) -> Tensor:
    """The scores ``post(c * (L @ R_T^T) + bias)`` of an encoder's :class:`ScoreOperands`, written into
    ``out (N, d_sae)`` (returned), without autograd: one GEMM (the bias as an extra column, :func:`gemm_bias_into`),
    then the per-latent scale law in place when ``ops.a`` is set (:func:`apply_scale_law_`), then ReLU when
    ``ops.relu``. The sparse step reuses ``out`` across steps and selects its pairs from it."""
    R = ops.R_T.t()
    if ops.a is not None:
        torch.mm(ops.L, R, out=out)
        apply_scale_law_(out, ops.log_norm, ops.a, ops.b, ops.bias)
    elif ops.bias is not None:
        gemm_bias_into(ops.L, R, ops.bias, out)
    else:
        torch.mm(ops.L, R, out=out)
    return out.relu_() if ops.relu else out
