"""Diagnostics of the cosine-scored-SAE paper: norm quartiles, feature matching, and the cos > inner win rate.

Source: Naihin & Stambler 2026, "Size Doesn't Matter: Cosine-Scored Sparse Autoencoders", arXiv 2606.15054
(code github ``SilenNaihin/cosine-scored-saes``).
Three suites, registered in :data:`saelab.evals.base.EVAL_SUITES`:

``norm_quartiles`` (exp44 / exp55c, paper Fig. 24)
    Quartiles of the input norm ``||x||`` over held-out eval tokens; per quartile the FVE, the mean
    reconstruction norm ratio ``||x_hat|| / ||x||``, the fraction of all (token, active latent) firings and the
    mean L0. The paper reports, for a standard SAE at Qwen3-8B L18, Q4 FVE -184 to -197 with norm ratio ~9.5x,
    against +0.33 and 0.55-0.78 for the cosine SAE.

``feature_matching`` (exp58b / exp58c, paper Fig. 2B)
    Two SAEs on the same model and hook. A latent of A is *matched* iff its best Pearson activation correlation
    (over the eval tokens) with any latent of B is >= 0.7 AND the decoder cosine of that best-correlated pair
    is > 0.7 (and the same way round for B). The norm-quartile firing profile of a latent set counts every
    (token, active latent of the set) pair in the quartile of the token's norm (exp58c). The paper: standard-
    unique latents fire Q1 4.0 / Q2 4.6 / Q3 5.1 / Q4 86.3 % (Q4/Q1 ~ 22x), cosine-unique ones 4.7x.

``cos_inner`` (exp40 ``evaluate_ablation``, exp5, exp25; paper Fig. 14/15)
    For the N alive latents with the highest mean non-zero activation, and for each of M eval texts: a clean
    forward and a forward in which the hook output ``h`` is replaced by ``h - (h.d) d`` (``d`` the unit decoder
    row) at every position; ``KL(p_clean || p_ablated)`` of the next-token distribution at the text's last
    position; Pearson correlations across texts of KL with ``cos(x_last, d)`` and with ``<x_last, d>``. The latent
    is a "cos win" if ``corr(cos, KL) > corr(inner, KL)``. The authors' code compares the *signed* correlations;
    the Fig. 14 caption says "higher absolute correlation": both are reported. The paper: Qwen3-8B L9 ~44 %,
    L18 ~65 %, L27 ~78 %.

Eval tokens (shared by the three suites)
    Held-out documents of ``cfg.data`` (the split the harvest never trains on), shuffled by ``cfg.seed`` and
    packed into contexts by :func:`~saelab.activations.harvest.iter_contexts` exactly as the core eval does.
    Position 0 (the prefix token, an attention sink of norm ~25,000 from layer 12 on in SmolLM2) and special
    tokens are always dropped. Norm outliers (norm > ``max_norm_multiple`` x the median of their forward batch,
    :func:`~saelab.activations.harvest.select_rows`) are dropped by default (10, as in training, so the SAEs are
    evaluated on the distribution they were trained on); ``--max_norm_multiple 0`` keeps them, which is the
    paper's exp58c setting except that position 0 stays excluded. The activations are cached by
    :class:`~saelab.evals.base.LMActivationStore` *before* the outlier filter (with each row's batch median
    norm), so every filter setting, every suite and every SAE of the same model/hook reuse one LM pass.

Pure tensor functions (unit-tested on constructed data): :func:`quartile_edges`, :func:`assign_quartiles`,
:func:`norm_quartile_stats`, :func:`padded_code`, :class:`CrossMoments`, :func:`match_latents`,
:func:`quartile_firing_counts`, :func:`firing_profile`, :func:`q4_q1_ratio`, :func:`project_out`,
:func:`pearson_rows`, :func:`cos_inner_wins`, :func:`kl_divergence`, :func:`top_latents_by_mean_activation`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations.harvest import DataConfig, iter_contexts, select_rows, split_documents
from ..models.hooks import HookPoint, capture, is_block_hook, replay, resolve_hook, splice
from ..models.lm import LoadedLM
from ..sae.activations import Code
from ..sae.model import SAE
from .base import EVAL_SUITES, EvalConfig, EvalResult, LMActivationStore, Suite

PAPER = "Naihin & Stambler 2026, arXiv 2606.15054"

# ------------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------------


@dataclass
class DiagnosticsConfig(EvalConfig):
    """Settings shared by the cosine-paper diagnostics (held-out eval tokens at the SAE's hook)."""

    n_tokens: int = 32_768
    """Held-out eval tokens to collect (after dropping position 0 and special tokens, before the outlier filter)."""
    context_size: int = 128
    """Tokens per eval context, including the prefix token at position 0 (as the core eval)."""
    batch_size: int = 8
    """Contexts per LM forward when collecting eval tokens (the outlier filter uses each batch's median norm)."""
    max_norm_multiple: float = 10.0
    """Drop eval tokens whose norm exceeds this multiple of their batch's median, as in training (0 keeps them,
    as the paper's exp58c; position 0 is always dropped)."""
    seed: int = 1
    """Seed of the held-out document order (the core eval's default)."""
    encode_batch: int = 4096
    """Tokens per SAE encode chunk."""
    progress: bool = True
    """Show progress bars (``saelab eval`` prints the stage timings, ``result.timings_s``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text and split; must match the harvest's so the held-out documents were never trained on."""


@dataclass
class NormQuartilesConfig(DiagnosticsConfig):
    """Norm-quartile reconstruction and firing analysis (cosine paper exp44/exp55c)."""

    n_bins: int = 4
    """Number of norm bins (4 = quartiles), equal-count bins over the eval tokens."""


@dataclass
class FeatureMatchingConfig(DiagnosticsConfig):
    """Match the latents of two SAEs on the same model/hook (cosine paper exp58b/exp58c)."""

    sae_b: str | None = None
    """Second SAE directory (same model and hook as --sae); required."""
    corr_threshold: float = 0.7
    """A pair matches if its activation correlation is >= this (exp58b) ..."""
    cos_threshold: float = 0.7
    """... and its decoder cosine is > this (exp58b)."""
    n_bins: int = 4
    """Number of norm bins for the firing profiles (4 = quartiles)."""


@dataclass
class CosInnerConfig(DiagnosticsConfig):
    """cos > inner win rate of decoder-direction ablations (cosine paper exp40 ``evaluate_ablation``)."""

    n_latents: int = 32
    """Latents evaluated: the alive ones with the highest mean non-zero activation on the eval tokens (paper: 100)."""
    n_texts: int = 16
    """Eval texts per latent (held-out contexts whose last token is not special; paper: 200)."""
    text_size: int = 128
    """Tokens per eval text, including the prefix token (paper: <= 2048)."""
    ablation_batch: int = 16
    """(latent, text) rows per ablated forward pass."""
    ablate_position0: bool = True
    """Project the direction out at position 0 (the attention sink) too, as the paper (all positions)."""
    fast_path: bool = True
    """Replay the cached clean hook output instead of recomputing the blocks before the hook (checked against
    the full forward on the first batch; falls back to it on any mismatch)."""
    keep_samples: bool = True
    """Include the per-(latent, text) KL / cos / inner / activation arrays in the result."""


# ------------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------------


@dataclass
class NormQuartileResult(EvalResult):
    """Result of the ``norm_quartiles`` suite.

    Attributes:
        n_tokens: eval tokens analysed (after filtering).
        n_outliers_excluded: tokens dropped as norm outliers (0 when ``max_norm_multiple`` is 0).
        max_norm_multiple: the outlier filter used (0 = none; position 0 and special tokens always dropped).
        edges: ``n_bins + 1`` bin edges of ``||x||`` (min, inner quantiles, max), raw activation units.
        bins: one dict per bin (Q1 = lowest norms), keys as :func:`norm_quartile_stats`.
        overall: the same statistics over all eval tokens.
        fve_q1, fve_q4, l2_ratio_q1, l2_ratio_q4, firing_frac_q1, firing_frac_q4: headline copies (first/last bin).
        firing_q4_q1_ratio: ``firing_frac_q4 / firing_frac_q1`` (None if Q1 has no firing).
    """

    n_tokens: int = 0
    n_outliers_excluded: int = 0
    max_norm_multiple: float = 0.0
    edges: list[float] = field(default_factory=list)
    bins: list[dict[str, float]] = field(default_factory=list)
    overall: dict[str, float] = field(default_factory=dict)
    fve: float = math.nan
    fve_q1: float = math.nan
    fve_q4: float = math.nan
    l2_ratio_q1: float = math.nan
    l2_ratio_q4: float = math.nan
    firing_frac_q1: float = math.nan
    firing_frac_q4: float = math.nan
    firing_q4_q1_ratio: float | None = None


@dataclass
class FeatureMatchingResult(EvalResult):
    """Result of the ``feature_matching`` suite (A = ``sae``, B = ``sae_b``).

    Attributes:
        sae_b: path of B.
        n_tokens, n_outliers_excluded, max_norm_multiple: the eval tokens (see :class:`NormQuartileResult`).
        corr_threshold, cos_threshold: the matching rule (corr >= , cos >).
        d_sae_a, d_sae_b: dictionary sizes.
        n_alive_a, n_alive_b: latents with a defined correlation (fire on >= 1 eval token and not constant).
        n_matched_a, n_matched_b: latents of A matched in B, and of B matched in A.
        n_corr_only_a, n_corr_only_b: latents whose best correlation passes but whose decoder cosine fails.
        frac_matched_a, frac_matched_b: matched / alive.
        mean_best_corr_a, mean_best_corr_b: mean best correlation over alive latents.
        edges: the norm-bin edges.
        profiles: ``{"a_unmatched", "a_matched", "a_all", "b_unmatched", "b_matched", "b_all"}`` -> per-bin
            fraction of the set's (token, firing) pairs (exp58c counting rule; Q1 first).
        firings: the same keys -> total number of (token, firing) pairs of the set.
        q4_q1: the same keys -> last-bin / first-bin fraction (None where the first bin is empty).
        q4_q1_a_unmatched, q4_q1_b_unmatched: headline copies (paper: standard-unique 22x, cosine-unique 4.7x).
    """

    sae_b: str = ""
    n_tokens: int = 0
    n_outliers_excluded: int = 0
    max_norm_multiple: float = 0.0
    corr_threshold: float = 0.7
    cos_threshold: float = 0.7
    d_sae_a: int = 0
    d_sae_b: int = 0
    n_alive_a: int = 0
    n_alive_b: int = 0
    n_matched_a: int = 0
    n_matched_b: int = 0
    n_corr_only_a: int = 0
    n_corr_only_b: int = 0
    frac_matched_a: float = math.nan
    frac_matched_b: float = math.nan
    mean_best_corr_a: float = math.nan
    mean_best_corr_b: float = math.nan
    edges: list[float] = field(default_factory=list)
    profiles: dict[str, list[float]] = field(default_factory=dict)
    firings: dict[str, int] = field(default_factory=dict)
    q4_q1: dict[str, float | None] = field(default_factory=dict)
    q4_q1_a_unmatched: float | None = None
    q4_q1_b_unmatched: float | None = None


@dataclass
class CosInnerResult(EvalResult):
    """Result of the ``cos_inner`` suite.

    Attributes:
        n_latents: latents evaluated; n_texts: texts per latent; text_size: tokens per text.
        win_rate_signed: fraction of latents with ``corr(cos, KL) > corr(inner, KL)`` (the authors' code).
        win_rate_abs: fraction with ``|corr(cos, KL)| > |corr(inner, KL)|`` (the Fig. 14 caption).
        n_undefined: latents where a correlation is undefined (constant KL, cos or inner): counted as losses,
            as the paper's ``wins / N`` does.
        latents: one row per latent: ``latent, mean_act`` (mean non-zero activation on the eval tokens, the
            selection score), ``corr_cos, corr_inner, win_signed, win_abs, mean_kl, max_kl, frac_active_last``
            (fraction of texts where the latent fires at the last position), ``sink_inner, sink_cos``
            (``<h_0, d>`` and ``cos(h_0, d)`` at position 0, the attention sink, which the ablation also edits
            when ``ablate_position0``).
        samples: ``{"kl", "cos", "inner", "act"}`` -> ``(n_latents, n_texts)`` lists, plus ``"x_norm"`` ->
            ``(n_texts,)`` ``||x_last||`` (empty if ``keep_samples`` is off).
        ablate_position0: whether position 0 was ablated too.
        sink_norm: ``||h_0||`` (the same for every text: position 0 sees only the prefix token).
        median_abs_sink_inner: median over the latents of ``|<h_0, d>|``, the size of the edit the ablation makes
            at position 0; compare with ``median_x_norm``, the median ``||x_last||``. When it is comparable or
            larger, the KL is driven by the sink edit rather than by the last token: rerun with
            ``--noablate_position0``.
        fast_path: whether the cached clean hook output was replayed (blocks before the hook skipped).
        fast_path_check: max |logit difference| between the replayed and full clean forward (None if not run).
        n_eval_tokens: eval tokens used to select the latents; n_alive: latents firing on them.
    """

    n_latents: int = 0
    n_texts: int = 0
    text_size: int = 0
    win_rate_signed: float = math.nan
    win_rate_abs: float = math.nan
    n_undefined: int = 0
    latents: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, list] = field(default_factory=dict)
    ablate_position0: bool = True
    sink_norm: float = math.nan
    median_abs_sink_inner: float = math.nan
    median_x_norm: float = math.nan
    fast_path: bool = False
    fast_path_check: float | None = None
    n_eval_tokens: int = 0
    n_alive: int = 0
    max_norm_multiple: float = 0.0


# ------------------------------------------------------------------------------------------------------
# shared eval tokens
# ------------------------------------------------------------------------------------------------------


@dataclass
class EvalTokens:
    """Held-out eval token activations at one hook.

    Attributes:
        x: ``(N, d_in)`` float32 activations (raw scale).
        token_ids: ``(N,)`` token ids.
        context: ``(N,)`` index of the context in the held-out stream.
        position: ``(N,)`` position in the context (>= 1).
        batch_median_norm: ``(N,)`` median norm of the kept tokens of the row's forward batch (outlier filter).
    """

    x: Tensor
    token_ids: Tensor
    context: Tensor
    position: Tensor
    batch_median_norm: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def keep_mask(self, max_norm_multiple: float | None) -> Tensor:
        """``(N,)`` bool: rows passing :func:`select_rows`' outlier filter (all rows if the multiple is 0/None)."""
        if not max_norm_multiple:
            return torch.ones(len(self), dtype=torch.bool)
        return self.x.norm(dim=-1) <= max_norm_multiple * self.batch_median_norm

    def select(self, mask: Tensor) -> EvalTokens:
        """The rows where ``mask`` is true."""
        return EvalTokens(self.x[mask], self.token_ids[mask], self.context[mask], self.position[mask],
                          self.batch_median_norm[mask])


def eval_token_activations(lm: LoadedLM, hook_name: str, store: LMActivationStore, *, n_tokens: int = 32_768,
                           context_size: int = 128, batch_size: int = 8, seed: int = 1,
                           data: DataConfig | None = None, progress: bool = False) -> EvalTokens:
    """Held-out token activations at ``hook_name``, computed once and cached in ``store``.

    The text is the core eval's: held-out documents of ``data`` shuffled by ``seed``, packed by
    :func:`iter_contexts`. Position 0 and special tokens are dropped (:func:`select_rows` without its norm
    filter); the norm filter is applied by the caller through :meth:`EvalTokens.keep_mask`, from the stored
    per-row batch median, which reproduces ``select_rows(..., max_norm_multiple)`` exactly.

    Cost: one early-stopped forward per ``batch_size`` contexts (~25 s for 32k tokens at layer 15 of
    SmolLM2-135M on 2 cores); ``n_tokens * d_in * 4`` bytes on disk (75 MB at the defaults).

    Args:
        lm: the model; hook_name: the hook (any name :func:`resolve_hook` accepts).
        store: the activation cache (keyed by model and hook).
        n_tokens: rows to collect (fewer if the held-out text runs out).
        context_size, batch_size, seed, data: see :class:`DiagnosticsConfig`.
        progress: show a progress bar on a cache miss.

    Returns:
        :class:`EvalTokens`.

    Raises:
        ValueError: no held-out documents, or they yield no token.
    """
    data = data or DataConfig()
    hook = resolve_hook(lm.model, hook_name)
    special = lm.special_ids
    spec = {"v": 1, "n_tokens": n_tokens, "context_size": context_size, "batch_size": batch_size, "seed": seed,
            "data": asdict(data), "prefix_id": lm.prefix_id, "special_ids": sorted(special),
            "module_path": hook.module_path, "dtype": str(next(lm.model.parameters()).dtype)}

    @torch.no_grad()
    def compute() -> dict[str, Tensor]:
        _, held_out = split_documents(data)
        if len(held_out) == 0:
            raise ValueError("no held-out documents: raise data.eval_fraction")
        contexts = iter_contexts(lm, held_out.shuffle(seed), context_size)
        rows: dict[str, list[Tensor]] = {k: [] for k in ("x", "token_ids", "context", "position", "batch_median_norm")}
        n, ctx0 = 0, 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc=f"eval tokens {hook.hook_name}",
                       dynamic_ncols=True)
        while n < n_tokens:
            chunk = [c for _, c in zip(range(batch_size), contexts)]
            if not chunk:
                break
            ids = torch.stack([c[0] for c in chunk]).to(lm.model.device)
            h = capture(lm.model, hook, ids)
            keep = select_rows(h, ids, special, None)
            if not keep.any():
                ctx0 += len(chunk)
                continue
            norms = h.norm(dim=-1)
            med = norms[keep].median()
            b, t = keep.nonzero(as_tuple=True)
            rows["x"].append(h[keep].float().cpu())
            rows["token_ids"].append(ids[keep].cpu())
            rows["context"].append((b + ctx0).cpu())
            rows["position"].append(t.cpu())
            rows["batch_median_norm"].append(med.float().expand(len(b)).cpu())
            n += len(b)
            ctx0 += len(chunk)
            if bar is not None:
                bar.update(len(b))
        if bar is not None:
            bar.close()
        if n == 0:
            raise ValueError("the held-out documents produced no eval token")
        if n < n_tokens:
            warnings.warn(f"the held-out documents gave only {n} eval tokens (< n_tokens={n_tokens})", stacklevel=2)
        return {k: torch.cat(v)[:n_tokens] for k, v in rows.items()}

    t = store.get("diagnostics_tokens", spec, compute)
    return EvalTokens(t["x"], t["token_ids"], t["context"], t["position"], t["batch_median_norm"])


def _eval_tokens(sae: SAE, lm: LoadedLM, cfg, store: LMActivationStore | None,
                 result: EvalResult) -> tuple[EvalTokens, LMActivationStore]:
    """All cached held-out eval tokens at the SAE's hook, unfiltered (stage ``lm_activations``); ``cfg`` is any
    config with the eval-token fields of :class:`DiagnosticsConfig`.

    Raises:
        ValueError: the hook's width is not the SAE's ``d_in``.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store = store or LMActivationStore(lm.name, sae.cfg.hook_name)
    with result.timed("lm_activations"):
        tokens = eval_token_activations(lm, sae.cfg.hook_name, store, n_tokens=cfg.n_tokens,
                                        context_size=cfg.context_size, batch_size=cfg.batch_size, seed=cfg.seed,
                                        data=cfg.data, progress=cfg.progress)
        if tokens.x.shape[1] != sae.cfg.d_in:
            raise ValueError(f"SAE d_in={sae.cfg.d_in} but hook {sae.cfg.hook_name} has width {tokens.x.shape[1]}")
    return tokens, store


def _load_tokens(sae: SAE, lm: LoadedLM, cfg: DiagnosticsConfig, store: LMActivationStore | None,
                 result: EvalResult) -> tuple[EvalTokens, int, LMActivationStore]:
    """Eval tokens at the SAE's hook, outlier-filtered per ``cfg`` (stage ``lm_activations``)."""
    tokens, store = _eval_tokens(sae, lm, cfg, store, result)
    with result.timed("lm_activations"):
        keep = tokens.keep_mask(cfg.max_norm_multiple)
        n_out = int((~keep).sum())
        tokens = tokens.select(keep) if n_out else tokens
    return tokens, n_out, store


@torch.no_grad()
def _encode_chunks(sae: SAE, x: Tensor, batch: int,
                   decode: bool = True) -> Iterator[tuple[int, Tensor, Code, Tensor | None]]:
    """Yield ``(start, x_chunk, code, x_hat_chunk or None)`` over ``x (N, d_in)`` (:meth:`SAE.encode_code`)."""
    sae.eval()
    for s in range(0, x.shape[0], batch):
        xb = x[s : s + batch].to(sae.device, sae.dtype)
        code, _ = sae.encode_code(xb)
        yield s, xb, code, sae.decode_code(code) if decode else None


# ------------------------------------------------------------------------------------------------------
# norm quartiles (exp44 / exp55c)
# ------------------------------------------------------------------------------------------------------


def quartile_edges(norms: Tensor, n_bins: int = 4) -> Tensor:
    """Inner bin edges of ``norms``: the ``i / n_bins`` quantiles, ``i = 1 .. n_bins - 1``.

    Quantiles use linear interpolation (``numpy.percentile``'s default, as the paper's analyses).

    Args:
        norms: ``(N,)`` values, N >= 1.
        n_bins: number of bins (4 = quartiles).

    Returns:
        ``(n_bins - 1,)`` float64 edges, non-decreasing.

    Raises:
        ValueError: ``n_bins < 1`` or empty ``norms``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if norms.numel() == 0:
        raise ValueError("no values to bin")
    v = norms.double().flatten().sort().values
    pos = torch.arange(1, n_bins, dtype=torch.float64) / n_bins * (v.numel() - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(v.numel() - 1)
    return v[lo] + (pos - lo.double()) * (v[hi] - v[lo])  # no torch.quantile: it refuses > 2**24 values


def assign_quartiles(norms: Tensor, edges: Tensor) -> Tensor:
    """Bin index of each value: 0 if ``v <= edges[0]``, ``i`` if ``edges[i-1] < v <= edges[i]``, last if above all.

    Args:
        norms: ``(N,)``; edges: ``(n_bins - 1,)`` non-decreasing.

    Returns:
        ``(N,)`` int64 in ``[0, n_bins)``.
    """
    return torch.bucketize(norms.double(), edges.double(), right=False)


def norm_quartile_stats(x: Tensor, x_hat: Tensor, l0: Tensor, n_bins: int = 4,
                        edges: Tensor | None = None) -> dict[str, Any]:
    """Reconstruction quality and firing per input-norm bin (exp44/exp55c).

    For the tokens of each bin ``q`` (by ``||x||``, :func:`assign_quartiles`):

    * ``fve = 1 - sum ||x - x_hat||^2 / sum ||x - mean_q(x)||^2`` (pooled, the bin's own mean);
    * ``fve_global_mean``: the same with the mean of *all* tokens in the denominator;
    * ``fve_resid_var = 1 - sum_d Var_q(x_d - x_hat_d) / sum_d Var_q(x_d)`` (the paper's / dictionary_learning's
      form: the residual's mean is not counted as error);
    * ``l2_ratio``: mean over tokens of ``||x_hat|| / ||x||``;
    * ``firing_frac``: the bin's share of all (token, active latent) pairs, ``sum_q l0 / sum l0``;
    * ``mean_l0``, ``n_tokens``, ``norm_lo`` / ``norm_hi`` (the bin's edges), ``mean_norm``.

    A bin with no token gets NaN statistics; an FVE with a zero denominator is NaN.

    Args:
        x: ``(N, d)`` inputs; x_hat: ``(N, d)`` reconstructions; l0: ``(N,)`` active latents per token.
        n_bins: number of bins; edges: optional inner edges (default :func:`quartile_edges` of ``||x||``).

    Returns:
        ``{"edges": [min, inner..., max], "bins": [dict per bin, lowest norms first], "overall": dict}``.
    """
    norms = x.double().norm(dim=-1)
    edges = quartile_edges(norms, n_bins) if edges is None else edges.double()
    idx = assign_quartiles(norms, edges)
    full = [float(norms.min())] + edges.tolist() + [float(norms.max())]
    # per-bin sums (float64), via a one-hot matmul: no per-bin copies of x
    onehot = F.one_hot(idx, n_bins).double()  # (N, n_bins)
    xd = x.double()
    ed = xd - x_hat.double()
    per_tok = torch.stack([torch.ones_like(norms), norms, xd.pow(2).sum(-1), ed.pow(2).sum(-1),
                           x_hat.double().norm(dim=-1) / norms.clamp_min(1e-12), l0.double()], dim=1)
    tok_sums = onehot.T @ per_tok  # (n_bins, 6): n, sum ||x||, sum ||x||^2, sum ||e||^2, sum ratio, sum l0
    sum_x, sum_e = onehot.T @ xd, onehot.T @ ed  # (n_bins, d)
    mean_all = xd.mean(0)
    total_l0 = float(tok_sums[:, 5].sum())

    def stats(t: Tensor, sx: Tensor, se: Tensor, lo: float, hi: float) -> dict[str, float]:
        n, s_norm, s_x2, sse, s_ratio, s_l0 = t.tolist()
        if n == 0:
            keys = ("mean_norm", "fve", "fve_global_mean", "fve_resid_var", "l2_ratio", "firing_frac", "mean_l0")
            return {"n_tokens": 0, "norm_lo": lo, "norm_hi": hi, **dict.fromkeys(keys, math.nan)}
        den_own = s_x2 - float(sx @ sx) / n  # sum ||x - mean_q||^2
        den_glob = s_x2 - 2 * float(mean_all @ sx) + n * float(mean_all @ mean_all)
        resid_var = sse - float(se @ se) / n
        div = lambda a, b: 1.0 - a / b if b > 0 else math.nan  # noqa: E731
        return {
            "n_tokens": int(n), "norm_lo": lo, "norm_hi": hi, "mean_norm": s_norm / n,
            "fve": div(sse, den_own), "fve_global_mean": div(sse, den_glob), "fve_resid_var": div(resid_var, den_own),
            "l2_ratio": s_ratio / n, "firing_frac": s_l0 / total_l0 if total_l0 > 0 else math.nan, "mean_l0": s_l0 / n,
        }

    bins = [stats(tok_sums[q], sum_x[q], sum_e[q], full[q], full[q + 1]) for q in range(n_bins)]
    overall = stats(tok_sums.sum(0), sum_x.sum(0), sum_e.sum(0), full[0], full[-1])
    return {"edges": full, "bins": bins, "overall": overall}


@torch.no_grad()
def run_norm_quartiles(sae: SAE, lm: LoadedLM, cfg: NormQuartilesConfig,
                       store: LMActivationStore | None = None) -> NormQuartileResult:
    """The ``norm_quartiles`` suite: :func:`norm_quartile_stats` of ``sae`` on the eval tokens.

    Stages (``timings_s``): ``lm_activations`` (cached), ``sae_encode``, ``stats``.

    Raises:
        ValueError: the SAE's width differs from the hook's, or no held-out text.
    """
    res = NormQuartileResult(suite="norm_quartiles", sae=str(cfg.sae),
                             max_norm_multiple=float(cfg.max_norm_multiple or 0))
    tokens, res.n_outliers_excluded, _ = _load_tokens(sae, lm, cfg, store, res)
    x = tokens.x
    with res.timed("sae_encode"):
        x_hat = torch.empty_like(x)
        l0 = torch.empty(x.shape[0])
        for s, _xb, code, xh in _encode_chunks(sae, x, cfg.encode_batch):
            x_hat[s : s + len(xh)] = xh.float().cpu()
            l0[s : s + len(xh)] = (code.values > 0).sum(-1).float().cpu()
    with res.timed("stats"):
        st = norm_quartile_stats(x, x_hat, l0, cfg.n_bins)
    res.n_tokens = x.shape[0]
    res.edges, res.bins, res.overall = st["edges"], st["bins"], st["overall"]
    first, last = st["bins"][0], st["bins"][-1]
    res.fve = st["overall"]["fve"]
    res.fve_q1, res.fve_q4 = first["fve"], last["fve"]
    res.l2_ratio_q1, res.l2_ratio_q4 = first["l2_ratio"], last["l2_ratio"]
    res.firing_frac_q1, res.firing_frac_q4 = first["firing_frac"], last["firing_frac"]
    res.firing_q4_q1_ratio = q4_q1_ratio([b["firing_frac"] for b in st["bins"]])
    return res


# ------------------------------------------------------------------------------------------------------
# feature matching (exp58b / exp58c)
# ------------------------------------------------------------------------------------------------------


def padded_code(code: Tensor | Code) -> tuple[Tensor, Tensor]:
    """Every non-zero code of each token as ``(indices (n, k) int64, values (n, k) float32)``, CPU.

    ``k`` is the largest number of non-zero codes of any token; tokens with fewer are padded with zero values
    (at arbitrary indices, harmless in sums). A sparse :class:`Code` (TopK: ``indices`` set) is returned as is.

    Args:
        code: a dense ``(n, d_sae)`` tensor, or a :class:`Code` (dense or sparse).
    """
    if isinstance(code, Code) and code.indices is not None:
        return code.indices.long().cpu(), code.values.float().cpu()
    f = (code.values if isinstance(code, Code) else code).float().cpu()
    k = int((f != 0).sum(1).max()) if f.numel() else 0
    idx = f.abs().topk(k, dim=1).indices
    return idx, f.gather(1, idx)


class CrossMoments:
    """Running sums for the Pearson correlation of every latent of A with every latent of B over tokens.

    ``corr(i, j) = (E[f_i g_j] - E f_i E g_j) / (std f_i std g_j)`` (population moments). Per-latent sums are
    float64; the ``(d_a, d_b)`` cross sum ``sum_n f_ni g_nj`` is float32 (340 MB for 9216 x 9216). For sparse
    codes it is accumulated pair by pair: each token adds the outer product of its ``l0_a`` and ``l0_b``
    non-zero codes (``index_add_``), ``N * k_a * k_b`` additions (33M for 32k tokens at k = 32, ~2 s on one core)
    instead of the ``N * d_a * d_b`` multiply-adds of a dense ``F_a^T F_b`` (2.8e12, ~1 min on 2 cores;
    ``torch.sparse.mm`` is slower still on CPU). When ``max l0_a * max l0_b`` of a chunk exceeds ``1 %`` of
    ``d_a * d_b`` (dense codes) the chunk uses the dense product.

    Args:
        d_a, d_b: numbers of latents.
    """

    pair_budget: int = 4_000_000
    """(token, latent a, latent b) triples per ``index_add_`` call (bounds the temporary memory, ~50 MB)."""

    def __init__(self, d_a: int, d_b: int) -> None:
        self.n = 0
        self.sum_a = torch.zeros(d_a, dtype=torch.float64)
        self.sum_a2 = torch.zeros(d_a, dtype=torch.float64)
        self.sum_b = torch.zeros(d_b, dtype=torch.float64)
        self.sum_b2 = torch.zeros(d_b, dtype=torch.float64)
        self.cross = torch.zeros(d_a, d_b, dtype=torch.float32)

    @torch.no_grad()
    def add(self, fa: Tensor | Code, fb: Tensor | Code) -> None:
        """Add the codes of a chunk of ``n`` tokens: dense ``(n, d_a)``, ``(n, d_b)`` tensors or :class:`Code`-s."""
        ia, va = padded_code(fa)
        ib, vb = padded_code(fb)
        n = ia.shape[0]
        if n != ib.shape[0]:
            raise ValueError(f"chunks cover different numbers of tokens: {n} vs {ib.shape[0]}")
        if n == 0:
            return
        d_a, d_b = self.cross.shape
        self.n += n
        va64, vb64 = va.double(), vb.double()
        self.sum_a.index_add_(0, ia.flatten(), va64.flatten())
        self.sum_a2.index_add_(0, ia.flatten(), va64.pow(2).flatten())
        self.sum_b.index_add_(0, ib.flatten(), vb64.flatten())
        self.sum_b2.index_add_(0, ib.flatten(), vb64.pow(2).flatten())
        ka, kb = ia.shape[1], ib.shape[1]
        if ka == 0 or kb == 0:
            return
        if ka * kb * 100 > d_a * d_b:  # dense codes: one GEMM is cheaper
            dense_a = torch.zeros(n, d_a).scatter_add_(1, ia, va)
            dense_b = torch.zeros(n, d_b).scatter_add_(1, ib, vb)
            self.cross.addmm_(dense_a.T, dense_b)
            return
        flat = self.cross.view(-1)
        step = max(1, self.pair_budget // (ka * kb))
        for s in range(0, n, step):
            idx = (ia[s : s + step, :, None] * d_b + ib[s : s + step, None, :]).reshape(-1)
            flat.index_add_(0, idx, (va[s : s + step, :, None] * vb[s : s + step, None, :]).reshape(-1))

    def stats(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(mean_a, std_a, mean_b, std_b), float64 population moments."""
        n = max(self.n, 1)
        ma, mb = self.sum_a / n, self.sum_b / n
        sa = (self.sum_a2 / n - ma.pow(2)).clamp_min(0).sqrt()
        sb = (self.sum_b2 / n - mb.pow(2)).clamp_min(0).sqrt()
        return ma, sa, mb, sb

    @torch.no_grad()
    def best_matches(self, block: int = 1024, rel_eps: float = 1e-6) -> dict[str, Tensor]:
        """Best-correlated partner of every latent, both ways.

        Latents with zero variance (never fire, or constant) have an undefined correlation: their best
        correlation is NaN and their best index -1, and they are never anyone's partner.

        Args:
            block: rows of A per block of the ``(d_a, d_b)`` correlation matrix.
            rel_eps: a std below ``rel_eps * (|mean| + 1e-12)`` counts as zero (float cancellation).

        Returns:
            ``{"corr_a": (d_a,), "idx_a": (d_a,) int64, "corr_b": (d_b,), "idx_b": (d_b,), "alive_a", "alive_b"}``:
            best correlation of each A latent over B (and its index), the same for B over A, and the
            defined-correlation masks.
        """
        ma, sa, mb, sb = self.stats()
        alive_a = (sa > rel_eps * (ma.abs() + 1e-12)) & (self.sum_a2 > 0)
        alive_b = (sb > rel_eps * (mb.abs() + 1e-12)) & (self.sum_b2 > 0)
        d_a, d_b = self.cross.shape
        corr_a = torch.full((d_a,), math.nan, dtype=torch.float64)
        idx_a = torch.full((d_a,), -1, dtype=torch.long)
        corr_b = torch.full((d_b,), -math.inf, dtype=torch.float64)
        idx_b = torch.full((d_b,), -1, dtype=torch.long)
        inv_sb = torch.where(alive_b, 1.0 / sb.clamp_min(1e-300), torch.zeros_like(sb))
        n = max(self.n, 1)
        for s in range(0, d_a, block):
            e = min(s + block, d_a)
            ok = alive_a[s:e]
            if not ok.any():
                continue
            rows = torch.arange(s, e)[ok]
            c = self.cross[rows].double() / n - ma[rows, None] * mb[None, :]
            c = c / sa[rows, None] * inv_sb[None, :]
            c[:, ~alive_b] = -math.inf
            v, j = c.max(dim=1)
            corr_a[rows], idx_a[rows] = v, j
            vb, ib = c.max(dim=0)
            better = vb > corr_b
            corr_b[better], idx_b[better] = vb[better], rows[ib[better]]
        corr_a[~alive_a] = math.nan
        idx_a[torch.isinf(corr_a)] = -1  # alive A but no alive B at all
        corr_a[torch.isinf(corr_a)] = math.nan
        corr_b[~alive_b | torch.isinf(corr_b)] = math.nan
        idx_b[~alive_b] = -1
        return {"corr_a": corr_a, "idx_a": idx_a, "corr_b": corr_b, "idx_b": idx_b,
                "alive_a": alive_a, "alive_b": alive_b}


def match_latents(best_corr: Tensor, best_idx: Tensor, W_dec_src: Tensor, W_dec_tgt: Tensor,
                  corr_threshold: float = 0.7, cos_threshold: float = 0.7) -> tuple[Tensor, Tensor]:
    """Apply the exp58b matching rule to each source latent's best-correlated target latent.

    Matched iff ``best_corr >= corr_threshold`` AND ``cos(W_dec_src[i], W_dec_tgt[best_idx[i]]) > cos_threshold``.
    Latents with an undefined correlation (NaN, index -1) are unmatched.

    Args:
        best_corr: ``(d_src,)``; best_idx: ``(d_src,)`` int64 (-1 = none).
        W_dec_src: ``(d_src, d_in)``; W_dec_tgt: ``(d_tgt, d_in)`` decoders (rows need not be unit-norm).
        corr_threshold, cos_threshold: the thresholds.

    Returns:
        ``(matched (d_src,) bool, decoder cosine (d_src,) float64, NaN where there is no partner)``.
    """
    has = best_idx >= 0
    dec_cos = torch.full(best_corr.shape, math.nan, dtype=torch.float64)
    if has.any():
        a = F.normalize(W_dec_src[has].double(), dim=-1)
        b = F.normalize(W_dec_tgt[best_idx[has]].double(), dim=-1)
        dec_cos[has] = (a * b).sum(-1)
    corr = torch.nan_to_num(best_corr.double(), nan=-math.inf)
    matched = has & (corr >= corr_threshold) & (torch.nan_to_num(dec_cos, nan=-math.inf) > cos_threshold)
    return matched, dec_cos


def quartile_firing_counts(f: Tensor | Code, bins: Tensor, n_bins: int, d_sae: int | None = None) -> Tensor:
    """``(n_bins, d_sae)`` float32: on how many tokens of each norm bin each latent fires (code > 0).

    Args:
        f: ``(N, d_sae)`` dense codes or a :class:`Code`; bins: ``(N,)`` bin of each token
            (:func:`assign_quartiles`); n_bins: number of bins; d_sae: latents (default ``f.shape[1]``).
    """
    d_sae = d_sae if d_sae is not None else f.shape[1]
    idx, val = padded_code(f)
    counts = torch.zeros(n_bins, d_sae)  # float32 counts are exact below 2**24 tokens
    rows = bins.to(torch.long).cpu()[:, None].expand_as(idx)
    return counts.index_put_((rows, idx), (val > 0).float(), accumulate=True)


def firing_profile(counts: Tensor, latents: Tensor) -> tuple[list[float], int]:
    """Share of a latent set's (token, firing) pairs in each norm bin (exp58c counting rule).

    Args:
        counts: ``(n_bins, d_sae)`` number of tokens of each bin on which each latent fires.
        latents: ``(d_sae,)`` bool mask of the set.

    Returns:
        (per-bin fractions summing to 1, NaN if the set never fires; total number of firings).
    """
    per_bin = counts[:, latents].double().sum(1)
    total = float(per_bin.sum())
    if total == 0:
        return [math.nan] * counts.shape[0], 0
    return (per_bin / total).tolist(), int(total)


def q4_q1_ratio(profile: list[float]) -> float | None:
    """Last-bin / first-bin share (the paper's "22x more on the highest-norm tokens"); None if undefined."""
    lo, hi = profile[0], profile[-1]
    if lo is None or hi is None or not math.isfinite(lo) or not math.isfinite(hi) or lo <= 0:
        return None
    return hi / lo


@torch.no_grad()
def run_feature_matching(sae: SAE, lm: LoadedLM, cfg: FeatureMatchingConfig, store: LMActivationStore | None = None,
                         sae_b: SAE | None = None) -> FeatureMatchingResult:
    """The ``feature_matching`` suite: match ``sae`` (A) against ``cfg.sae_b`` (B) on the eval tokens.

    Stages: ``lm_activations`` (cached), ``load_sae_b``, ``encode_and_moments`` (both SAEs' codes, chunked; the
    cross-moment accumulation), ``matching`` (the correlation matrix in row blocks, decoder cosines, profiles).

    Args:
        sae, lm, cfg, store: as every suite; sae_b: B already loaded (else ``load_sae(cfg.sae_b)``).

    Raises:
        ValueError: no ``sae_b``; the two SAEs sit at different hooks or widths.
    """
    from ..sae.saving import load_sae

    res = FeatureMatchingResult(suite="feature_matching", sae=str(cfg.sae), sae_b=str(cfg.sae_b or ""),
                                corr_threshold=cfg.corr_threshold, cos_threshold=cfg.cos_threshold,
                                max_norm_multiple=float(cfg.max_norm_multiple or 0))
    with res.timed("load_sae_b"):
        if sae_b is None:
            if not cfg.sae_b:
                raise ValueError("feature_matching needs a second SAE: pass --sae_b DIR")
            sae_b = load_sae(cfg.sae_b, device=str(sae.device))
        ha = resolve_hook(lm.model, sae.cfg.hook_name)
        hb = resolve_hook(lm.model, sae_b.cfg.hook_name or sae.cfg.hook_name)
        if ha.module_path != hb.module_path or sae.cfg.d_in != sae_b.cfg.d_in:
            raise ValueError(f"the SAEs must share model and hook: A is at {ha.hook_name} (d_in {sae.cfg.d_in}), "
                             f"B at {hb.hook_name} (d_in {sae_b.cfg.d_in})")
    tokens, res.n_outliers_excluded, _ = _load_tokens(sae, lm, cfg, store, res)
    x = tokens.x
    res.n_tokens, res.d_sae_a, res.d_sae_b = x.shape[0], sae.cfg.d_sae, sae_b.cfg.d_sae
    edges = quartile_edges(x.norm(dim=-1), cfg.n_bins)
    res.edges = [float(x.norm(dim=-1).min())] + edges.tolist() + [float(x.norm(dim=-1).max())]
    bins = assign_quartiles(x.norm(dim=-1), edges)
    mom = CrossMoments(sae.cfg.d_sae, sae_b.cfg.d_sae)
    counts_a = torch.zeros(cfg.n_bins, sae.cfg.d_sae)
    counts_b = torch.zeros(cfg.n_bins, sae_b.cfg.d_sae)
    with res.timed("encode_and_moments"):
        sae_b.eval()
        for s, xb, code_a, _ in _encode_chunks(sae, x, cfg.encode_batch, decode=False):
            code_b, _ = sae_b.encode_code(xb.to(sae_b.device, sae_b.dtype))
            q = bins[s : s + len(xb)]
            counts_a += quartile_firing_counts(code_a, q, cfg.n_bins, sae.cfg.d_sae)
            counts_b += quartile_firing_counts(code_b, q, cfg.n_bins, sae_b.cfg.d_sae)
            mom.add(code_a, code_b)
    with res.timed("matching"):
        best = mom.best_matches()
        m_a, _ = match_latents(best["corr_a"], best["idx_a"], sae.W_dec.detach().cpu(), sae_b.W_dec.detach().cpu(),
                               cfg.corr_threshold, cfg.cos_threshold)
        m_b, _ = match_latents(best["corr_b"], best["idx_b"], sae_b.W_dec.detach().cpu(), sae.W_dec.detach().cpu(),
                               cfg.corr_threshold, cfg.cos_threshold)
        alive_a, alive_b = best["alive_a"], best["alive_b"]
        corr_ok_a = torch.nan_to_num(best["corr_a"], nan=-math.inf) >= cfg.corr_threshold
        corr_ok_b = torch.nan_to_num(best["corr_b"], nan=-math.inf) >= cfg.corr_threshold
        res.n_alive_a, res.n_alive_b = int(alive_a.sum()), int(alive_b.sum())
        res.n_matched_a, res.n_matched_b = int(m_a.sum()), int(m_b.sum())
        res.n_corr_only_a, res.n_corr_only_b = int((corr_ok_a & ~m_a).sum()), int((corr_ok_b & ~m_b).sum())
        res.frac_matched_a = res.n_matched_a / res.n_alive_a if res.n_alive_a else math.nan
        res.frac_matched_b = res.n_matched_b / res.n_alive_b if res.n_alive_b else math.nan
        res.mean_best_corr_a = float(best["corr_a"][alive_a].mean()) if res.n_alive_a else math.nan
        res.mean_best_corr_b = float(best["corr_b"][alive_b].mean()) if res.n_alive_b else math.nan
        # unmatched = every latent without a match; never-firing latents add no firing, so this equals "alive unmatched"
        sets = {"a_unmatched": (counts_a, ~m_a), "a_matched": (counts_a, m_a),
                "a_all": (counts_a, torch.ones_like(m_a)), "b_unmatched": (counts_b, ~m_b),
                "b_matched": (counts_b, m_b), "b_all": (counts_b, torch.ones_like(m_b))}
        for name, (counts, mask) in sets.items():
            prof, total = firing_profile(counts, mask)
            res.profiles[name], res.firings[name], res.q4_q1[name] = prof, total, q4_q1_ratio(prof)
        res.q4_q1_a_unmatched, res.q4_q1_b_unmatched = res.q4_q1["a_unmatched"], res.q4_q1["b_unmatched"]
    return res


# ------------------------------------------------------------------------------------------------------
# cos > inner win rate (exp40 evaluate_ablation)
# ------------------------------------------------------------------------------------------------------


def project_out(h: Tensor, d: Tensor, start: int = 0) -> Tensor:
    """Remove the component along ``d`` from ``h``: ``h - (h . d_hat) d_hat``, ``d_hat = d / ||d||``.

    Args:
        h: ``(B, T, D)`` hook output (or ``(N, D)``).
        d: ``(D,)`` one direction, or ``(B, D)`` one per batch row (for ``(B, T, D)`` inputs).
        start: leave positions ``< start`` unchanged (1 = spare position 0; ``(B, T, D)`` inputs only).

    Returns:
        A new tensor of ``h``'s shape and dtype.
    """
    dh = F.normalize(d.to(h.dtype), dim=-1)
    if h.dim() == 3 and dh.dim() == 2:
        dh = dh[:, None, :]
    out = h - (h * dh).sum(-1, keepdim=True) * dh
    if start:
        out[:, :start] = h[:, :start]
    return out


def pearson_rows(a: Tensor, b: Tensor, rel_eps: float = 1e-9) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (along the last dim), float64.

    Rows where either side is constant (std <= ``rel_eps`` x its max |value|) give NaN.

    Args:
        a, b: ``(..., M)``.

    Returns:
        ``(...)`` correlations in [-1, 1] or NaN.
    """
    a, b = a.double(), b.double()
    da, db = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    sa, sb = da.pow(2).sum(-1).sqrt(), db.pow(2).sum(-1).sqrt()
    ok = (sa > rel_eps * a.abs().amax(-1).clamp_min(1e-300)) & (sb > rel_eps * b.abs().amax(-1).clamp_min(1e-300))
    r = (da * db).sum(-1) / (sa * sb).clamp_min(1e-300)
    return torch.where(ok, r.clamp(-1, 1), torch.full_like(r, math.nan))


def cos_inner_wins(cos: Tensor, inner: Tensor, kl: Tensor) -> dict[str, Any]:
    """The exp40 win rule on per-(latent, text) samples.

    Args:
        cos: ``(N, M)`` ``cos(x_last, d)``; inner: ``(N, M)`` ``<x_last, d>``; kl: ``(N, M)`` ablation KL.

    Returns:
        ``{"corr_cos": (N,), "corr_inner": (N,), "win_signed": (N,) bool, "win_abs": (N,) bool,
        "win_rate_signed": float, "win_rate_abs": float, "n_undefined": int}``. ``win_signed`` is
        ``corr(cos, KL) > corr(inner, KL)`` (the authors' code); ``win_abs`` compares absolute values (the
        Fig. 14 caption). A NaN correlation is never a win; rates are ``wins / N`` (the paper's).
    """
    cc, ci = pearson_rows(cos, kl), pearson_rows(inner, kl)
    win_s, win_a = cc > ci, cc.abs() > ci.abs()  # NaN compares False
    n = max(cos.shape[0], 1)
    return {"corr_cos": cc, "corr_inner": ci, "win_signed": win_s, "win_abs": win_a,
            "win_rate_signed": float(win_s.sum()) / n, "win_rate_abs": float(win_a.sum()) / n,
            "n_undefined": int((cc.isnan() | ci.isnan()).sum())}


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(p || q)`` per row of next-token logits ``(..., V)``, computed in float64 (nats)."""
    lp, lq = logits_p.double().log_softmax(-1), logits_q.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def top_latents_by_mean_activation(sum_act: Tensor, n_fire: Tensor, n: int, min_firings: int = 1) -> Tensor:
    """The ``n`` alive latents with the highest mean non-zero activation (exp40 selection), best first.

    Args:
        sum_act: ``(d_sae,)`` sum of each latent's activations; n_fire: ``(d_sae,)`` tokens where it is > 0.
        n: how many (fewer if fewer are alive); min_firings: "alive" threshold.

    Returns:
        ``(<= n,)`` int64 latent ids.
    """
    alive = n_fire >= min_firings
    mean = sum_act.double() / n_fire.double().clamp_min(1)
    score = torch.where(alive, mean, torch.full_like(mean, -math.inf))
    k = min(n, int(alive.sum()))
    return score.topk(k).indices if k else torch.empty(0, dtype=torch.long)


def _last_logits(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token logits at the last position, ``(B, V)`` (``logits_to_keep=1`` where the model supports it)."""
    try:
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except TypeError:
        out = model(input_ids=ids, use_cache=False)
    return out.logits[:, -1]


def clean_texts(lm: LoadedLM, hook_name: str, store: LMActivationStore, *, n_texts: int, text_size: int,
                seed: int, data: DataConfig, batch_size: int = 16) -> dict[str, Tensor]:
    """The cos>inner eval texts and their clean forward, cached in ``store`` (SAE-independent).

    Texts are the first ``n_texts`` held-out contexts (core-eval packing, order ``seed``) whose last token is not
    special, so the predicted position is a real token. Cached size: ``n_texts * text_size * d_model * 4`` bytes
    for ``h`` (4.7 MB at 16 x 128 x 576) plus ``n_texts * vocab * 4`` for the logits.

    Returns:
        ``{"ids": (M, T) int64, "h": (M, T, D) float32 hook output, "logits_last": (M, V) float32,
        "as_tuple": () int64 (1 if the hooked block returns a tuple)}``.

    Raises:
        ValueError: fewer than 2 usable held-out texts.
    """
    hook = resolve_hook(lm.model, hook_name)
    spec = {"v": 1, "n_texts": n_texts, "text_size": text_size, "seed": seed, "data": asdict(data),
            "prefix_id": lm.prefix_id, "special_ids": sorted(lm.special_ids), "module_path": hook.module_path,
            "dtype": str(next(lm.model.parameters()).dtype)}

    @torch.no_grad()
    def compute() -> dict[str, Tensor]:
        _, held_out = split_documents(data)
        special = torch.tensor(sorted(lm.special_ids))
        texts = []
        for ids, _ in iter_contexts(lm, held_out.shuffle(seed), text_size):
            if not bool(torch.isin(ids[-1:], special)):
                texts.append(ids)
            if len(texts) == n_texts:
                break
        if len(texts) < 2:
            raise ValueError(f"only {len(texts)} usable held-out texts of {text_size} tokens; need >= 2")
        ids = torch.stack(texts)
        hs, logits, kinds = [], [], []
        for s in range(0, len(ids), batch_size):
            b = ids[s : s + batch_size].to(lm.model.device)
            grabbed: dict[str, Tensor] = {}

            def grab(_m, _i, out):
                kinds.append(isinstance(out, tuple))
                grabbed["h"] = out[0] if isinstance(out, tuple) else out

            handle = hook.module.register_forward_hook(grab)
            try:
                logits.append(_last_logits(lm.model, b).float().cpu())
            finally:
                handle.remove()
            hs.append(grabbed["h"].float().cpu())
        return {"ids": ids, "h": torch.cat(hs), "logits_last": torch.cat(logits),
                "as_tuple": torch.tensor(int(any(kinds)))}

    return store.get("cos_inner_texts", spec, compute)


@torch.no_grad()
def run_cos_inner(sae: SAE, lm: LoadedLM, cfg: CosInnerConfig,
                  store: LMActivationStore | None = None) -> CosInnerResult:
    """The ``cos_inner`` suite (exp40 ``evaluate_ablation``; see the module docstring).

    Cost: ``n_latents * n_texts`` ablated text forwards, batched ``ablation_batch`` rows per pass, plus one clean
    forward of the texts (cached). With ``fast_path`` and a block hook, the blocks up to the hook are skipped
    (the ablation only changes what comes after), roughly halving the cost at a middle layer.

    Stages: ``lm_activations`` (cached), ``select_latents`` (SAE encode of the eval tokens), ``clean_forward``
    (cached), ``ablated_forwards``, ``stats``.

    Raises:
        ValueError: width mismatch, no alive latent, or too few texts.
    """
    res = CosInnerResult(suite="cos_inner", sae=str(cfg.sae), n_texts=cfg.n_texts, text_size=cfg.text_size,
                         ablate_position0=cfg.ablate_position0, max_norm_multiple=float(cfg.max_norm_multiple or 0))
    tokens, _, store = _load_tokens(sae, lm, cfg, store, res)
    res.n_eval_tokens = len(tokens)
    with res.timed("select_latents"):
        sum_act = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
        n_fire = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
        for _s, _xb, code, _ in _encode_chunks(sae, tokens.x, cfg.encode_batch, decode=False):
            idx, val = padded_code(code)
            sum_act.index_add_(0, idx.flatten(), val.double().flatten())
            n_fire.index_add_(0, idx.flatten(), (val > 0).double().flatten())
        res.n_alive = int((n_fire > 0).sum())
        latents = top_latents_by_mean_activation(sum_act, n_fire, cfg.n_latents)
        if len(latents) == 0:
            raise ValueError("no latent fires on the eval tokens")
    hook = resolve_hook(lm.model, sae.cfg.hook_name)
    with res.timed("clean_forward"):
        ct = clean_texts(lm, sae.cfg.hook_name, store, n_texts=cfg.n_texts, text_size=cfg.text_size, seed=cfg.seed,
                         data=cfg.data, batch_size=cfg.ablation_batch)
    ids, h_clean, logits_clean, as_tuple = ct["ids"], ct["h"], ct["logits_last"], bool(ct["as_tuple"])
    M, N = ids.shape[0], len(latents)
    res.n_latents, res.n_texts = N, M
    dev = lm.model.device
    dirs = F.normalize(sae.W_dec.detach()[latents].double().cpu(), dim=-1)  # (N, D) unit decoder rows
    x_last = h_clean[:, -1].double()  # (M, D)
    x_norm = x_last.norm(dim=-1)
    inner = dirs @ x_last.T  # (N, M)
    cos = inner / x_norm.clamp_min(1e-12)[None, :]
    acts = sae.encode(x_last.to(sae.device, sae.dtype))[:, latents].T.double().cpu()  # (N, M)
    h0 = h_clean[0, 0].double()
    res.sink_norm = float(h0.norm())
    sink_inner = dirs @ h0
    res.median_abs_sink_inner, res.median_x_norm = float(sink_inner.abs().median()), float(x_norm.median())
    start = 0 if cfg.ablate_position0 else 1
    model_dtype = next(lm.model.parameters()).dtype

    fast = cfg.fast_path and is_block_hook(lm.model, hook)
    with res.timed("ablated_forwards"):
        if fast:  # check the replay reproduces the clean forward on a first batch
            b = list(range(min(M, cfg.ablation_batch)))
            hb = h_clean[b].to(dev, model_dtype)
            with replay(lm.model, hook, hb, as_tuple):
                replayed = _last_logits(lm.model, ids[b].to(dev)).float().cpu()
            res.fast_path_check = float((replayed - logits_clean[b]).abs().max())
            scale = float(logits_clean[b].abs().max())
            fast = res.fast_path_check <= 1e-4 * max(scale, 1.0)
        res.fast_path = fast
        pairs = [(i, m) for i in range(N) for m in range(M)]
        kl = torch.zeros(N, M, dtype=torch.float64)
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pairs), unit="fwd", desc="cos_inner ablations", dynamic_ncols=True)
        for s in range(0, len(pairs), cfg.ablation_batch):
            chunk = pairs[s : s + cfg.ablation_batch]
            li = torch.tensor([p[0] for p in chunk])
            ti = torch.tensor([p[1] for p in chunk])
            d_rows = dirs[li].to(dev, model_dtype)

            def ablate(hh: Tensor, d_rows: Tensor = d_rows) -> Tensor:
                return project_out(hh, d_rows, start)

            if fast:
                h_rows = h_clean[ti].to(dev, model_dtype)
                with replay(lm.model, hook, h_rows, as_tuple) as stub, splice(stub, ablate):
                    logits = _last_logits(lm.model, ids[ti].to(dev))
            else:
                with splice(hook, ablate):
                    logits = _last_logits(lm.model, ids[ti].to(dev))
            kl[li, ti] = kl_divergence(logits_clean[ti], logits.float().cpu())
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    with res.timed("stats"):
        w = cos_inner_wins(cos, inner, kl)
        res.win_rate_signed, res.win_rate_abs = w["win_rate_signed"], w["win_rate_abs"]
        res.n_undefined = w["n_undefined"]
        mean_act = sum_act[latents] / n_fire[latents]
        for r in range(N):
            res.latents.append({
                "latent": int(latents[r]), "mean_act": float(mean_act[r]),
                "corr_cos": _f(w["corr_cos"][r]), "corr_inner": _f(w["corr_inner"][r]),
                "win_signed": bool(w["win_signed"][r]), "win_abs": bool(w["win_abs"][r]),
                "mean_kl": float(kl[r].mean()), "max_kl": float(kl[r].max()),
                "frac_active_last": float((acts[r] > 0).double().mean()),
                "sink_inner": float(sink_inner[r]), "sink_cos": float(sink_inner[r] / max(res.sink_norm, 1e-12)),
            })
        if cfg.keep_samples:
            res.samples = {"kl": kl.tolist(), "cos": cos.tolist(), "inner": inner.tolist(), "act": acts.tolist(),
                           "x_norm": x_norm.tolist()}
    return res


def _f(v: Tensor) -> float | None:
    """A float, or None for NaN (JSON has no NaN)."""
    v = float(v)
    return None if math.isnan(v) else v


# ------------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------------

EVAL_SUITES.register("norm_quartiles")(Suite(
    NormQuartilesConfig, run_norm_quartiles,
    help="FVE, reconstruction norm ratio and firing share per input-norm quartile (cosine paper exp44/55c)"))
EVAL_SUITES.register("feature_matching")(Suite(
    FeatureMatchingConfig, run_feature_matching,
    help="match latents of two SAEs (corr >= 0.7 and decoder cos > 0.7) and the unmatched ones' norm-quartile "
         "firing profile (cosine paper exp58b/58c)"))
EVAL_SUITES.register("cos_inner")(Suite(
    CosInnerConfig, run_cos_inner,
    help="cos > inner win rate of decoder-direction ablations (cosine paper exp40)"))

__all__ = [
    "CosInnerConfig", "CosInnerResult", "CrossMoments", "DiagnosticsConfig", "EvalTokens", "FeatureMatchingConfig",
    "FeatureMatchingResult", "NormQuartileResult", "NormQuartilesConfig", "assign_quartiles", "clean_texts",
    "cos_inner_wins", "eval_token_activations", "firing_profile", "kl_divergence", "match_latents",
    "norm_quartile_stats", "padded_code", "pearson_rows", "project_out", "q4_q1_ratio", "quartile_firing_counts",
    "quartile_edges", "run_cos_inner", "run_feature_matching", "run_norm_quartiles", "top_latents_by_mean_activation",
]
