"""SAE training losses as pure functions of tensors (no module state).

Sources: reconstruction and AuxK follow Gao et al. 2024 ("Scaling and evaluating sparse autoencoders",
§A.2, AuxK) as implemented in dictionary_learning ``trainers/top_k.py::get_auxiliary_loss``; the L1 penalty
weighted by decoder norms follows Anthropic's April 2024 update (SAELens ``standard_sae.py``); the
Matryoshka nested-prefix reconstruction follows Bussmann et al. 2025 as implemented in dictionary_learning
``trainers/matryoshka_batch_top_k.py`` and the C²R authors' copy of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.pairs import decode_pairs, matryoshka_prefix_losses
from ..kernels.blocks import compacts_rows
from ..kernels.topk import row_topk
from ..codes import Code, FlatCode, flat_pairs


def reconstruction_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Squared error summed over ``d_in``, averaged over tokens.

    Args:
        x, x_hat: ``(N, d_in)``.

    Returns:
        Scalar ``mean_n ||x_n - x_hat_n||^2`` (units: squared activation norm per token).

    One fused ``F.mse_loss`` (sum), one pass forward and one backward, where ``(x - x_hat).pow(2).sum(-1).mean()``'s
    ``pow`` backward takes several passes over ``(N, d_in)`` (same value up to float summation order).
    """
    return F.mse_loss(x_hat, x, reduction="sum") / max(x[..., 0].numel(), 1)


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained, pooled over the batch: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def l1_penalty(f: Tensor, W_dec: Tensor) -> Tensor:
    """``mean_n sum_j f_nj ||W_dec_j||`` for dense codes ``f (N, d_sae)`` and ``W_dec (d_sae, d_in)``."""
    return (f * W_dec.norm(dim=-1)).sum(-1).mean()


AUXK_BLOCK_FACTOR = 8
"""Sparse AuxK uses the dense dead-column block up to ``n_dead = 8 k``, the gathered pairs beyond: the block's
GEMMs grow with ``n_dead`` while the pairs' cost grows with ``N k_aux`` only, and the two cross between ``8 k`` and
``12 k`` on CPU (``benchmarks/RESULTS.md``)."""


def auxk_loss(residual: Tensor, pre: Tensor, dead: Tensor, W_dec: Tensor, k_aux: int) -> Tensor:
    """AuxK loss: reconstruct the (detached) residual with the top ``k_aux`` dead latents.

    ``loss = mean_n ||e_n - e_hat_n||^2 / mean_n ||e_n - mean(e)||^2`` where ``e = x - x_hat`` (detached) and
    ``e_hat`` is decoded (without ``b_dec``) from the ``min(k_aux, n_dead)`` largest ReLU'd pre-activations
    among dead latents (Gao et al. 2024 §A.2; dictionary_learning ``get_auxiliary_loss``).

    Args:
        residual: ``(N, d_in)`` reconstruction error, already detached.
        pre: ``(N, d_sae)`` encoder pre-activations.
        dead: ``(d_sae,)`` bool mask of dead latents.
        W_dec: ``(d_sae, d_in)``.
        k_aux: number of dead latents used per token (conventionally ``d_in // 2``).

    Sparse backward: when ``pre`` is the :class:`~saelab.kernels.sparse_step.SparseScores` of the sparse training path,
    the dead columns are searched without autograd and only they are recomputed with gradient (its
    ``pair_scorer``), so no ``(N, d_sae)`` gradient is formed: as a dense ``(N, n_dead)`` block (GEMMs) while
    ``n_dead <= AUXK_BLOCK_FACTOR * k``, else as the ``N * k`` kept pairs (gathers). The block runs the top-k only
    on the rows with more than ``k`` positive dead scores: elsewhere the ReLU already zeroes, in value and
    gradient, every score the top-k would drop. Same value and gradients as the dense form up to float rounding.

    Returns:
        Scalar loss; 0 when no latent is dead (or the residual has no variance).
    """
    n_dead = int(dead.sum())  # the step's one read for AuxK: k, the block choice and the shapes follow from it
    if n_dead == 0:
        return residual.new_zeros(())
    k = min(k_aux, n_dead)
    scorer = getattr(pre, "pair_scorer", None)
    if scorer is None:  # dense reference: autograd through the full pre-activations
        masked = pre.masked_fill(~dead, float("-inf"))
        vals, idx = masked.topk(k, dim=-1, sorted=False)
        e_hat = F.embedding_bag(idx, W_dec, per_sample_weights=torch.relu(vals), mode="sum")
    else:
        block = n_dead <= AUXK_BLOCK_FACTOR * k  # dense in the dead columns: GEMMs of N x n_dead x d_in
        with torch.no_grad():
            dead_ids = torch.nonzero_static(dead, size=n_dead).squeeze(1)  # the count is known: no second read
            sub = pre.columns(dead_ids)  # (N, n_dead), without gradient
            if block:  # the block drops, per row, the positive scores outside its top k (ReLU zeroes the rest)
                drop = None
                if k < n_dead:  # only rows with > k positive scores need a top-k (rare when few latents are dead)
                    over = (sub > 0).sum(1) > k
                    if not compacts_rows(sub.device):  # every row's top-k, kept where needed: no read
                        kept = row_topk(sub, k)[1]
                        drop = torch.ones_like(sub, dtype=torch.bool).scatter_(1, kept, False).logical_and_(
                            over.unsqueeze(1))
                    elif (over := over.nonzero().squeeze(1)).numel():
                        drop = torch.zeros_like(sub, dtype=torch.bool)
                        kept = row_topk(sub.index_select(0, over), k)[1]
                        drop[over] = drop.new_ones(over.numel(), n_dead).scatter_(1, kept, False)
            else:
                vals, j = row_topk(sub, k) if k < n_dead else (sub, None)
        if block:
            acts = torch.relu(scorer.columns(dead_ids, sub))
            if drop is not None:
                acts = acts.masked_fill(drop, 0.0)
            e_hat = acts @ W_dec.index_select(0, dead_ids)
        else:  # gather the N * k kept pairs
            idx = dead_ids.expand_as(sub) if j is None else dead_ids[j]
            vals = scorer(FlatCode.from_padded(vals, idx)).view_as(idx)
            e_hat = decode_pairs(W_dec, torch.relu(vals), idx)
    num = reconstruction_loss(residual, e_hat)
    with torch.no_grad():  # the residual is detached: no graph for the denominator
        den = torch.linalg.vector_norm(residual - residual.mean(0)).square() / residual.shape[0]
    loss = num / den
    return torch.nan_to_num(loss, nan=0.0, posinf=0.0)


class MatryoshkaReconstruction(NamedTuple):
    """Result of :func:`matryoshka_reconstruction`."""

    loss: Tensor
    """Scalar ``sum_m w_m L_m``."""
    prefix_losses: Tensor
    """``(G,)`` the unweighted ``L_m`` (prefix ``m`` = groups ``1..m``), for logging."""
    x_hat: Tensor
    """``(N, d_in)`` reconstruction from all groups, ``F W_dec + b_dec`` (for FVU and the AuxK residual)."""


def matryoshka_reconstruction(
    x: Tensor,
    code_dense: Tensor | Code,
    W_dec: Tensor,
    b_dec: Tensor,
    group_sizes: Sequence[int],
    *,
    group_weights: Sequence[float] | None = None,
) -> MatryoshkaReconstruction:
    """Matryoshka reconstruction loss over nested prefixes of latent groups (Bussmann et al. 2025).

    With ``p_m = group_sizes[0] + ... + group_sizes[m-1]``, prefix ``m`` reconstructs
    ``x_hat_m = F[:, :p_m] W_dec[:p_m] + b_dec`` and ``L_m = mean_n ||x_n - x_hat_m,n||^2``;
    ``loss = sum_{m=1..G} w_m L_m`` with ``w_m = 1/G`` by default, i.e. the mean over prefixes, as in the C²R
    authors' ``MatryoshkaBatchTopKTrainer`` (group weights 1/G, summed); pass ``group_weights=[1] * G`` for
    the plain sum. With one group this is :func:`reconstruction_loss`.

    The partial reconstructions are accumulated group by group (residual ``r_m = r_{m-1} - F_g W_g``), so the
    cost is one ``(N, d_sae) @ (d_sae, d_in)`` product in total, not ``G``. A sparse code (a
    :class:`~saelab.codes.Code` with ``indices``, e.g. from the sparse training path) is decoded one
    ``F.embedding_bag`` per group with a bag per token (``O(P d_in)`` for ``P`` active pairs), the prefix residuals
    updated in place with a hand-written backward (:func:`saelab.kernels.pairs.matryoshka_prefix_losses`).

    Args:
        x: ``(N, d_in)`` inputs.
        code_dense: ``(N, d_sae)`` dense codes, latents ordered by group, or a :class:`Code` (dense or sparse).
        W_dec: ``(d_sae, d_in)``; b_dec: ``(d_in,)``.
        group_sizes: ``G`` positive sizes summing to ``d_sae``
            (``saelab.sae.activations.MatryoshkaBatchTopK.group_sizes``).
        group_weights: ``G`` weights ``w_m``; default ``1/G`` each.

    Returns:
        :class:`MatryoshkaReconstruction` ``(loss, prefix_losses (G,), x_hat (N, d_in))``.

    Raises:
        ValueError: sizes that do not sum to ``d_sae``, or a weight list of another length.
    """
    sizes = [int(s) for s in group_sizes]
    d_sae = W_dec.shape[0]
    sparse = isinstance(code_dense, tuple) and code_dense[1] is not None
    if isinstance(code_dense, tuple) and not sparse:
        code_dense = code_dense[0]
    width_ok = sparse or code_dense.shape[-1] == d_sae
    if sum(sizes) != d_sae or not width_ok or min(sizes, default=0) < 1:
        shape = tuple(code_dense[0].shape if sparse else code_dense.shape)
        hint = "" if width_ok else "; for a sparse Code pass the Code itself, not code.values (those are (N, w))"
        raise ValueError(f"group sizes {sizes} must be positive and sum to d_sae={d_sae} (codes: {shape}){hint}")
    G = len(sizes)
    weights = [1.0 / G] * G if group_weights is None else [float(w) for w in group_weights]
    if len(weights) != G:
        raise ValueError(f"{len(weights)} group weights for {G} groups")
    if sparse:  # fused: one decode per group, the prefix residuals in place (saelab.kernels.pairs)
        stacked, x_hat = matryoshka_prefix_losses(x, b_dec, W_dec, flat_pairs(code_dense), sizes)
    else:
        residual, prefix_losses = x - b_dec, []
        for f_g, W_g in zip(code_dense.split(sizes, dim=-1), W_dec.split(sizes, dim=0)):
            residual = torch.addmm(residual, f_g, W_g, alpha=-1)
            prefix_losses.append(residual.pow(2).sum(-1).mean())
        stacked, x_hat = torch.stack(prefix_losses), x - residual
    loss = (stacked * _constant(tuple(weights), stacked.dtype, stacked.device)).sum()
    return MatryoshkaReconstruction(loss, stacked, x_hat)


_CONSTANTS: dict[tuple, Tensor] = {}


def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.tensor(values)`` on ``device``, built once per (values, dtype, device) and cached: the step copies no
    Python list to the device."""
    key = (values, dtype, torch.device(device))
    out = _CONSTANTS.get(key)
    if out is None:
        out = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return out


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-5) -> Tensor:
    """Geometric median of the rows of ``x (N, d)`` by Weiszfeld's algorithm.

    Used to initialise ``b_dec`` from the first training batch (dictionary_learning ``top_k.py``,
    OpenAI ``init_from_data_``).

    Returns:
        ``(d,)`` the point minimising ``sum_n ||x_n - m||``.
    """
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=-1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() < tol * max(1.0, float(m.norm())):
            m = new
            break
        m = new
    return m.float()
