"""The self-describing configuration of one SAE: what ``cfg.json`` records next to the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

DEFAULT_MATRYOSHKA_FRACTIONS: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32)
"""Matryoshka group fractions of the C²R paper runs (the authors' ``pipeline.sh``; dictionary_learning_demo
``demo_config.py``)."""


@dataclass
class SAEConfig:
    """Architecture of a sparse autoencoder (training hyper-parameters live in ``TrainConfig``).

    Shapes follow SAELens: ``W_enc (d_in, d_sae)``, ``b_enc (d_sae)``, ``W_dec (d_sae, d_in)``,
    ``b_dec (d_in)``.
    """

    d_in: int = 576
    """Width of the input activations (the LM's d_model for residual hooks)."""
    d_sae: int = 9216
    """Number of latents (dictionary size)."""
    activation: str = "topk"
    """Sparsifying activation: one of ``saelab.sae.activations.ACTIVATIONS`` (relu, topk, batchtopk, jumprelu)."""
    k: int = 32
    """Active latents per token for topk / mean active latents per token for batchtopk."""
    jumprelu_init_threshold: float = 0.001
    """JumpReLU: initial threshold (on the normalised scale), Rajamanoharan et al. 2024 §4."""
    jumprelu_bandwidth: float = 0.001
    """JumpReLU: width of the rectangle kernel of the straight-through estimator (Rajamanoharan et al. 2024, Eq. 11)."""
    matryoshka_fractions: list[float] = field(default_factory=lambda: list(DEFAULT_MATRYOSHKA_FRACTIONS))
    """matryoshka_batchtopk: fractions of d_sae in each nested latent group (sum 1; the last group takes the rounding remainder)."""
    encoder: str = "linear"
    """Encoder scoring: one of ``saelab.sae.encoders.ENCODERS`` (linear, cosine_global, cosine_per_feature,
    cosine_base_delta, cosine_grouped, magnitude_bypass); composes with any activation."""
    n_groups: int = 4
    """cosine_grouped: the NUMBER of groups of contiguous latents sharing (a, b); 1 <= n_groups <= d_sae."""
    cosine_init: str = "auto"
    """Cosine encoders' data-dependent ``b`` init (``Encoder.init_from_data_``): "auto" (ln mean||x - b_dec|| if it
    differs from sqrt(d_in) by more than 2x, else ln sqrt(d_in)), "sqrt_d" (always ln sqrt(d_in)) or
    "norm_adaptive" (always ln mean||x - b_dec||)."""
    model_name: str = ""
    """Model the SAE was trained on (alias, GGUF or directory); metadata only."""
    hook_name: str = ""
    """Hook point, e.g. ``blocks.15.hook_resid_post``; metadata only."""
    context_size: int = 128
    """Context length of the training contexts; metadata only."""
    prepend_bos: bool = True
    """Whether position 0 holds a prefix token (excluded from SAE data); metadata only."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata (training summary, corpus names, ...)."""

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.activation in ("topk", "batchtopk", "matryoshka_batchtopk") and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}] for {self.activation}, got {self.k}")
        from .encoders import COSINE_INIT_CHOICES, ENCODERS  # lazy: encoders -> activations -> config

        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; valid encoders: {', '.join(ENCODERS.names())}")
        if self.encoder == "cosine_grouped" and not 1 <= self.n_groups <= self.d_sae:
            raise ValueError(f"n_groups must be in [1, d_sae={self.d_sae}] for cosine_grouped, got {self.n_groups}")
        if self.cosine_init not in COSINE_INIT_CHOICES:
            raise ValueError(f"unknown cosine_init {self.cosine_init!r}; valid: {', '.join(COSINE_INIT_CHOICES)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Build from a dict, ignoring unknown keys (forward compatibility)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
