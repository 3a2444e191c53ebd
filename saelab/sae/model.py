"""The sparse autoencoder module: named encoder scoring -> named activation -> linear decoder.

Conventions (SAELens v6): ``W_enc (d_in, d_sae)``, ``b_enc (d_sae)``, ``W_dec (d_sae, d_in)`` whose rows are
the dictionary atoms, ``b_dec (d_in)`` subtracted from the input before encoding
(``apply_b_dec_to_input``). The scoring (``ENCODERS``: linear or cosine variants) and the activation
(``ACTIVATIONS``) are independent choices. This module never imports the trainer.

Transcoders (``cfg.transcoder``; Dunefsky et al. 2024, arXiv 2406.11944) are the same module with a decoder to
another hook: ``W_dec (d_sae, d_out)``, ``b_dec (d_out)``, and the input read uncentred (``b_in = 0``), as SAELens
``Transcoder`` (``process_sae_in`` skips ``b_dec``) and sparsify's ``transcode`` do; skip-transcoders
(``cfg.skip``; Paulo et al. 2025, arXiv 2501.18823) add ``x @ W_skip^T`` with ``W_skip (d_out, d_in)``, zeros at
init (SAELens ``SkipTranscoder``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import sparse_step
from ..kernels.pairs import decode_pairs
from ..kernels.topk import row_dots, take_rows
from .activations import ACTIVATIONS
from ..codes import Code, NormCode
from .config import SAEConfig
from .encoders import ENCODERS
from .objective import LossWeights, SAELoss, sae_loss


class SAE(nn.Module):
    """A sparse autoencoder ``x_hat = act(score(x - b_dec; W_enc, b_enc)) W_dec + b_dec``, or a (skip-)transcoder
    ``y_hat = act(score(x; W_enc, b_enc)) W_dec + b_dec [+ x @ W_skip^T]``.

    ``score`` is ``cfg.encoder`` (default ``linear``: ``(x - b_dec) @ W_enc + b_enc``; see
    :mod:`saelab.sae.encoders`). With ``magnitude_bypass`` the decoder uses unit-normalised atoms and rescales the
    reconstruction of ``x - b_dec`` to norm ``||x - b_dec||`` (Naihin & Stambler 2026, arXiv 2606.15054).

    Args:
        cfg: the architecture.

    Attributes:
        W_enc: ``(d_in, d_sae)`` encoder; initialised to ``W_dec^T``.
        b_enc: ``(d_sae,)`` encoder bias, zeros.
        W_dec: ``(d_sae, d_out)`` decoder with unit-norm rows (Kaiming-uniform then normalised); ``d_out = d_in``
            for a plain SAE (:attr:`SAEConfig.out_dim`).
        b_dec: ``(d_out,)`` decoder bias; the trainer sets it to the geometric median of the first batch of targets.
        b_in: ``(d_in,)`` the bias subtracted from the input before scoring: ``b_dec`` itself for a plain SAE, a
            zero buffer (not saved) for a transcoder.
        W_skip: ``(d_out, d_in)`` skip-transcoders only, zeros at init.
        encoder: the scoring :class:`~saelab.sae.encoders.Encoder` from ``ENCODERS`` (owns ``a``, ``b``, ...).
        activation: the sparsifying :class:`~torch.nn.Module` from ``ACTIVATIONS``.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        if not cfg.d_in or not cfg.d_sae:
            raise ValueError(f"d_in and d_sae must be set: build the SAE from cfg.resolved(d_in) (got d_in={cfg.d_in}, d_sae={cfg.d_sae})")
        super().__init__()
        self.cfg = cfg
        d_out = cfg.out_dim
        W_dec = torch.empty(cfg.d_sae, d_out)
        nn.init.kaiming_uniform_(W_dec)
        W_dec = F.normalize(W_dec, dim=-1)
        self.W_dec = nn.Parameter(W_dec)
        if cfg.transcoder:  # the encoder reads another space: its own unit-norm columns, drawn after W_dec
            W_enc_t = torch.empty(cfg.d_sae, cfg.d_in)
            nn.init.kaiming_uniform_(W_enc_t)
            W_enc_t = F.normalize(W_enc_t, dim=-1)
        else:
            W_enc_t = W_dec.clone()
        # (d_in, d_sae) stored column-major: each latent's encoder column is contiguous, so the sparse step's
        # per-latent gathers and gradients (saelab.kernels.sparse_step) need no transposed copies; GEMMs read it as is
        self.W_enc = nn.Parameter(W_enc_t.T)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.transcoder:
            # the output bias lives in another space: the input is scored uncentred (SAELens Transcoder)
            self.register_buffer("_b_in_zero", torch.zeros(cfg.d_in), persistent=False)
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, cfg.d_in))
        self.encoder = ENCODERS.get(cfg.encoder)(cfg)
        self.activation = ACTIVATIONS.get(cfg.activation)(cfg)

    # -- shapes ---------------------------------------------------------------------------------------
    def _flat(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"expected input with last dimension d_in={self.cfg.d_in}, got shape {tuple(x.shape)}")
        return x.reshape(-1, self.cfg.d_in), x.shape[:-1]

    @property
    def b_in(self) -> Tensor:
        """``(d_in,)`` the input-side bias subtracted before scoring (``x_c = x - b_in``): ``b_dec`` for a plain SAE
        (SAELens ``apply_b_dec_to_input``), zeros for a transcoder (SAELens ``Transcoder.process_sae_in``)."""
        return self._b_in_zero if self.cfg.transcoder else self.b_dec

    def skip_out(self, x: Tensor) -> Tensor | None:
        """The skip term ``x @ W_skip^T`` ``(N, d_out)`` of flat inputs ``x (N, d_in)`` (SAELens ``SkipTranscoder``;
        Paulo et al. 2025, arXiv 2501.18823), differentiable in ``W_skip``; None without a skip term."""
        return x @ self.W_skip.T if self.cfg.skip else None

    # -- core -----------------------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder scores ``(N, d_sae)`` of flat inputs ``x (N, d_in)``: ``encoder(x - b_in, W_enc, b_enc)``."""
        return self.encoder(x - self.b_in, self.W_enc, self.b_enc)

    def centered_norm(self, x: Tensor) -> Tensor:
        """``||x - b_dec||`` of shape ``(...)`` for ``x (..., d_in)``: the ``x_norm`` that :meth:`decode` needs for
        norm-restoring encoders (``magnitude_bypass``)."""
        return (x - self.b_in).norm(dim=-1)

    def encode_code(self, x: Tensor) -> tuple[Code, Tensor]:
        """Encode flat inputs ``(N, d_in)``.

        TopK-style activations (TopK always; BatchTopK and Matryoshka BatchTopK in training mode) take the sparse
        path of :mod:`saelab.kernels.sparse_step`: the pre-activations are computed without autograd, only the kept
        ``(token, latent)`` scores are recomputed with gradient, and BatchTopK codes are sparse (padded
        ``(N, w)`` with zeros, carrying their CSR pairs as ``code.flat``). Inside
        ``saelab.kernels.mode.dense_reference()`` the dense autograd path is used instead (same values and
        gradients up to float rounding; BatchTopK codes then are dense ``(N, d_sae)``).

        Returns:
            (code, pre-activations ``(N, d_sae)``). For norm-restoring encoders the code is a
            :class:`~saelab.codes.NormCode` carrying ``x_norm (N,) = ||x - b_dec||``, so
            :meth:`decode_code` needs no hidden state. On the sparse path with gradients, ``pre`` is a detached
            :class:`~saelab.kernels.sparse_step.SparseScores` whose ``pair_scorer`` gives ``saelab.sae.losses.auxk_loss`` its
            gradient.
        """
        if sparse_step.uses_sparse_path(self):
            return sparse_step.encode_sparse(self, x)
        x_c = x - self.b_in
        pre = self.encoder(x_c, self.W_enc, self.b_enc)
        code = self.activation(pre)
        if self.encoder.restores_norm:
            code = NormCode.of(code, x_c.norm(dim=-1))
        return code, pre

    def decode_code(self, code: Code, x_norm: Tensor | None = None, x: Tensor | None = None) -> Tensor:
        """Reconstruct ``(N, d_out)`` (``d_in`` for a plain SAE) from a :class:`Code`.

        Sparse codes are decoded with ``F.embedding_bag`` (gathers only the active decoder rows of each token,
        as in sparsify's sparse decoder) instead of a dense ``(N, d_sae) @ W_dec``; codes carrying CSR pairs
        (``code.flat``, BatchTopK on the sparse path) are decoded from those, skipping the padding.

        For norm-restoring encoders (``magnitude_bypass``): ``r = f @ normalize(W_dec rows)`` (computed as the code
        divided by the row norms, without copying ``W_dec``), then ``x_hat = r ||x_c|| / max(||r||, 1e-8) + b_dec``.

        Args:
            code: from :meth:`encode_code` (or any :class:`Code`).
            x_norm: ``(N,)`` ``||x - b_dec||``; defaults to ``code.x_norm`` (a :class:`NormCode`); ignored by
                encoders that do not restore the norm.
            x: ``(N, d_in)`` the encoded inputs: skip-transcoders add ``x @ W_skip^T``; ignored otherwise.

        Raises:
            ValueError: a norm-restoring encoder gets no ``x_norm``; a skip-transcoder gets no ``x``.
        """
        flat = getattr(code, "flat", None)
        if flat is None:
            values, indices, offsets = code.values, code.indices, None
        else:
            values, indices, offsets = flat.values, flat.indices, flat.offsets
        if self.encoder.restores_norm:
            x_norm = x_norm if x_norm is not None else getattr(code, "x_norm", None)
            self._check_x_norm(x_norm, code.values.shape[:1])
            inv = self.W_dec.norm(dim=-1).clamp_min(1e-12).reciprocal()  # F.normalize's eps
            values = values * (inv if indices is None else take_rows(inv, indices))  # deterministic backward
        if indices is None:
            r = values @ self.W_dec
        else:
            r = decode_pairs(self.W_dec, values, indices, offsets)
        out = self.encoder.restore_norm(r, x_norm) + self.b_dec
        return out if not self.cfg.skip else out + self._skip_of(x, code.values.shape[:1])

    def _skip_of(self, x: Tensor | None, lead: torch.Size) -> Tensor:
        if x is None:
            raise ValueError("a skip-transcoder's output includes x @ W_skip^T: pass the encoded inputs "
                             f"x=(N, d_in={self.cfg.d_in}) to decode/decode_code, or call sae(x)")
        if x.shape != (*lead, self.cfg.d_in):
            raise ValueError(f"x must have shape {(*lead, self.cfg.d_in)} (the codes' leading dims, d_in), got "
                             f"{tuple(x.shape)}")
        return x @ self.W_skip.T

    def _check_x_norm(self, x_norm: Tensor | None, lead: torch.Size) -> None:
        if x_norm is None:
            raise ValueError(
                f"encoder {self.cfg.encoder!r} restores the input norm at decode: pass x_norm=sae.centered_norm(x) "
                f"(||x - b_dec||, shape {tuple(lead)}), or decode a code from encode_code, or call sae(x)"
            )
        if x_norm.shape != lead:
            raise ValueError(f"x_norm must have shape {tuple(lead)} (the codes' leading dims), got {tuple(x_norm.shape)}")

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations.

        Args:
            x: ``(..., d_in)`` activations (any leading dimensions).

        Returns:
            ``(..., d_sae)`` non-negative codes.

        Raises:
            ValueError: if the last dimension is not ``d_in``.
        """
        flat, lead = self._flat(x)
        code, _ = self.encode_code(flat)
        return code.dense(self.cfg.d_sae).reshape(*lead, self.cfg.d_sae)

    def effective_codes(self, x: Tensor) -> Tensor:
        """Codes rescaled to be each latent's coefficient on its *unit* decoder direction.

        ``f_eff (..., d_sae)`` satisfies ``x_hat - b_dec = sum_j f_eff_j * d_hat_j`` exactly, with
        ``d_hat_j = W_dec[j] / ||W_dec[j]||``, for every encoder:

        * plain decode (``x_hat = f @ W_dec + b_dec``): ``f_eff_j = f_j ||W_dec[j]||`` (equal to ``f`` for the unit
          decoder rows that training keeps);
        * norm-restoring decode (``magnitude_bypass``, Naihin & Stambler 2026, arXiv 2606.15054, the ``NoC`` variant:
          ``x_hat = r ||x_c|| / max(||r||, 1e-8) + b_dec`` with ``r = sum_j f_j d_hat_j``):
          ``f_eff_j = f_j ||x_c|| / max(||r||, 1e-8)``.

        Metrics that read a code as a latent's contribution to the reconstruction (SAEBench absorption's
        ``proj_j = f_j cos(p, d_j)``, the k-sparse probes of feature splitting) need these: magnitude_bypass codes
        are cosines in [0, 1], smaller than their decoder contributions by ``||x_c|| / ||r||``.

        Args:
            x: ``(..., d_in)`` activations on the scale the SAE was saved for.

        Returns:
            ``(..., d_sae)`` non-negative effective codes (no gradient is blocked; wrap in ``torch.no_grad()`` for
            evaluation).

        Raises:
            ValueError: if the last dimension is not ``d_in``.
        """
        flat, lead = self._flat(x)
        code, _ = self.encode_code(flat)
        f = code.dense(self.cfg.d_sae)
        row_norms = self.W_dec.norm(dim=-1)
        if self.encoder.restores_norm:
            r = (f / row_norms.clamp_min(1e-12)) @ self.W_dec  # sum_j f_j d_hat_j, as decode_code computes it
            f = f * (code.x_norm / r.norm(dim=-1).clamp_min(1e-8)).unsqueeze(-1)
        else:
            f = f * row_norms
        return f.reshape(*lead, self.cfg.d_sae)

    def decode(self, f: Tensor, x_norm: Tensor | None = None, x: Tensor | None = None) -> Tensor:
        """Reconstruct ``(..., d_out)`` (``d_in`` for a plain SAE) from dense codes ``(..., d_sae)``:
        ``f @ W_dec + b_dec`` (``+ x @ W_skip^T`` for a skip-transcoder).

        Args:
            f: ``(..., d_sae)`` dense codes.
            x_norm: ``(...)`` ``||x - b_dec||`` (:meth:`centered_norm`); required for norm-restoring encoders
                (``magnitude_bypass``: ``x_hat = r ||x_c|| / max(||r||, 1e-8) + b_dec``, ``r = f @ normalize(W_dec)``),
                ignored by the others.
            x: ``(..., d_in)`` the encoded inputs; required by skip-transcoders, ignored otherwise.

        Raises:
            ValueError: ``magnitude_bypass`` without ``x_norm``, or ``x_norm`` of the wrong shape; a skip-transcoder
                without ``x``, or ``x`` of the wrong shape.
        """
        if not self.encoder.restores_norm:
            out = f @ self.W_dec + self.b_dec
            return out if not self.cfg.skip else out + self._skip_of(x, f.shape[:-1])
        lead = f.shape[:-1]
        self._check_x_norm(x_norm, lead)
        out = self.decode_code(Code(f.reshape(-1, f.shape[-1])), x_norm.reshape(-1))
        return out.reshape(*lead, self.cfg.d_in)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ``(..., d_out)`` of ``x (..., d_in)`` (``d_out = d_in`` for a plain SAE)."""
        flat, lead = self._flat(x)
        code, _ = self.encode_code(flat)
        return self.decode_code(code, x=flat).reshape(*lead, self.cfg.out_dim)

    # -- training objective -----------------------------------------------------------------------------
    def loss(self, x: Tensor, y: Tensor | None = None, *, dead: Tensor | None = None,
             weights: LossWeights = LossWeights(), sparsity_scale: float = 1.0) -> SAELoss:
        """This architecture's training loss on a batch ``x (N, d_in)`` (targets ``y (N, d_out)``, default ``x``;
        required for a transcoder): reconstruction
        (nested prefixes for Matryoshka), AuxK on the ``dead (d_sae,)`` latents for the selecting activations, the
        L1/L0 penalty for ReLU/JumpReLU. See :func:`saelab.sae.objective.sae_loss` (terms, sources, errors).

        Returns:
            :class:`~saelab.sae.objective.SAELoss` ``(loss, parts, code, pre, x_hat)``.
        """
        return sae_loss(self, x, y, dead=dead, weights=weights, sparsity_scale=sparsity_scale)

    # -- constraints (dictionary_learning ``trainers/trainer.py``, OpenAI ``train.py``) ---------------
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Renormalise decoder rows to unit L2 norm (after each optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Remove from ``W_dec.grad`` the component parallel to each (unit) decoder row (before the step)."""
        if self.W_dec.grad is None:
            return
        g, W = self.W_dec.grad, self.W_dec
        # g -= (g . W_hat) W_hat with W_hat = W / max(||W||, 1e-8), without a (d_sae, d_in) temporary
        coef = row_dots(g, W) / torch.linalg.vector_norm(W, dim=-1).square_().clamp_min_(1e-16)
        g.addcmul_(W, coef.unsqueeze(-1), value=-1)

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Fold an input normalisation ``x' = x / scale`` into the weights.

        An SAE trained on ``x / scale`` becomes one on raw ``x`` with identical latent indices and codes
        multiplied by ``scale`` (decoder rows stay unit-norm): ``b_dec, b_enc`` and thresholds are
        multiplied by ``scale`` (dictionary_learning ``scale_biases``). Cosine encoders also shift
        ``b <- b + (1 - a) ln scale`` (per latent/group/global; for base+delta ``a = a_base + delta``, only ``b``
        moves). ``magnitude_bypass`` codes are cosines, unchanged by the scale: only ``b_dec`` is scaled (``b_enc``
        is unused and thresholds stay on the cosine scale) and reconstructions are multiplied by ``scale``.
        A transcoder trained on ``(x / scale, y / scale)`` (one scale for both hooks, as the trainer uses) folds
        the same way; its ``W_skip`` maps ``x`` to ``y`` linearly and is unchanged.
        """
        self.b_dec.mul_(scale)
        self.encoder.fold_input_scale_(scale)
        if self.encoder.scale_free_codes:
            return
        self.b_enc.mul_(scale)
        act = self.activation
        if hasattr(act, "log_threshold"):
            act.log_threshold.add_(float(torch.log(torch.tensor(scale))))
        elif isinstance(getattr(act, "threshold", None), Tensor) and act.threshold >= 0:
            act.threshold.mul_(scale)

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype
