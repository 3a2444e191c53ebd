"""Feature absorption and feature splitting on the first-letter task (SAEBench ``evals/absorption``).

Sources: Chanin et al. 2024, "A is for Absorption" (arXiv 2409.14507, code ``sae-spelling``), and SAEBench's
re-implementation ``evals/absorption/{vocab,probing,k_sparse_probing,feature_absorption_calculator,main}.py``
with Demian Till's absorption fraction. Pipeline (each stage is timed in ``AbsorptionResult.timings_s``):

1. ``vocab``: every token whose decoded text is ``" " + w`` with ``w`` purely ASCII-alphabetic
   (:func:`alpha_vocab`); the label is ``w[0].lower()``. Words are split 80/20 into train/test, stratified
   by letter (:func:`split_words`).
2. ``lm_activations``: the residual stream at the word token of the ICL prompt
   ``"\\n{w1} has the first letter: W1\\n...\\n{w10} has the first letter: W10\\n{word} has the first letter:"``.
   The model is causal, so the suffix after the word never reaches the word-token activation: the prompt is
   cut right after the word (:func:`word_activations`). All words of one LM batch share one random ICL
   prefix (examples drawn from *training* words other than the batch's own), computed once and reused for
   the whole batch through the KV cache: a word costs ~3.5 tokens of plain forward instead of ~83. The activations are
   SAE-independent and cached in the :class:`~saelab.evals.base.LMActivationStore`.
3. ``gt_probe``: the ground-truth probe, 26 one-vs-rest logistic regressions on the LM activations trained
   as in SAEBench ``probing.py::train_multi_probe`` / ``common.py::train_and_save_probes`` (BCE with
   ``pos_weight = #neg/#pos``, Adam lr 1e-2 decayed exponentially to 1e-5 over 50 epochs, batch 64, weight
   decay 1e-4 as ``train_linear_probe_for_task`` passes it, overriding ``train_multi_probe``'s default of
   1e-6), see :func:`train_ovr_probe`. A letter *qualifies* when its test F1 (prediction = logit > 0)
   exceeds ``min_probe_f1`` (0.6). Also cached (SAE-independent).
4. ``sae_encode``: *effective* SAE codes of all words (:meth:`saelab.sae.model.SAE.effective_codes`: each latent's
   coefficient on its unit decoder direction, so that norm-restoring encoders are scored like the others), kept as
   a sparse matrix. SAEBench reads raw codes, which is the same thing for its linear decoders.
5. ``sparse_probe``: k-sparse probing (SAEBench ``k_sparse_probing.py``): an L1 one-vs-rest multi-probe on the
   training words' codes ranks the latents of each letter by weight (positive weights only); for
   ``k = 1..k_max`` a ``LogisticRegression(max_iter=500, class_weight="balanced")`` on the top-k latents gives
   a test F1 (:func:`k_sparse_f1`); the F1-jump rule (:func:`split_features`) picks the *split features*
   (the letter's "main latents"); ``num_split_features = |split features|`` (1 = no splitting).
6. ``absorption``: for the test words of letter l that the GT probe detects (logit > 0, "probe true
   positives"), :func:`absorption_scores` gives the absorption fraction and full-absorption flag of each word
   with SAEBench's thresholds; per letter their means are ``absorption_fraction`` and
   ``full_absorption_rate``.
7. ``decoder_cos``: ``average_max_decoder_cosine_sim`` (SAEBench core, :mod:`saelab.evals.core`).

Scores are means over qualifying letters: ``mean_absorption_fraction_score``, ``mean_full_absorption_score``
(lower is better) and ``mean_num_split_features``. SAEBench aborts with fewer than 20 qualifying letters; here
``min_letters`` (default 1) only decides whether the scores are computed: below it they are ``None`` and
``status == "too_few_letters"``; ``n_letters_qualifying`` is always reported.

Defaults (SmolLM2-135M): all ~31.5k words (``n_words=0``) with 10 ICL lines.
The number of words, not the prompt, decides how many letters pass the probe gate: at layer 15, 2,600 words
give 19/26 letters (20 without ICL), 10,000 give 25 (25), 31.5k give 25 (26); at layers 4/8/12 all words give
26/26. Without ICL the LM stage is about 3x cheaper and the probe's mean F1 slightly lower (0.852 vs 0.860 at layer
15). The LM stage dominates a cold run; once the LM activations and probe are cached, a further SAE costs a
fraction of it (``benchmarks/RESULTS.md``).

Deviations from SAEBench (all documented on the functions): ICL examples come from training words only
(SAEBench uses the test words' own split for test prompts) and are shared by the words of one batch; the
absorption stage reuses the probe-data activations of the test words instead of drawing a second random
ICL prompt; the split is stratified by letter; words of one character are dropped by default
(``min_word_chars=2``: a single-letter token is its own first letter).
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import exp, log
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..models.hooks import HookPoint, capture, resolve_hook
from ..models.lm import LoadedLM
from ..sae.model import SAE
from .base import EVAL_SUITES, EvalConfig, EvalResult, LMActivationStore, Suite
from .core import average_max_decoder_cosine_sim

if TYPE_CHECKING:  # scipy and scikit-learn are imported where used: `import saelab.evals` stays light
    import scipy.sparse as sp

LETTERS = "abcdefghijklmnopqrstuvwxyz"
"""The 26 classes, in label order."""
_ASCII_LETTERS = frozenset(LETTERS + LETTERS.upper())
TEMPLATE = "{word} has the first letter:"
"""SAEBench's ``prompt_template``; an ICL line appends ``" " + first letter in upper case``."""
_EPS = 1e-8
"""SAEBench ``feature_absorption_calculator.EPS``: a main latent with activation below it is silent."""
_CACHE_VERSION = 1


@dataclass
class AbsorptionConfig(EvalConfig):
    """Feature absorption and splitting on the first-letter task (SAEBench ``evals/absorption``)."""

    n_words: int = 0
    """Words sampled from the alphabetic single-token vocabulary (0 = all of them, ~31.5k on SmolLM2). Fewer
    words also mean fewer L1-probe steps (50 epochs of batch 4096), which inflates absorption: on the demo SAE
    3,000 words give 0.88 / 0.65 (fraction / full) against 0.48 / 0.33 with all words."""
    min_word_chars: int = 2
    """Minimum letters in a word (2 drops the single-letter tokens, which are their own first letter)."""
    n_icl_examples: int = 10
    """In-context example lines before the word (SAEBench: 10)."""
    test_fraction: float = 0.2
    """Fraction of each letter's words held out for testing (SAEBench: 80/20 split)."""
    batch_size: int = 256
    """LM sequences per forward pass, as in every suite; here each sequence is one word's prompt (the words of one
    batch share one random ICL prefix, run once through the KV cache)."""
    kv_cache: bool = True
    """Reuse the prefix's keys/values for the batch (False: run the full prompt for every word; same result)."""
    min_probe_f1: float = 0.6
    """A letter is evaluated only if the ground-truth probe's test F1 exceeds this (SAEBench min_GT_probe_f1)."""
    min_letters: int = 1
    """Compute the scores only if at least this many letters qualify (SAEBench aborts below 20)."""
    probe_epochs: int = 50
    """Epochs of the ground-truth probe (Adam, lr 1e-2 -> 1e-5, batch probe_batch_size)."""
    probe_batch_size: int = 64
    """Batch size of the ground-truth probe (SAEBench train_and_save_probes: 64)."""
    probe_weight_decay: float = 1e-4
    """Adam weight decay of the ground-truth probe (SAEBench train_linear_probe_for_task)."""
    k_max: int = 10
    """Largest k of the k-sparse probes (SAEBench max_k_value)."""
    f1_jump: float = 0.03
    """Feature splitting: k latents are split features while F1 rises by more than this per k (SAEBench
    f1_jump_threshold)."""
    sparse_probe_l1: float = 0.01
    """L1 coefficient of the latent-ranking multi-probe (SAEBench k_sparse_probe_l1_decay)."""
    sparse_probe_epochs: int = 50
    """Epochs of the latent-ranking multi-probe (SAEBench k_sparse_probe_num_epochs)."""
    sparse_probe_batch_size: int = 4096
    """Batch size of the latent-ranking multi-probe (SAEBench k_sparse_probe_batch_size); with few words a
    smaller batch gives the probe enough Adam steps."""
    fraction_cos: float = 0.1
    """Absorption fraction: a non-main latent can absorb only if cos(decoder row, probe) >= this."""
    full_cos: float = 0.025
    """Full absorption: the top-projecting latent needs cos(decoder row, probe) >= this."""
    max_absorbing_latents: int = 3
    """Absorption fraction: at most this many latents (top projections) compensate for the main latents."""
    projection_ratio: float = 0.4
    """Both rules: the absorbing latent(s) must carry at least this fraction of the probe projection."""
    seed: int = 42
    """Seed of the word sample, the split, the ICL examples and the probes' batch order."""
    lm_cache: bool = True
    """Cache the LM activations and the ground-truth probe on disk (LMActivationStore) for later SAEs."""


@dataclass
class AbsorptionResult(EvalResult):
    """Results of :func:`run_absorption`.

    Attributes:
        status: ``"ok"``, or ``"too_few_letters"`` when fewer than ``min_letters`` letters qualify (scores None).
        hook_name: the evaluated hook.
        n_words, n_train, n_test: vocabulary words used and their split.
        n_icl_examples: ICL lines per prompt.
        lm_cache_hit: the LM activations came from the disk cache (no LM forward ran).
        probe_cache_hit: the ground-truth probe came from the disk cache.
        probe_f1_by_letter: test F1 of the ground-truth probe for each of the 26 letters (0 when absent).
        n_letters_qualifying: letters with probe F1 > ``min_probe_f1``; ``letters_qualifying`` lists them.
        mean_absorption_fraction_score: mean over qualifying letters of the mean absorption fraction (0..1).
        mean_full_absorption_score: mean over qualifying letters of the full-absorption rate (0..1).
        mean_num_split_features: mean over qualifying letters of the number of split features (>= 1).
        std_dev_*: sample standard deviations across qualifying letters (None with fewer than 2).
        average_max_decoder_cosine_sim: mean over latents of the max cosine to another decoder row.
        per_letter: one dict per qualifying letter: ``letter, probe_f1, n_test, n_probe_true_positives,
            num_split_features, split_latents, sparse_probe_f1`` (list, index k-1), ``absorption_fraction,
            full_absorption_rate, num_full_absorption``.
    """

    status: str = "ok"
    hook_name: str = ""
    n_words: int = 0
    n_train: int = 0
    n_test: int = 0
    n_icl_examples: int = 0
    lm_cache_hit: bool = False
    probe_cache_hit: bool = False
    probe_f1_by_letter: dict[str, float] = field(default_factory=dict)
    n_letters_qualifying: int = 0
    letters_qualifying: list[str] = field(default_factory=list)
    mean_absorption_fraction_score: float | None = None
    mean_full_absorption_score: float | None = None
    mean_num_split_features: float | None = None
    std_dev_absorption_fraction_score: float | None = None
    std_dev_full_absorption_score: float | None = None
    std_dev_num_split_features: float | None = None
    average_max_decoder_cosine_sim: float | None = None
    per_letter: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------
# vocabulary and split
# ------------------------------------------------------------------------------------------------------------
def alpha_vocab(tokenizer, *, min_chars: int = 1, leading_space: bool = True) -> list[tuple[int, str]]:
    """Single-token words: tokens whose decoded text is purely ASCII-alphabetic after one leading space.

    As SAEBench ``vocab.py::get_alpha_tokens`` (letters ``a-zA-Z`` only; the token is decoded to text, so
    byte-level markers such as GPT-2's ``Ġ`` become a space), restricted by default to the tokens *with* the
    leading space, the form a word takes after ``"\\n"`` or another word in running text.

    Args:
        tokenizer: a Hugging Face tokenizer.
        min_chars: minimum number of letters after the space.
        leading_space: keep only tokens that start with exactly one space; ``False`` also keeps tokens
            without one (never tokens with two leading spaces).

    Returns:
        ``[(token_id, text)]`` sorted by id, ``text`` being the decoded token (``" cat"``).
    """
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    for i, text in enumerate(texts):
        if i in special:
            continue
        word = text[1:] if text.startswith(" ") else text
        if leading_space and not text.startswith(" "):
            continue
        if len(word) >= max(min_chars, 1) and all(c in _ASCII_LETTERS for c in word):
            out.append((i, text))
    return out


def first_letter_label(text: str) -> int:
    """Class index 0..25 of the first letter of ``text`` (leading spaces ignored, case-insensitive)."""
    return LETTERS.index(text.strip()[0].lower())


def split_words(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Stratified train/test split: ``round(test_fraction * n_l)`` random words of each letter go to test.

    Args:
        labels: ``(N,)`` class indices.
        test_fraction: in [0, 1).
        seed: numpy seed.

    Returns:
        ``(N,)`` bool, True for test words.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(idx)))
        is_test[rng.permutation(idx)[:n_test]] = True
    return is_test


# ------------------------------------------------------------------------------------------------------------
# LM activations at the word token
# ------------------------------------------------------------------------------------------------------------
def icl_prefix(lm: LoadedLM, examples: Sequence[str]) -> list[int]:
    """Token ids ``[prefix_id] + "\\n" + lines + "\\n"`` that precede the word token.

    Each line is ``TEMPLATE.format(word=w) + " " + W`` (``" cat has the first letter: C"``); lines are joined
    by newlines and a newline is prepended, as SAEBench ``prompting.py::create_icl_prompt`` does.
    """
    lines = [TEMPLATE.format(word=w) + " " + w.strip()[0].upper() for w in examples]
    text = "\n" + "".join(line + "\n" for line in lines)
    return [lm.prefix_id] + list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def _forward_to_hook(lm: LoadedLM, hook: HookPoint, input_ids: torch.Tensor, past_key_values=None) -> torch.Tensor:
    """Run the body up to the hooked module (later blocks never run) and return its output ``(B, T, d)``."""
    return capture(lm.model, hook, input_ids, past_key_values=past_key_values)


@torch.no_grad()
def word_activations(
    lm: LoadedLM,
    hook: HookPoint,
    groups: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    kv_cache: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Activations at the word token of ``prefix + word`` for groups of words sharing one prefix.

    Args:
        lm: the model.
        hook: the hook point.
        groups: ``[(prefix_ids, word_token_ids)]``; each word is one token appended to the group's prefix.
        kv_cache: run the prefix once (stopping at the hook, so only the hooked layers' keys/values exist),
            repeat its cache over the group and run the word tokens as a batch of one-token continuations;
            ``False`` runs the full ``(G, len(prefix) + 1)`` prompts (same values up to float rounding).
        progress: show a progress bar over groups.

    Returns:
        ``(sum of group sizes, d_model)`` float32 activations, in group order.
    """
    from transformers.cache_utils import DynamicCache

    device = lm.model.device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(w) for _, w in groups), unit="word", desc="absorption LM", dynamic_ncols=True)
    chunks = []
    for prefix, words in groups:
        if len(words) == 0:
            continue
        w = torch.tensor(list(words), dtype=torch.long, device=device)[:, None]
        if kv_cache:
            cache = DynamicCache()
            _forward_to_hook(lm, hook, torch.tensor([list(prefix)], device=device), cache)
            cache.batch_repeat_interleave(len(words))
            h = _forward_to_hook(lm, hook, w, cache)[:, -1]
        else:
            ids = torch.cat([torch.tensor(list(prefix), device=device).expand(len(words), -1), w], dim=1)
            h = _forward_to_hook(lm, hook, ids)[:, -1]
        chunks.append(h.float().cpu())
        if bar is not None:
            bar.update(len(words))
    if bar is not None:
        bar.close()
    return torch.cat(chunks) if chunks else torch.zeros(0, lm.d_model, device="cpu")


def build_groups(
    lm: LoadedLM,
    token_ids: np.ndarray,
    texts: Sequence[str],
    is_test: np.ndarray,
    *,
    n_icl: int,
    batch_size: int,
    seed: int,
) -> tuple[np.ndarray, list[tuple[list[int], list[int]]]]:
    """Shuffle the words into batches and give each batch its ICL prefix.

    The ``n_icl`` examples of a batch are drawn without replacement from the training words not in the batch,
    so no test word ever appears in a prompt other than its own.

    Returns:
        (order ``(N,)``: word index of each output row, ``[(prefix_ids, word_token_ids)]`` per batch).
    """
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(len(token_ids))
    train_pool = np.flatnonzero(~is_test)
    groups = []
    for s in range(0, len(order), batch_size):
        members = order[s : s + batch_size]
        own = set(members.tolist())
        examples: list[int] = []
        if n_icl > 0 and len(train_pool):
            cand = rng.choice(train_pool, size=min(len(train_pool), n_icl + len(members)), replace=False)
            examples = [int(i) for i in cand if int(i) not in own][:n_icl]
        groups.append((icl_prefix(lm, [texts[i] for i in examples]), token_ids[members].tolist()))
    return order, groups


# ------------------------------------------------------------------------------------------------------------
# probes
# ------------------------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor | sp.csr_matrix, idx: np.ndarray) -> torch.Tensor:
    """Rows ``idx`` of a dense tensor, or of a CSR matrix as a sparse COO tensor."""
    if isinstance(x, torch.Tensor):
        return x[torch.from_numpy(idx)]
    sub = x[idx]
    sub.sort_indices()
    sub = sub.tocoo()  # from a CSR with sorted columns: row-major order, no duplicates, i.e. already coalesced
    indices = torch.from_numpy(np.vstack([sub.row, sub.col]).astype(np.int64))
    return torch.sparse_coo_tensor(indices, torch.from_numpy(sub.data.astype(np.float32)), sub.shape,
                                   check_invariants=False, is_coalesced=True)


def train_ovr_probe(
    x: torch.Tensor | sp.csr_matrix,
    y: np.ndarray,
    n_classes: int = 26,
    *,
    epochs: int = 50,
    batch_size: int = 4096,
    lr: float = 1e-2,
    end_lr: float = 1e-5,
    weight_decay: float = 1e-6,
    l1: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic-regression probes trained jointly (SAEBench ``probing.py::train_multi_probe``).

    Loss: ``BCEWithLogits(pos_weight = #neg/#pos per class)`` of the ``(n, n_classes)`` one-hot targets, plus
    ``l1 * mean_c sum_j |W_cj|`` (``k_sparse_probing.py::train_sparse_multi_probe``); Adam with weight decay;
    the learning rate decays exponentially from ``lr`` to ``end_lr`` over the epochs. The weights start at
    zero (SAEBench: ``nn.Linear``'s random init; the problem is convex, and a zero start keeps an
    under-trained L1 probe from ranking latents by their random initial weights). Deterministic given ``seed``
    (batch order).

    Args:
        x: ``(n, d)`` dense float tensor, or a ``scipy.sparse.csr_matrix`` (SAE codes; batches are multiplied
            as sparse tensors).
        y: ``(n,)`` int class indices in ``[0, n_classes)``.
        n_classes: number of probes.
        epochs, batch_size, lr, end_lr, weight_decay, l1: training settings.
        seed: batch order.

    Returns:
        ``(W (n_classes, d), b (n_classes,))`` on ``x``'s device (the CPU for a CSR matrix); class c's logit is
        ``x @ W[c] + b[c]``.
    """
    n, d = x.shape
    dev = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    W = torch.zeros(n_classes, d, requires_grad=True, device=dev)
    b = torch.zeros(n_classes, requires_grad=True, device=dev)
    y_t = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(dev)
    onehot = F.one_hot(y_t, n_classes).float()
    pos = onehot.sum(0)
    pos_weight = torch.where(pos > 0, (n - pos) / pos.clamp_min(1), torch.ones_like(pos))
    opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=exp(log(end_lr / lr) / max(epochs, 1)))
    sparse = not isinstance(x, torch.Tensor)
    if not sparse:
        x = x.float()
    rng = np.random.default_rng(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = rng.permutation(n)
            if not sparse:  # one gather per epoch; the batches are then views
                p_t = torch.from_numpy(perm).to(dev)
                xp, yp = x[p_t], onehot[p_t]
            for s in range(0, n, batch_size):
                if sparse:
                    idx = perm[s : s + batch_size]
                    xb, yb = _rows(x, idx), onehot[torch.from_numpy(idx)]
                    logits = torch.sparse.mm(xb, W.t()) + b
                else:
                    xb, yb = xp[s : s + batch_size], yp[s : s + batch_size]
                    logits = torch.addmm(b, xb, W.t())
                loss = F.binary_cross_entropy_with_logits(logits, yb, pos_weight=pos_weight)
                if l1:
                    loss = loss + l1 * W.abs().sum(-1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    return W.detach(), b.detach()


def probe_logits(x: torch.Tensor | sp.csr_matrix, W: torch.Tensor, b: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``(n, n_classes)`` logits ``x @ W.T + b`` for dense or CSR ``x``."""
    out = []
    for s in range(0, x.shape[0], chunk):
        idx = np.arange(s, min(s + chunk, x.shape[0]))
        xb = _rows(x, idx)
        out.append((torch.sparse.mm(xb, W.t()) if xb.is_sparse else xb.float() @ W.t()) + b)
    return torch.cat(out) if out else torch.zeros(0, W.shape[0], device=W.device)


def per_class_f1(logits: torch.Tensor, y: np.ndarray) -> list[float]:
    """Test F1 of each one-vs-rest probe (prediction = logit > 0); 0 for a class absent from ``y`` and never
    predicted."""
    from sklearn.metrics import f1_score

    pred = (logits > 0).cpu().numpy()
    return [float(f1_score(y == c, pred[:, c], zero_division=0.0)) for c in range(logits.shape[1])]


def rank_latents(weights: torch.Tensor, k_max: int) -> list[int]:
    """Latents with the ``k_max`` largest *positive* weights of one letter's L1 probe, best first.

    Args:
        weights: ``(d_sae,)`` one row of the L1 multi-probe.
        k_max: at most this many.

    Returns:
        Latent indices (fewer than ``k_max`` if fewer weights are positive).
    """
    top = torch.topk(weights, min(k_max, weights.numel()))
    return [int(i) for i, v in zip(top.indices, top.values) if v > 0]


def k_sparse_f1(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k_max: int, *, max_iter: int = 500
) -> list[float]:
    """Test F1 of k-sparse probes on the first k columns, k = 1..k_max (SAEBench ``train_k_sparse_probes``).

    Each probe is ``sklearn LogisticRegression(max_iter=500, class_weight="balanced")``; prediction = logit > 0.

    Args:
        train_x: ``(n_train, >= k_max)`` activations of the ranked latents (column 0 = best).
        train_y, test_y: bool targets (the word starts with the letter).
        test_x: ``(n_test, >= k_max)``.
        k_max: largest k; columns beyond ``train_x.shape[1]`` do not exist and end the list early.

    Returns:
        ``[F1_1, ..., F1_K]`` with ``K = min(k_max, n_columns)``; NaN for a k whose training set has one class.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    out = []
    for k in range(1, min(k_max, train_x.shape[1]) + 1):
        if len(np.unique(train_y)) < 2:
            out.append(float("nan"))
            continue
        clf = LogisticRegression(max_iter=max_iter, class_weight="balanced").fit(train_x[:, :k], train_y)
        pred = clf.decision_function(test_x[:, :k]) > 0
        out.append(float(f1_score(test_y, pred, zero_division=0.0)))
    return out


def split_features(f1_by_k: Sequence[float], jump: float = 0.03) -> int:
    """Number of split features by SAEBench's F1-jump rule (``add_feature_splits_to_metrics_df``).

    ``prev = -100``; for k = 1, 2, ...: if ``F1_k > prev + jump`` then ``prev = F1_k`` and the split features
    are the top-k latents, otherwise stop at the first k that does not improve by more than ``jump``.
    A NaN F1 stops the scan.

    Args:
        f1_by_k: F1 of the k-sparse probe for k = 1..K.
        jump: the F1-jump threshold (0.03).

    Returns:
        The number of split features (>= 1 whenever ``F1_1`` is a number; 0 for an empty list).

    Example:
        >>> split_features([0.5, 0.6, 0.61, 0.9])
        2
    """
    prev, n = -100.0, 0
    for k, f1 in enumerate(f1_by_k, start=1):
        if f1 > prev + jump:
            prev, n = f1, k
        else:
            break
    return n


# ------------------------------------------------------------------------------------------------------------
# absorption
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def absorption_scores(
    acts: torch.Tensor,
    codes: torch.Tensor,
    probe_dir: torch.Tensor,
    W_dec: torch.Tensor,
    main_latents: Sequence[int],
    *,
    fraction_cos: float = 0.1,
    full_cos: float = 0.025,
    max_absorbing: int = 3,
    ratio: float = 0.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorption fraction and full absorption of each word (SAEBench ``feature_absorption_calculator.py``).

    With ``p = probe_dir / ||probe_dir||``, ``P = x . p`` (raw activation, not centred), ``c_j = cos(p, d_j)``
    over decoder rows and ``proj_j = f_j c_j``:

    * ``M = sum_{j in main} proj_j``; absorbers ``A = {j not in main: c_j >= fraction_cos, proj_j > 0}``;
      ``T`` = sum of the ``max_absorbing`` largest ``proj_j`` in A.
      fraction = 0 if ``M >= P`` or ``T / P < ratio``; else 1 if ``M <= 0``; else ``a = min(T, P - M)`` and
      ``clip(a / (a + M), 0, 1)``.
    * full absorption = every main latent has ``f < 1e-8`` and the latent with the largest ``proj_j`` (over
      *all* latents) has ``c >= full_cos`` and ``P >= 0`` and ``proj_top / P >= ratio``.

    ``P <= 0`` makes ``T / P`` non-positive (or undefined), so such a word is never absorbed (SAEBench would
    divide by zero at exactly ``P = 0``).

    Args:
        acts: ``(n, d_in)`` LM activations of the words.
        codes: ``(n, d_sae)`` their SAE codes.
        probe_dir: ``(d_in,)`` the letter's ground-truth probe weights (any norm).
        W_dec: ``(d_sae, d_in)`` decoder.
        main_latents: the letter's split features (may be empty).
        fraction_cos, full_cos, max_absorbing, ratio: SAEBench's thresholds 0.1, 0.025, 3, 0.4.

    Returns:
        ``(fraction (n,) float in [0, 1], full (n,) bool)``.
    """
    acts, codes = acts.float(), codes.float()
    p = probe_dir.float() / probe_dir.float().norm()
    c = F.cosine_similarity(W_dec.float(), p[None, :], dim=-1)  # (d_sae,)
    P = acts @ p  # (n,)
    proj = codes * c  # (n, d_sae)
    main = torch.zeros(codes.shape[1], dtype=torch.bool, device=codes.device)
    main[list(main_latents)] = True
    M = proj[:, main].sum(-1)
    cand = torch.where((~main & (c >= fraction_cos))[None, :] & (proj > 0), proj, torch.zeros_like(proj))
    T = cand.topk(min(max_absorbing, cand.shape[1]), dim=-1).values.sum(-1)
    P_safe = torch.where(P > 0, P, torch.ones_like(P))
    weak = (P <= 0) | (T / P_safe < ratio)
    a = torch.minimum(T, P - M)
    partial = (a / (a + M)).clamp(0, 1)
    frac = torch.where((M >= P) | weak, torch.zeros_like(P), torch.where(M <= 0, torch.ones_like(P), partial))
    frac = torch.nan_to_num(frac, nan=0.0)
    silent = (codes[:, main] < _EPS).all(-1)
    top_val, top_idx = proj.max(dim=-1)
    full = silent & (c[top_idx] >= full_cos) & (P > 0) & (top_val / P_safe >= ratio)
    return frac, full


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(statistics.mean(values)), (float(statistics.stdev(values)) if len(values) > 1 else None)


# ------------------------------------------------------------------------------------------------------------
# the suite
# ------------------------------------------------------------------------------------------------------------
def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def _cached(
    store: LMActivationStore | None, name: str, spec: dict, compute: Callable[[], dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], bool]:
    """``store.get`` that also says whether it was a hit (``store=None``: always compute)."""
    called = []

    def wrapped():
        called.append(True)
        return compute()

    out = store.get(name, spec, wrapped) if store is not None else wrapped()
    return out, not called


def _encode_csr(sae: SAE, acts: torch.Tensor, batch: int) -> sp.csr_matrix:
    """Effective SAE codes ``(n, d_sae)`` (:meth:`SAE.effective_codes`) as a float32 CSR matrix, ``batch`` rows at a time.

    Both the k-sparse probes and the absorption projections ``proj_j = f_j cos(p, d_j)`` read a code as latent j's
    contribution along its unit decoder direction, so the codes are those for which ``x_hat - b_dec = sum_j f_j d_hat_j``
    holds exactly (for norm-restoring encoders the raw codes are cosines, far smaller than their contributions)."""
    import scipy.sparse as sp

    parts = []
    with torch.no_grad():
        for s in range(0, acts.shape[0], batch):
            f = sae.effective_codes(acts[s : s + batch].to(sae.device, sae.dtype)).float().cpu().numpy()
            parts.append(sp.csr_matrix(f))
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, sae.cfg.d_sae), dtype=np.float32)


def ground_truth_probe(
    acts: torch.Tensor, labels: np.ndarray, is_test: np.ndarray, cfg: AbsorptionConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train the 26 one-vs-rest ground-truth probes on the training words (:func:`train_ovr_probe`).

    Args:
        acts: ``(N, d_in)`` LM activations at the word token.
        labels: ``(N,)`` first-letter classes.
        is_test: ``(N,)`` held-out mask.
        cfg: ``probe_epochs``, ``probe_batch_size``, ``probe_weight_decay``, ``seed``.

    Returns:
        ``(W (26, d_in), b (26,))``.
    """
    tr = np.flatnonzero(~is_test)
    return train_ovr_probe(acts[tr], labels[tr], epochs=cfg.probe_epochs, batch_size=cfg.probe_batch_size,
                           weight_decay=cfg.probe_weight_decay, seed=cfg.seed)


def score_sae(
    sae: SAE,
    acts: torch.Tensor,
    labels: np.ndarray,
    is_test: np.ndarray,
    W_probe: torch.Tensor,
    b_probe: torch.Tensor,
    cfg: AbsorptionConfig,
    res: AbsorptionResult,
) -> AbsorptionResult:
    """The SAE-dependent stages (sae_encode, sparse_probe, absorption) on given activations and probe.

    Fills ``res.probe_f1_by_letter``, the qualifying letters and, when at least ``cfg.min_letters`` qualify,
    ``res.per_letter`` and the mean/std scores (else ``res.status = "too_few_letters"``). Needs no LM, so it
    can be tested on constructed activations and SAEs.

    Args:
        sae: the SAE (``encode`` on raw activations, ``W_dec (d_sae, d_in)``).
        acts: ``(N, d_in)`` activations at the word token.
        labels: ``(N,)`` first-letter classes 0..25.
        is_test: ``(N,)`` held-out mask (probes are fitted on the rest).
        W_probe, b_probe: ground-truth probes ``(26, d_in)``, ``(26,)``.
        cfg: thresholds and probe settings.
        res: the result to fill (its ``timed`` records the stages).

    Returns:
        ``res``.
    """
    tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    test_logits = probe_logits(acts[te], W_probe, b_probe)
    f1s = per_class_f1(test_logits, labels[te])
    res.probe_f1_by_letter = {LETTERS[c]: f1s[c] for c in range(26)}
    qualifying = [c for c in range(26) if f1s[c] > cfg.min_probe_f1]
    res.letters_qualifying = [LETTERS[c] for c in qualifying]
    res.n_letters_qualifying = len(qualifying)
    if res.n_letters_qualifying < max(cfg.min_letters, 1):
        res.status = "too_few_letters"
        return res
    res.status = "ok"
    sae.eval()
    with res.timed("sae_encode"):
        codes = _encode_csr(sae, acts, cfg.encode_batch_size)
        codes_tr, codes_te = codes[tr], codes[te]

    with res.timed("sparse_probe"):
        W1, _ = train_ovr_probe(codes_tr, labels[tr], epochs=cfg.sparse_probe_epochs,
                                batch_size=cfg.sparse_probe_batch_size, weight_decay=1e-6, l1=cfg.sparse_probe_l1,
                                seed=cfg.seed)
        rows: dict[int, dict[str, Any]] = {}
        letters: Any = qualifying
        if cfg.progress:
            from tqdm.auto import tqdm

            letters = tqdm(qualifying, desc="k-sparse probes", dynamic_ncols=True)
        for c in letters:
            ranked = rank_latents(W1[c], cfg.k_max)
            f1_k = k_sparse_f1(codes_tr[:, ranked].toarray(), labels[tr] == c, codes_te[:, ranked].toarray(),
                               labels[te] == c, cfg.k_max) if ranked else []
            n_split = split_features(f1_k, cfg.f1_jump)
            rows[c] = {"letter": LETTERS[c], "probe_f1": f1s[c], "n_test": int((labels[te] == c).sum()),
                       "num_split_features": n_split, "split_latents": ranked[:n_split], "sparse_probe_f1": f1_k}

    with res.timed("absorption"):
        W_dec = sae.W_dec.detach().float().cpu()
        for c in qualifying:
            tp = te[(labels[te] == c) & (test_logits[:, c] > 0).numpy()]
            row = rows[c]
            row["n_probe_true_positives"] = len(tp)
            if len(tp) == 0:  # cannot happen for F1 > 0; kept finite instead of SAEBench's 0/0
                row.update(absorption_fraction=0.0, full_absorption_rate=0.0, num_full_absorption=0)
                continue
            frac, full = absorption_scores(
                acts[tp], torch.from_numpy(codes[tp].toarray()), W_probe[c], W_dec, row["split_latents"],
                fraction_cos=cfg.fraction_cos, full_cos=cfg.full_cos, max_absorbing=cfg.max_absorbing_latents,
                ratio=cfg.projection_ratio)
            row.update(absorption_fraction=float(frac.mean()), full_absorption_rate=float(full.float().mean()),
                       num_full_absorption=int(full.sum()))
    res.per_letter = [rows[c] for c in qualifying]
    res.mean_absorption_fraction_score, res.std_dev_absorption_fraction_score = _mean_std(
        [r["absorption_fraction"] for r in res.per_letter])
    res.mean_full_absorption_score, res.std_dev_full_absorption_score = _mean_std(
        [r["full_absorption_rate"] for r in res.per_letter])
    res.mean_num_split_features, res.std_dev_num_split_features = _mean_std(
        [float(r["num_split_features"]) for r in res.per_letter])
    return res


def first_letter_dataset(tokenizer, cfg: AbsorptionConfig) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """The words of the task: ``cfg.n_words`` random alphabetic tokens (all if 0), their labels and split.

    Returns:
        ``(token_ids (N,), texts, labels (N,), is_test (N,))``, words sorted by token id.

    Raises:
        ValueError: the tokenizer has no such words.
    """
    vocab = alpha_vocab(tokenizer, min_chars=cfg.min_word_chars)
    if not vocab:
        raise ValueError("the tokenizer has no purely alphabetic single-token words")
    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.permutation(len(vocab))[: cfg.n_words] if cfg.n_words > 0 else np.arange(len(vocab)))
    token_ids = np.array([vocab[i][0] for i in pick], dtype=np.int64)
    texts = [vocab[i][1] for i in pick]
    labels = np.array([first_letter_label(t) for t in texts], dtype=np.int64)
    return token_ids, texts, labels, split_words(labels, cfg.test_fraction, cfg.seed)


@torch.no_grad()
def run_absorption(
    sae: SAE, lm: LoadedLM, cfg: AbsorptionConfig, store: LMActivationStore | None = None
) -> AbsorptionResult:
    """Run the first-letter absorption / splitting evaluation of ``sae`` (see the module docstring).

    Args:
        sae: the SAE, on raw activations of ``sae.cfg.hook_name``.
        lm: the model it was trained on.
        cfg: settings.
        store: cache of LM activations; ``None`` creates the default one for (model, hook). With
            ``cfg.lm_cache=False`` no cache is read or written.

    Returns:
        :class:`AbsorptionResult`; ``timings_s`` has the stages vocab, lm_activations, gt_probe, decoder_cos
        and (when enough letters qualify) sae_encode, sparse_probe, absorption.

    Raises:
        ValueError: the SAE's ``d_in`` differs from the model's width, or the vocabulary is empty.
        RuntimeError: a cache entry does not match the word list.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    res = AbsorptionResult(suite="absorption", sae=str(cfg.sae), n_icl_examples=cfg.n_icl_examples)
    hook = resolve_hook(lm.model, sae.cfg.hook_name)
    res.hook_name = hook.hook_name
    if lm.d_model != sae.cfg.d_in:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} but hook {hook.hook_name} has width {lm.d_model}")
    if not cfg.lm_cache:
        store = None
    elif store is None:
        store = LMActivationStore(lm.name, hook.hook_name)

    with res.timed("vocab"):
        token_ids, texts, labels, is_test = first_letter_dataset(lm.tokenizer, cfg)
    res.n_words, res.n_test = len(token_ids), int(is_test.sum())
    res.n_train = res.n_words - res.n_test
    spec = {"task": "first_letter", "version": _CACHE_VERSION, "words": _digest(token_ids), "split": _digest(is_test),
            "n_icl": cfg.n_icl_examples, "batch_size": cfg.batch_size, "seed": cfg.seed, "template": TEMPLATE}

    def compute_acts() -> dict[str, torch.Tensor]:
        order, groups = build_groups(lm, token_ids, texts, is_test, n_icl=cfg.n_icl_examples,
                                     batch_size=cfg.batch_size, seed=cfg.seed)
        h = word_activations(lm, hook, groups, kv_cache=cfg.kv_cache, progress=cfg.progress)
        acts = torch.empty_like(h)
        acts[torch.from_numpy(order)] = h
        return {"acts": acts, "token_ids": torch.from_numpy(token_ids), "labels": torch.from_numpy(labels),
                "is_test": torch.from_numpy(is_test.astype(np.uint8))}

    with res.timed("lm_activations"):
        got, res.lm_cache_hit = _cached(store, "absorption_first_letter", spec, compute_acts)
        acts = got["acts"].float()
        if not torch.equal(got["token_ids"], torch.from_numpy(token_ids)):
            raise RuntimeError("cached absorption activations do not match the word list; delete the cache entry")

    with res.timed("gt_probe"):
        pspec = {**spec, "probe": "ovr_bce_adam", "epochs": cfg.probe_epochs, "batch": cfg.probe_batch_size,
                 "wd": cfg.probe_weight_decay}

        def compute_probe() -> dict[str, torch.Tensor]:
            W, b = ground_truth_probe(acts, labels, is_test, cfg)
            return {"W": W, "b": b}

        probe, res.probe_cache_hit = _cached(store, "absorption_probe", pspec, compute_probe)

    with res.timed("decoder_cos"):
        res.average_max_decoder_cosine_sim = average_max_decoder_cosine_sim(sae.W_dec.detach())
    return score_sae(sae, acts, labels, is_test, probe["W"], probe["b"], cfg, res)


EVAL_SUITES.register("absorption")(Suite(
    AbsorptionConfig, run_absorption,
    help="first-letter feature absorption (fraction, full) and feature splitting (k-sparse probing), SAEBench-style",
))
