"""Sparse training path of TopK-style SAEs: one dense GEMM forward, everything else ``O(P d_in)``.

For TopK, BatchTopK and Matryoshka BatchTopK only the ``P`` kept ``(token, latent)`` pairs (``P = k N``)
carry gradient, so the dense autograd graph (a ``(N, d_sae)`` gradient and two more ``N x d_in x d_sae``
GEMMs in the encoder backward) is wasted work. :func:`encode_sparse` instead

1. computes the pre-activations ``(N, d_sae)`` without autograd (:meth:`Encoder.scores_into`: the encoder's
   scores, equal to its ``forward`` up to rounding, into a buffer reused across steps); this GEMM is the
   step's only ``O(N d_in d_sae)`` cost;
2. selects the pairs (the activation's ``select_pairs``: per-token top-k, or batch-level top-``kN``);
3. recomputes the kept scores differentiably (:class:`PairScorer`): the linear dot products
   ``x_c . W_enc[:, i]`` of the pairs through :class:`_PairDots`, whose backward is sparse (``grad W_enc``
   accumulated pair by pair with ``F.embedding_bag`` over the rows of ``x_c``, ``grad b_dec = -W_enc @
   colsum(grad)``), and the encoder-specific rest (norms, ``exp(a ln||x|| + b)``, ``b_enc``) with ordinary
   autograd on ``(P,)`` tensors via :meth:`Encoder.score_from_dots`;
4. returns a sparse :class:`~saelab.sae.activations.Code` (padded ``(N, w)`` plus the CSR pairs ``flat`` for
   variable rows) that :meth:`SAE.decode_code` and :func:`saelab.losses.matryoshka_reconstruction` decode with
   ``F.embedding_bag``, and the pre-activations as :class:`SparseScores` (detached values plus a
   :class:`PairScorer`) so that :func:`saelab.losses.auxk_loss` gets a sparse backward too.

Values and gradients equal the dense path's up to float rounding (``tests/test_sparse_kernels.py``). The dense
path stays as the reference: inside ``with dense_reference():`` every SAE encodes through autograd on the full
``(N, d_sae)`` pre-activations as before.

Sources: the idea that only the ``k`` active latents enter the encoder backward and the decoder is that of
OpenAI's ``sparse_autoencoder`` (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; the
``FastAutoencoder`` autograd function of its ``kernels.py``, Triton sparse-dense matmuls on GPU) and of
sparsify's ``eager_decode`` (``F.embedding_bag``); the CPU kernels here are written from that description with
stock torch ops.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import (  # noqa: F401  (SparseCode: re-exported for users)
    Candidates, Code, FlatCode, SparseCode, row_topk, take_rows,
)
from .encoders import NormCode, ScreenOperands, apply_scale_law_, column_norms

if TYPE_CHECKING:
    from .model import SAE

_state = threading.local()


@contextmanager
def dense_reference() -> Iterator[None]:
    """Within this block (in this thread) :meth:`SAE.encode_code` uses the dense autograd reference path.

    The reference path differentiates through the full ``(N, d_sae)`` pre-activations and returns the codes of
    the activation's ``forward`` (dense for BatchTopK); the parity tests compare it with the sparse path.
    """
    old = getattr(_state, "dense", False)
    _state.dense = True
    try:
        yield
    finally:
        _state.dense = old


def sparse_path_enabled() -> bool:
    """False inside :func:`dense_reference`."""
    return not getattr(_state, "dense", False)


def uses_sparse_path(sae: SAE) -> bool:
    """Whether :meth:`SAE.encode_code` takes the sparse path: its activation currently selects pairs
    (``selects_pairs``: TopK; BatchTopK and Matryoshka BatchTopK in training mode or before their inference
    threshold is set) and :func:`dense_reference` is not active."""
    return sparse_path_enabled() and bool(getattr(sae.activation, "selects_pairs", False))


class SparseScores(Tensor):
    """Pre-activations ``(N, d_sae)`` of the sparse path: a detached tensor whose :attr:`pair_scorer` recomputes
    any ``(token, latent)`` pairs of it with gradient (:class:`PairScorer`).

    Behaves as a plain tensor without gradient (operations on it return plain tensors);
    :func:`saelab.losses.auxk_loss` uses :attr:`pair_scorer` to give the AuxK loss its sparse backward.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl
    pair_scorer: PairScorer

    def columns(self, ids: Tensor) -> Tensor:
        """``(N, n)`` the columns ``ids (n,)``, as a plain tensor without gradient."""
        return self.as_subclass(Tensor).index_select(1, ids)

    @staticmethod
    def wrap(pre: Tensor, scorer: PairScorer) -> SparseScores:
        out = Tensor._make_subclass(SparseScores, pre.detach(), False)
        out.pair_scorer = scorer
        return out


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
    counts = torch.bincount(bags, minlength=n_bags)
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
    """``(d_sae,)`` ``max(||W_enc[:, i]||, 1e-12)`` (:func:`saelab.sae.encoders.column_norms`) whose backward is one
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
        sizes = torch.diff(offsets, append=offsets.new_tensor([idx.numel()]))
        bag = torch.arange(n, device=idx.device).repeat_interleave(sizes)
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
    :func:`saelab.losses.matryoshka_reconstruction`).

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
        ends = torch.tensor(per_group).cumsum(0).tolist()
        lows = torch.tensor([0, *sizes]).cumsum(0).tolist()
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
    bounds = torch.tensor(sizes, device=pairs.indices.device).cumsum(0)
    group = torch.bucketize(pairs.indices, bounds, right=True)  # latents < bounds[0] -> group 0
    bag = group * n + pairs.rows
    order = bucket_order(bag, G * n)
    counts = torch.bincount(bag, minlength=G * n).view(G, n)
    starts = counts.cumsum(1) - counts  # each group's bag offsets, from its first pair
    per_group = counts.sum(1).tolist()
    values, indices = take_rows(pairs.values, order), pairs.indices[order]
    if sparse_path_enabled():
        return _MatryoshkaPrefixes.apply(x, b_dec, W_dec, values, indices, starts, per_group, sizes)
    residual, losses, lows = x - b_dec, [], [0, *bounds[:-1].tolist()]
    for W_g, v, i, lo, o in zip(W_dec.split(sizes), values.split(per_group), indices.split(per_group), lows, starts):
        residual = residual - decode_pairs(W_g, v, i - lo, o)
        losses.append(residual.pow(2).sum(-1).mean())
    return torch.stack(losses), x - residual


class PairScorer:
    """Differentiable encoder scores of chosen ``(token, latent)`` pairs of one batch.

    Args:
        sae: the SAE (its encoder, ``W_enc``, ``b_enc``, ``b_dec``).
        x: ``(N, d_in)`` the batch.
        x_c: ``(N, d_in)`` ``x - b_dec`` with autograd.

    Calling it with a :class:`~saelab.sae.activations.FlatCode` whose ``values`` are the no-gradient scores
    of its pairs returns ``(P,)`` scores equal to them, with gradients into ``W_enc``, ``b_enc``, ``b_dec``
    (and ``x`` if it requires grad) and the encoder's own parameters; the cost is ``O(P)`` forward and
    ``O(P d_in + d_in d_sae)`` backward (see :class:`_PairDots`).
    """

    def __init__(self, sae: SAE, x: Tensor, x_c: Tensor) -> None:
        self.encoder, self.W_enc, self.b_enc, self.b_dec = sae.encoder, sae.W_enc, sae.b_enc, sae.b_dec
        self.x, self.x_c, self.x_c_nograd = x, x_c, x_c.detach()
        self._norms: tuple[Tensor, Tensor] | None = None

    def norms(self) -> tuple[Tensor, Tensor]:
        """``(max(||x_c||, 1e-8) (N,), max(||W_enc[:, i]||, 1e-12) (d_sae,))`` with autograd (computed once)."""
        if self._norms is None:
            self._norms = (self.x_c.norm(dim=-1).clamp_min(1e-8), _ColumnNorms.apply(self.W_enc))
        return self._norms

    def __call__(self, pairs: FlatCode) -> Tensor:
        enc, cols = self.encoder, pairs.indices
        xn = wn = None
        if enc.uses_norms:
            x_norm, w_norm = self.norms()
            xn, wn = take_rows(x_norm, pairs.rows), take_rows(w_norm, cols)
        with torch.no_grad():
            dots = enc.dots_from_scores(pairs.values, _detach(xn), _detach(wn), self.b_enc, cols)
        dots = _PairDots.apply(self.x, self.b_dec, self.W_enc, self.x_c_nograd, dots, pairs.rows, cols, pairs.offsets)
        return enc.score_from_dots(dots, xn, wn, self.b_enc, cols)

    def columns(self, cols: Tensor, scores: Tensor) -> Tensor:
        """Differentiable scores ``(N, n)`` of every token at latents ``cols (n,)``, given their values ``scores``
        (without gradient, e.g. columns of the pre-activations). Backward ``O(N n d_in)`` in GEMMs
        (:class:`_BlockDots`): cheaper than :meth:`__call__` when ``n`` is at most ~10x the pairs per token."""
        enc = self.encoder
        xn = wn = None
        if enc.uses_norms:
            x_norm, w_norm = self.norms()
            xn, wn = x_norm.unsqueeze(1), take_rows(w_norm, cols)
        with torch.no_grad():
            dots = enc.dots_from_scores(scores, _detach(xn), _detach(wn), self.b_enc, cols)
        dots = _BlockDots.apply(self.x, self.b_dec, self.W_enc, self.x_c_nograd, dots, cols)
        return enc.score_from_dots(dots, xn, wn, self.b_enc, cols)


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


SELECTION_GEMMS = ("auto", "fp32", "bf16")
"""Choices of :func:`set_selection_gemm`."""

SCREEN_CANDIDATES_PER_K = 2
"""Screened selection: candidates per token = this x ``k`` (capped at ``d_sae``). With the single bf16 GEMM's bound
(~1.2 u ||L|| max ||R||): on the demo's trained TopK SAE (d_sae 9216, k 32, real activations) 2 k leaves 0.6 % of
tokens to redo on exact rows and 3 k none, but 3 k's wider top-k and candidate dots cost more encode time than
the redone tokens save; on the comparison's trained BatchTopK SAEs (d_sae 2304) 2 k widens 5-21 % of tokens from the
same bf16 scores, 3 k 0-0.6 %, at equal encode time. BatchTopK's search starts from 2 k as on the fp32 path."""

_BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits, round to nearest)


def set_selection_gemm(sae: SAE, mode: str) -> None:
    """Choose the GEMM that selects the kept pairs on the sparse training path of ``sae``.

    * ``"fp32"``: the full fp32 pre-activations (the reference path; default of a bare SAE);
    * ``"bf16"``: the screened selection (:func:`screen_candidates`): a bf16 GEMM with a certified error bound
      finds each token's candidates, their exact fp32 scores are recomputed, and tokens the bound cannot certify
      are redone on exact fp32 rows; the kept pairs and their values are those of the fp32 path up to float
      rounding (ties);
    * ``"auto"``: ``"bf16"`` where a bf16 GEMM is fast (:func:`fast_bf16_gemm`: CUDA, or a CPU with AVX-512 BF16 /
      AMX), else ``"fp32"``.

    Encoders whose scores are one GEMM, a per-latent scale law and a bias
    (:meth:`~saelab.sae.encoders.Encoder.screen_operands`: all the built-in ones) with TopK / BatchTopK / Matryoshka
    BatchTopK are screened; others always use the fp32 path.

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode not in SELECTION_GEMMS:
        raise ValueError(f"unknown selection GEMM {mode!r}; choose one of {', '.join(SELECTION_GEMMS)}")
    sae.__dict__["_selection_gemm"] = mode


def fast_bf16_gemm(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 GEMMs natively with fp32 accumulation: CUDA, or a CPU where oneDNN supports
    bf16 (AVX-512 BF16 or AMX)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def _screening(sae: SAE, device: torch.device) -> bool:
    mode = sae.__dict__.get("_selection_gemm", "fp32")
    return mode == "bf16" or (mode == "auto" and fast_bf16_gemm(device))


@contextmanager
def fp32_accumulation(device: torch.device) -> Iterator[None]:
    """cuBLAS may reduce bf16 GEMMs in bf16 (``allow_bf16_reduced_precision_reduction``), which the error bound
    of :func:`screen_candidates` does not cover: switched off inside this block."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    old = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction = old


def pair_dots(L: Tensor, R_T: Tensor, cols: Tensor) -> Tensor:
    """``(N, m)`` dot products ``L[n] . R_T[cols[n, j]]`` in fp32, for ``L (N, K)``, ``R_T (d_sae, K)`` and
    ``cols (N, m)`` (one gather-dot kernel, ``O(N m K)``: embedding_bag's per-sample-weight gradient)."""
    n, m = cols.shape
    flat = cols.reshape(-1)
    starts = torch.arange(0, n * m, m, device=cols.device)
    bag = torch.arange(n, device=cols.device).repeat_interleave(m)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(L.contiguous(), R_T, flat, starts, bag, 0, -1).view(n, m)


def _post(ops: ScreenOperands, dots: Tensor, cols: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
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
    """Write the bf16 GEMM operand ``[bf16(t), col]`` (``t (n, K)`` fp32) into ``out (n, K + 1)`` bf16 and return the
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
    return residue


def _screen(ops: ScreenOperands, alloc: Alloc = _fresh) -> tuple[Tensor, Tensor]:
    """``(s~ (N, d_sae) bf16, slack_n (N,))``: :func:`screen_scores` and :func:`screen_slack` sharing the operands."""
    (n, K), d_sae, dev, bf = ops.L.shape, ops.R_T.shape[0], ops.L.device, torch.bfloat16
    scaled = ops.a is not None
    A = alloc("screen_L", (n, K + 1), bf, dev)
    lo_L = _bf16_operand(ops.L, 1.0, A, alloc("screen_scratch_L", (n, K), ops.L.dtype, dev))
    B = alloc("screen_R", (d_sae, K + 1), bf, dev)
    lo_R = _bf16_operand(ops.R_T, None if scaled else ops.bias, B, alloc("screen_scratch_R", (d_sae, K), ops.R_T.dtype, dev))
    with fp32_accumulation(dev):
        out = torch.mm(A, B.t(), out=alloc("screen_scores", (n, d_sae), bf, dev))
    if scaled:
        apply_scale_law_(out, ops.log_norm, ops.a, ops.b, ops.bias)
    return out, _slack(ops, lo_L, lo_R)


def _slack(ops: ScreenOperands, lo_L: Tensor, lo_R: Tensor) -> Tensor:
    """``slack_n`` of :func:`screen_slack` from the residue norms ``lo_L (N,)``, ``lo_R (d_sae,)``."""
    L, R_T, bias = ops.L, ops.R_T, ops.bias
    K = L.shape[1] + 1
    gamma = K * 2.0**-24 / (1 - K * 2.0**-24)
    r_max, lo_r = R_T.norm(dim=1).max(), lo_R.max()
    hi_L = L.norm(dim=1) + lo_L  # >= ||bf16(L_n)||
    gemm = lo_L * r_max + hi_L * lo_r + gamma * hi_L * (r_max + lo_r)
    if ops.a is None:
        if bias is None:
            return 1.02 * gemm
        b_max = bias.abs().max()
        return 1.02 * (gemm + gamma * (1 + _BF16_U) * b_max) + (bias - bias.to(torch.bfloat16).float()).abs().max()
    ln = ops.log_norm
    c_max = torch.exp(torch.maximum(ops.a.max() * ln, ops.a.min() * ln) + ops.b.max())
    slack = 1.01 * c_max * (1.02 * gemm)
    return slack + 2.1 * _BF16_U * bias.abs().max() if bias is not None else slack


def screen_scores(ops: ScreenOperands, alloc: Alloc = _fresh) -> Tensor:
    """``(N, d_sae)`` bf16 approximation ``s~`` of the scores before ``post`` (see :func:`screen_candidates` for its
    error bound): one bf16 GEMM with fp32 accumulation, rounded to bf16. Without a scale law the bias is a column of
    the GEMM (``[L, 1] @ [R_T, bias]^T``); with one (``ops.a``) the GEMM gives ``L @ R_T^T`` and an fp32 epilogue
    over blocks of tokens applies ``exp(a_i log_norm_n + b_i) (.) + bias_i`` before the rounding
    (:func:`~saelab.sae.encoders.apply_scale_law_`)."""
    return _screen(ops, alloc)[0]


def screen_slack(ops: ScreenOperands) -> Tensor:
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


def screen_rel(ops: ScreenOperands) -> float:
    """The relative coefficient ``rel`` of the bound ``|s~ - s| <= rel u |s~| + slack_n``: 2.05 for one rounding of
    the GEMM output, 3.1 with a scale law (the scaled value is rounded again)."""
    return 2.05 if ops.a is None else 3.1


def screen_candidates(ops: ScreenOperands, m: int, alloc: Alloc = _fresh) -> Candidates:
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
        ops: the encoder's :class:`~saelab.sae.encoders.ScreenOperands` (fp32).
        m: candidates per token (``<= d_sae``).
        alloc: scratch tensors (default fresh; the training step reuses buffers kept on the SAE).

    Returns:
        :class:`~saelab.sae.activations.Candidates` (``full_rows`` computes exact fp32 rows from ``ops``; ``more``
        screens more candidates of some tokens from the same bf16 scores).
    """
    L, R_T = ops.L, ops.R_T
    approx, slack = _screen(ops, alloc)
    rel = screen_rel(ops) * _BF16_U

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
        return _post(ops, L[rows] @ R_T.t(), rows=rows)

    return Candidates(*candidates(None, m), full_rows, {}, candidates)


class ScreenedScores:
    """The pre-activations ``(N, d_sae)`` of a screened step, never formed: :meth:`columns` computes exact fp32
    columns on demand (AuxK's dead latents) and :attr:`pair_scorer` recomputes pairs with gradient, as for
    :class:`SparseScores`. Any other use raises, naming the fix."""

    def __init__(self, ops: ScreenOperands, scorer: PairScorer, alloc: Alloc = _fresh) -> None:
        self.ops, self.pair_scorer, self._alloc = ops, scorer, alloc
        self.shape = torch.Size((ops.L.shape[0], ops.R_T.shape[0]))

    def columns(self, ids: Tensor) -> Tensor:
        """``(N, n)`` exact scores of latents ``ids (n,)``, without gradient (written into scratch space of
        ``N d_sae`` floats that the training step reuses: AuxK asks for up to every dead column each step)."""
        ops, (N, d_sae), n, K = self.ops, self.shape, ids.numel(), self.ops.L.shape[1]
        dtype, dev = ops.L.dtype, ops.L.device
        R = self._alloc("columns_R", (d_sae * K,), dtype, dev)[: n * K].view(n, K)
        out = self._alloc("columns", (N * d_sae,), dtype, dev)[: N * n].view(N, n)
        with torch.autocast(dev.type, enabled=False):  # exact fp32 columns, also inside an autocast forward
            return _post(ops, torch.mm(ops.L, torch.index_select(ops.R_T, 0, ids, out=R).t(), out=out), ids)

    def __getattr__(self, name: str):
        raise AttributeError(
            f"the screened training step does not form the (N, d_sae) pre-activations ({name!r} unavailable); "
            "use .columns(ids), or saelab.sae.sparse.set_selection_gemm(sae, 'fp32') for the full tensor"
        )


def encode_sparse(sae: SAE, x: Tensor) -> tuple[Code, Tensor]:
    """The sparse path of :meth:`SAE.encode_code` (see the module docstring).

    Args:
        sae: an SAE for which :func:`uses_sparse_path` holds.
        x: ``(N, d_in)`` flat inputs.

    Returns:
        ``(code, pre)``: a sparse code (``(N, k)`` for TopK; padded ``(N, w)`` carrying ``flat`` for BatchTopK;
        a :class:`~saelab.sae.encoders.NormCode` for norm-restoring encoders) and the ``(N, d_sae)``
        pre-activations, a :class:`SparseScores` when gradients are recorded.
    """
    x_c = x - sae.b_dec
    params = (sae.W_enc, sae.b_enc, sae.b_dec, *sae.encoder.parameters())
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    ops = None
    # the selection is exact fp32 (screened or not) also under torch.autocast: its GEMMs must not be downcast
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        if grad and _screening(sae, x.device) and hasattr(sae.activation, "select_from_candidates"):
            ops = sae.encoder.screen_operands(x_c.detach(), sae.W_enc, sae.b_enc)
        if ops is not None:
            m = min(sae.cfg.d_sae, SCREEN_CANDIDATES_PER_K * sae.cfg.k)
            cand = screen_candidates(ops, m, lambda *a: _buffer(sae, *a))
            pairs = sae.activation.select_from_candidates(cand)
            sae.__dict__["_screen_stats"] = cand.stats
        else:
            out = _scores_buffer(sae, x_c) if grad else x_c.new_empty(x_c.shape[0], sae.cfg.d_sae)
            pre = sae.encoder.scores_into(x_c, sae.W_enc, sae.b_enc, out)
            pairs = sae.activation.select_pairs(pre)
    if grad:
        scorer = PairScorer(sae, x, x_c)
        pairs = pairs._replace(values=scorer(pairs))
        if ops is not None:
            pre = ScreenedScores(ops, scorer, lambda *a: _buffer(sae, *a))
        else:
            pre = SparseScores.wrap(pre, scorer)
    code = pairs._replace(values=torch.relu(pairs.values)).to_code()
    if sae.encoder.restores_norm:
        code = NormCode.of(code, x_c.norm(dim=-1))
    return code, pre


def _buffer(sae: SAE, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scratch tensor of the sparse step (``name``: the pre-activations ``(N, d_sae)``, the screened selection's
    operands and bf16 scores), reused across training steps on CPU.

    A fresh 150 MB CPU tensor is page-faulted in on every step (glibc returns blocks that large to the OS on
    free). A buffer kept on the SAE is reused only when nothing else
    references its storage any more (e.g. the previous step's ``pre`` was dropped), so a tensor still held by a
    caller is never overwritten. Other devices, or a torch without the storage use count, get a fresh tensor.
    """
    bufs = sae.__dict__.setdefault("_sparse_buffers", {})
    buf = bufs.get(name)
    if buf is not None and buf.shape == shape and buf.dtype == dtype and buf.device == device and _sole_owner(buf):
        return buf
    buf = torch.empty(shape, dtype=dtype, device=device)
    if device.type == "cpu":
        bufs[name] = buf
    return buf


def _scores_buffer(sae: SAE, x_c: Tensor) -> Tensor:
    """The ``(N, d_sae)`` pre-activations buffer (:func:`_buffer`)."""
    return _buffer(sae, "scores", (x_c.shape[0], sae.cfg.d_sae), x_c.dtype, x_c.device)


def _storage_refs(t: Tensor) -> int | None:
    """References to ``t``'s storage (tensors and views sharing it), as seen through a temporary
    ``untyped_storage()`` handle; None on a torch without ``torch._C._storage_Use_Count``."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return None if use_count is None else use_count(t.untyped_storage()._cdata)


@functools.cache
def _sole_refs() -> int | None:
    """The storage count :func:`_storage_refs` sees for a tensor nobody else holds (the temporary storage handle adds
    a reference on some torch versions: 2 on 2.13), probed once on a fresh tensor."""
    return _storage_refs(torch.empty(1))


def _sole_owner(t: Tensor) -> bool:
    """Whether ``t`` is the only tensor using its storage."""
    sole, refs = _sole_refs(), _storage_refs(t)
    return sole is not None and refs == sole
