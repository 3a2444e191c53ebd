"""SCR (spurious correlation removal) and TPP (targeted probe perturbation), after SAEBench ``evals/scr_and_tpp``.

Karvonen et al. 2025, "Evaluating Sparse Autoencoders on Targeted Concept Removal Tasks"; reference code
``adamkarvonen/SAEBench`` ``sae_bench/evals/scr_and_tpp/{main.py, dataset_creation.py}`` and
``sae_bench/evals/sparse_probing/probe_training.py``. Both suites share one mechanism:

1. linear probes on the **mean-pooled LM activation at the SAE's hook** (never on SAE codes), fitted once per task and
   shared by every SAE;
2. latent attribution on the task's train split (``main.get_effects_per_class_precomputed_acts``):
   ``effect_j = (mean f_j | y=1 - mean f_j | y=0) * (w . W_dec[j])`` with ``f`` the per-text mean code over valid
   tokens and ``w`` the probe weight (:func:`latent_effects`); SCR ranks ``|effect|``, TPP
   ``max(Δ_j, 0) (w . W_dec[j])``; the ablated set is the top ``min(N, #non-zero)`` (:func:`select_top_latents`,
   ``main.select_top_n_features``);
3. zero-ablation of those latents at every valid token **keeping the SAE error term**
   (``x' = x - Σ_{s∈S} f_s W_dec[s]``, ``main.ablated_precomputed_activations``), mean-pooling, and the frozen
   probes applied to the ablated pooled activation; no LM re-run, no probe retraining.

For a decoder linear in the code (``x_hat = f W_dec + b_dec``) step 3 pools to ``X' = X - F[:, S] @ W_dec[S]``
(:func:`linear_ablation_delta`): every N and task is one small matrix product on the pooled arrays. Decoders that
rescale the reconstruction (``sae.encoder.restores_norm``, the magnitude-bypass encoder) are ablated per token:
``x' = x + restore(r - r_S) - restore(r)`` with ``r = Σ_j f_j W_dec[j] / ||W_dec[j]||``
(:func:`per_token_ablation_deltas`), and their attribution uses the effective codes (``SAE.effective_codes``:
``x_hat - b_dec = Σ_j f_eff_j d̂_j``) and the unit atoms ``d̂_j``, which equals the formula above for a linear
decoder.

**SCR** (``main.get_scr_plotting_dict``). A dataset holds documents with two binary attributes (column 1, column 2).
For one column-1 pair the four quadrants are MP (col1 +, col2 +), FP (col1 +, col2 -), MN (col1 -, col2 +),
FN (col1 -, col2 -); with ``q`` docs per quadrant (train ``q_train``, test ``q_test``) three tasks are built as in
``dataset_creation.get_spurious_corr_data``:

* G (column-2 oracle): MP[:q] + MN[:q] vs FP[:q] + FN[:q];
* P (column-1 oracle): MP[:q] + FP[:q] vs MN[:q] + FN[:q];
* S (biased): MP[:2q] vs FN[:2q], where the two attributes are perfectly correlated.

``A_S→P`` / ``A_S→G``: accuracy of the biased probe on P's / G's test data; ``A_P``, ``A_G``: the oracles'.
dir1 ablates the latents selected for G (``|effect|`` with G's probe) and measures ``A'_S→P``; dir2 ablates P's and
measures ``A'_S→G``: ``scr_dir1 = (A'_S→P - A_S→P) / (A_P - A_S→P)``, ``scr_dir2`` likewise, 0 when the denominator is
below 0.001, not clipped. ``scr_metric_threshold_N`` is dir1 when ``A_S→P < A_S→G``, dir2 when ``A_S→P > A_S→G`` and
absent on a tie. Keys are averaged unweighted over the (dataset, pair) runs that have them.

SCR datasets (:data:`SCR_DATASETS`):

* ``vader_domain_sentiment``: the VADER human-rated snippets (corpus ``vader_sentiment``); column 1 = domain pair,
  column 2 = sentiment (rating >= 1 vs <= -1). Same shape as SAEBench's Amazon category x rating. Four pairs as
  SAEBench (4 per dataset): movie_reviews/nyt_editorials, tweets/amazon_reviews, movie_reviews/amazon_reviews,
  tweets/nyt_editorials.
* ``wordnet_field_pos``: WordNet synset glosses (corpus ``wordnet``); column 1 = semantic field (the lexicographer
  file without its POS: communication vs possession, cognition vs body), column 2 = part of speech (noun vs verb).
  WordNet files every synset under both attributes (``noun.communication``, ``verb.communication``, ...), so they
  are two natural binary attributes of the same documents, all four quadrants hold hundreds to thousands of synsets,
  and a balanced LM probe decodes each well above chance (the per-pair oracle accuracies ``A_P``, ``A_G`` are
  reported in every run). The other bundled corpora carry one attribute only (bbc topic, quote source, GCIDE part
  of speech, tweet sentiment), or a second one that is not decodable (Seinfeld laughter) or fixed by the first
  (Bible testament by book), so they give no valid pair.

**TPP** (``main.create_tpp_plotting_dict``). For each multi-class sparse-probing dataset (bbc_topic,
wordnet_supersense, gcide_pos, quote_source) each class ``i`` is a one-vs-rest task with a probe; ablating the
latents ``S_i(N)`` (TPP rule, class ``i``'s probe) gives ``intended_i = A_i - A_i^{(i)}``,
``unintended_i = mean_{j≠i} (A_j - A_j^{(i)})`` and ``total_i = intended_i - unintended_i`` (``A_j``: probe ``j`` on
its own test data). Per-dataset values are means over classes; the keys ``tpp_threshold_N_total_metric``,
``..._intended_diff_only``, ``..._unintended_diff_only`` are means over datasets. The texts, classes, splits and
negatives are the sparse-probing suite's (:func:`saelab.evals.tasks.build_probing_dataset` with its default sizes and
seed), read from the LM-activation cache under the entry ``"sparse_probing"``, so the LM runs once for both suites.

Deviations from SAEBench:

* **data**: bundled corpora instead of Bias in Bios and Amazon reviews; SCR quadrants of ``q_train`` = 100 /
  ``q_test`` = 50 docs (SAEBench 1000 / 250), sampled with a seeded shuffle per quadrant (SAEBench takes rows in file
  order); a text that falls in two quadrants is dropped. TPP classes have 100 train / 50 test docs (SAEBench 2000 /
  500) and **fixed seeded negatives** (SAEBench redraws them from the global torch RNG at every call, so its clean and
  ablated accuracies use different negatives);
* **probes**: scikit-learn ``LogisticRegression(C=probe_C)`` (lbfgs, L2, deterministic) on features z-scored with
  the train statistics, folded back to a raw-space weight ``w / σ`` for attribution and ablation; SAEBench trains a
  torch probe (AdamW lr 1e-3, batch 16, 20 epochs, L1 1e-3, best epoch chosen on the test set). The strength of the
  spurious correlation the biased probe learns depends on this recipe;
* **tokens**: as the sparse-probing suite, position 0, special tokens and tokens whose norm exceeds
  ``max_norm_multiple`` x the median (attention sinks) are left out of every mean: probe features, attribution codes
  and the ablation sum use the same valid-token set (SAEBench's ablation sum also runs over masked positions, where
  ``encode(0)`` can be non-zero); context 128 tokens including the prefix;
* **N values**: SAEBench's ``[2, 5, 10, 20, 50, 100, 500]``; N larger than ``d_sae`` is not an error but capped, as
  every N is, at the number of latents with a non-zero effect (the count used is reported as ``n_selected``);
* **TPP selection ties**: the top ``min(N, #non-zero)`` effects by value (stable order), like ``torch.topk``
  up to tie order.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.corpora import load_corpus
from ..models.lm import LoadedLM
from ..registry import Registry
from ..sae.model import SAE
from .base import EVAL_SUITES, EvalConfig, EvalResult, LMActivationStore, Suite
from .probing import lm_memo, norm_outlier_keep, pooled_sae_features, segment_mean, setup_suite, token_activations
from .tasks import PROBE_DATASETS, build_probing_dataset

__all__ = [
    "DEFAULT_N_VALUES",
    "SCR_DATASETS",
    "LinearProbe",
    "ScrConfig",
    "ScrDataset",
    "ScrDatasetSpec",
    "ScrResult",
    "ScrTask",
    "TppConfig",
    "TppResult",
    "build_scr_dataset",
    "fit_probe",
    "latent_effects",
    "linear_ablation_delta",
    "per_token_ablation_deltas",
    "run_scr",
    "run_tpp",
    "scr_pair_scores",
    "scr_tasks",
    "select_top_latents",
    "tpp_scores",
]

DEFAULT_N_VALUES = (2, 5, 10, 20, 50, 100, 500)
"""SAEBench ``ScrAndTppEvalConfig.n_values``: numbers of ablated latents."""

SCR_VERSION = 1
"""Version of the SCR text selection rules; part of the LM-activation cache key."""

_DENOM_EPS = 0.001
"""SAEBench ``get_scr_plotting_dict``: a direction whose denominator is below this scores 0."""


# ==============================================================================================================
# Pure core: probes, attribution, ablation, scores (numpy / torch arrays, no LM)


@dataclass(frozen=True)
class LinearProbe:
    """A linear probe on raw (unstandardised) features: ``logit = X @ w + b``, prediction ``logit > 0``.

    Attributes:
        w: ``(d_in,)`` float64 weight in the raw feature space (the z-scored fit's weight divided by the train std).
        b: bias.
    """

    w: np.ndarray
    b: float

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        """Accuracy in [0, 1] of ``(X @ w + b > 0) == y`` for ``X (n, d_in)``, ``y (n,)`` 0/1."""
        return float((((np.asarray(X, np.float64) @ self.w + self.b) > 0).astype(np.int64) == np.asarray(y)).mean())


def fit_probe(X: np.ndarray, y: np.ndarray, C: float = 1.0) -> LinearProbe:
    """Deterministic logistic-regression probe, returned in raw feature coordinates.

    Features are z-scored with the train mean ``mu`` and std ``sd`` (constant features keep ``sd = 1``), a
    ``LogisticRegression(C=C, max_iter=5000)`` (L2, lbfgs) is fitted, and its weight ``v`` and bias ``c`` are folded
    back: ``w = v / sd``, ``b = c - (v / sd) . mu``, so ``X @ w + b`` equals the fitted decision function. Stands in
    for SAEBench's ``probe_training.train_probe_gpu`` (see the module doc).

    Args:
        X: ``(n, d_in)`` features.
        y: ``(n,)`` 0/1 labels, both present.
        C: inverse L2 strength.

    Raises:
        ValueError: a class is missing.
    """
    from sklearn.linear_model import LogisticRegression

    X, y = np.asarray(X, np.float64), np.asarray(y)
    if not (y == 1).any() or not (y == 0).any():
        raise ValueError("a probe needs both classes in its training labels")
    mu, sd = X.mean(0), X.std(0)
    sd[sd == 0] = 1.0
    clf = LogisticRegression(C=C, max_iter=5000).fit((X - mu) / sd, y)
    w = clf.coef_[0] / sd
    return LinearProbe(w, float(clf.intercept_[0] - w @ mu))


_EFFECT_RULES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "abs": lambda delta, g: np.abs(delta * g),
    "positive": lambda delta, g: np.maximum(delta, 0.0) * g,
}
"""SAEBench ``get_effects_per_class_precomputed_acts``: SCR uses ``|Δ g|`` ("abs"), TPP ``max(Δ, 0) g`` ("positive")."""


def latent_effects(F: np.ndarray, y: np.ndarray, w: np.ndarray, W_dec: np.ndarray, rule: str) -> np.ndarray:
    """Per-latent attribution of a probe (SAEBench ``main.get_effects_per_class_precomputed_acts``).

    ``Δ_j = mean(F[y == 1, j]) - mean(F[y == 0, j])`` and ``g_j = W_dec[j] . w``; the effect is ``|Δ_j g_j|``
    (``rule="abs"``, SCR) or ``max(Δ_j, 0) g_j`` (``rule="positive"``, TPP). ``Δ_j g_j`` is latent ``j``'s first-order
    contribution to the gap in mean probe logit between the classes.

    Args:
        F: ``(n, d_sae)`` per-text mean codes (train split).
        y: ``(n,)`` 0/1 labels, both present.
        w: ``(d_in,)`` probe weight in the activation space.
        W_dec: ``(d_sae, d_in)`` decoder rows.
        rule: ``"abs"`` or ``"positive"``.

    Returns:
        ``(d_sae,)`` float64 effects.

    Raises:
        ValueError: unknown rule, a missing class, or mismatched shapes.
    """
    if rule not in _EFFECT_RULES:
        raise ValueError(f"unknown effect rule {rule!r}; valid: {', '.join(_EFFECT_RULES)}")
    F, y = np.asarray(F, np.float64), np.asarray(y)
    W_dec, w = np.asarray(W_dec, np.float64), np.asarray(w, np.float64)
    if F.shape[1] != W_dec.shape[0] or W_dec.shape[1] != w.shape[0]:
        raise ValueError(f"shapes do not match: F {F.shape}, W_dec {W_dec.shape}, w {w.shape}")
    if not (y == 1).any() or not (y == 0).any():
        raise ValueError("attribution needs both classes")
    delta = F[y == 1].mean(0) - F[y == 0].mean(0)
    return _EFFECT_RULES[rule](delta, W_dec @ w)


def select_top_latents(effects: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``min(n, #non-zero)`` largest effects, largest first (SAEBench ``select_top_n_features``).

    Args:
        effects: ``(d_sae,)``.
        n: wanted count (>= 0; larger than ``d_sae`` is capped).

    Returns:
        ``(k,)`` int64 indices; ``k < n`` when fewer effects are non-zero (SAEBench warns then).
    """
    e = np.asarray(effects, np.float64)
    k = min(int(n), int(np.count_nonzero(e)))
    return np.argsort(-e, kind="stable")[:k].astype(np.int64)


def linear_ablation_delta(F: np.ndarray, W_dec: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """Change of the pooled activation when ``latents`` are zero-ablated at every valid token, error term kept.

    For ``x_hat = f W_dec + b_dec`` the ablated token is ``x' = x - Σ_{s∈S} f_s W_dec[s]`` (SAEBench
    ``ablated_precomputed_activations``); averaging over the same valid tokens as the pooled codes gives
    ``X' - X = -F[:, S] @ W_dec[S]``.

    Args:
        F: ``(n, d_sae)`` per-text mean codes over the valid tokens.
        W_dec: ``(d_sae, d_in)``.
        latents: ``(k,)`` indices.

    Returns:
        ``(n, d_in)`` float64.
    """
    S = np.asarray(latents, np.int64)
    return -(np.asarray(F, np.float64)[:, S] @ np.asarray(W_dec, np.float64)[S])


@torch.no_grad()
def per_token_ablation_deltas(sae: SAE, acts: torch.Tensor, offsets: torch.Tensor, keep: torch.Tensor | None,
                              latent_sets: Sequence[np.ndarray], chunk_tokens: int = 4096) -> list[np.ndarray]:
    """Pooled activation changes of zero-ablating each latent set, computed token by token (any decoder).

    Per token ``x``: ``f = encode(x)``, ``x' = decode(f with f_S = 0) + (x - decode(f))`` (the error term is kept),
    so ``x' - x = decode(f_{S←0}) - decode(f)``; the changes are averaged over each text's kept tokens. For
    norm-restoring decoders (``sae.encoder.restores_norm``: ``decode = restore(r, ||x - b_dec||) + b_dec`` with
    ``r = Σ_j f_j W_dec[j] / ||W_dec[j]||``), ``r`` is computed once per chunk and each set subtracts its own rows,
    ``restore(r - r_S) - restore(r)``; otherwise ``decode`` is linear and the change is ``-f_S W_dec[S]``.

    Args:
        sae: the SAE.
        acts: ``(N, d_in)`` valid-token activations.
        offsets: ``(n + 1,)`` text boundaries in ``acts``.
        keep: optional ``(N,)`` bool; tokens that are False are neither ablated nor averaged.
        latent_sets: the sets ``S`` (int arrays).
        chunk_tokens: tokens encoded at a time.

    Returns:
        One ``(n, d_in)`` float64 array per set; zeros for a text without kept tokens.
    """
    dev = sae.device
    n_texts = len(offsets) - 1
    counts = (offsets[1:] - offsets[:-1]).to(torch.long)
    seg = torch.repeat_interleave(torch.arange(n_texts), counts)
    if keep is not None:
        acts, seg = acts[keep], seg[keep]
    n_kept = torch.bincount(seg, minlength=n_texts).clamp_min(1).to(torch.float64)
    sets = [torch.as_tensor(np.asarray(S, np.int64), device=dev) for S in latent_sets]
    outs = [torch.zeros(n_texts, sae.cfg.d_in, dtype=torch.float64) for _ in sets]
    restores = bool(getattr(sae.encoder, "restores_norm", False))
    inv = sae.W_dec.norm(dim=-1).clamp_min(1e-12).reciprocal()  # SAE.decode_code's unit atoms
    for s in range(0, acts.shape[0], chunk_tokens):
        x = acts[s : s + chunk_tokens].to(device=dev, dtype=sae.dtype)
        sg = seg[s : s + chunk_tokens]
        f = sae.encode(x)
        if restores:
            fu = f * inv
            r = fu @ sae.W_dec
            x_norm = sae.centered_norm(x)
            base = sae.encoder.restore_norm(r, x_norm)
        for S, out in zip(sets, outs):
            if len(S) == 0:
                continue
            if restores:
                d = sae.encoder.restore_norm(r - fu[:, S] @ sae.W_dec[S], x_norm) - base
            else:
                d = -(f[:, S] @ sae.W_dec[S])
            out.index_add_(0, sg, d.double().cpu())
    return [(o / n_kept[:, None]).numpy() for o in outs]


def _normalised(a_ablated: float, a_clean: float, a_oracle: float) -> float:
    denom = a_oracle - a_clean
    return 0.0 if denom < _DENOM_EPS else (a_ablated - a_clean) / denom


def scr_pair_scores(acc: dict[str, float], ablated_s_on_p: dict[int, float],
                    ablated_s_on_g: dict[int, float]) -> dict[str, Any]:
    """SCR scores of one (dataset, pair) run (SAEBench ``main.get_scr_plotting_dict``).

    Args:
        acc: unablated accuracies ``{"S_on_P", "S_on_G", "P", "G"}`` (biased probe on P's / G's test data, oracles).
        ablated_s_on_p: ``{N: A'_S→P}`` after ablating the latents selected for G (dir1).
        ablated_s_on_g: ``{N: A'_S→G}`` after ablating the latents selected for P (dir2).

    Returns:
        ``{"scr_dir1_threshold_N", "scr_dir2_threshold_N", "scr_metric_threshold_N" (absent on a tie), "direction"
        (1, 2 or None)}``: ``dir1 = (A'_S→P - A_S→P) / (A_P - A_S→P)``, ``dir2`` likewise, 0 when the denominator
        is below 0.001; the metric is dir1 iff ``A_S→P < A_S→G`` (the biased probe relies on the column-2 attribute,
        which dir1 removes), dir2 iff ``A_S→P > A_S→G``.
    """
    out: dict[str, Any] = {}
    direction = 1 if acc["S_on_P"] < acc["S_on_G"] else 2 if acc["S_on_P"] > acc["S_on_G"] else None
    for n in ablated_s_on_p:
        d1 = _normalised(ablated_s_on_p[n], acc["S_on_P"], acc["P"])
        d2 = _normalised(ablated_s_on_g[n], acc["S_on_G"], acc["G"])
        out[f"scr_dir1_threshold_{n}"] = d1
        out[f"scr_dir2_threshold_{n}"] = d2
        if direction is not None:
            out[f"scr_metric_threshold_{n}"] = d1 if direction == 1 else d2
    out["direction"] = direction
    return out


def tpp_scores(clean: np.ndarray, ablated: np.ndarray) -> dict[str, np.ndarray]:
    """TPP per-class differences (SAEBench ``main.create_tpp_plotting_dict``).

    Args:
        clean: ``(K,)`` clean test accuracy of each class's probe on its own task.
        ablated: ``(K, K)``; ``ablated[i, j]`` = accuracy of probe ``j`` on its own test data after ablating class
            ``i``'s latents (row = ablated class, column = probe).

    Returns:
        ``{"intended": (K,), "unintended": (K,), "total": (K,)}`` with ``intended_i = clean_i - ablated[i, i]``,
        ``unintended_i = mean_{j≠i}(clean_j - ablated[i, j])``, ``total = intended - unintended``.

    Raises:
        ValueError: fewer than 2 classes or mismatched shapes.
    """
    clean, ablated = np.asarray(clean, np.float64), np.asarray(ablated, np.float64)
    K = len(clean)
    if K < 2 or ablated.shape != (K, K):
        raise ValueError(f"need K >= 2 classes and a (K, K) ablated matrix; got clean {clean.shape}, "
                         f"ablated {ablated.shape}")
    drop = clean[None, :] - ablated
    intended = np.diag(drop).copy()
    unintended = (drop.sum(1) - intended) / (K - 1)
    return {"intended": intended, "unintended": unintended, "total": intended - unintended}


# ==============================================================================================================
# SCR data: documents with two binary attributes


@dataclass(frozen=True)
class ScrDatasetSpec:
    """A registered SCR dataset.

    Attributes:
        name: registry name.
        load: ``() -> list[(text, column-1 value, column-2 value)]`` (values may be None: unused document).
        col1_pairs: the column-1 pairs ``(pos, neg)``, one SCR run each (SAEBench ``column1_vals_lookup``).
        col2: the column-2 pair ``(pos, neg)`` (SAEBench ``COLUMN2_VALS_LOOKUP``).
        description: one line for reports.
    """

    name: str
    load: Callable[[], list[tuple[str, str | None, str | None]]]
    col1_pairs: tuple[tuple[str, str], ...]
    col2: tuple[str, str]
    description: str = ""


SCR_DATASETS: Registry[ScrDatasetSpec] = Registry("SCR dataset")
"""SCR dataset name -> :class:`ScrDatasetSpec`."""


def _load_vader_domain_sentiment() -> list[tuple[str, str | None, str | None]]:
    """VADER snippets: (text, domain, sentiment); neutral snippets (-1 < rating < 1) have no sentiment."""
    return [(d.text, d.meta.get("domain"), d.label if d.label in ("positive", "negative") else None)
            for d in load_corpus("vader_sentiment")]


def _load_wordnet_field_pos() -> list[tuple[str, str | None, str | None]]:
    """WordNet glosses: (text, semantic field, noun/verb) from the lexicographer file ``<pos>.<field>``."""
    pos = {"noun": "noun", "verb": "verb"}
    out = []
    for d in load_corpus("wordnet"):
        p, _, fld = str(d.label).partition(".")
        out.append((d.text, fld or None, pos.get(p)))
    return out


SCR_DATASETS.register("vader_domain_sentiment")(ScrDatasetSpec(
    "vader_domain_sentiment", _load_vader_domain_sentiment,
    (("movie_reviews", "nyt_editorials"), ("tweets", "amazon_reviews"), ("movie_reviews", "amazon_reviews"),
     ("tweets", "nyt_editorials")),
    ("positive", "negative"), "VADER human-rated snippets: domain pair x sentiment"))
SCR_DATASETS.register("wordnet_field_pos")(ScrDatasetSpec(
    "wordnet_field_pos", _load_wordnet_field_pos,
    (("communication", "possession"), ("cognition", "body")),
    ("noun", "verb"), "WordNet synset glosses: semantic field pair x part of speech (noun vs verb)"))


@dataclass(frozen=True, eq=False)
class ScrTask:
    """One binary SCR task of one pair: indices into the dataset pool and 0/1 labels per split.

    Attributes:
        name: ``"G"`` (column 2), ``"P"`` (column 1) or ``"S"`` (biased).
        train_index, test_index: ``(n,)`` int64 pool indices.
        train_labels, test_labels: ``(n,)`` int64 0/1.
    """

    name: str
    train_index: np.ndarray
    train_labels: np.ndarray
    test_index: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True, eq=False)
class ScrDataset:
    """The text pool of one SCR dataset and the quadrant cells its pairs draw from.

    Attributes:
        name: dataset name.
        texts: the pool (each text once).
        cells: ``{(col1 value, col2 value): {"train": (2 q_train,) int64, "test": (2 q_test,) int64}}`` pool
            indices in a seeded random order.
        pairs: the column-1 pairs.
        col2: the column-2 pair.
        spec: JSON description (sizes, seed, version); part of the LM-activation cache key.
    """

    name: str
    texts: tuple[str, ...]
    cells: dict[tuple[str, str], dict[str, np.ndarray]]
    pairs: tuple[tuple[str, str], ...]
    col2: tuple[str, str]
    spec: dict = field(default_factory=dict)


def _seeded_shuffle(items: list, *parts: object) -> list:
    import random

    random.Random("|".join(str(p) for p in parts)).shuffle(items)
    return items


def build_scr_dataset(name: str, q_train: int = 100, q_test: int = 50, seed: int = 42) -> ScrDataset:
    """Pool and quadrant cells of a registered SCR dataset.

    Every cell ``(a, b)`` used by a pair (``a`` in a column-1 pair, ``b`` in the column-2 pair) is shuffled with a
    seed derived from ``seed``, the dataset and the cell; its first ``2 q_train`` texts are its train part and the next
    ``2 q_test`` its test part (SAEBench needs ``2q`` of the diagonal quadrants and ``q`` of the others; one size for
    all keeps a cell shared by two pairs identical in both). Texts are stripped, empty ones dropped, duplicates kept
    once, and a text found in two cells dropped.

    Args:
        name: an :data:`SCR_DATASETS` name.
        q_train, q_test: documents per quadrant in each split (SAEBench: 1000 / 250).
        seed: sampling seed.

    Returns:
        The :class:`ScrDataset`.

    Raises:
        KeyError: unknown dataset (lists the valid ones).
        ValueError: ``q_train`` or ``q_test`` < 1, or a cell has fewer than ``2 (q_train + q_test)`` texts (the
            message names the cell and suggests smaller sizes).
    """
    if q_train < 1 or q_test < 1:
        raise ValueError(f"q_train and q_test must be >= 1, got {q_train}, {q_test}")
    spec = SCR_DATASETS.get(name)
    wanted = {(a, b) for pair in spec.col1_pairs for a in pair for b in spec.col2}
    seen: dict[str, tuple[str, str] | None] = {}
    for text, a, b in spec.load():
        text = text.strip()
        if not text or (a, b) not in wanted:
            continue
        if text in seen and seen[text] != (a, b):
            seen[text] = None
        else:
            seen.setdefault(text, (a, b))
    by_cell: dict[tuple[str, str], list[str]] = {c: [] for c in sorted(wanted)}
    for text, cell in seen.items():
        if cell is not None:
            by_cell[cell].append(text)
    need = 2 * (q_train + q_test)
    texts: list[str] = []
    cells: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for cell, items in by_cell.items():
        if len(items) < need:
            raise ValueError(f"SCR dataset {name!r}: quadrant {cell} has {len(items)} texts but needs "
                             f"2 * (q_train + q_test) = {need}; lower q_train/q_test")
        items = _seeded_shuffle(items, seed, "scr", name, *cell)[:need]
        start = len(texts)
        texts.extend(items)
        idx = np.arange(start, start + need, dtype=np.int64)
        cells[cell] = {"train": idx[: 2 * q_train], "test": idx[2 * q_train :]}
    meta = {"scr_dataset": name, "pairs": [list(p) for p in spec.col1_pairs], "col2": list(spec.col2),
            "q_train": q_train, "q_test": q_test, "seed": seed, "version": SCR_VERSION}
    return ScrDataset(name, tuple(texts), cells, tuple(spec.col1_pairs), tuple(spec.col2), meta)


def scr_tasks(ds: ScrDataset, pair: tuple[str, str], seed: int = 42) -> dict[str, ScrTask]:
    """The G, P and S tasks of one column-1 pair (SAEBench ``dataset_creation.get_spurious_corr_data``).

    With MP = cell (pair[0], col2[0]), FP = (pair[0], col2[1]), MN = (pair[1], col2[0]), FN = (pair[1], col2[1]) and
    ``q`` = half a cell's split: G = MP[:q] + MN[:q] (1) vs FP[:q] + FN[:q] (0); P = MP[:q] + FP[:q] (1) vs
    MN[:q] + FN[:q] (0); S = MP[:2q] (1) vs FN[:2q] (0). Each task's order is shuffled with a seeded generator.

    Raises:
        KeyError: ``pair`` is not one of the dataset's pairs.
    """
    if tuple(pair) not in ds.pairs:
        raise KeyError(f"pair {pair} is not in SCR dataset {ds.name!r}; pairs: {list(ds.pairs)}")
    p1, n1 = pair
    p2, n2 = ds.col2
    MP, FP, MN, FN = ds.cells[(p1, p2)], ds.cells[(p1, n2)], ds.cells[(n1, p2)], ds.cells[(n1, n2)]

    def split(part: str, pos: list[np.ndarray], neg: list[np.ndarray], tag: str) -> tuple[np.ndarray, np.ndarray]:
        idx = np.concatenate(pos + neg)
        y = np.concatenate([np.ones(sum(map(len, pos)), np.int64), np.zeros(sum(map(len, neg)), np.int64)])
        digest = hashlib.sha256(f"{seed}|{ds.name}|{tag}|{part}".encode()).digest()
        order = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(len(y))
        return idx[order], y[order]

    out = {}
    for tag, pos, neg in (("G", (MP, MN), (FP, FN)), ("P", (MP, FP), (MN, FN)), ("S", (MP,), (FN,))):
        parts = []
        for part in ("train", "test"):
            q = len(MP[part]) // 2
            take = (lambda c: c[part][:q]) if tag != "S" else (lambda c: c[part][: 2 * q])
            parts.append(split(part, [take(c) for c in pos], [take(c) for c in neg], f"{'/'.join(pair)}/{tag}"))
        out[tag] = ScrTask(tag, parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    return out


# ==============================================================================================================
# Configs and results


def _default_tpp_datasets() -> list[str]:
    return [n for n in ("bbc_topic", "wordnet_supersense", "gcide_pos", "quote_source") if n in PROBE_DATASETS]


@dataclass
class _AblationConfig(EvalConfig):
    """Settings SCR and TPP share: the ablation sizes, the probes, and the pooled-text features (as the
    sparse-probing suite's, so TPP reads its cached LM activations)."""

    n_values: list[int] = field(default_factory=lambda: list(DEFAULT_N_VALUES))
    """Numbers of ablated latents (SAEBench's; each capped at the latents with a non-zero effect)."""
    probe_C: float = 1.0
    """Inverse L2 strength of the logistic-regression probes (on z-scored LM features)."""
    context_size: int = 128
    """Tokens per text including the prefix token at position 0 (the sparse-probing default)."""
    seed: int = 42
    """Sampling seed (SAEBench's and the sparse-probing default)."""
    max_norm_multiple: float = 10.0
    """Leave out of every mean tokens whose norm exceeds this multiple of the median (0 keeps all)."""
    batch_tokens: int = 4096
    """Padded tokens per LM forward pass."""
    activation_cache: str | None = None
    """Root of the LM-activation cache (default: saelab.paths.cache_dir("eval_activations")); used only when the
    caller passes no store."""


@dataclass
class ScrConfig(_AblationConfig):
    """SCR (SAEBench ``scr_and_tpp`` with ``perform_scr=True``) of one saved SAE on bundled two-attribute text."""

    datasets: list[str] = field(default_factory=lambda: list(SCR_DATASETS.names()))
    """Datasets of ``saelab.evals.scr_tpp.SCR_DATASETS``."""
    q_train: int = 100
    """Train documents per quadrant (SAEBench: 1000)."""
    q_test: int = 50
    """Test documents per quadrant (SAEBench: 250)."""


@dataclass
class TppConfig(_AblationConfig):
    """TPP (SAEBench ``scr_and_tpp`` with ``perform_scr=False``) of one saved SAE on the sparse-probing datasets."""

    datasets: list[str] = field(default_factory=_default_tpp_datasets)
    """Multi-class datasets of ``saelab.evals.tasks.PROBE_DATASETS``."""
    n_train_per_class: int = 100
    """Train texts per class (the sparse-probing default, so its cached LM activations are reused)."""
    n_test_per_class: int = 50
    """Test texts per class (the sparse-probing default)."""


@dataclass
class ScrResult(EvalResult):
    """Result of the ``scr`` suite (SAEBench ``scr_metrics``; means over the (dataset, pair) runs).

    Attributes:
        scr_metrics: every averaged key: ``scr_metric_threshold_N``, ``scr_dir1_threshold_N``,
            ``scr_dir2_threshold_N`` for each N of the config.
        scr_metric_threshold_2, ..., scr_metric_threshold_500: the headline keys for SAEBench's N values (None when
            that N was not run or no run chose a direction).
        per_pair: one row per run: ``dataset``, ``pair``, ``col2``, unablated accuracies ``acc_S_on_P``,
            ``acc_S_on_G``, ``acc_P``, ``acc_G``, denominators ``denom_dir1 = acc_P - acc_S_on_P`` and ``denom_dir2``,
            ``direction``, ablated accuracies ``ablated_S_on_P``/``ablated_S_on_G`` ``{N: acc}``, ``n_selected_G``
            / ``n_selected_P`` ``{N: latents ablated}``, ``top_latents_G``/``top_latents_P`` (5 best), the scores,
            and sizes.
        config: the config used.
    """

    scr_metrics: dict[str, float] = field(default_factory=dict)
    scr_metric_threshold_2: float | None = None
    scr_metric_threshold_5: float | None = None
    scr_metric_threshold_10: float | None = None
    scr_metric_threshold_20: float | None = None
    scr_metric_threshold_50: float | None = None
    scr_metric_threshold_100: float | None = None
    scr_metric_threshold_500: float | None = None
    per_pair: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)


@dataclass
class TppResult(EvalResult):
    """Result of the ``tpp`` suite (SAEBench ``tpp_metrics``; means over datasets of means over classes).

    Attributes:
        tpp_metrics: every averaged key: ``tpp_threshold_N_total_metric``, ``tpp_threshold_N_intended_diff_only``,
            ``tpp_threshold_N_unintended_diff_only`` for each N of the config.
        tpp_threshold_2_total_metric, ..., tpp_threshold_500_total_metric: the headline keys for SAEBench's N
            values (None when that N was not run).
        per_dataset: ``{dataset: {key: mean over its classes}}`` plus ``n_classes``, ``n_texts``.
        per_class: one row per (dataset, class): ``clean_accuracy``, ``n_selected`` ``{N: k}``, ``top_latents``
            (5 best), the three keys per N.
        config: the config used.
    """

    tpp_metrics: dict[str, float] = field(default_factory=dict)
    tpp_threshold_2_total_metric: float | None = None
    tpp_threshold_5_total_metric: float | None = None
    tpp_threshold_10_total_metric: float | None = None
    tpp_threshold_20_total_metric: float | None = None
    tpp_threshold_50_total_metric: float | None = None
    tpp_threshold_100_total_metric: float | None = None
    tpp_threshold_500_total_metric: float | None = None
    per_dataset: dict[str, dict[str, float]] = field(default_factory=dict)
    per_class: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)


# ==============================================================================================================
# Suites


def _memo_probe(X: np.ndarray, y: np.ndarray, C: float) -> LinearProbe:
    """:func:`fit_probe`, or its earlier result for byte-identical ``X``, ``y`` and equal ``C`` (fits are
    deterministic, so every SAE of a model/hook shares one probe per task, as SAEBench's pickled probes)."""
    return lm_memo("scr_tpp_probe", (X, y), {"C": float(C)}, lambda: fit_probe(X, y, C))


def _check_n_values(n_values: Sequence[int]) -> list[int]:
    ns = [int(n) for n in n_values]
    if not ns or any(n < 1 for n in ns) or len(set(ns)) != len(ns):
        raise ValueError(f"n_values must be distinct positive integers, got {list(n_values)}")
    return ns


@dataclass
class _Features:
    """Pooled features of one text pool, and what the ablation needs.

    Attributes:
        X: ``(n, d_in)`` float64 mean LM activation over kept tokens.
        F: ``(n, d_sae)`` float64 mean codes used for attribution (effective codes for norm-restoring decoders).
        D: ``(d_sae, d_in)`` float64 atoms paired with ``F`` (``W_dec``, or its unit rows).
        linear: whether ``X - F[:, S] @ D[S]`` is the exact ablation.
        acts, offsets, keep: the token activations (kept for the per-token path).
    """

    X: np.ndarray
    F: np.ndarray
    D: np.ndarray
    linear: bool
    acts: torch.Tensor
    offsets: torch.Tensor
    keep: torch.Tensor


@torch.no_grad()
def _pooled_effective_codes(sae: SAE, acts: torch.Tensor, offsets: torch.Tensor, keep: torch.Tensor,
                            chunk: int) -> torch.Tensor:
    seg = torch.repeat_interleave(torch.arange(len(offsets) - 1), (offsets[1:] - offsets[:-1]).to(torch.long))
    a, sg = acts[keep], seg[keep]
    out = torch.zeros(len(offsets) - 1, sae.cfg.d_sae, dtype=torch.float64)
    for s in range(0, a.shape[0], chunk):
        f = sae.effective_codes(a[s : s + chunk].to(device=sae.device, dtype=sae.dtype))
        out.index_add_(0, sg[s : s + chunk], f.double().cpu())
    return out / torch.bincount(sg, minlength=len(offsets) - 1).clamp_min(1)[:, None].double()


def _features(res: EvalResult, sae: SAE, acts: dict[str, torch.Tensor], cfg) -> _Features:
    with res.timed("lm_pool"):
        keep = norm_outlier_keep(acts["acts"], cfg.max_norm_multiple)
        X = segment_mean(acts["acts"], acts["offsets"], keep).double().numpy()
    with res.timed("sae_encode"):
        linear = not getattr(sae.encoder, "restores_norm", False)
        W = sae.W_dec.detach().double().cpu()
        if linear:
            F = pooled_sae_features(sae, acts["acts"], acts["offsets"], cfg.encode_batch_size, keep).double().numpy()
            D = W.numpy()
        else:
            F = _pooled_effective_codes(sae, acts["acts"], acts["offsets"], keep, cfg.encode_batch_size).numpy()
            D = (W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)).numpy()
    return _Features(X, F, D, linear, acts["acts"], acts["offsets"], keep)


def _subset_tokens(feats: _Features, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token activations, offsets and keep mask of the texts ``idx`` (in that order)."""
    off = feats.offsets
    rows = [torch.arange(int(off[i]), int(off[i + 1])) for i in idx]
    sel = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    counts = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return feats.acts[sel], torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]), feats.keep[sel]


def _ablation_deltas(sae: SAE, feats: _Features, idx: np.ndarray, sets: Sequence[np.ndarray],
                     chunk: int) -> list[np.ndarray]:
    """``(len(idx), d_in)`` pooled ablation changes of the texts ``idx`` for each latent set."""
    if feats.linear:
        return [linear_ablation_delta(feats.F[idx], feats.D, S) for S in sets]
    acts, offsets, keep = _subset_tokens(feats, idx)
    return per_token_ablation_deltas(sae, acts, offsets, keep, sets, chunk)


def _warn_short(name: str, n_selected: dict[int, int]) -> None:
    short = {n: k for n, k in n_selected.items() if k < n}
    if short:
        warnings.warn(f"{name}: fewer latents with a non-zero effect than N, ablating only {short} (N: count)",
                      stacklevel=3)


def _mean_or_none(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def run_scr(sae: SAE, lm: LoadedLM, cfg: ScrConfig, store: LMActivationStore | None = None) -> ScrResult:
    """Run the SCR suite on ``sae`` (see the module doc).

    Stages timed in ``timings_s``: ``tasks``, ``lm_activations`` (LM forward or cache read), ``lm_pool``,
    ``sae_encode``, ``probes`` (memoised across SAEs), ``attribution``, ``ablation``.

    Args:
        sae: the SAE; its ``cfg.hook_name`` picks the hook.
        lm: the model it reads.
        cfg: settings.
        store: LM-activation cache (default: one at ``cfg.activation_cache`` for this model and hook).

    Returns:
        :class:`ScrResult`.

    Raises:
        KeyError: unknown dataset; ValueError: bad ``n_values``, quadrants too small for ``q_train``/``q_test``, an
            unknown hook, or a store for another hook.
    """
    res = ScrResult(suite="scr", sae=str(cfg.sae), config=asdict(cfg))
    ns = _check_n_values(cfg.n_values)
    hook, store = setup_suite(sae, lm, cfg, store)
    for name in cfg.datasets:
        t0 = time.perf_counter()
        with res.timed("tasks"):
            ds = build_scr_dataset(name, cfg.q_train, cfg.q_test, cfg.seed)
        with res.timed("lm_activations"):
            acts, fresh = token_activations(store, lm, hook, "scr", ds.texts, ds.spec, context_size=cfg.context_size,
                                            batch_tokens=cfg.batch_tokens, progress=cfg.progress)
        feats = _features(res, sae, acts, cfg)
        lines = []
        for pair in ds.pairs:
            row = _scr_pair(res, sae, feats, ds, pair, ns, cfg)
            res.per_pair.append(row)
            m = row.get("scr_metric_threshold_10", row.get(f"scr_metric_threshold_{ns[0]}"))
            lines.append(f"{'/'.join(pair)} dir{row['direction']} "
                         f"{'-' if m is None else f'{m:+.3f}'}")
        if cfg.progress:
            print(f"[scr] {name}: {len(ds.texts)} texts, LM {'computed' if fresh else 'cached'}, "
                  f"{time.perf_counter() - t0:.1f}s | SCR@10 " + ", ".join(lines))
    keys = [f"scr_{k}_threshold_{n}" for k in ("metric", "dir1", "dir2") for n in ns]
    for k in keys:
        v = _mean_or_none(r.get(k) for r in res.per_pair)
        if v is not None:
            res.scr_metrics[k] = v
    for n in DEFAULT_N_VALUES:
        setattr(res, f"scr_metric_threshold_{n}", res.scr_metrics.get(f"scr_metric_threshold_{n}"))
    if cfg.progress:
        print("[scr] timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res.timings_s.items()))
    return res


def _scr_pair(res: ScrResult, sae: SAE, feats: _Features, ds: ScrDataset, pair: tuple[str, str],
              ns: list[int], cfg: ScrConfig) -> dict:
    """Probes, attribution, ablation and scores of one (dataset, pair) run."""
    tasks = scr_tasks(ds, pair, cfg.seed)
    X = feats.X
    with res.timed("probes"):
        probes = {t: _memo_probe(X[tk.train_index], tk.train_labels, cfg.probe_C) for t, tk in tasks.items()}
    S, P, G = probes["S"], tasks["P"], tasks["G"]
    acc = {"S_on_P": S.accuracy(X[P.test_index], P.test_labels), "S_on_G": S.accuracy(X[G.test_index], G.test_labels),
           "P": probes["P"].accuracy(X[P.test_index], P.test_labels),
           "G": probes["G"].accuracy(X[G.test_index], G.test_labels)}
    with res.timed("attribution"):
        sel = {}
        for t in ("G", "P"):
            tk = tasks[t]
            e = latent_effects(feats.F[tk.train_index], tk.train_labels, probes[t].w, feats.D, "abs")
            sel[t] = {n: select_top_latents(e, n) for n in ns}
    with res.timed("ablation"):
        # dir1 ablates G's latents and reads the biased probe on P's test data; dir2 the reverse
        # one pass over the union of both test sets (the per-token path encodes each token once)
        idx = np.unique(np.concatenate([P.test_index, G.test_index]))
        deltas = iter(_ablation_deltas(sae, feats, idx, [sel[t][n] for t in ("G", "P") for n in ns],
                                       cfg.encode_batch_size))
        ablated: dict[str, dict[int, float]] = {}
        for t, other in (("G", P), ("P", G)):
            rows = np.searchsorted(idx, other.test_index)
            ablated[t] = {n: S.accuracy(X[other.test_index] + next(deltas)[rows], other.test_labels) for n in ns}
    scores = scr_pair_scores(acc, ablated["G"], ablated["P"])
    n_sel = {t: {n: len(sel[t][n]) for n in ns} for t in ("G", "P")}
    for t in ("G", "P"):
        _warn_short(f"SCR {ds.name} {'/'.join(pair)} task {t}", n_sel[t])
    return {"dataset": ds.name, "pair": list(pair), "col2": list(ds.col2),
            **{f"acc_{k}": v for k, v in acc.items()},
            "denom_dir1": acc["P"] - acc["S_on_P"], "denom_dir2": acc["G"] - acc["S_on_G"],
            "ablated_S_on_P": ablated["G"], "ablated_S_on_G": ablated["P"],
            "n_selected_G": n_sel["G"], "n_selected_P": n_sel["P"],
            "top_latents_G": [int(i) for i in sel["G"][max(ns)][:5]],
            "top_latents_P": [int(i) for i in sel["P"][max(ns)][:5]],
            "n_train": {t: tk.train_labels.size for t, tk in tasks.items()},
            "n_test": {t: tk.test_labels.size for t, tk in tasks.items()}, **scores}


def run_tpp(sae: SAE, lm: LoadedLM, cfg: TppConfig, store: LMActivationStore | None = None) -> TppResult:
    """Run the TPP suite on ``sae`` (see the module doc).

    The texts and their LM activations are the sparse-probing suite's (cache entry ``"sparse_probing"``, same spec),
    so after a sparse-probing run with the same sizes, seed and context the LM does not run.

    Stages timed in ``timings_s``: ``tasks``, ``lm_activations``, ``lm_pool``, ``sae_encode``, ``probes``,
    ``attribution``, ``ablation``.

    Args:
        sae: the SAE; its ``cfg.hook_name`` picks the hook.
        lm: the model it reads.
        cfg: settings.
        store: LM-activation cache (default: one at ``cfg.activation_cache`` for this model and hook).

    Returns:
        :class:`TppResult`.

    Raises:
        KeyError: unknown dataset; ValueError: a dataset with fewer than 3 one-vs-rest classes, bad ``n_values``,
            an unknown hook, or a store for another hook.
    """
    res = TppResult(suite="tpp", sae=str(cfg.sae), config=asdict(cfg))
    ns = _check_n_values(cfg.n_values)
    hook, store = setup_suite(sae, lm, cfg, store)
    for name in cfg.datasets:
        t0 = time.perf_counter()
        with res.timed("tasks"):
            item = build_probing_dataset(name, cfg.n_train_per_class, cfg.n_test_per_class, cfg.seed)
        if len(item.tasks) < 3:
            raise ValueError(f"TPP needs a dataset with >= 3 one-vs-rest classes; {name!r} has {len(item.tasks)} "
                             f"task(s); choose from {_default_tpp_datasets()}")
        with res.timed("lm_activations"):
            acts, fresh = token_activations(store, lm, hook, "sparse_probing", item.texts, item.spec,
                                            context_size=cfg.context_size, batch_tokens=cfg.batch_tokens,
                                            progress=cfg.progress)
        feats = _features(res, sae, acts, cfg)
        rows = _tpp_classes(res, sae, feats, item.tasks, ns, cfg.probe_C, cfg.encode_batch_size)
        for r in rows:
            r["dataset"] = name
        clean = np.array([r["clean_accuracy"] for r in rows])
        K = len(rows)
        res.per_class.extend(rows)
        keys = [k for k in rows[0] if k.startswith("tpp_threshold_")]
        d = res.per_dataset[name] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        d.update({"n_classes": K, "n_texts": len(item.texts), "clean_accuracy": float(clean.mean())})
        if cfg.progress:
            n10 = 10 if 10 in ns else ns[0]
            print(f"[tpp] {name}: {len(item.texts)} texts, LM {'computed' if fresh else 'cached'}, "
                  f"{time.perf_counter() - t0:.1f}s | clean {clean.mean():.3f}, TPP@{n10} "
                  f"{d[f'tpp_threshold_{n10}_total_metric']:+.3f} "
                  f"(intended {d[f'tpp_threshold_{n10}_intended_diff_only']:+.3f})")
    for n in ns:
        for suffix in ("total_metric", "intended_diff_only", "unintended_diff_only"):
            k = f"tpp_threshold_{n}_{suffix}"
            v = _mean_or_none(d.get(k) for d in res.per_dataset.values())
            if v is not None:
                res.tpp_metrics[k] = v
    for n in DEFAULT_N_VALUES:
        setattr(res, f"tpp_threshold_{n}_total_metric", res.tpp_metrics.get(f"tpp_threshold_{n}_total_metric"))
    if cfg.progress:
        print("[tpp] timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res.timings_s.items()))
    return res


def _tpp_classes(res: EvalResult, sae: SAE | None, feats: _Features, tasks: Sequence, ns: list[int], probe_C: float,
                 chunk: int) -> list[dict]:
    """TPP rows of one dataset's one-vs-rest tasks (objects with ``positive_class``, ``name``, ``train_index``,
    ``train_labels``, ``test_index``, ``test_labels``) on pooled features (timed ``probes``, ``attribution``,
    ``ablation``); ``sae`` is only read by the per-token path (``feats.linear`` False)."""
    X = feats.X
    with res.timed("probes"):
        probes = [_memo_probe(X[t.train_index], t.train_labels, probe_C) for t in tasks]
    clean = np.array([p.accuracy(X[t.test_index], t.test_labels) for p, t in zip(probes, tasks)])
    with res.timed("attribution"):
        sel = []
        for p, t in zip(probes, tasks):
            e = latent_effects(feats.F[t.train_index], t.train_labels, p.w, feats.D, "positive")
            sel.append({n: select_top_latents(e, n) for n in ns})
    with res.timed("ablation"):
        test_idx = np.unique(np.concatenate([t.test_index for t in tasks]))
        where = {int(i): r for r, i in enumerate(test_idx)}
        at = [np.fromiter((where[int(k)] for k in t.test_index), np.int64, len(t.test_index)) for t in tasks]
        K = len(tasks)
        ablated = {n: np.zeros((K, K)) for n in ns}
        # one pass over the tokens for every (class, N) set: the per-token path encodes each token once
        deltas = iter(_ablation_deltas(sae, feats, test_idx, [sel[i][n] for i in range(K) for n in ns], chunk))
        for i in range(K):
            for n in ns:
                d = next(deltas)
                for j, (p, t) in enumerate(zip(probes, tasks)):
                    ablated[n][i, j] = p.accuracy(X[t.test_index] + d[at[j]], t.test_labels)
    scores = {n: tpp_scores(clean, ablated[n]) for n in ns}
    rows = []
    for i, t in enumerate(tasks):
        n_sel = {n: len(sel[i][n]) for n in ns}
        _warn_short(f"TPP {t.name}", n_sel)
        row = {"class": t.positive_class, "clean_accuracy": float(clean[i]), "n_train": len(t.train_labels),
               "n_test": len(t.test_labels), "n_selected": n_sel, "top_latents": [int(j) for j in sel[i][max(ns)][:5]]}
        for n in ns:
            row[f"tpp_threshold_{n}_total_metric"] = float(scores[n]["total"][i])
            row[f"tpp_threshold_{n}_intended_diff_only"] = float(scores[n]["intended"][i])
            row[f"tpp_threshold_{n}_unintended_diff_only"] = float(scores[n]["unintended"][i])
        rows.append(row)
    return rows


EVAL_SUITES.register("scr")(Suite(ScrConfig, run_scr, "SAEBench SCR: spurious correlation removal by latent "
                                                        "ablation, on bundled two-attribute text"))
EVAL_SUITES.register("tpp")(Suite(TppConfig, run_tpp, "SAEBench TPP: targeted probe perturbation by latent ablation, "
                                                       "on the sparse-probing datasets"))
