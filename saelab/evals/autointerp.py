"""Auto-interp: an LLM judge explains sampled latents from their activating windows and is scored on detecting them.

Protocol: SAEBench detection scoring (Karvonen et al. 2025, "SAEBench"; public code
``github.com/adamkarvonen/SAEBench``, ``sae_bench/evals/autointerp/main.py``), with the C²R variant as
``--protocol c2r`` (Jin et al., ICML 2026, "Cross-sample Consistency Regularization"; the authors' SAEBench fork,
``github.com/hr-jin/Cross-sample-Consistency-Regularization``, ``SAEBench/sae_bench/evals/autointerp/main.py`` and
``eval_config.py``, and ``sae_bench_utils/indexing_utils.py`` ``get_zero_activation_sequences``). The steps:

1. **Eval tokens.** The held-out documents of ``cfg.data`` (never harvested for training), shuffled by ``cfg.seed``
   and packed into ``context_size``-token contexts exactly as the core and diagnostics evals do; their activations
   at the SAE's hook come from :func:`saelab.evals.eval_tokens.eval_token_activations` (cached on disk and shared
   with the diagnostics suites). Position 0, special tokens and norm outliers are not SAE data: their activation is 0.
   The last context (possibly cut short by ``n_tokens``) is dropped.
2. **Latents.** A latent is *alive* when it is > 0 on at least ``min_activations`` eval tokens (SAEBench's
   ``dead_latent_threshold``, 15; C²R uses 30). Alive latents are visited in a random order fixed by
   ``sample_seed`` (SAEBench ``random.sample``) until ``n_latents`` of them have enough windows; ``--latents``
   names them instead.
3. **Windows** of ``2 * buffer + 1`` tokens (``buffer = 10``) centred on positions ``buffer <= p < T - buffer`` of
   a context (so every window lies inside one context), per latent (``acts`` = its activations, ``(C, T)``):

   * *top*: the ``n_top_gen + n_top_score`` highest activations whose windows do not overlap (greedy, a centre
     within ``buffer`` of a chosen one in the same context is skipped), randomly split into generation and scoring
     windows (SAEBench ``get_k_largest_indices(no_overlap=True)``);
   * *importance-sampled*: ``n_iw_gen + n_iw_score`` centres drawn without replacement with probability
     proportional to ``act ** 2`` among the positions with ``0 < act < t``, ``t`` = the smallest top-window centre
     activation, so they are disjoint from the top centres (SAEBench ``get_iw_sample_indices``, squared values);
   * *random*: ``n_random_score`` centres drawn uniformly (with replacement) over all contexts and valid positions;
   * *zero* (C²R negatives): ``n_zero_score`` distinct contexts on which the latent **never fires** (activation
     exactly 0 at every position of the context: every kept eval token, and the excluded ones are 0 by step 1),
     drawn uniformly without replacement, each shown as the window around a centre drawn uniformly from
     ``[buffer, T - buffer)`` (the fork's ``get_zero_activation_sequences`` + ``index_with_buffer``). A latent with
     fewer never-firing contexts is skipped (counted in ``n_skipped_insufficient``).

   A window is *active* when any of its tokens has ``act > act_threshold_frac * max_act`` (``max_act`` = the
   latent's largest top-window activation, SAEBench ``act_threshold_frac = 0.01``); its active tokens are the ones
   marked ``<<tok>>`` (C²R: ``<<tok[act:value]>>``). Unlike SAEBench, random windows are labelled with their real
   activations (SAEBench gives them all-zero activations, so a random window on which the latent fires counts as
   a negative).
4. **Explanation.** The judge sees the generation windows (top then importance-sampled, by decreasing activation)
   with the active tokens marked and writes one short sentence. C²R also shows ``n_zero_gen`` zero windows as
   non-activating, and these are the **first ``n_zero_gen`` of the scoring negatives** (the fork passes
   ``bottom_toks[:n_iw_sampled_ex_for_generation]``, a prefix of the scoring set's negatives, to the explanation
   prompt): the explainer sees sequences that are later scored, a leak the fork accepts and saelab reproduces. Its
   prompt is the fork's (``ACTIVATE (i).`` / ``INACTIVATE (j).`` documents, the fork's system prompt with demos).
   ``parse_explanation`` keeps what follows the last "activates on" / "fires on", first line only, at most
   ``explanation_words`` words.
5. **Detection scoring.** The scoring windows (top, importance-sampled, random; C²R: 5 top and 10 zero), shuffled
   (``sample_seed``) and unmarked, with the explanation; the judge lists the windows it thinks activate. Per-latent
   score = accuracy over all scoring windows (positives and negatives), SAEBench ``score_predictions``.
   ``parse_predictions`` is lenient (any integers in the reply, "3-5" ranges, number words, "None"); indices out of
   range are dropped and counted; a reply with no index and no "none" (a refusal, prose, an empty string), or one
   that starts by repeating the excerpts ("1. The cat sat ..."), is *unparseable*: counted and left out of the mean,
   as SAEBench drops it (``--unparseable_as_none`` scores it as "None" instead).
6. **Aggregate.** ``mean_score`` over the scored latents with a 95 % **percentile bootstrap** interval over latents
   (``n_bootstrap`` resamples, seeded) and the normal standard error ``sem``. ``chance_score`` is the score of a
   judge that always answers "None" (the mean fraction of inactive scoring windows): with SAEBench's 2 + 2 + 10
   windows it is about 0.71, the floor any judge should beat.

Deviations of ``--protocol c2r`` from the fork, and why:

* A latent with fewer than ``n_zero_score`` never-firing contexts is skipped; the fork scores it with however many
  it found (at least one), which moves that latent's chance level. Dense latents are therefore the ones skipped.
* The fork additionally skips a latent whose activations below its smallest top-window centre are all < 1e-6 (a
  leftover of SAEBench's importance sampling, which C²R does not use); saelab does not.
* Values are marked ``<<tok[act:1.23]>>`` (3 significant digits; the fork prints the raw bfloat16 value).
* The explanation prompt ends with "Complete the sentence: This neuron activates on" (not in the fork), so that a
  small local judge answers in the parsed form instead of restating the documents; ``explanation_max_tokens``
  defaults to 64 (the fork sets no limit; 30 words need about 40 tokens). The scoring prompt is saelab's (as for
  ``saebench``: the question repeated after the excerpts, which small judges need), not the fork's wording.
* The eval text is the held-out split of ``cfg.data`` in ``context_size``-token contexts (the fork: 2M tokens of
  FineWeb in 1024-token contexts), so "never fires in the context" is judged over ``context_size`` tokens.

Defaults are sized for the local CPU judge (``n_latents = 32``; SAEBench uses 1000 latents over 2M tokens of the
Pile with gpt-4o-mini): ``saelab eval --suite autointerp --judge local`` takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..data.split import iter_contexts, split_documents
from ..models.lm import LoadedLM
from ..registry import Registry
from ..sae.model import SAE
from .base import EVAL_SUITES, EvalResult, LMActivationStore, Suite
from .eval_tokens import DiagnosticsConfig, eval_tokens
from .judges import Judge, JudgeConfig, Messages, make_judge

__all__ = ["AutoInterpConfig", "AutoInterpResult", "PROTOCOLS", "SamplingProtocol", "Window", "bootstrap_ci",
           "format_window", "iw_windows", "parse_explanation", "parse_predictions", "random_windows",
           "never_firing_windows", "run_autointerp", "score_predictions", "top_windows", "window_labels"]


# ------------------------------------------------------------------------------------------------------ protocols


@dataclass(frozen=True)
class SamplingProtocol:
    """How many windows of each kind the judge sees, and how they are shown.

    Attributes:
        n_top_gen, n_iw_gen: top and importance-sampled windows in the explanation prompt.
        n_zero_gen: zero-activation windows shown as non-activating in the explanation prompt: the first
            ``n_zero_gen`` of the scoring negatives (so ``n_zero_gen <= n_zero_score``; the C²R fork's reuse).
        n_top_score, n_iw_score, n_random_score, n_zero_score: windows of each kind in the scoring prompt; zero
            windows come from contexts on which the latent never fires.
        mark_values: mark active tokens as ``<<tok[act:value]>>`` instead of ``<<tok>>``.
        explanation_words: the explanation's word limit (in the prompt and when parsing).
        source: where the numbers come from.
        explain_prompt: the explanation prompt, a key of ``_EXPLAIN_PROMPTS`` (``saebench`` or ``c2r``).
        explanation_max_tokens: judge tokens for the explanation unless the config sets them.
    """

    n_top_gen: int
    n_iw_gen: int
    n_zero_gen: int
    n_top_score: int
    n_iw_score: int
    n_random_score: int
    n_zero_score: int
    mark_values: bool
    explanation_words: int
    source: str
    explain_prompt: str = "saebench"
    explanation_max_tokens: int = 30

    @property
    def n_score(self) -> int:
        return self.n_top_score + self.n_iw_score + self.n_random_score + self.n_zero_score


PROTOCOLS: Registry[SamplingProtocol] = Registry("auto-interp protocol")
PROTOCOLS.register("saebench")(SamplingProtocol(
    n_top_gen=10, n_iw_gen=5, n_zero_gen=0, n_top_score=2, n_iw_score=2, n_random_score=10, n_zero_score=0,
    mark_values=False, explanation_words=20,
    source="SAEBench evals/autointerp/main.py (Karvonen et al. 2025)"))
PROTOCOLS.register("c2r")(SamplingProtocol(
    n_top_gen=15, n_iw_gen=0, n_zero_gen=5, n_top_score=5, n_iw_score=0, n_random_score=0, n_zero_score=10,
    mark_values=True, explanation_words=30, explain_prompt="c2r", explanation_max_tokens=64,
    source="C²R authors' SAEBench fork, evals/autointerp/main.py and eval_config.py (Jin et al. 2026)"))


# --------------------------------------------------------------------------------------------------------- config


@dataclass
class AutoInterpConfig(JudgeConfig, DiagnosticsConfig):
    """Auto-interp: explain sampled latents with an LLM judge and score the explanations by detection."""

    include_in_all: ClassVar[bool] = False  # `saelab eval --suite all` skips it: it needs a judge and is slow on CPU

    protocol: str = "saebench"
    """Window counts and marking: 'saebench' (10 top + 5 importance-sampled to explain; 2 top + 2 importance-sampled
    + 10 random to score) or 'c2r' (5 top + 10 windows of never-firing contexts to score; 15 top + 5 of those 10
    negatives to explain, as the C²R authors' SAEBench fork)."""
    n_latents: int = 32
    """Latents explained and scored (SAEBench: 1000); alive latents are sampled at random (--sample_seed)."""
    latents: list[int] | None = None
    """Explicit latent ids (overrides --n_latents); a latent without enough windows is skipped and counted."""
    min_activations: int = 15
    """A latent is alive when it fires on at least this many eval tokens (SAEBench 15, C²R 30)."""
    buffer: int = 10
    """Tokens shown each side of a window's centre (SAEBench 10: 21-token windows)."""
    act_threshold_frac: float = 0.01
    """A token is active (marked, and makes its window a positive) when act > this x the latent's max activation."""
    explanation_max_tokens: int | None = None
    """Judge tokens for the explanation (default: the protocol's, SAEBench 30; c2r 64 for its 30-word limit)."""
    prediction_max_tokens: int | None = None
    """Judge tokens for the list of activating windows (default 2 x scoring windows + 5, as SAEBench)."""
    n_top_gen: int | None = None
    """Override the protocol's number of top windows in the explanation prompt."""
    n_iw_gen: int | None = None
    """Override the protocol's number of importance-sampled windows in the explanation prompt."""
    n_zero_gen: int | None = None
    """Override the protocol's number of scoring negatives also shown in the explanation prompt (<= n_zero_score)."""
    n_top_score: int | None = None
    """Override the protocol's number of top windows in the scoring prompt."""
    n_iw_score: int | None = None
    """Override the protocol's number of importance-sampled windows in the scoring prompt."""
    n_random_score: int | None = None
    """Override the protocol's number of random windows in the scoring prompt."""
    n_zero_score: int | None = None
    """Override the protocol's number of negatives (windows of never-firing contexts) in the scoring prompt."""
    unparseable_as_none: bool = False
    """Score an unparseable verdict (refusal, prose without indices) as "None" instead of leaving the latent out."""
    n_bootstrap: int = 2000
    """Bootstrap resamples (over latents) for the 95-percent interval of the mean score."""
    sample_seed: int = 0
    """Seed of the latent choice, the window sampling and the scoring order."""
    keep_prompts: bool = False
    """Store every prompt (the windows as shown) in the result JSON, not only the judge's replies."""

    def sampling(self) -> SamplingProtocol:
        """The protocol with this config's overrides applied.

        Raises:
            KeyError: unknown protocol. ValueError: a negative count, no top windows, no scoring windows, or more
                explanation negatives than scoring negatives.
        """
        base = PROTOCOLS.get(self.protocol)
        over = {k: getattr(self, k) for k in ("n_top_gen", "n_iw_gen", "n_zero_gen", "n_top_score", "n_iw_score",
                                              "n_random_score", "n_zero_score") if getattr(self, k) is not None}
        p = SamplingProtocol(**{**asdict(base), **over})
        counts = {k: v for k, v in asdict(p).items() if k.startswith("n_")}
        if any(v < 0 for v in counts.values()):
            raise ValueError(f"window counts must be >= 0, got {counts}")
        if p.n_top_gen < 1:
            raise ValueError("the explanation needs at least one top window (--n_top_gen >= 1)")
        if p.n_score < 1:
            raise ValueError("scoring needs at least one window (raise --n_top_score / --n_random_score ...)")
        if p.n_zero_gen > p.n_zero_score:
            raise ValueError(f"the explanation's negatives are a subset of the scoring negatives: n_zero_gen "
                             f"{p.n_zero_gen} > n_zero_score {p.n_zero_score}; raise --n_zero_score or lower "
                             "--n_zero_gen")
        return p


# --------------------------------------------------------------------------------------------------------- result


@dataclass
class AutoInterpResult(EvalResult):
    """Result of the ``autointerp`` suite.

    Attributes:
        judge: which judge produced the numbers (kind, model, endpoint) — a weak local judge gives weak scores.
        judge_kind: ``local`` or ``openai``.
        protocol: ``saebench`` or ``c2r``; sampling: the window counts actually used.
        mean_score: mean detection accuracy over the scored latents (NaN when none was scored).
        std: standard deviation of the per-latent scores; sem: ``std / sqrt(n_scored)``.
        ci95_low, ci95_high: 95 % percentile-bootstrap interval of ``mean_score`` over latents; ci_method says so.
        chance_score: the mean score of always answering "None" (fraction of inactive scoring windows).
        mean_recall, mean_false_positive_rate: means over the scored latents of TP / positives and FP / negatives
            (latents without positives, or negatives, left out of the respective mean).
        n_tokens: eval tokens; n_contexts: contexts used for windows; n_alive: latents firing >= min_activations
            times; n_latents_requested; n_scored: latents with a score; n_unscored: latents explained but whose
            verdict was unparseable (left out of the mean); n_skipped_insufficient: visited latents without enough
            distinct windows.
        parse: counts of explanation / verdict parse outcomes (``explanation_ok``, ``explanation_empty``,
            ``explanation_refusal``, ``prediction_ok``, ``prediction_none``, ``prediction_out_of_range_only``,
            ``prediction_echo``, ``prediction_unparseable``, ``prediction_refusal``, ``out_of_range_indices``,
            ``duplicate_indices``).
        usage: the judge's :class:`~saelab.evals.judges.JudgeUsage` (requests, cache hits, retries, tokens, cost).
        latents: one dict per explained latent: ``latent, n_fires, max_act, explanation, explanation_raw,
            explanation_status, prediction_raw, prediction_status, predicted, active`` (1-based indices of the truly
            active scoring windows), ``kinds`` (kind of each scoring window in the order shown), ``score`` (None when
            unscored), ``tp, fp, fn, tn``; plus ``prompts`` with ``--keep_prompts``.
    """

    judge: str = ""
    judge_kind: str = ""
    protocol: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    mean_score: float = math.nan
    std: float = math.nan
    sem: float = math.nan
    ci95_low: float = math.nan
    ci95_high: float = math.nan
    ci_method: str = ""
    chance_score: float = math.nan
    mean_recall: float = math.nan
    mean_false_positive_rate: float = math.nan
    n_tokens: int = 0
    n_contexts: int = 0
    n_alive: int = 0
    n_latents_requested: int = 0
    n_scored: int = 0
    n_unscored: int = 0
    n_skipped_insufficient: int = 0
    parse: dict[str, int] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    latents: list[dict[str, Any]] = field(default_factory=list)


# -------------------------------------------------------------------------------------------------------- windows


@dataclass
class Window:
    """One window shown to the judge.

    Attributes:
        kind: ``top``, ``iw`` (importance-sampled), ``random`` or ``zero`` (from a context where the latent never
            fires).
        context, position: where its centre is in the eval contexts.
        token_ids, acts: the ``2 * buffer + 1`` tokens and the latent's activations on them.
    """

    kind: str
    context: int
    position: int
    token_ids: list[int]
    acts: list[float]

    def max_act(self) -> float:
        return max(self.acts) if self.acts else 0.0


def _valid(acts: Tensor, buffer: int) -> Tensor:
    """The ``(C, T - 2 * buffer)`` block of centres whose window fits inside the context."""
    if acts.shape[1] < 2 * buffer + 1:
        raise ValueError(f"context_size {acts.shape[1]} is too short for windows of 2 x {buffer} + 1 tokens")
    return acts[:, buffer : acts.shape[1] - buffer]


def top_windows(acts: Tensor, k: int, buffer: int) -> Tensor:
    """Centres of the ``k`` largest activations with non-overlapping windows (SAEBench ``get_k_largest_indices``).

    Greedy over positions by decreasing activation (ties: lower flat index first); a centre in the same context
    within ``buffer`` positions of an already chosen centre is skipped. Only activations > 0 qualify.

    Args:
        acts: ``(C, T)`` activations of one latent; k: windows wanted; buffer: half-width.

    Returns:
        ``(m, 2)`` int64 ``[context, position]`` rows, ``m <= k``, by decreasing activation.
    """
    v = _valid(acts, buffer)
    flat = v.flatten()
    nz = torch.nonzero(flat > 0).flatten()
    order = nz[torch.argsort(-flat[nz], stable=True)]
    width = v.shape[1]
    chosen: list[tuple[int, int]] = []
    blocked: set[tuple[int, int]] = set()
    for i in order.tolist():
        c, p = divmod(i, width)
        p += buffer
        if (c, p) in blocked:
            continue
        chosen.append((c, p))
        blocked.update((c, p + o) for o in range(-buffer, buffer + 1))
        if len(chosen) == k:
            break
    return torch.tensor(chosen, dtype=torch.int64, device=acts.device).reshape(-1, 2)


def iw_windows(acts: Tensor, k: int, buffer: int, threshold: float, generator: torch.Generator) -> Tensor | None:
    """``k`` centres drawn without replacement with probability ``∝ act²`` among ``0 < act < threshold``.

    SAEBench ``get_iw_sample_indices`` (``use_squared_values=True``) on activations zeroed where ``>= threshold``.

    Returns:
        ``(k, 2)`` int64 ``[context, position]``, or None when fewer than ``k`` positions qualify.
    """
    v = _valid(acts, buffer)
    w = torch.where(v >= threshold, torch.zeros_like(v), v).clamp_min(0).double().pow(2).flatten()
    if k == 0:
        return torch.zeros(0, 2, dtype=torch.int64, device=acts.device)
    if int((w > 0).sum()) < k:
        return None
    idx = torch.multinomial(w, k, replacement=False, generator=generator)
    return torch.stack([idx // v.shape[1], idx % v.shape[1] + buffer], dim=1)


def random_windows(n_contexts: int, context_size: int, k: int, buffer: int, generator: torch.Generator) -> Tensor:
    """``k`` centres drawn uniformly, with replacement, over contexts and positions ``[buffer, T - buffer)``."""
    c = torch.randint(0, n_contexts, (k,), generator=generator, device=generator.device)
    p = torch.randint(buffer, context_size - buffer, (k,), generator=generator, device=generator.device)
    return torch.stack([c, p], dim=1)


def never_firing_windows(acts: Tensor, k: int, buffer: int, generator: torch.Generator) -> Tensor | None:
    """Negatives of the C²R fork: windows of ``k`` distinct contexts on which the latent never fires.

    A context qualifies when the latent's activation is exactly 0 at every one of its positions; ``k`` of them are
    drawn uniformly without replacement, and each window's centre uniformly from ``[buffer, T - buffer)``. This is
    the fork's ``get_zero_activation_sequences`` (``sae_bench_utils/indexing_utils.py`` in
    ``github.com/hr-jin/Cross-sample-Consistency-Regularization``), which the fork then cuts with
    ``index_with_buffer`` into ``2 * buffer + 1``-token windows.

    Args:
        acts: ``(C, T)`` activations of one latent; k: negatives wanted; buffer: half-width;
        generator: the random source (not used when ``k == 0``, so other draws are unaffected).

    Returns:
        ``(k, 2)`` int64 ``[context, position]`` rows, or None when fewer than ``k`` contexts never fire.

    Raises:
        ValueError: windows longer than the context.
    """
    _valid(acts, buffer)
    if k == 0:
        return torch.zeros(0, 2, dtype=torch.int64, device=acts.device)
    never = torch.nonzero((acts == 0).all(dim=1)).flatten()
    if len(never) < k:
        return None
    rows = never[torch.randperm(len(never), generator=generator, device=generator.device)[:k].to(never.device)]
    cols = torch.randint(buffer, acts.shape[1] - buffer, (k,), generator=generator, device=generator.device)
    return torch.stack([rows, cols], dim=1)


def window_labels(windows: list[Window], threshold: float) -> list[bool]:
    """Whether each window is active: any token with ``act > threshold`` (SAEBench ``Example.is_active``)."""
    return [any(a > threshold for a in w.acts) for w in windows]


def format_window(tokens: list[str], acts: list[float], threshold: float | None, mark_values: bool = False) -> str:
    """One window as text: tokens concatenated, active ones (``act > threshold``) marked ``<<tok>>``.

    Newlines are shown as ``↵`` and U+FFFD (a byte-level piece of a multi-byte character) is dropped, as SAEBench's
    ``Example.to_str``. ``threshold=None`` marks nothing (scoring prompts); ``mark_values`` writes
    ``<<tok[act:1.23]>>`` (C²R).
    """
    out = []
    for s, a in zip(tokens, acts):
        s = s.replace("\ufffd", "").replace("\r\n", "\n").replace("\n", "↵")
        if threshold is not None and a > threshold:
            s = f"<<{s}[act:{a:.3g}]>>" if mark_values else f"<<{s}>>"
        out.append(s)
    return "".join(out)


# -------------------------------------------------------------------------------------------------------- prompts


def _explain_messages(windows: list[str], negatives: list[str], words: int) -> Messages:
    """saelab's SAEBench-style explanation prompt (``windows`` marked ``<<tok>>``, strongest first)."""
    system = (
        "We are studying a feature of a language model. The feature is active on certain words, parts of words or "
        "ideas in a text. You will see short text excerpts on which it is active, strongest first; the tokens where "
        "it is active are marked with << and >>. Say in one short sentence, at most "
        f"{words} words, what the feature is active on. Be general rather than too specific, cover most marked "
        "tokens, and mention capitalisation or punctuation only when it matters. Do not list many words. Good "
        "answers look like: This feature activates on the word 'knows' in rhetorical questions. / This feature "
        "activates on verbs about making decisions. / This feature activates on the word piece 'Ent' at the start "
        "of words. / This feature activates on text about economic policy."
    )
    user = "Excerpts where the feature is active:\n\n" + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(windows))
    if negatives:
        user += ("\n\nExcerpts where the feature is NOT active:\n\n"
                 + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(negatives)))
    user += "\n\nComplete the sentence: This feature activates on"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _explain_messages_c2r(windows: list[str], negatives: list[str], words: int) -> Messages:
    """The C²R fork's explanation prompt (``AutoInterp.get_generation_prompts`` with ``use_demos_in_explanation``).

    ``ACTIVATE (i).`` documents (``windows``, marked ``<<tok[act:value]>>``, strongest first) then ``INACTIVATE
    (j).`` ones (``negatives``, numbered on), under the fork's system prompt; saelab appends the completion cue
    (see the module docstring's deviations).
    """
    system = (
        "We're studying neurons in a neural network. Each neuron activates on some particular word/words/substring/"
        "concept in a short document. The activating words in each document are indicated with "
        "<<{token}[act:{activation}]>>.\nWe will give you a list of ACTIVATE documents (where the neuron fires, "
        "ordered by strength) and INACTIVATE documents (where the neuron does not fire). Look at the marked parts of "
        "the ACTIVATE documents, and consider the INACTIVATE documents to refine the activation boundary. Summarize "
        "in a single sentence what the neuron is activating on. Try not to be overly specific or overly broad. Your "
        "explanation should cover all activating words and not cover any inactive text. Pay attention to things "
        "like capitalization and punctuation if relevant. Keep the explanation as short and simple as possible, "
        f"limited to {words} words or less. Omit punctuation and formatting. Some examples: \"This neuron activates "
        "on the word 'knows' in rhetorical questions\", and \"This neuron activates on verbs related to "
        "decision-making and preferences\", and \"This neuron activates on the substring 'Ent' at the start of "
        "words\", and \"This neuron activates on text about government economic policy\"."
    )
    docs = "\n".join(f"ACTIVATE ({i + 1}). {w}" for i, w in enumerate(windows))
    if negatives:
        docs += "\n\n" + "\n".join(f"INACTIVATE ({i + 1 + len(windows)}). {w}" for i, w in enumerate(negatives))
    user = (f"The relevant documents are given below:\n\n{docs}"
            "\n\nComplete the sentence: This neuron activates on")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


_EXPLAIN_PROMPTS = {"saebench": _explain_messages, "c2r": _explain_messages_c2r}


def _score_messages(explanation: str, windows: list[str], example: list[int]) -> Messages:
    n = len(windows)
    system = (
        "We are studying a feature of a language model. The feature is active on certain words, parts of words or "
        f"ideas in a text. You get a short explanation of what it is active on and {n} numbered text excerpts in "
        "random order. Reply with the numbers of the excerpts in which the feature is active on at least one "
        f"token, separated by commas, for example: {', '.join(map(str, example))}. Do not read the explanation too "
        "narrowly. If it is active in none of them, reply None. Reply with the numbers or None and nothing else."
    )
    user = (f"Explanation: this feature activates on {explanation or '(no explanation)'}.\n\nExcerpts:\n\n"
            + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(windows))
            + f"\n\nWhich of the excerpts 1 to {n} contain the feature? Reply only with their numbers separated by "
            "commas, or None.")  # the question again at the end: small judges otherwise repeat the excerpts
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# -------------------------------------------------------------------------------------------------------- parsing

_REFUSAL = re.compile(r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i can(?:no|')t|i am unable|i'm unable|unable to "
                      r"(?:help|assist|comply|determine)|as an ai\b|i (?:do not|don't) (?:have|know))", re.I)
_NONE = re.compile(r"\b(none|nothing|no (?:excerpts?|examples?|texts?|sequences?|documents?)|neither)\b", re.I)
_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                     "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}
_LEADS = re.compile(r"\b(?:activates|activated|fires|is active|active|responds)\s+(?:on|for|to|when)\b\s*", re.I)


def parse_explanation(text: str, max_words: int = 30) -> tuple[str, str]:
    """The explanation in a judge's reply and its status (``ok``, ``empty`` or ``refusal``).

    Keeps the first non-empty line, then what follows the last "activates on" / "fires on" / "is active on"
    (SAEBench ``parse_explanation`` splits on "activates on"), drops surrounding quotes, markdown and the final
    period, and truncates to ``max_words`` words.
    """
    lines = [ln.strip() for ln in str(text or "").replace("\r", "\n").split("\n") if ln.strip()]
    if not lines:
        return "", "empty"
    line = lines[0]
    if _REFUSAL.search(line) and not _LEADS.search(line):
        return "", "refusal"
    parts = _LEADS.split(line)
    expl = parts[-1] if len(parts) > 1 else line
    expl = expl.strip().strip("*_`\"'“”‘’ ").rstrip(".!").strip().strip("\"'“”‘’ ")
    words = expl.split()
    if len(words) > max_words:
        expl = " ".join(words[:max_words])
    return (expl, "ok") if expl else ("", "empty")


@dataclass
class ParsedPrediction:
    """A parsed verdict: 1-based ``indices`` (sorted, unique, in range), its ``status`` (``ok``, ``none``,
    ``out_of_range_only``, ``echo``, ``unparseable``, ``refusal``), and counts of dropped ``out_of_range`` /
    ``duplicates``. Only ``ok``, ``none`` and ``out_of_range_only`` verdicts are scored."""

    indices: list[int]
    status: str
    out_of_range: int = 0
    duplicates: int = 0

    @property
    def scored(self) -> bool:
        return self.status in ("ok", "none", "out_of_range_only")


_ENUM_LINE = re.compile(r"^\s*\(?\d{1,3}[.):]\s+(.*)$")
_LIST_MARKER = re.compile(r"^\s*\d{1,3}[.)]\s+(?=\d+\s*,)", re.M)  # "1. 2, 7, 9": a list marker, then the verdict


def _is_enumerated_text(line: str) -> bool:
    """``"3. The cat sat on the mat"``: a list marker followed by at least two words (an excerpt, not a verdict)."""
    m = _ENUM_LINE.match(line)
    return bool(m) and len(re.findall(r"[A-Za-z]{2,}", m.group(1))) >= 2


def parse_predictions(text: str, n: int) -> ParsedPrediction:
    """Parse a detection verdict leniently (never raises).

    Integers anywhere in the reply count (``"2, 5 and 7"``, ``"Excerpts 3 and 9."``, ``"[1,4]"``), ``a-b`` ranges
    expand, number words ("three") count when there is no digit; indices outside ``1..n`` are dropped and counted.
    Lines that are an enumerated excerpt (``"3. The cat sat on the mat"``) are ignored, and a reply that *starts*
    with one is an ``echo`` (the judge repeated the excerpts instead of answering: a weak judge's usual failure); a
    list marker at the start of a line before a comma-separated verdict (``"1. 2, 7, 9"``, SmolLM2's habit) is not
    an index.
    With no index: ``none`` if the reply says none/nothing, ``refusal`` if it apologises or declines, else
    ``unparseable``.

    Args:
        text: the judge's reply; n: number of windows shown.
    """
    lines = [ln for ln in str(text or "").splitlines() if ln.strip()]
    if lines and _is_enumerated_text(lines[0]):
        return ParsedPrediction([], "echo")
    t = "\n".join(ln for ln in lines if not _is_enumerated_text(ln))
    t = _LIST_MARKER.sub("", t)
    found: list[int] = []

    def rng(m: re.Match) -> str:
        a, b = int(m.group(1)), int(m.group(2))
        if a <= b and b - a <= 2 * max(n, 1):
            found.extend(range(a, b + 1))
            return " "
        return m.group(0)

    rest = re.sub(r"(?<![\d.])(\d{1,4})\s*(?:-|–|to)\s*(\d{1,4})(?![\d.])", rng, t)
    found.extend(int(x) for x in re.findall(r"\d+", rest) if len(x) <= 6)
    if not found:
        found = [_WORDS[w.lower()] for w in re.findall(r"[A-Za-z]+", t) if w.lower() in _WORDS and w.lower() != "zero"]
    if not found:
        if _NONE.search(t):
            return ParsedPrediction([], "none")
        return ParsedPrediction([], "refusal" if _REFUSAL.search(t) else "unparseable")
    valid = [i for i in found if 1 <= i <= n]
    uniq = sorted(set(valid))
    out = ParsedPrediction(uniq, "ok", out_of_range=len(found) - len(valid), duplicates=len(valid) - len(uniq))
    if not uniq:
        out.status = "out_of_range_only"
    return out


def score_predictions(predicted: list[int], active: list[bool]) -> dict[str, Any]:
    """Detection accuracy of one latent (SAEBench ``score_predictions``): the fraction of windows whose predicted
    label (index in ``predicted``, 1-based) equals the true one, with the confusion counts.

    Returns:
        ``{"score", "tp", "fp", "fn", "tn"}``.
    """
    pred = set(predicted)
    tp = fp = fn = tn = 0
    for i, a in enumerate(active, start=1):
        p = i in pred
        tp += p and a
        fp += p and not a
        fn += (not p) and a
        tn += (not p) and (not a)
    n = len(active)
    return {"score": (tp + tn) / n if n else math.nan, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def bootstrap_ci(scores: list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores`` (resampling latents with replacement).

    Returns:
        ``(low, high)``; ``(nan, nan)`` for fewer than 2 scores or ``n_boot < 1``.
    """
    x = np.asarray(scores, dtype=np.float64)
    if len(x) < 2 or n_boot < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    a = (1.0 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------------------------ run


def _contexts(lm: LoadedLM, cfg: AutoInterpConfig, n: int) -> Tensor:
    """The first ``n`` held-out contexts, token ids ``(n, context_size)`` (the ones the eval tokens came from)."""
    _, held_out = split_documents(cfg.data)
    ids = [c[0] for _, c in zip(range(n), iter_contexts(lm, held_out.shuffle(cfg.seed), cfg.context_size))]
    return torch.stack(ids) if ids else torch.zeros(0, cfg.context_size, dtype=torch.long, device="cpu")


@torch.no_grad()
def _fire_counts(sae: SAE, x: Tensor, batch: int) -> Tensor:
    """``(d_sae,)`` int64 CPU: on how many rows of ``x`` each latent fires (counted on the SAE's device)."""
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=sae.device)
    sae.eval()
    for s in range(0, x.shape[0], batch):
        code, _ = sae.encode_code(x[s : s + batch].to(sae.device, sae.dtype))
        counts += code.active_mask_counts(sae.cfg.d_sae).long()
    return counts.cpu()


@torch.no_grad()
def _latent_acts(sae: SAE, x: Tensor, latents: list[int], batch: int) -> Tensor:
    """``(N, len(latents))`` activations of the given latents on every eval token, on the CPU (where the windows
    are drawn); each batch's selected columns are copied back once."""
    out = torch.zeros(x.shape[0], len(latents), device="cpu")
    sel = torch.tensor(latents, dtype=torch.long, device="cpu")
    col = torch.full((sae.cfg.d_sae,), -1, dtype=torch.long, device="cpu")
    col[sel] = torch.arange(len(latents), device="cpu")
    sae.eval()  # BatchTopK: the inference threshold, not the batch-dependent top-k
    for s in range(0, x.shape[0], batch):
        code, _ = sae.encode_code(x[s : s + batch].to(sae.device, sae.dtype))
        if code.indices is None:  # dense code
            out[s : s + batch] = code.values[:, sel.to(code.values.device)].float().cpu()
        else:  # (B, k) values and latent ids: scatter only the selected latents, never densify
            c = col[code.indices.cpu().long()]
            v = code.values.float().cpu()
            m = (c >= 0) & (v > 0)
            rows = torch.arange(v.shape[0], device="cpu")[:, None].expand_as(c)
            out[s + rows[m], c[m]] = v[m]
    return out


class _TokenText:
    """Memoised single-token strings; special tokens (the document separator) are shown as a paragraph break."""

    def __init__(self, lm: LoadedLM) -> None:
        self.tok, self.special, self.memo = lm.tokenizer, lm.special_ids, {}

    def __call__(self, ids: list[int]) -> list[str]:
        miss = sorted({i for i in ids if i not in self.memo})
        if miss:
            strs = self.tok.batch_decode([[i] for i in miss], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
            for i, s in zip(miss, strs):
                self.memo[i] = "\n\n" if i in self.special else s
        return [self.memo[i] for i in ids]


def _windows(kind: str, centres: Tensor, ids: Tensor, acts: Tensor, b: int) -> list[Window]:
    out = []
    for c, p in centres.tolist():
        out.append(Window(kind, c, p, ids[c, p - b : p + b + 1].tolist(), acts[c, p - b : p + b + 1].tolist()))
    return out


@dataclass
class _Plan:
    latent: int
    n_fires: int
    max_act: float
    threshold: float
    gen: list[Window]
    gen_neg: list[Window]
    score: list[Window]
    example: list[int]


def _plan_latent(latent: int, n_fires: int, acts: Tensor, ids: Tensor, proto: SamplingProtocol,
                 cfg: AutoInterpConfig) -> _Plan | None:
    """Sample the windows of one latent (generator seeded by ``(sample_seed, latent)``); None if too few windows."""
    b = cfg.buffer
    g = torch.Generator().manual_seed(cfg.sample_seed * 1_000_003 + latent)
    n_top = proto.n_top_gen + proto.n_top_score
    top = top_windows(acts, n_top, b)
    if len(top) < n_top:
        return None
    top_vals = acts[top[:, 0], top[:, 1]]
    iw = iw_windows(acts, proto.n_iw_gen + proto.n_iw_score, b, float(top_vals.min()), g)
    zero = never_firing_windows(acts, proto.n_zero_score, b, g)
    if iw is None or zero is None:
        return None
    rnd = random_windows(acts.shape[0], acts.shape[1], proto.n_random_score, b, g)
    tw = _windows("top", top, ids, acts, b)
    max_act = max(w.max_act() for w in tw)
    threshold = cfg.act_threshold_frac * max_act
    ti = torch.randperm(len(tw), generator=g, device=g.device).tolist()
    iww = _windows("iw", iw, ids, acts, b)
    ii = torch.randperm(len(iww), generator=g, device=g.device).tolist()
    zw = _windows("zero", zero, ids, acts, b)
    gen = [tw[i] for i in ti[: proto.n_top_gen]] + [iww[i] for i in ii[: proto.n_iw_gen]]
    gen.sort(key=lambda w: -w.max_act())
    score = ([tw[i] for i in ti[proto.n_top_gen:]] + [iww[i] for i in ii[proto.n_iw_gen:]]
             + _windows("random", rnd, ids, acts, b) + zw)
    score = [score[i] for i in torch.randperm(len(score), generator=g, device=g.device).tolist()]
    n_pos = max(1, min(proto.n_top_score + proto.n_iw_score, len(score)))
    example = sorted(torch.randperm(len(score), generator=g, device=g.device)[:n_pos].add(1).tolist())
    # the explanation's negatives are a prefix of the scoring negatives (already in random order), as in the fork
    return _Plan(latent, n_fires, max_act, threshold, gen, zw[: proto.n_zero_gen], score, example)


def _progress_batches(items: list, size: int, desc: str, on: bool):
    bar = None
    if on:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=desc, unit="latent", dynamic_ncols=True)
    for s in range(0, len(items), size):
        yield items[s : s + size]
        if bar is not None:
            bar.update(min(size, len(items) - s))
    if bar is not None:
        bar.close()


def run_autointerp(sae: SAE, lm: LoadedLM, cfg: AutoInterpConfig, store: LMActivationStore | None = None,
                   judge: Judge | None = None) -> AutoInterpResult:
    """The ``autointerp`` suite: sample latents and windows, ask the judge to explain and detect, score.

    Stages (``timings_s``): ``lm_activations`` (cached), ``sae_encode`` (firing counts), ``sampling`` (encoding the
    visited latents and drawing their windows), ``explain``, ``score`` (the judge calls).

    Args:
        sae: the SAE; lm: its model (also the local judge when it is the judge model).
        cfg: see :class:`AutoInterpConfig`.
        store: LM activation cache (default: one for the SAE's model and hook).
        judge: a ready judge (default: :func:`~saelab.evals.judges.make_judge` of ``cfg``).

    Returns:
        :class:`AutoInterpResult`.

    Raises:
        ValueError: bad protocol counts, windows longer than the contexts, no held-out text, a token mismatch between
            the cached activations and the held-out contexts (a changed ``data`` config), or an explicit latent id
            out of range. KeyError: unknown judge or protocol. JudgeError: the judge server failed after retries.
    """
    proto = cfg.sampling()
    if cfg.context_size < 2 * cfg.buffer + 2:
        raise ValueError(f"context_size {cfg.context_size} is too short for windows of 2 x {cfg.buffer} + 1 tokens")
    if cfg.latents is not None:
        bad = [j for j in cfg.latents if not 0 <= j < sae.cfg.d_sae]
        if bad:
            raise ValueError(f"--latents {bad} out of range: the SAE has d_sae={sae.cfg.d_sae}")
    judge = judge or make_judge(cfg, lm)
    res = AutoInterpResult(suite="autointerp", sae=str(cfg.sae), judge=judge.description, judge_kind=cfg.judge,
                           protocol=cfg.protocol, sampling=asdict(proto),
                           ci_method=f"95% percentile bootstrap over latents ({cfg.n_bootstrap} resamples)")
    tokens, store = eval_tokens(sae, lm, cfg, store, res)
    with res.timed("sae_encode"):
        n_ctx = int(tokens.context.max()) if len(tokens) else 0  # the last context may be cut short: drop it
        keep = (tokens.context < n_ctx) & tokens.keep_mask(cfg.max_norm_multiple)
        ctx_ids = _contexts(lm, cfg, n_ctx)
        if len(ctx_ids) < n_ctx:
            raise ValueError("the held-out contexts are fewer than the cached eval tokens refer to: "
                             "was --data changed?")
        if keep.any() and not torch.equal(ctx_ids[tokens.context[keep], tokens.position[keep]], tokens.token_ids[keep]):
            raise ValueError("cached eval tokens do not match the held-out contexts (data or tokenizer changed?); "
                             "delete the eval_activations cache entry or restore the original --data")
        x = tokens.x[keep]
        ctx, pos = tokens.context[keep], tokens.position[keep]
        res.n_tokens, res.n_contexts = int(keep.sum()), n_ctx
        counts = _fire_counts(sae, x, cfg.encode_batch_size)
    alive = torch.nonzero(counts >= cfg.min_activations).flatten()
    res.n_alive = int(len(alive))
    if cfg.latents is not None:
        order = [int(j) for j in cfg.latents]
        want = len(order)
    else:
        g = torch.Generator().manual_seed(cfg.sample_seed)
        order = alive[torch.randperm(len(alive), generator=g, device=g.device)].tolist()
        want = cfg.n_latents
    res.n_latents_requested = want

    plans: list[_Plan] = []
    chunk = max(64, want)
    with res.timed("sampling"):
        for s in range(0, len(order), chunk):
            if len(plans) >= want:
                break
            group = order[s : s + chunk]
            cols = _latent_acts(sae, x, group, cfg.encode_batch_size)
            for j, latent in enumerate(group):
                if len(plans) >= want:
                    break
                dense = torch.zeros(n_ctx, cfg.context_size, device="cpu")
                dense[ctx, pos] = cols[:, j]
                plan = _plan_latent(latent, int(counts[latent]), dense, ctx_ids, proto, cfg) if n_ctx else None
                if plan is None:
                    res.n_skipped_insufficient += 1
                else:
                    plans.append(plan)

    text = _TokenText(lm)
    fmt = lambda w, thr: format_window(text(w.token_ids), w.acts, thr, proto.mark_values)  # noqa: E731
    explain = _EXPLAIN_PROMPTS[proto.explain_prompt]
    gen_msgs = [explain([fmt(w, p.threshold) for w in p.gen], [fmt(w, None) for w in p.gen_neg],
                        proto.explanation_words) for p in plans]
    raw_expl: list[str] = []
    bs = max(1, cfg.judge_batch_size)
    with res.timed("explain"):
        for batch in _progress_batches(gen_msgs, bs, "auto-interp explain", cfg.progress):
            raw_expl += judge.complete(batch, cfg.explanation_max_tokens or proto.explanation_max_tokens)
    parsed_expl = [parse_explanation(r, proto.explanation_words) for r in raw_expl]
    score_msgs = [_score_messages(e, [fmt(w, None) for w in p.score], p.example)
                  for p, (e, _) in zip(plans, parsed_expl)]
    max_pred = cfg.prediction_max_tokens or 2 * proto.n_score + 5
    raw_pred: list[str] = []
    with res.timed("score"):
        for batch in _progress_batches(score_msgs, bs, "auto-interp score", cfg.progress):
            raw_pred += judge.complete(batch, max_pred)

    parse = dict.fromkeys(("explanation_ok", "explanation_empty", "explanation_refusal", "prediction_ok",
                           "prediction_none", "prediction_out_of_range_only", "prediction_echo",
                           "prediction_unparseable",
                           "prediction_refusal", "out_of_range_indices", "duplicate_indices"), 0)
    scores, chance, recalls, fprs = [], [], [], []
    for i, (p, (expl, e_status), r_expl, r_pred) in enumerate(zip(plans, parsed_expl, raw_expl, raw_pred)):
        parse[f"explanation_{e_status}"] += 1
        pp = parse_predictions(r_pred, len(p.score))
        parse[f"prediction_{pp.status}"] += 1
        parse["out_of_range_indices"] += pp.out_of_range
        parse["duplicate_indices"] += pp.duplicates
        active = window_labels(p.score, p.threshold)
        rec: dict[str, Any] = {
            "latent": p.latent, "n_fires": p.n_fires, "max_act": p.max_act, "explanation": expl,
            "explanation_raw": r_expl, "explanation_status": e_status, "prediction_raw": r_pred,
            "prediction_status": pp.status, "predicted": pp.indices,
            "active": [k for k, a in enumerate(active, start=1) if a], "kinds": [w.kind for w in p.score],
            "score": None,
        }
        if pp.scored or cfg.unparseable_as_none:
            sc = score_predictions(pp.indices, active)
            rec.update(sc)
            scores.append(sc["score"])
            chance.append(sum(not a for a in active) / len(active))
            if sc["tp"] + sc["fn"]:
                recalls.append(sc["tp"] / (sc["tp"] + sc["fn"]))
            if sc["fp"] + sc["tn"]:
                fprs.append(sc["fp"] / (sc["fp"] + sc["tn"]))
        else:
            res.n_unscored += 1
        if cfg.keep_prompts:
            rec["prompts"] = {"explain": gen_msgs[i], "score": score_msgs[i]}
        res.latents.append(rec)
    res.parse = parse
    res.n_scored = len(scores)
    if scores:
        arr = np.asarray(scores)
        res.mean_score = float(arr.mean())
        res.std = float(arr.std(ddof=1)) if len(arr) > 1 else math.nan
        res.sem = res.std / math.sqrt(len(arr)) if len(arr) > 1 else math.nan
        res.ci95_low, res.ci95_high = bootstrap_ci(scores, cfg.n_bootstrap, cfg.sample_seed)
        res.chance_score = float(np.mean(chance))
        res.mean_recall = float(np.mean(recalls)) if recalls else math.nan
        res.mean_false_positive_rate = float(np.mean(fprs)) if fprs else math.nan
    res.usage = judge.usage.to_dict()
    return res


def load_explanations(path) -> tuple[dict[int, str], dict[int, float | None], str]:
    """``({latent: explanation}, {latent: score}, judge)`` from an ``eval_autointerp.json`` (for the feature browser).

    Raises:
        FileNotFoundError: missing file. ValueError: not valid JSON, or not an auto-interp result.
    """
    from ..io import read_json

    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("latents"), list):
        raise ValueError(f"{path} is not an auto-interp result (no 'latents' list); make it with "
                         "`saelab eval --suite autointerp`")
    expl = {int(r["latent"]): str(r.get("explanation") or "") for r in data["latents"] if "latent" in r}
    score = {int(r["latent"]): r.get("score") for r in data["latents"] if "latent" in r}
    return expl, score, str(data.get("judge", ""))


EVAL_SUITES.register("autointerp")(Suite(
    AutoInterpConfig, run_autointerp,
    help="LLM-judge explanations of sampled latents, scored by detection (SAEBench autointerp); --judge local|openai"))
