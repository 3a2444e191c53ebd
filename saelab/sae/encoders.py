"""Encoder scoring functions, chosen by name from ``ENCODERS``: how an SAE turns an input into latent scores.

An encoder maps the centred input ``x_c = x - b_dec`` ``(N, d_in)``, ``W_enc (d_in, d_sae)`` and ``b_enc (d_sae)``
to pre-activations ``(N, d_sae)``; the activation (``ACTIVATIONS``: relu, topk, batchtopk, jumprelu, ...) then
sparsifies them, so every scoring composes with every activation. Encoders own their extra parameters
(``a``, ``b``, ``a_base``, ``delta``), stored as ``encoder.<name>`` in ``sae_weights.safetensors``.

Source of the cosine family: Naihin & Stambler 2026, "Size Doesn't Matter: Cosine-Scored Sparse Autoencoders",
arXiv 2606.15054 (score formula: Fig. 1; cascade and base+delta: Fig. 10; magnitude bypass: Fig. 11; groups:
Fig. 12), reference repo ``SilenNaihin/cosine-scored-saes`` (classes named per encoder below; headline recipe
``experiments/40_saprmarks_recipe/exp40_karvonen_recipe.py``). Common to the family:
``cos_i = <x_c/||x_c||, w_i/||w_i||>`` with ``w_i`` column ``i`` of ``W_enc``, normalised inside every forward
(load-bearing: most latents die without it, the authors' ``exp45`` ablation); ``||x_c||`` clamped to >= 1e-8. Score
``s_i = exp(a_i ln||x_c|| + b_i) cos_i + b_enc,i = e^b_i ||x_c||^a_i cos_i + b_enc,i``: ``a = 0`` is a pure (scaled)
cosine, ``a = 1, b = 0`` the inner product with unit-norm encoder columns. ``a`` and ``b`` are unconstrained (no clamp,
no regulariser), as in the paper's headline runs. Initialisation: ``a = 0``, ``b = ln sqrt(d_in)``, optionally adapted
to the data norm by :meth:`Encoder.init_from_data_`.
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry
from ..kernels.scores import ScoreOperands, column_norms
from ..kernels.topk import take_rows


class EncoderSizes(Protocol):
    """What an encoder reads of its :class:`~saelab.sae.config.SAEConfig` (the config module validates encoder
    names against :data:`ENCODERS`, so this module does not import it)."""

    d_in: int
    d_sae: int
    n_groups: int
    cosine_init: str


ENCODERS: Registry[type[Encoder]] = Registry("encoder")
COSINE_INIT_CHOICES = ("auto", "sqrt_d", "norm_adaptive")
HIST_BINS = 20


def cosine_and_norm(x_c: Tensor, W_enc: Tensor) -> tuple[Tensor, Tensor]:
    """``cos (N, d_sae)`` between rows of ``x_c (N, d_in)`` and unit-normalised columns of ``W_enc (d_in, d_sae)``,
    and ``||x_c|| (N, 1)`` clamped to >= 1e-8 (as the reference classes)."""
    norm = x_c.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return (x_c / norm) @ F.normalize(W_enc, dim=0), norm


def _unit_columns_t(W_enc: Tensor) -> Tensor:
    """``(d_sae, d_in)`` the unit-normalised columns of ``W_enc`` as contiguous rows (``F.normalize``'s eps), a new
    tensor (out of place: for the column-major ``W_enc`` of the SAE, ``W_enc.t()`` is already contiguous, so an
    in-place division would rescale the parameter itself)."""
    return torch.div(W_enc.t(), column_norms(W_enc).unsqueeze(1)).contiguous()


def _at(p: Tensor, cols: Tensor | None) -> Tensor:
    """A per-latent parameter ``p`` (shape ``()`` or ``(d_sae,)``) at latents ``cols`` (all of them when None)."""
    return p if cols is None or p.dim() == 0 else take_rows(p, cols)


def _hist(v: Tensor) -> dict:
    """``HIST_BINS``-bin histogram of the values ``v (d_sae,)`` over ``[min, max]`` (equal-width bins, the last one
    closed), as ``numpy.histogram`` on a CPU copy: ``torch.histc`` has no deterministic CUDA kernel (it raises under
    ``torch.use_deterministic_algorithms(True)``), and this runs once per log line on ``d_sae`` values."""
    v = v.detach().to("cpu", torch.float64).numpy()
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:  # all equal: a unit-wide range around the value (numpy's convention)
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(v, bins=HIST_BINS, range=(lo, hi))
    return {"a_hist_counts": [int(c) for c in counts], "a_hist_edges": [float(e) for e in edges]}


class Encoder(nn.Module):
    """The score of every encoder, one formula (Naihin & Stambler 2026, Fig. 1; the linear SAE is its special case):

        ``s_i = post(c_i * (x_c / n_x) . (w_i / n_w) + bias_i)``

    with ``w_i`` column ``i`` of ``W_enc``. What varies is declared by each encoder:

    * ``uses_norms``: ``n_x = max(||x_c||, 1e-8)`` and ``n_w = max(||w_i||, 1e-12)`` (a cosine); else both 1;
    * :meth:`scale_law`: ``(a, b)`` giving ``c_i = exp(a_i ln n_x + b_i)``; None for ``c = 1``;
    * ``uses_b_enc``: ``bias = b_enc``; else none;
    * ``relu``: ``post`` is ReLU; else the identity.

    Linear: ``x_c @ W_enc + b_enc``. Cosine family: ``e^b_i ||x_c||^a_i cos_i + b_enc,i``. Magnitude bypass:
    ``ReLU(cos_i)``. The base class writes the formula in the three forms the model and the kernels use:
    :meth:`forward` (dense, autograd), :meth:`score_from_dots` and its inverse (elementwise in the dot product
    ``x_c . w_i``, for the pairs the sparse step keeps), and :meth:`score_operands` (one GEMM with a scale law and a
    bias, for the kernels' scores without autograd and the screened selection).

    Class attributes:
        restores_norm: the decoder uses unit-normalised atoms and rescales the reconstruction to ``||x_c||``
            (see :meth:`restore_norm`); the SAE then needs ``||x_c||`` at decode time.
        scale_free_codes: codes do not change when the input is rescaled around ``b_dec`` (so folding an input
            scale leaves ``b_enc`` and activation thresholds alone).
        saelens_note: why a SAELens loader cannot reproduce this scoring; ``None`` if it can.
    """

    uses_norms: ClassVar[bool] = False
    uses_b_enc: ClassVar[bool] = True
    relu: ClassVar[bool] = False
    restores_norm: ClassVar[bool] = False
    scale_free_codes: ClassVar[bool] = False
    saelens_note: ClassVar[str | None] = None

    def __init__(self, cfg: EncoderSizes) -> None:
        super().__init__()
        self.d_in, self.d_sae, self.cosine_init = cfg.d_in, cfg.d_sae, cfg.cosine_init

    def scale_law(self) -> tuple[Tensor, Tensor] | None:
        """``(a, b)``, each of shape ``()`` or ``(d_sae,)``, with ``c_i = exp(a_i ln n_x + b_i)``; None: ``c = 1``."""
        return None

    def forward(self, x_c: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
        """Scores ``(N, d_sae)`` of centred inputs ``x_c = x - b_dec (N, d_in)``, with autograd."""
        if not self.uses_norms:
            s = x_c @ W_enc if not self.uses_b_enc else torch.addmm(b_enc, x_c, W_enc)
        else:
            s, norm = cosine_and_norm(x_c, W_enc)
            law = self.scale_law()
            if law is not None:
                a, b = law
                scale = torch.exp(torch.addcmul(b, norm.log(), a))  # (N, 1) or (N, d_sae)
                s = torch.addcmul(b_enc, scale, s) if self.uses_b_enc else scale * s
            elif self.uses_b_enc:
                s = s + b_enc
        return torch.relu(s) if self.relu else s

    @staticmethod
    def _scale(law: tuple[Tensor, Tensor], x_norm: Tensor, cols: Tensor | None) -> Tensor:
        """``c = exp(a ln n_x + b)`` at latents ``cols`` (all when None), broadcast like ``x_norm``."""
        a, b = law
        return torch.exp(_at(a, cols) * x_norm.log() + _at(b, cols))

    def score_from_dots(self, dots: Tensor, x_norm: Tensor | None, w_norm: Tensor | None, b_enc: Tensor,
                        cols: Tensor | None) -> Tensor:
        """Scores from the linear dot products ``dots = x_c . W_enc[:, i]``: the same function as :meth:`forward`.

        Two layouts: dense (``cols`` None; ``dots (N, d_sae)``, ``x_norm (N, 1)``, ``w_norm (d_sae,)``) or pairs
        (``dots``, ``x_norm``, ``w_norm``, ``cols`` all ``(P,)``: pair ``p`` is latent ``cols[p]`` of a token with
        centred norm ``x_norm[p]``). ``x_norm = max(||x_c||, 1e-8)`` and ``w_norm = max(||W_enc[:, i]||, 1e-12)``
        (``F.normalize``'s eps), both None when :attr:`uses_norms` is False. Differentiable in every argument.
        """
        s = dots / (x_norm * w_norm) if self.uses_norms else dots
        law = self.scale_law()
        if law is not None:
            s = self._scale(law, x_norm, cols) * s
        if self.uses_b_enc:
            s = s + _at(b_enc, cols)
        return torch.relu(s) if self.relu else s

    def dots_from_scores(self, scores: Tensor, x_norm: Tensor | None, w_norm: Tensor | None, b_enc: Tensor,
                         cols: Tensor | None) -> Tensor:
        """Inverse of :meth:`score_from_dots` (same layouts), used without gradient to recover the dot products
        of kept pairs from the scores already computed for the selection. Where the score clips (ReLU) the
        dot product is taken as the clip point (its gradient is 0 either way)."""
        t = scores - _at(b_enc, cols) if self.uses_b_enc else scores
        law = self.scale_law()
        if law is not None:
            t = t / self._scale(law, x_norm, cols).clamp_min(torch.finfo(scores.dtype).tiny)
        return t * (x_norm * w_norm) if self.uses_norms else t

    @torch.no_grad()
    def score_operands(self, x_c: Tensor, W_enc: Tensor, b_enc: Tensor) -> ScoreOperands:
        """The scores as one GEMM, a per-latent scale law and a bias, ``s = post(c * (L @ R_T^T) + bias)``
        (:class:`ScoreOperands`), from which the kernels compute them without autograd: in full
        (:func:`saelab.kernels.scores.scores_into`) or screened by a bf16 GEMM with a certified error bound
        (:func:`saelab.kernels.screen.screen_candidates`). Equal to :meth:`forward` up to float rounding.

        ``L = x_c / n_x`` and ``R_T`` the columns ``w_i / n_w`` as contiguous rows; a scalar ``(a, b)`` folds into
        ``L`` (``c`` then depends on the token only), a per-latent one is applied after the GEMM (``log_norm = ln n_x``).
        """
        bias = b_enc if self.uses_b_enc else None
        if not self.uses_norms:
            return ScoreOperands(x_c, W_enc.t().contiguous(), bias, relu=self.relu)
        norm = x_c.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        law = self.scale_law()
        if law is None:
            return ScoreOperands(x_c / norm, _unit_columns_t(W_enc), bias, relu=self.relu)
        a, b = law
        if a.dim() == 0 and b.dim() == 0:
            return ScoreOperands(x_c * (torch.exp(a * norm.log() + b) / norm), _unit_columns_t(W_enc), bias,
                                 relu=self.relu)
        d = self.d_sae
        return ScoreOperands(x_c / norm, _unit_columns_t(W_enc), bias, relu=self.relu, a=a.expand(d).contiguous(),
                             b=b.expand(d).contiguous(), log_norm=norm.log().squeeze(1))

    def init_from_data_(self, x_c: Tensor) -> float | None:
        """Data-dependent initialisation from centred inputs ``(N, d_in)``; returns the chosen ``b`` (or None)."""
        return None

    def fold_input_scale_(self, scale: float) -> None:
        """Adjust this encoder's own parameters when the SAE's input scale is folded (see ``SAE.fold_input_scale_``)."""

    def scale_stats(self) -> dict:
        """JSON-ready summary of the learned scale parameters (empty when there are none)."""
        return {}

    def restore_norm(self, r: Tensor, x_norm: Tensor | None) -> Tensor:
        """Map the decoded ``r (N, d_in)`` (before ``+ b_dec``) to the reconstruction of ``x_c``; identity here."""
        return r


@ENCODERS.register("linear")
class LinearEncoder(Encoder):
    """Inner-product score ``x_c @ W_enc + b_enc`` (the standard SAE; reference class ``BatchTopKSAE``): the formula
    of :class:`Encoder` without norms, scale law or ReLU."""


class CosineEncoder(Encoder):
    """Adaptive-cosine score ``s_i = exp(a_i ln||x_c|| + b_i) cos_i + b_enc,i`` (paper Fig. 1).

    Subclasses define parameters ``a``/``b`` (unitless; ``e^b`` is in input-norm units when ``a = 0``) and how they
    map to latents via :meth:`a_latent`, :meth:`b_latent` (shape ``()`` or ``(d_sae,)``) and :meth:`a_like_b`
    (``a`` in the shape of ``b``, for folding).
    """

    saelens_note = (
        "cosine-scored encoder (Naihin & Stambler 2026, arXiv 2606.15054): scores are exp(a*ln||x-b_dec|| + b) * "
        "cos(x-b_dec, W_enc column) + b_enc with learned encoder.a/encoder.b; this cannot be expressed in the SAELens "
        "layout, and a SAELens loader would compute plain inner-product scores (x-b_dec) @ W_enc + b_enc instead"
    )
    has_hist: ClassVar[bool] = True
    uses_norms = True

    def a_latent(self) -> Tensor:
        return self.a

    def b_latent(self) -> Tensor:
        return self.b

    def a_like_b(self) -> Tensor:
        return self.a

    def scale_law(self) -> tuple[Tensor, Tensor]:
        """``(a_i, b_i)`` per latent (or scalars): :meth:`a_latent`, :meth:`b_latent`."""
        return self.a_latent(), self.b_latent()

    @torch.no_grad()
    def init_from_data_(self, x_c: Tensor) -> float:
        """Set ``b`` from the mean centred norm ``m = mean ||x_c||`` per ``cosine_init`` (the reference repo's README,
        "norm-adaptive init").

        ``"auto"``: ``b = ln m`` if ``m > 2 sqrt(d_in)`` or ``m < sqrt(d_in) / 2``, else ``ln sqrt(d_in)``;
        ``"sqrt_d"``: always ``ln sqrt(d_in)``; ``"norm_adaptive"``: always ``ln m``. ``a`` is left alone.

        Args:
            x_c: ``(N, d_in)`` centred inputs ``x - b_dec`` (after ``b_dec``'s geometric-median init).

        Returns:
            The value written to every entry of ``b``.
        """
        m = float(x_c.detach().double().norm(dim=-1).mean().clamp_min(1e-8))
        sqrt_d = math.sqrt(self.d_in)
        adapt = {"auto": m > 2 * sqrt_d or m < sqrt_d / 2, "sqrt_d": False, "norm_adaptive": True}[self.cosine_init]
        value = math.log(m) if adapt else math.log(sqrt_d)
        self.b.fill_(value)
        return value

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """``b <- b + (1 - a) ln scale`` so that ``exp(a ln(s||x'||) + b_raw) = s exp(a ln||x'|| + b)``: scores (and
        codes) on raw ``x = s x'`` are ``s`` times those on ``x'`` once ``b_enc`` is also scaled by the SAE."""
        self.b.add_((1 - self.a_like_b()) * math.log(scale))

    @torch.no_grad()
    def scale_stats(self) -> dict:
        """``a_mean/a_min/a_max/a_std``, ``b_mean/b_min/b_max`` and ``a_frac_abs_below_0.05`` over latents (the
        effective per-latent values), plus a 20-bin histogram of per-latent ``a`` for vector/grouped variants.
        Computed on the CPU from one copy of ``a`` and ``b`` (one transfer instead of a device read per number)."""
        a = self.a_latent().detach().to("cpu", torch.float32).expand(self.d_sae)
        b = self.b_latent().detach().to("cpu", torch.float32).expand(self.d_sae)
        out = {
            "a_mean": float(a.mean()), "a_min": float(a.min()), "a_max": float(a.max()), "a_std": float(a.std(0, correction=0)),
            "a_frac_abs_below_0.05": float((a.abs() < 0.05).float().mean()),
            "b_mean": float(b.mean()), "b_min": float(b.min()), "b_max": float(b.max()),
        }
        return {**out, **(_hist(a) if self.has_hist else {})}


@ENCODERS.register("cosine_global")
class GlobalCosineEncoder(CosineEncoder):
    """One scalar ``a`` (init 0) and ``b`` (init ln sqrt(d_in)) for all latents.

    Reference class ``AdaptiveCosineBatchTopKSAE`` (arm ``adaptive_l2``); the paper's "Adaptive Cosine (global a)".
    """

    has_hist = False

    def __init__(self, cfg: EncoderSizes) -> None:
        super().__init__(cfg)
        self.a = nn.Parameter(torch.tensor(0.0))
        self.b = nn.Parameter(torch.tensor(math.log(math.sqrt(cfg.d_in))))


@ENCODERS.register("cosine_per_feature")
class PerFeatureCosineEncoder(CosineEncoder):
    """Vectors ``a (d_sae)`` (init 0) and ``b (d_sae)`` (init ln sqrt(d_in)): one scale law per latent.

    Reference class ``PerFeatureAdaptiveCosineSAE`` (arm ``perfeature_l2``), the L18 headline. Can collapse in a
    winner-take-all cascade at deep/high-norm layers (paper Fig. 10): prefer base+delta there.
    """

    def __init__(self, cfg: EncoderSizes) -> None:
        super().__init__(cfg)
        self.a = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b = nn.Parameter(torch.full((cfg.d_sae,), math.log(math.sqrt(cfg.d_in))))


@ENCODERS.register("cosine_base_delta")
class BaseDeltaCosineEncoder(CosineEncoder):
    """``a_i = a_base + delta_i`` (``a_base`` scalar, ``delta (d_sae)``, both init 0) and ``b (d_sae)``.

    Reference class ``PerFeatureBaseDeltaSAE`` (arm ``perfeature_bd``); fixes the per-feature cascade (Fig. 10).
    """

    def __init__(self, cfg: EncoderSizes) -> None:
        super().__init__(cfg)
        self.a_base = nn.Parameter(torch.tensor(0.0))
        self.delta = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b = nn.Parameter(torch.full((cfg.d_sae,), math.log(math.sqrt(cfg.d_in))))

    def a_latent(self) -> Tensor:
        return self.a_base + self.delta

    def a_like_b(self) -> Tensor:
        return self.a_base + self.delta

    def scale_stats(self) -> dict:
        return {**super().scale_stats(), "a_base": float(self.a_base.detach())}


@ENCODERS.register("cosine_grouped")
class GroupedCosineEncoder(CosineEncoder):
    """``a, b`` of shape ``(G,)``, ``G = cfg.n_groups`` the NUMBER of groups of contiguous latents.

    Latent ``i`` uses group ``min(i // (d_sae // G), G - 1)``: ``repeat_interleave(d_sae // G)`` with the remainder
    ``d_sae % G`` latents taking the last group's value. ``G = 1`` is the global variant, ``G = d_sae`` the
    per-feature one. Reference class ``GroupScaleSAE(n_groups=G)`` (the authors' ``exp37_regularized_training.py``;
    paper Fig. 12).
    """

    def __init__(self, cfg: EncoderSizes) -> None:
        super().__init__(cfg)
        G = cfg.n_groups
        self.a = nn.Parameter(torch.zeros(G))
        self.b = nn.Parameter(torch.full((G,), math.log(math.sqrt(cfg.d_in))))
        group_of = (torch.arange(cfg.d_sae) // (cfg.d_sae // G)).clamp_max(G - 1)
        self.register_buffer("group_of", group_of, persistent=False)

    def a_latent(self) -> Tensor:
        return self.a[self.group_of]

    def b_latent(self) -> Tensor:
        return self.b[self.group_of]

    def scale_stats(self) -> dict:
        return {**super().scale_stats(), "a_groups": self.a.detach().tolist(), "b_groups": self.b.detach().tolist()}


@ENCODERS.register("magnitude_bypass")
class MagnitudeBypassEncoder(Encoder):
    """Encoder ``z_i = ReLU(cos_i)`` (no ``b_enc``, no scale); decoder with norm restoration.

    Decoder: ``r = f @ normalize(W_dec rows)``, ``x_hat = r ||x_c|| / max(||r||, 1e-8) + b_dec`` (paper Fig. 11:
    restoration is load-bearing). Codes are cosines in [0, 1], independent of the input scale, so ``b_enc`` (kept for
    the layout, unused) and activation thresholds live on the cosine scale. Reference class ``NoCBatchTopKSAE``
    (arm ``no_C``).
    """

    restores_norm = True
    scale_free_codes = True
    saelens_note = (
        "magnitude-bypass encoder (Naihin & Stambler 2026, arXiv 2606.15054): codes are ReLU(cos(x-b_dec, W_enc "
        "column)) without b_enc, and the decoder rescales the reconstruction to ||x-b_dec||; this cannot be expressed "
        "in the SAELens layout, and a SAELens loader would compute plain inner-product scores and decode without "
        "norm restoration"
    )

    uses_norms = True
    uses_b_enc = False
    relu = True

    def restore_norm(self, r: Tensor, x_norm: Tensor | None) -> Tensor:
        """``r (N, d_in) * x_norm (N,) / max(||r||, 1e-8)``: the reconstruction of ``x_c`` has norm ``||x_c||``."""
        if x_norm is None:
            raise ValueError("magnitude_bypass decoding needs x_norm = ||x - b_dec||")
        return r * (x_norm.unsqueeze(-1) / r.norm(dim=-1, keepdim=True).clamp_min(1e-8))
