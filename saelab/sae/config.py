"""The self-describing configuration of one SAE: what ``cfg.json`` records next to the weights."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from simple_parsing.helpers import field

DEFAULT_MATRYOSHKA_FRACTIONS: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32)
"""Matryoshka group fractions of the C²R paper runs (the authors' ``pipeline.sh``; dictionary_learning_demo
``demo_config.py``)."""


METADATA_FIELDS: tuple[str, ...] = ("model_name", "hook_name", "hook_name_out", "context_size", "prepend_bos", "extra")
"""``SAEConfig`` fields that describe where the SAE's data came from: the trainer fills them
(:meth:`SAEConfig.resolved`); they are no command-line flags and no part of a checkpoint's identity."""

_SELECTING = ("topk", "batchtopk", "matryoshka_batchtopk")
"""Activations that keep ``k`` latents per token (or ``k`` per token on average over the batch)."""


@dataclass
class SAEConfig:
    """Architecture of a sparse autoencoder (training hyper-parameters live in ``TrainConfig``).

    Shapes follow SAELens: ``W_enc (d_in, d_sae)``, ``b_enc (d_sae)``, ``W_dec (d_sae, d_in)``,
    ``b_dec (d_in)``; a transcoder (``transcoder=True``, SAELens ``Transcoder``) decodes to ``d_out``:
    ``W_dec (d_sae, d_out)``, ``b_dec (d_out)``, and a skip-transcoder (``skip=True``, SAELens ``SkipTranscoder``)
    adds ``W_skip (d_out, d_in)``. A config may leave ``d_in`` and ``d_sae`` at 0 (as ``TrainConfig.sae`` does): the trainer
    fills them with :meth:`resolved`, and ``SAE(cfg)`` needs both set. The nesting follows EleutherAI sparsify's
    ``TrainConfig.sae: SparseCoderConfig`` (``expansion_factor`` / ``num_latents``).

    Raises:
        ValueError: (on construction) a negative ``d_in``/``d_sae``, ``expansion_factor <= 0``, ``k < 1`` (or
            ``k > d_sae`` when ``d_sae`` is set) for a selecting activation, an unknown ``encoder`` or
            ``cosine_init``, a bad ``n_groups``, a negative ``d_out``, ``d_out``/``skip`` without ``transcoder``, or
            a transcoder with a norm-restoring encoder; the message names the field and the fix.
    """

    d_in: int = field(default=0, cmd=False)
    """Width of the input activations (the LM's d_model for residual hooks); 0: set from the activations by the
    trainer."""
    d_sae: int = 0
    """Number of latents (dictionary size); 0: round(expansion_factor * d_in)."""
    expansion_factor: float = 16.0
    """d_sae = expansion_factor * d_in (rounded) when d_sae is 0, as sparsify's expansion_factor; ignored
    otherwise."""
    activation: str = "topk"
    """Sparsifying activation: one of ``saelab.sae.activations.ACTIVATIONS`` (relu, topk, batchtopk, jumprelu,
    matryoshka_batchtopk)."""
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
    transcoder: bool = False
    """Transcoder (Dunefsky et al. 2024, "Transcoders find interpretable LLM feature circuits", arXiv 2406.11944):
    encode the input hook, decode a prediction of another hook's activations (``hook_name_out``, width ``d_out``),
    e.g. MLP input -> MLP output; trained on a row-aligned ``target_cache``. The input is not centred by ``b_dec``
    (an output-side bias), as in SAELens ``Transcoder.process_sae_in`` and sparsify's ``transcode``."""
    skip: bool = False
    """Skip-transcoder (Paulo et al. 2025, "Transcoders beat sparse autoencoders for interpretability", arXiv
    2501.18823): add a linear skip term ``x @ W_skip^T`` with ``W_skip (d_out, d_in)`` initialised to zeros
    (SAELens ``SkipTranscoder``, sparsify ``skip_connection``); needs ``transcoder``."""
    d_out: int = field(default=0, cmd=False)
    """Transcoders: width of the predicted activations; 0: set by the trainer from the target cache (d_in when
    unknown). 0 for plain SAEs, whose output width is d_in (:attr:`out_dim`)."""
    model_name: str = field(default="", cmd=False)
    """Model the SAE was trained on (alias, GGUF or directory); metadata only, set by the trainer."""
    hook_name: str = field(default="", cmd=False)
    """Hook point, e.g. ``blocks.15.hook_resid_post``; metadata only, set by the trainer."""
    hook_name_out: str = field(default="", cmd=False)
    """Transcoders: hook point of the predicted activations (SAELens ``hook_name_out``), e.g.
    ``blocks.15.hook_mlp_out``; metadata only, set by the trainer from the target cache."""
    context_size: int = field(default=128, cmd=False)
    """Context length of the training contexts; metadata only, set by the trainer."""
    prepend_bos: bool = field(default=True, cmd=False)
    """Whether position 0 holds a prefix token (excluded from SAE data); metadata only, set by the trainer."""
    extra: dict[str, Any] = field(default_factory=dict, cmd=False)
    """Free-form metadata (training summary, corpus names, ...), set by the trainer."""

    def __post_init__(self) -> None:
        # what can be checked before d_in is known; resolved() checks the rest once d_sae is set
        for name in ("d_in", "d_sae", "d_out"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0: filled in by the trainer), got {v!r}")
        if not self.expansion_factor > 0:
            raise ValueError(f"expansion_factor must be > 0 (d_sae = expansion_factor * d_in), got {self.expansion_factor!r}; "
                             "or set d_sae directly")
        if self.activation in _SELECTING:
            if self.k < 1:
                raise ValueError(f"k must be >= 1 for {self.activation}, got {self.k}; set --k to the active latents per token")
            if self.d_sae and self.k > self.d_sae:
                raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae} for {self.activation}: lower k or raise "
                                 "d_sae / expansion_factor")
        from .encoders import COSINE_INIT_CHOICES, ENCODERS  # lazy: the encoders register on import

        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; valid encoders: {', '.join(ENCODERS.names())}")
        if self.encoder == "cosine_grouped" and not (1 <= self.n_groups and (not self.d_sae or self.n_groups <= self.d_sae)):
            raise ValueError(f"n_groups must be in [1, d_sae={self.d_sae or 'd_sae'}] for cosine_grouped, got {self.n_groups}")
        if self.cosine_init not in COSINE_INIT_CHOICES:
            raise ValueError(f"unknown cosine_init {self.cosine_init!r}; valid: {', '.join(COSINE_INIT_CHOICES)}")
        if not self.transcoder:
            if self.skip:
                raise ValueError("skip=True needs transcoder=True: the skip term W_skip x belongs to skip-transcoders "
                                 "(set --transcoder true and a --target_cache of the output hook)")
            if self.d_out and self.d_out != self.d_in:
                raise ValueError(f"d_out={self.d_out} differs from d_in={self.d_in} on a plain SAE: set transcoder=True "
                                 "to predict another hook's activations, or leave d_out at 0")
        elif ENCODERS.get(self.encoder).restores_norm:
            raise ValueError(f"encoder {self.encoder!r} rescales the reconstruction to the norm of the centred input, "
                             "which says nothing about the norm of a transcoder's output hook: choose another "
                             "encoder (e.g. linear or cosine_per_feature) or transcoder=False")

    def resolved(self, d_in: int, d_out: int | None = None, **metadata: Any) -> SAEConfig:
        """A complete copy for activations of width ``d_in``: ``d_in`` set (whatever ``self.d_in`` holds: the
        width always comes from the activations), ``d_sae`` filled in when 0 as
        ``round(expansion_factor * d_in)`` (sparsify's ``num_latents or expansion_factor * d_in``) and the
        metadata fields (:data:`METADATA_FIELDS`: model_name, hook_name, hook_name_out, context_size, prepend_bos,
        extra) set from ``metadata``. For a transcoder ``d_out`` is set from ``d_out`` (the target cache's width),
        else kept when set, else ``d_in``; a plain SAE keeps ``d_out = 0``. ``self`` is unchanged.

        Args:
            d_in: width of the activations (the cache's ``d_in``), >= 1.
            d_out: transcoders: width of the target activations (the target cache's ``d_in``); ignored (may be
                None) for plain SAEs.
            **metadata: values of metadata fields.

        Returns:
            A new :class:`SAEConfig` with ``d_in >= 1`` and ``d_sae >= 1``, checked as a whole (k <= d_sae, ...).

        Raises:
            ValueError: ``d_in < 1``; a key of ``metadata`` that is no metadata field; or a check of the complete
                config failing (e.g. ``k > d_sae``). Each names the field and the fix.
        """
        if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
            raise ValueError(f"d_in must be a positive integer (the width of the activations), got {d_in!r}")
        bad = sorted(set(metadata) - set(METADATA_FIELDS))
        if bad:
            raise ValueError(f"resolved(): {bad} are no metadata fields; valid: {', '.join(METADATA_FIELDS)} "
                             "(set architecture fields on the config itself)")
        d_sae = self.d_sae or int(round(self.expansion_factor * d_in))
        if d_sae < 1:
            raise ValueError(f"expansion_factor={self.expansion_factor:g} x d_in={d_in} gives d_sae={d_sae}; raise "
                             "expansion_factor or set d_sae")
        out = {"d_out": d_out or self.d_out or d_in} if self.transcoder else {}
        # a deep copy: the trainer adds to the copy's ``extra``, which must not reach the caller's config
        return replace(copy.deepcopy(self), d_in=d_in, d_sae=d_sae, **out, **metadata)  # __post_init__ checks it all

    @property
    def out_dim(self) -> int:
        """Width of the reconstruction: ``d_out`` for a transcoder (``d_in`` while unset), ``d_in`` otherwise."""
        return (self.d_out or self.d_in) if self.transcoder else self.d_in

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Build from a dict, ignoring unknown keys (forward compatibility); fields missing from ``d`` (e.g.
        ``expansion_factor`` in a ``cfg.json`` written before it existed) keep their defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
