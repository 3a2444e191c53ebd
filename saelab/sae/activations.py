"""Sparsifying activations, chosen by name from ``ACTIVATIONS``.

Each activation is an ``nn.Module`` that maps encoder pre-activations ``(N, d_sae)`` to a :class:`Code`:
either sparse ``(values, indices)`` of shape ``(N, k)`` (TopK) or a dense ``(N, d_sae)`` tensor. It owns
whatever parameters/buffers it needs (JumpReLU thresholds, the BatchTopK inference threshold).

Sources:
* TopK: Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (ReLU after top-k).
* BatchTopK: Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"; inference threshold = EMA of the
  minimum positive training activation (dictionary_learning ``trainers/batch_top_k.py``).
* JumpReLU: Rajamanoharan et al. 2024, "Jumping Ahead" Eq. 3-4 (forward) and Eq. 11-12 (straight-through
  estimators with a rectangle kernel).
* Matryoshka BatchTopK: Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka Sparse
  Autoencoders" (bartbussmann/matryoshka_sae); group sizes as dictionary_learning
  ``trainers/matryoshka_batch_top_k.py``. The nested-prefix loss is ``saelab.losses.matryoshka_reconstruction``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..registry import Registry
from .config import SAEConfig

ACTIVATIONS: Registry[type[nn.Module]] = Registry("activation")


class Code(NamedTuple):
    """Latent code of a batch.

    ``indices is None``: ``values`` is dense ``(N, d_sae)``. Otherwise ``values`` and ``indices`` are
    ``(N, k)``: the activations and the latent ids they belong to.
    """

    values: Tensor
    indices: Tensor | None = None

    def dense(self, d_sae: int) -> Tensor:
        """The code as a dense ``(N, d_sae)`` tensor."""
        if self.indices is None:
            return self.values
        out = self.values.new_zeros(self.values.shape[:-1] + (d_sae,))
        return out.scatter_(-1, self.indices, self.values)

    def active_mask_counts(self, d_sae: int) -> Tensor:
        """``(d_sae,)`` number of tokens on which each latent is non-zero."""
        if self.indices is None:
            return (self.values > 0).sum(0)
        idx = self.indices[self.values > 0]
        return torch.bincount(idx.flatten(), minlength=d_sae)

    def l0(self) -> Tensor:
        """``(N,)`` number of non-zero latents per token."""
        return (self.values > 0).sum(-1)


@ACTIVATIONS.register("relu")
class ReLU(nn.Module):
    """``f = ReLU(pre)``; sparsity comes from the L1 penalty (the "standard" SAE)."""

    saelens_architecture = "standard"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()

    def forward(self, pre: Tensor) -> Code:
        return Code(torch.relu(pre))


@ACTIVATIONS.register("topk")
class TopK(nn.Module):
    """Keep the ``k`` largest pre-activations per token, then ReLU (Gao et al. 2024)."""

    saelens_architecture = "topk"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.k = cfg.k

    def forward(self, pre: Tensor) -> Code:
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return Code(torch.relu(vals), idx)


@ACTIVATIONS.register("batchtopk")
class BatchTopK(nn.Module):
    """Keep the ``k * N`` largest ReLU'd pre-activations over the whole batch (Bussmann et al. 2024).

    In training mode the selection is batch-level. In eval mode a token-level JumpReLU-style rule
    ``f = z * 1[z > threshold]`` is used, with ``threshold`` the EMA (beta 0.999) of the smallest positive
    training activation, updated by :meth:`update_threshold` (dictionary_learning ``batch_top_k.py``).
    Until the threshold is set (``threshold < 0``), eval falls back to BatchTopK.
    """

    saelens_architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.k = cfg.k
        self.register_buffer("threshold", torch.tensor(-1.0))

    def forward(self, pre: Tensor) -> Code:
        z = torch.relu(pre)
        if not self.training and self.threshold >= 0:
            return Code(z * (z > self.threshold))
        flat = z.flatten()
        n_keep = min(self.k * z.shape[0], flat.numel())
        vals, idx = flat.topk(n_keep, sorted=False)
        out = torch.zeros_like(flat).scatter(0, idx, vals)
        return Code(out.view_as(z))

    @torch.no_grad()
    def update_threshold(self, code: Code, beta: float = 0.999) -> None:
        """EMA-update the inference threshold from a training batch's code."""
        pos = code.values[code.values > 0]
        if pos.numel() == 0:
            return
        m = pos.min()
        self.threshold.copy_(m if self.threshold < 0 else beta * self.threshold + (1 - beta) * m)


class _JumpReLUFn(torch.autograd.Function):
    """``pre * 1[pre > theta]`` with the STE of Rajamanoharan et al. 2024 Eq. 11 for ``theta``."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((pre - theta).abs() < eps / 2).to(grad.dtype)  # rectangle kernel K((pre-theta)/eps)
        d_pre = grad * (pre > theta)
        d_theta = (-(theta / eps) * kernel * grad).sum(0)
        return d_pre, d_theta, None


class _StepFn(torch.autograd.Function):
    """``1[pre > theta]`` with the STE of Rajamanoharan et al. 2024 Eq. 12 for ``theta``."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        return torch.zeros_like(pre), (-(1.0 / eps) * kernel * grad).sum(0), None


@ACTIVATIONS.register("jumprelu")
class JumpReLU(nn.Module):
    """``f = pre * 1[pre > theta]`` with a learned per-latent threshold ``theta = exp(log_threshold)``.

    Trained with an L0 penalty through :meth:`l0` (Rajamanoharan et al. 2024, Eq. 5 and 12).
    """

    saelens_architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.bandwidth = cfg.jumprelu_bandwidth
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), float(torch.tensor(cfg.jumprelu_init_threshold).log())))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def forward(self, pre: Tensor) -> Code:
        pre = torch.relu(pre)
        return Code(_JumpReLUFn.apply(pre, self.threshold, self.bandwidth))

    def l0(self, pre: Tensor) -> Tensor:
        """Differentiable ``(N,)`` count of active latents (STE towards ``theta``)."""
        return _StepFn.apply(torch.relu(pre), self.threshold, self.bandwidth).sum(-1)


DEFAULT_MATRYOSHKA_FRACTIONS: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32)
"""Matryoshka group fractions of the C²R paper runs (methods.md §1.3; dictionary_learning_demo ``demo_config.py``)."""


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fractions = [float(f) for f in fractions]
    if not fractions or any(not f > 0 for f in fractions):
        raise ValueError(f"matryoshka fractions must be a non-empty list of positive numbers, got {fractions}")
    if not math.isclose(sum(fractions), 1.0, rel_tol=0, abs_tol=1e-6):
        raise ValueError(f"matryoshka fractions must sum to 1, got {fractions} (sum {sum(fractions)})")
    return fractions


def matryoshka_group_sizes(d_sae: int, fractions: Sequence[float]) -> list[int]:
    """Split ``d_sae`` latents into consecutive Matryoshka groups.

    Every group but the last gets ``floor(fraction * d_sae)`` latents and the last the remainder, so the sizes
    sum to ``d_sae`` exactly (dictionary_learning ``MatryoshkaBatchTopKTrainer``).

    Args:
        d_sae: number of latents.
        fractions: positive group fractions summing to 1.

    Returns:
        ``len(fractions)`` positive sizes summing to ``d_sae``; group ``g`` is latents
        ``sum(sizes[:g]) .. sum(sizes[:g+1]) - 1`` and the prefixes ``1..g`` are the nested dictionaries.

    Raises:
        ValueError: no fractions, a non-positive fraction, fractions not summing to 1, or ``d_sae`` too small
            for every group to get a latent.
    """
    fractions = _check_fractions(fractions)
    sizes = [math.floor(f * d_sae + 1e-9) for f in fractions[:-1]]  # + 1e-9: 0.29 * 100 is 28.999...
    sizes.append(d_sae - sum(sizes))
    if min(sizes) < 1:
        raise ValueError(f"d_sae={d_sae} is too small for matryoshka fractions {fractions}: group sizes {sizes}")
    return sizes


@ACTIVATIONS.register("matryoshka_batchtopk")
class MatryoshkaBatchTopK(BatchTopK):
    """BatchTopK whose latents are ordered into nested groups (Bussmann et al. 2025, Matryoshka SAEs).

    The selection is BatchTopK's (batch-level top ``k * N`` in training, the EMA threshold at inference), so
    :meth:`update_threshold` and saving as JumpReLU apply unchanged. What makes it Matryoshka is the loss:
    the trainer must reconstruct from every prefix of groups, ``saelab.losses.matryoshka_reconstruction``
    with :attr:`group_sizes`.

    Attributes:
        fractions: ``cfg.matryoshka_fractions`` (default :data:`DEFAULT_MATRYOSHKA_FRACTIONS`), checked here.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.d_sae = cfg.d_sae
        self.fractions = _check_fractions(getattr(cfg, "matryoshka_fractions", None) or DEFAULT_MATRYOSHKA_FRACTIONS)

    @property
    def group_sizes(self) -> list[int]:
        """Sizes of the consecutive latent groups (:func:`matryoshka_group_sizes`).

        Raises:
            ValueError: ``d_sae`` too small to give every group a latent. Checked here, not at construction,
                so that a tiny Matryoshka SAE can still be built, encoded and saved (it is a BatchTopK SAE at
                inference); only its training loss needs the groups.
        """
        return matryoshka_group_sizes(self.d_sae, self.fractions)
