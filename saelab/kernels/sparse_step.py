"""Sparse training path of TopK-style SAEs: one dense GEMM forward, everything else ``O(P d_in)``.

For TopK, BatchTopK and Matryoshka BatchTopK only the ``P`` kept ``(token, latent)`` pairs (``P = k N``)
carry gradient, so the dense autograd graph (a ``(N, d_sae)`` gradient and two more ``N x d_in x d_sae``
GEMMs in the encoder backward) is wasted work. :func:`encode_sparse` instead

1. computes the pre-activations ``(N, d_sae)`` without autograd (:func:`~saelab.kernels.scores.scores_into` of the
   encoder's :meth:`~saelab.sae.encoders.Encoder.score_operands`, equal to its ``forward`` up to rounding, into a
   buffer reused across steps); this GEMM is the
   step's only ``O(N d_in d_sae)`` cost;
2. selects the pairs (the activation's ``select_pairs``: per-token top-k, or batch-level top-``kN``);
3. recomputes the kept scores differentiably (:class:`PairScorer`): the linear dot products
   ``x_c . W_enc[:, i]`` of the pairs through :class:`_PairDots`, whose backward is sparse (``grad W_enc``
   accumulated pair by pair with ``F.embedding_bag`` over the rows of ``x_c``, ``grad b_dec = -W_enc @
   colsum(grad)``), and the encoder-specific rest (norms, ``exp(a ln||x|| + b)``, ``b_enc``) with ordinary
   autograd on ``(P,)`` tensors via :meth:`Encoder.score_from_dots`;
4. returns a sparse :class:`~saelab.codes.Code` (padded ``(N, w)`` plus the CSR pairs ``flat`` for
   variable rows) that :meth:`SAE.decode_code` and :func:`saelab.sae.losses.matryoshka_reconstruction` decode with
   ``F.embedding_bag``, and the pre-activations as :class:`SparseScores` (detached values plus a
   :class:`PairScorer`) so that :func:`saelab.sae.losses.auxk_loss` gets a sparse backward too.

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

import torch
from torch import Tensor, nn

from ..codes import Code, FlatCode, NormCode
from ..devices import bf16_native
from .mode import sparse_path_enabled
from .pairs import _BlockDots, _ColumnNorms, _PairDots
from .screen import Alloc, _fresh, _post, fp32_accumulation, screen_candidates
from .scores import ScoreOperands, scores_into
from .topk import take_rows

SAE = nn.Module
"""Annotation for an :class:`~saelab.sae.model.SAE` (the kernels sit below the model and do not import it)."""


def uses_sparse_path(sae: SAE) -> bool:
    """Whether :meth:`SAE.encode_code` takes the sparse path: its activation currently selects pairs
    (``selects_pairs``: TopK; BatchTopK and Matryoshka BatchTopK in training mode or before their inference
    threshold is set) and :func:`dense_reference` is not active."""
    return sparse_path_enabled() and bool(getattr(sae.activation, "selects_pairs", False))


class SparseScores(Tensor):
    """Pre-activations ``(N, d_sae)`` of the sparse path: a detached tensor whose :attr:`pair_scorer` recomputes
    any ``(token, latent)`` pairs of it with gradient (:class:`PairScorer`).

    Behaves as a plain tensor without gradient (operations on it return plain tensors);
    :func:`saelab.sae.losses.auxk_loss` uses :attr:`pair_scorer` to give the AuxK loss its sparse backward.
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


class PairScorer:
    """Differentiable encoder scores of chosen ``(token, latent)`` pairs of one batch.

    Args:
        sae: the SAE (its encoder, ``W_enc``, ``b_enc``, ``b_dec``).
        x: ``(N, d_in)`` the batch.
        x_c: ``(N, d_in)`` ``x - b_dec`` with autograd.

    Calling it with a :class:`~saelab.codes.FlatCode` whose ``values`` are the no-gradient scores
    of its pairs returns ``(P,)`` scores equal to them, with gradients into ``W_enc``, ``b_enc``, ``b_dec``
    (and ``x`` if it requires grad) and the encoder's own parameters; the cost is ``O(P)`` forward and
    ``O(P d_in + d_in d_sae)`` backward (see :class:`_PairDots`).
    """

    def __init__(self, sae: SAE, x: Tensor, x_c: Tensor) -> None:
        # the input-side bias: b_dec for an SAE, a constant zero for a transcoder (whose b_dec is the output's)
        self.encoder, self.W_enc, self.b_enc, self.b_dec = sae.encoder, sae.W_enc, sae.b_enc, _input_bias(sae)
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


def _input_bias(sae: SAE) -> Tensor:
    """``(d_in,)`` the bias the encoder subtracts from its input: ``sae.b_in`` (``b_dec`` for an SAE, zeros for a
    transcoder), ``b_dec`` for modules without that attribute."""
    return getattr(sae, "b_in", sae.b_dec)


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


def set_selection_gemm(sae: SAE, mode: str) -> None:
    """Choose the GEMM that selects the kept pairs on the sparse training path of ``sae``.

    * ``"fp32"``: the full fp32 pre-activations (the reference path; default of a bare SAE);
    * ``"bf16"``: the screened selection (:func:`screen_candidates`): a bf16 GEMM with a certified error bound
      finds each token's candidates, their exact fp32 scores are recomputed, and tokens the bound cannot certify
      are redone on exact fp32 rows; the kept pairs and their values are those of the fp32 path up to float
      rounding (ties);
    * ``"auto"``: ``"bf16"`` where a bf16 GEMM is fast (:func:`saelab.devices.bf16_native`: a CUDA GPU of compute
      capability >= 8, or a CPU with AVX-512 BF16 / AMX), else ``"fp32"``.

    Every encoder's scores are one GEMM, a per-latent scale law and a bias
    (:meth:`~saelab.sae.encoders.Encoder.score_operands`), so every encoder with TopK / BatchTopK / Matryoshka
    BatchTopK is screened.

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode not in SELECTION_GEMMS:
        raise ValueError(f"unknown selection GEMM {mode!r}; choose one of {', '.join(SELECTION_GEMMS)}")
    sae.__dict__["_selection_gemm"] = mode


def _screening(sae: SAE, device: torch.device) -> bool:
    mode = sae.__dict__.get("_selection_gemm", "fp32")
    return mode == "bf16" or (mode == "auto" and bf16_native(device))


class ScreenedScores:
    """The pre-activations ``(N, d_sae)`` of a screened step, never formed: :meth:`columns` computes exact fp32
    columns on demand (AuxK's dead latents) and :attr:`pair_scorer` recomputes pairs with gradient, as for
    :class:`SparseScores`. Any other use raises, naming the fix."""

    def __init__(self, ops: ScoreOperands, scorer: PairScorer, alloc: Alloc = _fresh) -> None:
        self.ops, self.pair_scorer, self._alloc = ops, scorer, alloc
        self.shape = torch.Size((ops.L.shape[0], ops.R_T.shape[0]))

    def columns(self, ids: Tensor) -> Tensor:
        """``(N, n)`` exact scores of latents ``ids (n,)``, without gradient (written into scratch space of
        ``N d_sae`` floats that the training step reuses: AuxK asks for up to every dead column each step)."""
        ops, (N, d_sae), n, K = self.ops, self.shape, ids.numel(), self.ops.L.shape[1]
        dtype, dev = ops.L.dtype, ops.L.device
        R = self._alloc("columns_R", (d_sae * K,), dtype, dev)[: n * K].view(n, K)
        out = self._alloc("columns", (N * d_sae,), dtype, dev)[: N * n].view(N, n)
        with torch.autocast(dev.type, enabled=False), fp32_accumulation(dev):  # exact fp32, also under autocast or TF32
            return _post(ops, torch.mm(ops.L, torch.index_select(ops.R_T, 0, ids, out=R).t(), out=out), ids)

    def __getattr__(self, name: str):
        raise AttributeError(
            f"the screened training step does not form the (N, d_sae) pre-activations ({name!r} unavailable); "
            "use .columns(ids), or saelab.kernels.sparse_step.set_selection_gemm(sae, 'fp32') for the full tensor"
        )


def encode_sparse(sae: SAE, x: Tensor) -> tuple[Code, Tensor]:
    """The sparse path of :meth:`SAE.encode_code` (see the module docstring).

    Args:
        sae: an SAE for which :func:`uses_sparse_path` holds.
        x: ``(N, d_in)`` flat inputs.

    Returns:
        ``(code, pre)``: a sparse code (``(N, k)`` for TopK; padded ``(N, w)`` carrying ``flat`` for BatchTopK;
        a :class:`~saelab.codes.NormCode` for norm-restoring encoders) and the ``(N, d_sae)``
        pre-activations, a :class:`SparseScores` when gradients are recorded.
    """
    b_in = _input_bias(sae)
    x_c = x - b_in
    params = (sae.W_enc, sae.b_enc, b_in, *sae.encoder.parameters())
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    # the selection is exact fp32 (screened or not) also under torch.autocast or TF32: its GEMMs must not be downcast
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False), fp32_accumulation(x.device):
        ops = sae.encoder.score_operands(x_c.detach(), sae.W_enc, sae.b_enc)
        screened = grad and _screening(sae, x.device) and hasattr(sae.activation, "select_from_candidates")
        if screened:
            m = min(sae.cfg.d_sae, SCREEN_CANDIDATES_PER_K * sae.cfg.k)
            cand = screen_candidates(ops, m, lambda *a: _buffer(sae, *a))
            pairs = sae.activation.select_from_candidates(cand)
            sae.__dict__["_screen_stats"] = cand.stats
        else:
            out = _scores_buffer(sae, x_c) if grad else x_c.new_empty(x_c.shape[0], sae.cfg.d_sae)
            pre = scores_into(ops, out)
            pairs = sae.activation.select_pairs(pre)
    if grad:
        scorer = PairScorer(sae, x, x_c)
        pairs = pairs._replace(values=scorer(pairs))
        pre = ScreenedScores(ops, scorer, lambda *a: _buffer(sae, *a)) if screened else SparseScores.wrap(pre, scorer)
    code = pairs._replace(values=torch.relu(pairs.values)).to_code()
    if sae.encoder.restores_norm:
        code = NormCode.of(code, x_c.norm(dim=-1))
    return code, pre


def _buffer(sae: SAE, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scratch tensor of the sparse step (``name``: the pre-activations ``(N, d_sae)``, the screened selection's
    operands and bf16 scores, AuxK's dead columns), reused across training steps on every device.

    A fresh 150 MB CPU tensor is page-faulted in on every step (glibc returns blocks that large to the OS on
    free); on a GPU a fresh ``N x d_sae`` block each step fragments the caching allocator's pool. A buffer kept on
    the SAE is reused only when nothing else references its storage any more (e.g. the previous step's ``pre`` was
    dropped), so a tensor still held by a caller is never overwritten (on a GPU, kernels of one stream run in order,
    so the next step's writes follow the last step's reads). A torch without the storage use count gets a fresh
    tensor.
    """
    bufs = sae.__dict__.setdefault("_sparse_buffers", {})
    buf = bufs.get(name)
    if buf is not None and buf.shape == shape and buf.dtype == dtype and buf.device == device and _sole_owner(buf):
        return buf
    buf = torch.empty(shape, dtype=dtype, device=device)
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
