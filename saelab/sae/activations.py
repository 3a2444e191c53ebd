"""Sparsifying activations, chosen by name from ``ACTIVATIONS``.

Each activation is an ``nn.Module`` that maps encoder pre-activations ``(N, d_sae)`` to a :class:`Code`:
either sparse ``(values, indices)`` of shape ``(N, k)`` (TopK) or a dense ``(N, d_sae)`` tensor. It owns
whatever parameters/buffers it needs (JumpReLU thresholds, the BatchTopK inference threshold). The selecting
activations (TopK, BatchTopK, Matryoshka BatchTopK) also expose ``select_pairs``: the kept ``(token, latent)``
pairs as a :class:`FlatCode`, which the sparse training path (:mod:`saelab.sae.sparse`) turns into sparse
codes (padded :class:`SparseCode` for BatchTopK).

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
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..registry import Registry
from .config import DEFAULT_MATRYOSHKA_FRACTIONS, SAEConfig

ACTIVATIONS: Registry[type[nn.Module]] = Registry("activation")


class Code(NamedTuple):
    """Latent code of a batch of ``N`` tokens.

    ``indices is None``: ``values`` is dense ``(N, d_sae)``. Otherwise ``values`` and ``indices`` are ``(N, w)``:
    each token's active values and the latent ids they belong to. TopK codes have ``w = k``; BatchTopK codes of
    the sparse training path (:mod:`saelab.sae.sparse`) have ``w`` = the largest number of latents any token
    keeps, and shorter rows are padded with value ``0`` (at latent 0). A zero value is inactive wherever it
    sits, so ``values > 0`` masks, sums and ``index_add`` over the padded form are exact.
    """

    values: Tensor
    indices: Tensor | None = None

    def dense(self, d_sae: int) -> Tensor:
        """The code as a dense ``(N, d_sae)`` tensor (differentiable in ``values``)."""
        if self.indices is None:
            return self.values
        out = self.values.new_zeros(self.values.shape[:-1] + (d_sae,))
        return out.scatter_add_(-1, self.indices, self.values)  # add, not set: padding may repeat latent 0

    def active_mask_counts(self, d_sae: int) -> Tensor:
        """``(d_sae,)`` number of tokens on which each latent is non-zero."""
        if self.indices is None:
            return (self.values > 0).sum(0)
        idx = self.indices[self.values > 0]
        return torch.bincount(idx.flatten(), minlength=d_sae)

    def l0(self) -> Tensor:
        """``(N,)`` number of non-zero latents per token."""
        return (self.values > 0).sum(-1)


def take_rows(t: Tensor, idx: Tensor) -> Tensor:
    """``t[idx]`` along dim 0 (``idx`` any shape; result ``idx.shape + t.shape[1:]``) through ``index_select``.

    Use it wherever the result needs a gradient: the backward of advanced indexing accumulates into ``t``'s
    gradient with atomic adds across CPU threads, so its float sums (and then the trained weights) changed from
    run to run with 2 threads; ``index_select``'s backward (``index_add_``) adds in a fixed order.
    """
    return t.index_select(0, idx.reshape(-1)).view(*idx.shape, *t.shape[1:])


@torch.no_grad()
def row_dots(a: Tensor, b: Tensor, rows: int = 1024) -> Tensor:
    """``(N,)`` row-wise dot products ``sum_j a[n, j] b[n, j]`` of ``a, b (N, d)``, without gradient.

    ``torch.linalg.vecdot`` in blocks of ``rows`` rows written into one output: each block's elementwise product
    stays in cache, whereas one CPU ``vecdot`` call over many thousand rows slows down sharply and
    ``(a * b).sum(-1)`` materialises the whole ``(N, d)`` product (``benchmarks/RESULTS.md``).

    Raises:
        RuntimeError: ``a`` and ``b`` are not two ``(N, d)`` tensors of one shape.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise RuntimeError(f"row_dots needs two (N, d) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    out = a.new_empty(a.shape[0], dtype=torch.promote_types(a.dtype, b.dtype))
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


def _top_with_floor(pre: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, cols (r, width), floor (r,))``: each row's ``width`` largest entries and their minimum (every entry
    left out is ``<=`` it)."""
    vals, cols = row_topk(pre, width)
    return vals, cols, vals.min(1).values


class Candidates(NamedTuple):
    """Per-token candidates for a pair selection, with a certificate for everything left out.

    Produced by the screened selection of :mod:`saelab.sae.sparse` (a bf16 GEMM finds each token's likely top
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


class FlatCode(NamedTuple):
    """The active ``(token, latent)`` pairs of a batch in row-major (CSR) order.

    Produced by the selecting activations' :meth:`TopK.select_pairs` (with the raw pre-activations as
    ``values``) and carried by sparse codes as ``code.flat`` (with the code values). ``offsets`` and
    ``indices`` are exactly what ``F.embedding_bag(indices, W_dec, offsets, per_sample_weights=values)``
    needs to decode variable-length rows.

    Attributes:
        values: ``(P,)`` value of each pair.
        indices: ``(P,)`` int64 latent id of each pair.
        rows: ``(P,)`` int64 token of each pair, non-decreasing.
        offsets: ``(N,)`` int64 index into the pairs of each token's first pair.
        width: ``k`` when every token has exactly ``k`` pairs (TopK, AuxK), so that the padded ``(N, k)``
            form is a view; None for variable rows (BatchTopK).
    """

    values: Tensor
    indices: Tensor
    rows: Tensor
    offsets: Tensor
    width: int | None = None

    @classmethod
    def from_padded(cls, values: Tensor, indices: Tensor) -> FlatCode:
        """All ``N * w`` entries of a padded ``(N, w)`` code (padding included, it has value 0)."""
        n, w = indices.shape
        rows = torch.arange(n, device=indices.device).repeat_interleave(w)
        return cls(values.reshape(-1), indices.reshape(-1), rows, torch.arange(0, n * w, w, device=indices.device), w)

    def to_code(self) -> Code:
        """The padded :class:`Code` ``(N, w)`` of these pairs (a :class:`SparseCode` carrying ``flat=self`` when
        rows have different lengths). Differentiable in ``values``."""
        n = self.offsets.shape[0]
        if self.width is not None:
            return Code(self.values.view(n, self.width), self.indices.view(n, self.width))
        counts = torch.bincount(self.rows, minlength=n)
        w = int(counts.max()) if n else 0
        pos = torch.arange(self.rows.shape[0], device=self.rows.device) - self.offsets[self.rows]
        idx = self.indices.new_zeros(n, w).index_put_((self.rows, pos), self.indices)
        vals = self.values.new_zeros(n, w).index_put((self.rows, pos), self.values)
        return SparseCode.of(Code(vals, idx), flat=self)


class SparseCode(Code):
    """A padded sparse :class:`Code` that also carries its pairs in CSR form as ``flat`` (:class:`FlatCode`),
    so decoders and losses skip the padding. Fields and methods are those of :class:`Code`."""

    flat: FlatCode | None = None

    @classmethod
    def of(cls, code: Code, **attrs) -> SparseCode:
        """``code`` as a :class:`SparseCode`, keeping its extra attributes and setting ``attrs`` (e.g. ``flat=``)."""
        out = cls(*code)
        out.__dict__.update(getattr(code, "__dict__", {}))
        out.__dict__.update(attrs)
        return out


def flat_pairs(code: Code) -> FlatCode:
    """The pairs of a sparse ``code`` (``indices`` set): its ``flat`` form if it carries one, else every entry of
    the padded ``(N, w)`` form (:meth:`FlatCode.from_padded`).

    Raises:
        ValueError: a dense code (``indices is None``).
    """
    if code.indices is None:
        raise ValueError("flat_pairs needs a sparse code (indices set); dense codes have no pair list")
    flat = getattr(code, "flat", None)
    return flat if flat is not None else FlatCode.from_padded(code.values, code.indices)


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
        vals, idx = row_topk(pre, self.k)
        return Code(torch.relu(vals), idx)

    selects_pairs = True
    """:meth:`forward` keeps a set of ``(token, latent)`` pairs that :meth:`select_pairs` returns (the sparse
    training path of :mod:`saelab.sae.sparse` applies)."""

    @torch.no_grad()
    def select_pairs(self, pre: Tensor) -> FlatCode:
        """The pairs :meth:`forward` keeps, with their raw (not ReLU'd) pre-activations as values.

        Used by the sparse training path (:mod:`saelab.sae.sparse`), which recomputes the kept scores
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
        selection of :mod:`saelab.sae.sparse`): each token's top ``k`` candidates, certified when their smallest
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
        training path (:mod:`saelab.sae.sparse`).

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
        return self._select(vals, cols, vals.min(1).values, lambda rows, width: _top_with_floor(pre[rows], width))

    @torch.no_grad()
    def select_from_candidates(self, cand: Candidates) -> FlatCode:
        """:meth:`select_pairs` from per-token candidates (the screened selection of :mod:`saelab.sae.sparse`):
        the same search with ``cand.bound`` as each token's floor; tokens that may hold more of the batch's top
        ``kN`` are redone on their exact full rows (``cand.full_rows``). Same pairs as :meth:`select_pairs` on
        the full pre-activations, up to ties."""
        n_redo = [0]

        def more(rows: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
            n_redo[0] += rows.numel()
            if cand.more is not None:
                return cand.more(rows, width)
            return _top_with_floor(cand.full_rows(rows), width)

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
            if not bool(short.any()):
                break
            redo = short.nonzero().squeeze(1)
            more = min(d_sae, 4 * int(width[redo].max()))
            v2, c2, floor[redo] = more_fn(redo, more)
            width[redo] = more
            keep = ~short[rows]
            vals, cols = torch.cat([vals[keep], v2.reshape(-1)]), torch.cat([cols[keep], c2.reshape(-1)])
            rows = torch.cat([rows[keep], redo.repeat_interleave(more)])
        key, order = (rows[pick] * d_sae + cols[pick]).sort()
        rows = key // d_sae
        counts = torch.bincount(rows, minlength=n)
        return FlatCode(top[order], key - rows * d_sae, rows, counts.cumsum(0) - counts)

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
