"""Autograd functions over ``(token, latent)`` pairs: the sparse step's encoder dot products, sparse decode and the
fused Matryoshka prefixes, each with a hand-written backward whose cost is ``O(P d_in)`` for ``P`` pairs.

Sources: the idea that only the active latents enter the encoder backward and the decoder is that of OpenAI's
``sparse_autoencoder`` (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; the ``FastAutoencoder``
autograd function of its ``kernels.py``) and of sparsify's ``eager_decode`` (``F.embedding_bag``); the kernels here
are written from that description with stock torch ops.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..codes import FlatCode, bucket_counts
from .mode import sparse_path_enabled
from .scores import column_norms
from .topk import take_rows


def bucket_order(keys: Tensor, n_buckets: int) -> Tensor:
    """``keys.argsort(stable=True)`` for integer keys in ``[0, n_buckets)``, sorted in the narrowest integer dtype.

    Groups the pairs of the sparse backward by latent (or by bag). torch's stable CPU sort of integers is a radix
    sort, whose cost falls with the key width, so the keys are narrowed first (``benchmarks/RESULTS.md``). Stable also
    makes the summation order, and so the gradients, deterministic.
    """
    if n_buckets <= 2**15:
        keys = keys.to(torch.int16)
    elif n_buckets <= 2**31:
        keys = keys.to(torch.int32)
    return keys.argsort(stable=True)


def bag_sums(table: Tensor, rows: Tensor, bags: Tensor, weights: Tensor, n_bags: int) -> Tensor:
    """``(n_bags, d)`` weighted row sums ``out[b] = sum_{p: bags[p] = b} weights[p] table[rows[p]]`` for a ``table (R, d)``
    and ``P`` pairs ``rows, bags (P,)`` int64, ``weights (P,)``: the pairs grouped by bag (:func:`bucket_order`, stable,
    so each bag sums in pair order: deterministic), then ONE ``F.embedding_bag`` that writes every output row once
    (a scatter-add would zero-fill the output first). The sparse backward's gradients of the decoder and encoder
    weights and of the C²R/OrtSAE pair term are such sums. Raises as ``F.embedding_bag`` for out-of-range ids."""
    order = bucket_order(bags, n_bags)
    counts = bucket_counts(bags, n_bags)
    return F.embedding_bag(rows[order], table, counts.cumsum(0) - counts, per_sample_weights=weights[order], mode="sum")


class _PairDots(torch.autograd.Function):
    """Linear dot products ``x_c[rows[p]] . W_enc[:, cols[p]]`` of ``P`` pairs, ``x_c = x - b_dec``, with a sparse
    backward.

    The forward returns the given values (computed without gradient from the dense pre-activations). Backward,
    with ``g (P,)`` the incoming gradient:

    * ``grad W_enc[:, i] = sum_{p: cols[p] = i} g_p x_c[rows[p]]``: pairs sorted by latent, then one
      ``F.embedding_bag`` over the rows of ``x_c`` with a bag per latent (``O(P d_in)``);
    * ``grad b_dec = -W_enc @ colsum``, ``colsum_i = sum_{p: cols[p] = i} g_p`` (``O(d_in d_sae)``), which is
      ``-sum_n grad x_c[n]`` without forming ``grad x_c``;
    * ``grad x[n] = sum_{p: rows[p] = n} g_p W_enc[:, cols[p]]`` (``F.embedding_bag`` over ``W_enc^T``), only
      when ``x`` requires gradient.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, x_c, dots, rows, cols, offsets):
        ctx.save_for_backward(W_enc, x_c, rows, cols, offsets)
        return dots.clone()

    @staticmethod
    def backward(ctx, g):
        W_enc, x_c, rows, cols, offsets = ctx.saved_tensors
        need_x, need_b, need_w = ctx.needs_input_grad[:3]
        d_sae = W_enc.shape[1]
        g = g.contiguous()
        grad_x = grad_b = grad_w = None
        if need_w:
            grad_wt = bag_sums(x_c, rows, cols, g, d_sae)
            # laid out like W_enc: free for the SAE's column-major W_enc; otherwise a blocked transpose (autograd
            # would copy a mismatched layout anyway, and adding another gradient (AuxK, cosine norms) to a
            # mismatched layout is several times slower). Detached from its base, so autograd can add a second
            # W_enc gradient (AuxK, cosine norms) into it in place instead of into a fresh, page-faulted tensor.
            grad_w = grad_wt.t().detach() if W_enc.stride(0) == 1 else torch.empty_like(W_enc).copy_(grad_wt.t())
        if need_b:
            colsum = g.new_zeros(d_sae).index_add_(0, cols, g)
            grad_b = -(W_enc @ colsum)
        if need_x:
            grad_x = F.embedding_bag(cols, W_enc.t().contiguous(), offsets, per_sample_weights=g, mode="sum")
        return grad_x, grad_b, grad_w, None, None, None, None, None


class _ColumnNorms(torch.autograd.Function):
    """``(d_sae,)`` ``max(||W_enc[:, i]||, 1e-12)`` (:func:`saelab.kernels.scores.column_norms`) whose backward is one
    pass, ``grad W_enc = W_enc * (g / norm)`` (0 where the clamp is active), instead of autograd's three."""

    @staticmethod
    def forward(ctx, W_enc):
        norm = column_norms(W_enc)
        ctx.save_for_backward(W_enc, norm)
        return norm

    @staticmethod
    def backward(ctx, g):
        W_enc, norm = ctx.saved_tensors
        return W_enc * torch.where(norm > 1e-12, g / norm, torch.zeros_like(g))


class _BlockDots(torch.autograd.Function):
    """Linear dot products ``x_c @ W_enc[:, cols]`` ``(N, n)`` of every token with a few latents ``cols``, with a
    backward that touches only those columns: ``grad W_enc[:, cols] = x_c^T g``, ``grad b_dec = -W_enc[:, cols]
    g^T 1``, ``grad x = g W_enc[:, cols]^T`` (when needed). Forward returns the given values."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, x_c, dots, cols):
        ctx.save_for_backward(W_enc, x_c, cols)
        return dots.clone()

    @staticmethod
    def backward(ctx, g):
        W_enc, x_c, cols = ctx.saved_tensors
        need_x, need_b, need_w = ctx.needs_input_grad[:3]
        W_cols = W_enc.t().index_select(0, cols).t()  # rows of W_enc^T: no copy of a column-major W_enc
        grad_x = g @ W_cols.T if need_x else None
        grad_b = -(W_cols @ g.sum(0)) if need_b else None
        grad_w = torch.zeros_like(W_enc).index_copy_(1, cols, x_c.T @ g) if need_w else None
        return grad_x, grad_b, grad_w, None, None, None


class _SparseDecode(torch.autograd.Function):
    """``out[n] = sum_{p in bag n} values[p] W_dec[indices[p]]`` (``F.embedding_bag`` mode sum) with a backward
    laid out for training: ``grad W_dec[i] = sum_{p: indices[p] = i} values[p] grad_out[bag(p)]`` as ONE
    ``F.embedding_bag`` over the rows of ``grad_out`` with a bag per latent (pairs sorted by latent), which
    writes the dense ``(d_sae, d_in)`` gradient once (the built-in backward zero-fills it and then
    scatter-adds); ``grad values[p] = grad_out[bag(p)] . W_dec[indices[p]]`` (the built-in kernel)."""

    @staticmethod
    def forward(ctx, W_dec, values, indices, offsets):
        ctx.save_for_backward(W_dec, values, indices, offsets)
        return F.embedding_bag(indices, W_dec, offsets, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, g):
        W_dec, values, indices, offsets = ctx.saved_tensors
        return (*_decode_grads(W_dec, values, indices, offsets, g, ctx.needs_input_grad[0], ctx.needs_input_grad[1]),
                None, None)


def _decode_grads(W_dec: Tensor, values: Tensor, indices: Tensor, offsets: Tensor | None, g: Tensor, need_w: bool,
                  need_v: bool, sign: float = 1.0) -> tuple[Tensor | None, Tensor | None]:
    """``(grad W_dec, grad values)`` of ``out = sign * embedding_bag(indices, W_dec, offsets, values)`` for the incoming
    ``g (N, d_in)`` (see :class:`_SparseDecode`; ``sign = -1`` spares a negated copy of ``g``)."""
    g = g.contiguous()
    idx, vals = indices.reshape(-1), values.reshape(-1)
    n = g.shape[0]
    if indices.dim() == 2:  # (N, w): bag n holds entries n*w .. n*w + w - 1
        w = indices.shape[1]
        starts = torch.arange(0, n * w, w, device=idx.device)
        bag = torch.arange(n, device=idx.device).repeat_interleave(w)
    else:
        starts = offsets
        sizes = torch.diff(offsets, append=offsets.new_full((1,), idx.numel()))
        bag = torch.arange(n, device=idx.device).repeat_interleave(sizes, output_size=idx.numel())
    grad_w = grad_v = None
    if need_w:
        grad_w = bag_sums(g, bag, idx, vals if sign == 1.0 else vals * sign, W_dec.shape[0])
    if need_v:
        grad_v = torch.ops.aten._embedding_bag_per_sample_weights_backward(g, W_dec, idx, starts, bag, 0, -1)
        grad_v = (grad_v if sign == 1.0 else grad_v.mul_(sign)).view_as(values)
    return grad_w, grad_v


def decode_pairs(W_dec: Tensor, values: Tensor, indices: Tensor, offsets: Tensor | None = None) -> Tensor:
    """``(N, d_in)`` sums ``sum_p values[p] W_dec[indices[p]]`` per token: ``F.embedding_bag(indices, W_dec,
    offsets, per_sample_weights=values, mode="sum")`` with :class:`_SparseDecode`'s backward (the built-in
    ``F.embedding_bag`` inside :func:`dense_reference`).

    Args:
        W_dec: ``(d_sae, d_in)``.
        values, indices: ``(N, w)`` (padded or TopK codes), or ``(P,)`` with ``offsets (N,)`` (CSR).
    """
    if not sparse_path_enabled():
        return F.embedding_bag(indices, W_dec, offsets, per_sample_weights=values, mode="sum")
    return _SparseDecode.apply(W_dec, values, indices, offsets)


class _MatryoshkaPrefixes(torch.autograd.Function):
    """Prefix losses of a Matryoshka reconstruction from sparse pairs, fused (Bussmann et al. 2025; the loss of
    :func:`saelab.sae.losses.matryoshka_reconstruction`).

    Inputs: ``x (N, d_in)``, ``b_dec``, ``W_dec (d_sae, d_in)``, the pairs' ``values`` and ``indices (P,)`` sorted by
    ``(group, token)``, ``starts (G, N)`` each group's bag offsets from its first pair, and the python lists
    ``per_group`` (pairs per group) and ``sizes`` (latents per group). Outputs ``L (G,)`` with
    ``L_m = (1/N) sum_n ||R_m[n]||^2``, ``R_m = x - b_dec - sum_{g <= m} r_g`` (``r_g`` the decode of group ``g``'s
    pairs), and ``x_hat = b_dec + sum_g r_g``.

    Forward: one N-bag decode per group into its own ``(N, d_in)`` tensor and one running residual updated in place.
    Backward, with ``c_m = 2 grad_L_m / N`` and ``Gamma_g = sum_{m >= g} c_m R_m`` (built from the last residual
    backwards, ``R_{g-1} = R_g + r_g``, in place): ``grad r_g = grad_x_hat - Gamma_g`` (the decode's backward
    (:func:`_decode_grads`) takes ``-Gamma_g`` by sign, without a negated copy), ``grad x = Gamma_0``,
    ``grad b_dec = -sum_n Gamma_0[n] + sum_n grad_x_hat[n]``. Autograd through the same chain made ~3 (N, d_in)
    temporaries per group and step.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_dec, values, indices, starts, per_group, sizes):
        ctx.set_materialize_grads(False)
        W, v_all, i_all = W_dec.detach(), values.detach(), indices
        R = x.detach() - b_dec.detach()
        n = x.shape[0]
        losses, parts, lo, p0 = [], [], 0, 0
        for g, (P_g, size) in enumerate(zip(per_group, sizes)):
            r = F.embedding_bag(i_all[p0 : p0 + P_g] - lo, W[lo : lo + size], starts[g], mode="sum",
                                per_sample_weights=v_all[p0 : p0 + P_g])
            R.sub_(r)
            flat = R.view(-1)
            losses.append(torch.dot(flat, flat) / n)
            parts.append(r)
            lo, p0 = lo + size, p0 + P_g
        ctx.save_for_backward(W, v_all, i_all, starts, R, *parts)
        ctx.groups = (list(per_group), list(sizes))
        return torch.stack(losses), x.detach() - R

    @staticmethod
    def backward(ctx, grad_L, grad_x_hat):
        W, v_all, i_all, starts, R, *parts = ctx.saved_tensors
        per_group, sizes = ctx.groups
        n, G = R.shape[0], len(sizes)
        c = [0.0] * G if grad_L is None else (2.0 * grad_L / n).tolist()
        Gamma = R * c[-1]
        Rw = R.clone() if G > 1 else R
        need_w, need_v = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        grads_w, grads_v = [None] * G, [None] * G
        ends = list(itertools.accumulate(per_group))
        lows = list(itertools.accumulate([0, *sizes]))
        for g in reversed(range(G)):
            p0, P_g, lo = ends[g] - per_group[g], per_group[g], lows[g]
            v, idx, W_g = v_all[p0 : p0 + P_g], i_all[p0 : p0 + P_g] - lo, W[lo : lo + sizes[g]]
            if grad_x_hat is None:  # grad r_g = -Gamma_g
                grads_w[g], grads_v[g] = _decode_grads(W_g, v, idx, starts[g], Gamma, need_w, need_v, sign=-1.0)
            else:
                grads_w[g], grads_v[g] = _decode_grads(W_g, v, idx, starts[g], grad_x_hat - Gamma, need_w, need_v)
            if g:
                Rw.add_(parts[g])  # R_{g-1}
                Gamma.add_(Rw, alpha=c[g - 1])
        grad_x = Gamma if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.needs_input_grad[1]:
            grad_b = -Gamma.sum(0)
            if grad_x_hat is not None:
                grad_b += grad_x_hat.sum(0)
        grad_W = torch.cat(grads_w) if need_w else None
        grad_v = torch.cat(grads_v) if need_v else None
        return grad_x, grad_b, grad_W, grad_v, None, None, None, None


def matryoshka_prefix_losses(x: Tensor, b_dec: Tensor, W_dec: Tensor, pairs: FlatCode,
                             sizes: list[int]) -> tuple[Tensor, Tensor]:
    """``(L (G,), x_hat (N, d_in))``: the Matryoshka prefix losses ``L_m = mean_n ||x_n - b_dec - sum_{g <= m}
    r_g[n]||^2`` of sparse pairs and the full reconstruction (:class:`_MatryoshkaPrefixes`; the pairs are sorted by
    ``(group, token)`` here, differentiably in their values). Inside :func:`dense_reference`, the same through
    autograd (one decode per group, :func:`decode_pairs`)."""
    G, n = len(sizes), x.shape[0]
    bounds = _group_bounds(tuple(sizes), pairs.indices.device)
    group = torch.bucketize(pairs.indices, bounds, right=True)  # latents < bounds[0] -> group 0
    bag = group * n + pairs.rows
    order = bucket_order(bag, G * n)
    counts = bucket_counts(bag, G * n).view(G, n)
    starts = counts.cumsum(1) - counts  # each group's bag offsets, from its first pair
    per_group = counts.sum(1).tolist()  # pairs per group: the slices of the fused kernel (one read a step)
    values, indices = take_rows(pairs.values, order), pairs.indices[order]
    if sparse_path_enabled():
        return _MatryoshkaPrefixes.apply(x, b_dec, W_dec, values, indices, starts, per_group, sizes)
    residual, losses, lows = x - b_dec, [], list(itertools.accumulate([0, *sizes[:-1]]))
    for W_g, v, i, lo, o in zip(W_dec.split(sizes), values.split(per_group), indices.split(per_group), lows, starts):
        residual = residual - decode_pairs(W_g, v, i - lo, o)
        losses.append(residual.pow(2).sum(-1).mean())
    return torch.stack(losses), x - residual


_BOUNDS: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}


def _group_bounds(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """``(G,)`` int64 cumulative group sizes on ``device``, built once per (sizes, device) and cached, so the step
    copies no Python list to the device."""
    key = (sizes, torch.device(device))
    out = _BOUNDS.get(key)
    if out is None:
        out = _BOUNDS[key] = torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.long, device=device)
    return out


def pair_dots(L: Tensor, R_T: Tensor, cols: Tensor) -> Tensor:
    """``(N, m)`` dot products ``L[n] . R_T[cols[n, j]]`` in fp32, for ``L (N, K)``, ``R_T (d_sae, K)`` and
    ``cols (N, m)`` (one gather-dot kernel, ``O(N m K)``: embedding_bag's per-sample-weight gradient)."""
    n, m = cols.shape
    flat = cols.reshape(-1)
    starts = torch.arange(0, n * m, m, device=cols.device)
    bag = torch.arange(n, device=cols.device).repeat_interleave(m)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(L.contiguous(), R_T, flat, starts, bag, 0, -1).view(n, m)
