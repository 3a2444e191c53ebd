"""The training objective of an SAE: one function of a batch, the same for the trainer, the tests and benchmarks.

Each activation declares the terms its architecture trains with, and :func:`sae_loss` adds them up:

* reconstruction: ``mean_n ||y_n - x_hat_n||^2`` (:func:`~saelab.sae.losses.reconstruction_loss`), or, for an
  activation with nested latent groups (``group_sizes``: Matryoshka BatchTopK), the mean over the nested prefixes
  (:func:`~saelab.sae.losses.matryoshka_reconstruction`; Bussmann et al. 2025);
* AuxK on dead latents for the selecting activations (``uses_auxk``: TopK, BatchTopK, Matryoshka; Gao et al. 2024
  §A.2), weight ``aux_coefficient``;
* a sparsity penalty named by the activation's ``penalty``: ``"l1"`` (ReLU: decoder-norm-weighted L1, Anthropic's
  April 2024 update) or ``"l0"`` (JumpReLU: the straight-through L0 of Rajamanoharan et al. 2024, Eq. 5 and 12),
  weighted by ``l1_coefficient`` / ``l0_coefficient`` times a warm-up factor.

Regularizers on the code and the decoder (C²R, OrtSAE) are not part of the architecture: the trainer adds them
(:mod:`saelab.regularizers`).

The SAE encodes through :meth:`~saelab.sae.model.SAE.encode_code`, which takes the sparse kernels of
:mod:`saelab.kernels` where they apply (selecting activations) and plain autograd elsewhere or inside
``dense_reference()``; this function is the same in both cases, and the parity tests compare the two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import losses
from ..codes import Code

SAE = nn.Module
"""Annotation for an :class:`~saelab.sae.model.SAE` (this module is below the model: it does not import it)."""


@dataclass(frozen=True)
class LossWeights:
    """Weights of the architecture's loss terms (the trainer fills them from ``TrainConfig``)."""

    aux_k: int | None = None
    """AuxK: dead latents used per token; None: ``d_out // 2`` (``d_in // 2`` for a plain SAE; Gao et al. 2024 §A.2)."""
    aux_coefficient: float = 1 / 32
    """AuxK weight (Gao et al. 2024); 0 turns AuxK off."""
    l1_coefficient: float = 1.0
    """ReLU SAEs: L1 penalty weight."""
    l0_coefficient: float = 1.0
    """JumpReLU SAEs: L0 penalty weight."""


class SAELoss(NamedTuple):
    """What :func:`sae_loss` returns."""

    loss: Tensor
    """Scalar total loss, differentiable."""
    parts: dict[str, Tensor]
    """Unweighted terms for logging: ``mse`` always; ``matryoshka``, ``auxk``, ``l1`` or ``l0_penalty`` when used."""
    code: Code
    """The batch's code (``(N, k)`` sparse, padded sparse, or dense ``(N, d_sae)``)."""
    pre: Tensor
    """``(N, d_sae)`` pre-activations (on the sparse path a detached tensor that recomputes pairs with gradient)."""
    x_hat: Tensor
    """``(N, d_out)`` reconstruction (``d_out = d_in`` for a plain SAE), skip term included."""


@dataclass(frozen=True)
class Penalty:
    """A sparsity penalty an activation can name (``activation.penalty``)."""

    log_name: str
    """Key of the unweighted value in :attr:`SAELoss.parts`."""
    weight: Callable[[LossWeights], float]
    """Its coefficient."""
    value: Callable[[SAE, Code, Tensor], Tensor]
    """``(sae, code, pre) -> scalar``."""


PENALTIES: dict[str, Penalty] = {
    "l1": Penalty("l1", lambda w: w.l1_coefficient, lambda sae, code, pre: losses.l1_penalty(code.values, sae.W_dec)),
    "l0": Penalty("l0_penalty", lambda w: w.l0_coefficient, lambda sae, code, pre: sae.activation.l0(pre).mean()),
}
"""The penalties by the name an activation gives in its ``penalty`` attribute."""


def check_trainable(sae: SAE) -> list[int] | None:
    """Check that :func:`sae_loss` can train ``sae``, and return its nested group sizes (None without groups).

    Raises:
        ValueError: a nested-group activation (Matryoshka) with a norm-restoring encoder: the prefix losses need a
            linear decoder; or ``d_sae`` too small for the groups (:attr:`MatryoshkaBatchTopK.group_sizes`).
    """
    sizes = getattr(sae.activation, "group_sizes", None)
    if sizes is not None and sae.encoder.restores_norm:
        raise ValueError(f"{sae.cfg.activation} needs a linear decoder; encoder {sae.cfg.encoder!r} rescales the "
                         "reconstruction")
    return sizes


def sae_loss(sae: SAE, x: Tensor, y: Tensor | None = None, *, dead: Tensor | None = None,
             weights: LossWeights = LossWeights(), sparsity_scale: float = 1.0) -> SAELoss:
    """The training loss of ``sae`` on one batch (see the module docstring for its terms).

    Args:
        sae: the SAE (any activation x encoder).
        x: ``(N, d_in)`` inputs.
        y: ``(N, d_out)`` reconstruction targets (``d_out = d_in`` for a plain SAE); default ``x`` (the denoising
            variant passes clean targets; a transcoder must pass the output hook's rows of the same tokens).
        dead: ``(d_sae,)`` bool mask of dead latents for AuxK; default none dead (AuxK is then 0).
        weights: the terms' coefficients.
        sparsity_scale: factor on the L1/L0 penalty (the trainer's linear warm-up), in ``[0, 1]``.

    Returns:
        :class:`SAELoss` ``(loss, parts, code, pre, x_hat)``.

    A skip-transcoder's skip term ``s = x @ W_skip^T`` is part of every reconstruction: the Matryoshka prefixes
    reconstruct ``y - s`` (so ``W_skip`` gets its gradient through the target) and ``x_hat`` includes ``s``.

    Raises:
        ValueError: ``x`` not ``(N, d_in)`` or ``y`` not ``(N, d_out)``; a transcoder without ``y``; a nested-group
            activation with a norm-restoring encoder (Matryoshka prefixes need a linear decoder).
    """
    cfg = sae.cfg
    d_in, d_out = cfg.d_in, cfg.out_dim
    if y is None and cfg.transcoder:
        raise ValueError("a transcoder predicts another hook: pass its targets y (N, d_out) (the trainer reads them "
                         "from TrainConfig.target_cache)")
    y = x if y is None else y
    if x.dim() != 2 or x.shape[1] != d_in or y.shape != (x.shape[0], d_out):
        raise ValueError(f"sae_loss needs x of shape (N, d_in={d_in}) and y of shape (N, d_out={d_out}), got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    act = sae.activation
    sizes = check_trainable(sae)
    code, pre = sae.encode_code(x)
    if sizes is not None:  # mean over nested prefixes; x_hat is the full reconstruction (one decode in total)
        skip = sae.skip_out(x) if cfg.skip else None
        rec = losses.matryoshka_reconstruction(y if skip is None else y - skip, code, sae.W_dec, sae.b_dec, sizes)
        x_hat, loss = rec.x_hat if skip is None else rec.x_hat + skip, rec.loss
        parts = {"matryoshka": rec.loss, "mse": rec.prefix_losses[-1]}
    else:
        x_hat = sae.decode_code(code, x=x)
        loss = losses.reconstruction_loss(y, x_hat)
        parts = {"mse": loss}
    if getattr(act, "uses_auxk", False) and weights.aux_coefficient > 0:
        dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device) if dead is None else dead
        aux = losses.auxk_loss((y - x_hat).detach(), pre, dead, sae.W_dec, weights.aux_k or d_out // 2)
        loss = loss + weights.aux_coefficient * aux
        parts["auxk"] = aux
    name = getattr(act, "penalty", None)
    if name is not None:
        pen = PENALTIES[name]
        value = pen.value(sae, code, pre)
        loss = loss + sparsity_scale * pen.weight(weights) * value
        parts[pen.log_name] = value
    return SAELoss(loss, parts, code, pre, x_hat)
