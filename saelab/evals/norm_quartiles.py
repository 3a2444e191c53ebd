"""Norm-quartile diagnostics of the cosine-scored-SAE paper: FVE, norm ratio and firing per input-norm bin.

Source: Naihin & Stambler 2026, "Size Doesn't Matter: Cosine-Scored Sparse Autoencoders", arXiv 2606.15054
(code github ``SilenNaihin/cosine-scored-saes``).
Registered in :data:`saelab.evals.base.EVAL_SUITES`; the eval tokens come from :mod:`saelab.evals.eval_tokens`.

``norm_quartiles`` (paper Fig. 24; the authors' ``exp44`` / ``exp55c`` scripts)
    Quartiles of the input norm ``||x||`` over held-out eval tokens; per quartile the FVE, the mean
    reconstruction norm ratio ``||x_hat|| / ||x||``, the fraction of all (token, active latent) firings and the
    mean L0. The paper reports, for a standard SAE at Qwen3-8B L18, Q4 FVE -184 to -197 with norm ratio ~9.5x,
    against +0.33 and 0.55-0.78 for the cosine SAE.

Pure tensor functions (unit-tested on constructed data): :func:`quartile_edges`, :func:`assign_quartiles`,
:func:`norm_quartile_stats`, :func:`q4_q1_ratio`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.lm import LoadedLM
from ..sae.model import SAE
from .base import EVAL_SUITES, EvalResult, LMActivationStore, Suite
from .eval_tokens import DiagnosticsConfig, encode_chunks, load_tokens


@dataclass
class NormQuartilesConfig(DiagnosticsConfig):
    """Norm-quartile reconstruction and firing analysis (cosine paper Fig. 24)."""

    n_bins: int = 4
    """Number of norm bins (4 = quartiles), equal-count bins over the eval tokens."""


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
    pos = torch.arange(1, n_bins, dtype=torch.float64, device=v.device) / n_bins * (v.numel() - 1)
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
    """Reconstruction quality and firing per input-norm bin (paper Fig. 24; the authors' ``exp44`` / ``exp55c``).

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


def q4_q1_ratio(profile: list[float]) -> float | None:
    """Last-bin / first-bin share (the paper's "22x more on the highest-norm tokens"); None if undefined."""
    lo, hi = profile[0], profile[-1]
    if lo is None or hi is None or not math.isfinite(lo) or not math.isfinite(hi) or lo <= 0:
        return None
    return hi / lo


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
    tokens, res.n_outliers_excluded, _ = load_tokens(sae, lm, cfg, store, res)
    x = tokens.x  # CPU (the cache): the statistics run there, on the reconstructions copied back once per chunk
    with res.timed("sae_encode"):
        x_hat = torch.empty_like(x)
        l0 = torch.empty(x.shape[0], device=x.device)
        for s, _xb, code, xh in encode_chunks(sae, x, cfg.encode_batch_size):
            x_hat[s : s + len(xh)] = xh.float().to(x.device)
            l0[s : s + len(xh)] = (code.values > 0).sum(-1).float().to(x.device)
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


EVAL_SUITES.register("norm_quartiles")(Suite(
    NormQuartilesConfig, run_norm_quartiles,
    help="FVE, reconstruction norm ratio and firing share per input-norm quartile (cosine paper, Fig. 24)"))


__all__ = [
    "NormQuartileResult", "NormQuartilesConfig", "assign_quartiles", "norm_quartile_stats", "q4_q1_ratio",
    "quartile_edges", "run_norm_quartiles",
]
