"""The sparse autoencoder module: linear encoder scoring -> named activation -> linear decoder.

Conventions (SAELens v6): ``W_enc (d_in, d_sae)``, ``b_enc (d_sae)``, ``W_dec (d_sae, d_in)`` whose rows are
the dictionary atoms, ``b_dec (d_in)`` subtracted from the input before encoding
(``apply_b_dec_to_input``). This module never imports the trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import ACTIVATIONS, Code
from .config import SAEConfig


class SAE(nn.Module):
    """A sparse autoencoder ``x_hat = act(W_enc^T (x - b_dec) + b_enc) W_dec + b_dec``.

    Args:
        cfg: the architecture.

    Attributes:
        W_enc: ``(d_in, d_sae)`` encoder; initialised to ``W_dec^T``.
        b_enc: ``(d_sae,)`` encoder bias, zeros.
        W_dec: ``(d_sae, d_in)`` decoder with unit-norm rows (Kaiming-uniform then normalised).
        b_dec: ``(d_in,)`` decoder bias; the trainer sets it to the geometric median of the first batch.
        activation: the sparsifying :class:`~torch.nn.Module` from ``ACTIVATIONS``.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        W_dec = torch.empty(cfg.d_sae, cfg.d_in)
        nn.init.kaiming_uniform_(W_dec)
        W_dec = F.normalize(W_dec, dim=-1)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.activation = ACTIVATIONS.get(cfg.activation)(cfg)

    # -- shapes ---------------------------------------------------------------------------------------
    def _flat(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"expected input with last dimension d_in={self.cfg.d_in}, got shape {tuple(x.shape)}")
        return x.reshape(-1, self.cfg.d_in), x.shape[:-1]

    # -- core -----------------------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder scores ``(N, d_sae)`` of flat inputs ``x (N, d_in)``: ``(x - b_dec) @ W_enc + b_enc``."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def encode_code(self, x: Tensor) -> tuple[Code, Tensor]:
        """Encode flat inputs ``(N, d_in)``.

        Returns:
            (code, pre-activations ``(N, d_sae)``).
        """
        pre = self.pre_acts(x)
        return self.activation(pre), pre

    def decode_code(self, code: Code) -> Tensor:
        """Reconstruct ``(N, d_in)`` from a :class:`Code`.

        Sparse codes are decoded with ``F.embedding_bag`` (gathers only the ``k`` active decoder rows per
        token, as in sparsify's sparse decoder) instead of a dense ``(N, d_sae) @ W_dec``.
        """
        if code.indices is None:
            return code.values @ self.W_dec + self.b_dec
        out = F.embedding_bag(code.indices, self.W_dec, per_sample_weights=code.values, mode="sum")
        return out + self.b_dec

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

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruct ``(..., d_in)`` from dense codes ``(..., d_sae)``: ``f @ W_dec + b_dec``."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ``(..., d_in)`` of ``x (..., d_in)``."""
        flat, lead = self._flat(x)
        code, _ = self.encode_code(flat)
        return self.decode_code(code).reshape(*lead, self.cfg.d_in)

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
        g = self.W_dec.grad
        W = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        g.sub_((g * W).sum(-1, keepdim=True) * W)

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Fold an input normalisation ``x' = x / scale`` into the weights.

        An SAE trained on ``x / scale`` becomes one on raw ``x`` with identical latent indices and codes
        multiplied by ``scale`` (decoder rows stay unit-norm): ``b_dec, b_enc`` and thresholds are
        multiplied by ``scale`` (dictionary_learning ``scale_biases``).
        """
        self.b_dec.mul_(scale)
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
