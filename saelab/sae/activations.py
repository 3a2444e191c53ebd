"""Sparsifying activations, chosen by name from ``ACTIVATIONS``.

Each activation is an ``nn.Module`` that maps encoder pre-activations ``(N, d_sae)`` to a :class:`Code`:
either sparse ``(values, indices)`` of shape ``(N, k)`` (TopK) or a dense ``(N, d_sae)`` tensor. It owns
whatever parameters/buffers it needs (JumpReLU thresholds, the BatchTopK inference threshold), and declares the
terms of its training loss (:func:`saelab.sae.objective.sae_loss`): ``uses_auxk`` (AuxK on dead latents), ``penalty``
(a sparsity penalty by name) and, for Matryoshka, ``group_sizes`` (nested-prefix reconstruction). The selecting
activations (TopK, BatchTopK, Matryoshka BatchTopK) also expose ``select_pairs``: the kept ``(token, latent)``
pairs as a :class:`FlatCode`, which the sparse training path (:mod:`saelab.kernels.sparse_step`) turns into sparse
codes (padded :class:`SparseCode` for BatchTopK).

Sources:
* TopK: Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (ReLU after top-k).
* BatchTopK: Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"; inference threshold = EMA of the
  minimum positive training activation (dictionary_learning ``trainers/batch_top_k.py``).
* JumpReLU: Rajamanoharan et al. 2024, "Jumping Ahead" Eq. 3-4 (forward) and Eq. 11-12 (straight-through
  estimators with a rectangle kernel).
* Matryoshka BatchTopK: Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka Sparse
  Autoencoders" (bartbussmann/matryoshka_sae); group sizes as dictionary_learning
  ``trainers/matryoshka_batch_top_k.py``. The nested-prefix loss is ``saelab.sae.losses.matryoshka_reconstruction``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
import torch
from torch import Tensor, nn

from ..kernels.screen import Candidates
from ..kernels.topk import row_topk, top_with_floor
from ..registry import Registry
from ..codes import Code, FlatCode, bucket_counts
from .config import DEFAULT_MATRYOSHKA_FRACTIONS, SAEConfig

ACTIVATIONS: Registry[type[nn.Module]] = Registry("activation")


@ACTIVATIONS.register("relu")
class ReLU(nn.Module):
    """``f = ReLU(pre)``; sparsity comes from the L1 penalty (the "standard" SAE)."""

    saelens_architecture = "standard"
    penalty = "l1"
    """Trained with the decoder-norm-weighted L1 penalty (:data:`saelab.sae.objective.PENALTIES`)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()

    def forward(self, pre: Tensor) -> Code:
        return Code(torch.relu(pre))


@ACTIVATIONS.register("topk")
class TopK(nn.Module):
    """Keep the ``k`` largest pre-activations per token, then ReLU (Gao et al. 2024)."""

    saelens_architecture = "topk"
    uses_auxk = True
    """Trained with AuxK on dead latents (:func:`saelab.sae.objective.sae_loss`)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.k = cfg.k

    def forward(self, pre: Tensor) -> Code:
        vals, idx = row_topk(pre, self.k)
        return Code(torch.relu(vals), idx)

    selects_pairs = True
    """:meth:`forward` keeps a set of ``(token, latent)`` pairs that :meth:`select_pairs` returns (the sparse
    training path of :mod:`saelab.kernels.sparse_step` applies)."""

    @torch.no_grad()
    def select_pairs(self, pre: Tensor) -> FlatCode:
        """The pairs :meth:`forward` keeps, with their raw (not ReLU'd) pre-activations as values.

        Used by the sparse training path (:mod:`saelab.kernels.sparse_step`), which recomputes the kept scores
        differentiably and applies the ReLU itself; the selection is the same ``topk`` as :meth:`forward`.

        Args:
            pre: ``(N, d_sae)`` pre-activations.

        Returns:
            :class:`FlatCode` of ``N * k`` pairs (``width = k``).
        """
        vals, idx = row_topk(pre, self.k)
        return FlatCode.from_padded(vals, idx)

    @torch.no_grad()
    def select_from_candidates(self, cand: Candidates) -> FlatCode:
        """:meth:`select_pairs` from per-token candidates instead of the full pre-activations (the screened
        selection of :mod:`saelab.kernels.sparse_step`): each token's top ``k`` candidates, certified when their smallest
        value exceeds ``cand.bound`` (nothing left out can then enter the top ``k``); tokens that fail the check
        are redone exactly on their full rows (``cand.full_rows``). Same pairs as :meth:`select_pairs` on the
        full pre-activations, up to ties.
        """
        vals, j = cand.values.topk(self.k, dim=1, sorted=False)
        cols = cand.cols.gather(1, j)
        redo = (~(vals.min(1).values > cand.bound)).nonzero().squeeze(1)
        if redo.numel():
            vals[redo], cols[redo] = row_topk(cand.full_rows(redo), self.k)
        cand.stats["redone_rows"] = redo.numel()
        return FlatCode.from_padded(vals, cols)


@ACTIVATIONS.register("batchtopk")
class BatchTopK(nn.Module):
    """Keep the ``k * N`` largest ReLU'd pre-activations over the whole batch (Bussmann et al. 2024).

    In training mode the selection is batch-level. In eval mode a token-level JumpReLU-style rule
    ``f = z * 1[z > threshold]`` is used, with ``threshold`` the EMA (beta 0.999) of the smallest positive
    training activation, updated by :meth:`update_threshold` (dictionary_learning ``batch_top_k.py``).
    Until the threshold is set (``threshold < 0``), eval falls back to BatchTopK.
    """

    saelens_architecture = "jumprelu"
    uses_auxk = True
    """Trained with AuxK on dead latents (:func:`saelab.sae.objective.sae_loss`)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.k, self.d_sae = cfg.k, cfg.d_sae
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

    @property
    def selects_pairs(self) -> bool:
        """Whether :meth:`forward` keeps pairs given by :meth:`select_pairs`: in training mode, or in eval mode
        before the inference threshold is set (the threshold rule is not a pair selection)."""
        return self.training or bool(self.threshold < 0)

    @torch.no_grad()
    def select_pairs(self, pre: Tensor) -> FlatCode:
        """The pairs :meth:`forward` keeps by batch-level selection, with their raw pre-activations as values.

        The ``k * N`` largest entries of ``pre`` over the whole batch: those of ``ReLU(pre)`` that
        :meth:`forward` keeps, up to ties among entries ``<= 0`` (which code 0 either way). Used by the sparse
        training path (:mod:`saelab.kernels.sparse_step`).

        A ``topk`` over all ``N d_sae`` entries is slow on CPU (its cost grows with all of them), so the
        selection runs on per-token candidates: each token's top ``2k`` entries, the ``kN`` largest of those,
        and a check that no token can hold more: a token whose smallest candidate exceeds that
        ``kN``-th value (and is positive) gets 4x more candidates, until none does. Exact: every entry left
        out is ``<=`` the ``kN``-th candidate value (or ``<= 0``, coding 0 either way).

        Args:
            pre: ``(N, d_sae)`` pre-activations.

        Returns:
            :class:`FlatCode` of ``k * N`` pairs in row-major order with variable row lengths.
        """
        kc = min(pre.shape[1], 2 * self.k)
        vals, cols = row_topk(pre, kc)
        return self._select(vals, cols, vals.min(1).values, lambda rows, width: top_with_floor(pre[rows], width))

    @torch.no_grad()
    def select_from_candidates(self, cand: Candidates) -> FlatCode:
        """:meth:`select_pairs` from per-token candidates (the screened selection of :mod:`saelab.kernels.sparse_step`):
        the same search with ``cand.bound`` as each token's floor; tokens that may hold more of the batch's top
        ``kN`` are redone on their exact full rows (``cand.full_rows``). Same pairs as :meth:`select_pairs` on
        the full pre-activations, up to ties."""
        n_redo = [0]

        def more(rows: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
            n_redo[0] += rows.numel()
            if cand.more is not None:
                return cand.more(rows, width)
            return top_with_floor(cand.full_rows(rows), width)

        out = self._select(cand.values.clone(), cand.cols.clone(), cand.bound.clone(), more)
        cand.stats["redone_rows"] = n_redo[0]
        return out

    def _select(self, vals: Tensor, cols: Tensor, floor: Tensor,
                more_fn: Callable[[Tensor, int], tuple[Tensor, Tensor, Tensor]]) -> FlatCode:
        """The batch's top ``kN`` among per-token candidates ``vals, cols (N, w)`` (exact values), where every
        entry a token left out is ``<= floor[n]``; ``more_fn(rows, width)`` gives ``width`` candidates of some
        tokens with their new floors (exact values), for tokens that may hold more (see :meth:`select_pairs`)."""
        n, kc = vals.shape
        d_sae = self.d_sae
        n_keep = min(self.k * n, n * d_sae)
        width = torch.full((n,), kc, device=vals.device)
        vals, cols = vals.reshape(-1), cols.reshape(-1)
        rows = torch.arange(n, device=vals.device).repeat_interleave(kc)
        while True:
            top, pick = vals.topk(n_keep, sorted=False)
            cut = top.min()
            short = (floor > cut) & (floor > 0) & (width < d_sae)  # may hold more of the batch's top kN
            # ONE read per round (the loop's only one): how many tokens are short, their widest candidate set and
            # their candidates in all (0, 0, 0: done); the shapes below follow from these three numbers
            widths = torch.where(short, width, 0)
            n_short, widest, n_drop = torch.stack([short.sum(), widths.max(), widths.sum()]).tolist()
            if n_short == 0:
                break
            redo = torch.nonzero_static(short, size=n_short).squeeze(1)
            more = min(d_sae, 4 * widest)
            v2, c2, floor[redo] = more_fn(redo, more)
            width[redo] = more
            keep = torch.nonzero_static(~short[rows], size=rows.numel() - n_drop).squeeze(1)
            vals = torch.cat([vals.index_select(0, keep), v2.reshape(-1)])
            cols = torch.cat([cols.index_select(0, keep), c2.reshape(-1)])
            rows = torch.cat([rows.index_select(0, keep), redo.repeat_interleave(more)])
        key, order = (rows[pick] * d_sae + cols[pick]).sort()
        rows = key // d_sae
        counts = bucket_counts(rows, n)
        return FlatCode(top[order], key - rows * d_sae, rows, counts.cumsum(0) - counts)

    @torch.no_grad()
    def update_threshold(self, code: Code, beta: float = 0.999) -> None:
        """EMA-update the inference threshold from a training batch's code: ``threshold <- m`` while unset
        (``< 0``), else ``beta threshold + (1 - beta) m``, with ``m`` the batch's smallest positive code value; a
        batch without one leaves it unchanged. Computed on the device (no value is read on the host)."""
        values = code.values
        if values.numel() == 0:
            return
        m = torch.where(values > 0, values, torch.inf).amin()  # +inf: no positive value in the batch
        t = self.threshold
        new = torch.where(t < 0, m, beta * t + (1 - beta) * m)
        self.threshold.copy_(torch.where(m < torch.inf, new, t))


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
    penalty = "l0"
    """Trained with the straight-through L0 penalty of :meth:`l0` (:data:`saelab.sae.objective.PENALTIES`)."""

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
    :func:`saelab.sae.objective.sae_loss` reconstructs from every prefix of the groups :attr:`group_sizes`
    (``saelab.sae.losses.matryoshka_reconstruction``).

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
