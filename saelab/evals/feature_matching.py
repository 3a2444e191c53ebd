"""Feature matching of the cosine-scored-SAE paper: which latents of two SAEs match, and where the rest fire.

Source: Naihin & Stambler 2026, "Size Doesn't Matter: Cosine-Scored Sparse Autoencoders", arXiv 2606.15054
(code github ``SilenNaihin/cosine-scored-saes``).
Registered in :data:`saelab.evals.base.EVAL_SUITES`; the eval tokens come from :mod:`saelab.evals.eval_tokens`.

``feature_matching`` (paper Fig. 2B; the authors' ``exp58b`` / ``exp58c`` scripts)
    Two SAEs on the same model and hook. A latent of A is *matched* iff its best Pearson activation correlation
    (over the eval tokens) with any latent of B is >= 0.7 AND the decoder cosine of that best-correlated pair
    is > 0.7 (and the same way round for B). The norm-quartile firing profile of a latent set counts every
    (token, active latent of the set) pair in the quartile of the token's norm (as the authors' ``exp58c``). The
    paper: standard-unique latents fire Q1 4.0 / Q2 4.6 / Q3 5.1 / Q4 86.3 % (Q4/Q1 ~ 22x), cosine-unique ones 4.7x.

Pure tensor functions (unit-tested on constructed data): :class:`CrossMoments`, :func:`match_latents`,
:func:`quartile_firing_counts`, :func:`firing_profile`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.hooks import resolve_hook
from ..models.lm import LoadedLM
from ..codes import Code
from ..sae.model import SAE
from .base import EVAL_SUITES, EvalResult, LMActivationStore, Suite
from .eval_tokens import DiagnosticsConfig, encode_chunks, load_tokens, padded_code
from .norm_quartiles import assign_quartiles, q4_q1_ratio, quartile_edges


@dataclass
class FeatureMatchingConfig(DiagnosticsConfig):
    """Match the latents of two SAEs on the same model/hook (cosine paper Fig. 2B)."""

    sae_b: str | None = None
    """Second SAE directory (same model and hook as --sae); required."""
    corr_threshold: float = 0.7
    """A pair matches if its activation correlation is >= this (the authors' ``exp58b``: 0.7) ..."""
    cos_threshold: float = 0.7
    """... and its decoder cosine is > this (the authors' ``exp58b``: 0.7)."""
    n_bins: int = 4
    """Number of norm bins for the firing profiles (4 = quartiles)."""


@dataclass
class FeatureMatchingResult(EvalResult):
    """Result of the ``feature_matching`` suite (A = ``sae``, B = ``sae_b``).

    Attributes:
        sae_b: path of B.
        n_tokens, n_outliers_excluded, max_norm_multiple: the eval tokens (see
            :class:`~saelab.evals.norm_quartiles.NormQuartileResult`).
        corr_threshold, cos_threshold: the matching rule (corr >= , cos >).
        d_sae_a, d_sae_b: dictionary sizes.
        n_alive_a, n_alive_b: latents with a defined correlation (fire on >= 1 eval token and not constant).
        n_matched_a, n_matched_b: latents of A matched in B, and of B matched in A.
        n_corr_only_a, n_corr_only_b: latents whose best correlation passes but whose decoder cosine fails.
        frac_matched_a, frac_matched_b: matched / alive.
        mean_best_corr_a, mean_best_corr_b: mean best correlation over alive latents.
        edges: the norm-bin edges.
        profiles: ``{"a_unmatched", "a_matched", "a_all", "b_unmatched", "b_matched", "b_all"}`` -> per-bin
            fraction of the set's (token, firing) pairs (the authors' ``exp58c`` counting rule; Q1 first).
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


class CrossMoments:
    """Running sums for the Pearson correlation of every latent of A with every latent of B over tokens.

    ``corr(i, j) = (E[f_i g_j] - E f_i E g_j) / (std f_i std g_j)`` (population moments). Per-latent sums are
    float64; the ``(d_a, d_b)`` cross sum ``sum_n f_ni g_nj`` is float32 (340 MB for 9216 x 9216). For sparse
    codes it is accumulated pair by pair: each token adds the outer product of its ``l0_a`` and ``l0_b``
    non-zero codes (``index_add_``), ``N * k_a * k_b`` additions (33M for 32k tokens at k = 32)
    instead of the ``N * d_a * d_b`` multiply-adds of a dense ``F_a^T F_b`` (2.8e12; ``torch.sparse.mm`` is slower
    still on CPU). When ``max l0_a * max l0_b`` of a chunk exceeds ``1 %`` of
    ``d_a * d_b`` (dense codes), and always on a GPU, the chunk uses the dense product: a GPU runs the GEMM at
    full speed, while its ``index_add_`` of the pairs would be a scatter of atomic float adds (their order, hence
    the rounding, changes from run to run; PyTorch "Reproducibility" notes).

    Args:
        d_a, d_b: numbers of latents.
        device: where the sums live (the SAEs' device); each chunk's codes are moved there.
    """

    pair_budget: int = 4_000_000
    """(token, latent a, latent b) triples per ``index_add_`` call (bounds the temporary memory, ~50 MB)."""

    def __init__(self, d_a: int, d_b: int, device: torch.device | str = "cpu") -> None:
        self.n = 0
        self.device = torch.device(device)
        self.sum_a = torch.zeros(d_a, dtype=torch.float64, device=device)
        self.sum_a2 = torch.zeros(d_a, dtype=torch.float64, device=device)
        self.sum_b = torch.zeros(d_b, dtype=torch.float64, device=device)
        self.sum_b2 = torch.zeros(d_b, dtype=torch.float64, device=device)
        self.cross = torch.zeros(d_a, d_b, dtype=torch.float32, device=device)

    @torch.no_grad()
    def add(self, fa: Tensor | Code, fb: Tensor | Code) -> None:
        """Add the codes of a chunk of ``n`` tokens: dense ``(n, d_a)``, ``(n, d_b)`` tensors or :class:`Code`-s."""
        dev = self.device
        ia, va = (t.to(dev) for t in padded_code(fa))
        ib, vb = (t.to(dev) for t in padded_code(fb))
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
        if ka * kb * 100 > d_a * d_b or dev.type != "cpu":  # dense codes (or a GPU): one GEMM is cheaper
            # a row's indices are distinct (top-k positions), so no two adds meet: the result is order-free
            dense_a = torch.zeros(n, d_a, device=dev).scatter_add_(1, ia, va)
            dense_b = torch.zeros(n, d_b, device=dev).scatter_add_(1, ib, vb)
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
        dev = self.device
        corr_a = torch.full((d_a,), math.nan, dtype=torch.float64, device=dev)
        idx_a = torch.full((d_a,), -1, dtype=torch.long, device=dev)
        corr_b = torch.full((d_b,), -math.inf, dtype=torch.float64, device=dev)
        idx_b = torch.full((d_b,), -1, dtype=torch.long, device=dev)
        inv_sb = torch.where(alive_b, 1.0 / sb.clamp_min(1e-300), torch.zeros_like(sb))
        n = max(self.n, 1)
        for s in range(0, d_a, block):
            e = min(s + block, d_a)
            ok = alive_a[s:e]
            if not ok.any():
                continue
            rows = torch.arange(s, e, device=dev)[ok]
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
    """Apply the paper's matching rule (the authors' ``exp58b``) to each source latent's best-correlated target latent.

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
    dec_cos = torch.full(best_corr.shape, math.nan, dtype=torch.float64, device=best_corr.device)
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

    Returns:
        The counts, on the codes' device (exact, whatever the order of the accumulation: integers below 2**24).
    """
    d_sae = d_sae if d_sae is not None else f.shape[1]
    idx, val = padded_code(f)
    counts = torch.zeros(n_bins, d_sae, device=idx.device)  # float32 counts are exact below 2**24 tokens
    rows = bins.to(idx.device, torch.long)[:, None].expand_as(idx)
    return counts.index_put_((rows, idx), (val > 0).float(), accumulate=True)


def firing_profile(counts: Tensor, latents: Tensor) -> tuple[list[float], int]:
    """Share of a latent set's (token, firing) pairs in each norm bin (the authors' ``exp58c`` counting rule).

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
    tokens, res.n_outliers_excluded, _ = load_tokens(sae, lm, cfg, store, res)
    x = tokens.x
    res.n_tokens, res.d_sae_a, res.d_sae_b = x.shape[0], sae.cfg.d_sae, sae_b.cfg.d_sae
    edges = quartile_edges(x.norm(dim=-1), cfg.n_bins)
    res.edges = [float(x.norm(dim=-1).min())] + edges.tolist() + [float(x.norm(dim=-1).max())]
    dev = sae.device  # the moments and counts accumulate where the codes are; x stays on the CPU (the cache)
    bins = assign_quartiles(x.norm(dim=-1), edges).to(dev)
    mom = CrossMoments(sae.cfg.d_sae, sae_b.cfg.d_sae, dev)
    counts_a = torch.zeros(cfg.n_bins, sae.cfg.d_sae, device=dev)
    counts_b = torch.zeros(cfg.n_bins, sae_b.cfg.d_sae, device=dev)
    with res.timed("encode_and_moments"):
        sae_b.eval()
        for s, xb, code_a, _ in encode_chunks(sae, x, cfg.encode_batch_size, decode=False):
            code_b, _ = sae_b.encode_code(xb.to(sae_b.device, sae_b.dtype))
            q = bins[s : s + len(xb)]
            counts_a += quartile_firing_counts(code_a, q, cfg.n_bins, sae.cfg.d_sae)
            counts_b += quartile_firing_counts(code_b, q, cfg.n_bins, sae_b.cfg.d_sae)
            mom.add(code_a, code_b)
    with res.timed("matching"):
        best = mom.best_matches()
        W_a, W_b = sae.W_dec.detach().to(dev), sae_b.W_dec.detach().to(dev)
        m_a, _ = match_latents(best["corr_a"], best["idx_a"], W_a, W_b, cfg.corr_threshold, cfg.cos_threshold)
        m_b, _ = match_latents(best["corr_b"], best["idx_b"], W_b, W_a, cfg.corr_threshold, cfg.cos_threshold)
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


EVAL_SUITES.register("feature_matching")(Suite(
    FeatureMatchingConfig, run_feature_matching,
    help="match latents of two SAEs (corr >= 0.7 and decoder cos > 0.7) and the unmatched ones' norm-quartile "
         "firing profile (cosine paper, Fig. 2B)"))


__all__ = [
    "CrossMoments", "FeatureMatchingConfig", "FeatureMatchingResult", "firing_profile", "match_latents",
    "quartile_firing_counts", "run_feature_matching",
]
