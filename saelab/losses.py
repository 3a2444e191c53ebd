"""SAE training losses as pure functions of tensors (no module state).

Sources: reconstruction and AuxK follow Gao et al. 2024 ("Scaling and evaluating sparse autoencoders",
§A.2, AuxK) as implemented in dictionary_learning ``trainers/top_k.py::get_auxiliary_loss``; the L1 penalty
weighted by decoder norms follows Anthropic's April 2024 update (SAELens ``standard_sae.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reconstruction_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Squared error summed over ``d_in``, averaged over tokens.

    Args:
        x, x_hat: ``(N, d_in)``.

    Returns:
        Scalar ``mean_n ||x_n - x_hat_n||^2`` (units: squared activation norm per token).
    """
    return (x - x_hat).pow(2).sum(-1).mean()


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained, pooled over the batch: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def l1_penalty(f: Tensor, W_dec: Tensor) -> Tensor:
    """``mean_n sum_j f_nj ||W_dec_j||`` for dense codes ``f (N, d_sae)`` and ``W_dec (d_sae, d_in)``."""
    return (f * W_dec.norm(dim=-1)).sum(-1).mean()


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

    Returns:
        Scalar loss; 0 when no latent is dead (or the residual has no variance).
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k = min(k_aux, n_dead)
    masked = pre.masked_fill(~dead, float("-inf"))
    vals, idx = masked.topk(k, dim=-1, sorted=False)
    e_hat = F.embedding_bag(idx, W_dec, per_sample_weights=torch.relu(vals), mode="sum")
    num = (e_hat - residual).pow(2).sum(-1).mean()
    den = (residual - residual.mean(0)).pow(2).sum(-1).mean()
    loss = num / den
    return torch.nan_to_num(loss, nan=0.0, posinf=0.0)


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
