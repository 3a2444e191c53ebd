"""First-letter absorption / splitting suite: each rule on constructed data with known answers, the vocabulary on the
bundled tokenizer, the KV-cache shortcut, and one end-to-end run on the real bundled model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saelab.evals.absorption import (
    LETTERS,
    AbsorptionConfig,
    AbsorptionResult,
    absorption_scores,
    alpha_vocab,
    build_groups,
    first_letter_label,
    ground_truth_probe,
    k_sparse_f1,
    rank_latents,
    run_absorption,
    score_sae,
    split_features,
    split_words,
    word_activations,
)
from saelab.evals.base import EVAL_SUITES, LMActivationStore
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE


# ---------------------------------------------------------------------------------------------------------------
# split-feature rule
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "f1s, expected",
    [
        ([0.5, 0.6, 0.61, 0.9], 2),  # 0.61 is not > 0.6 + 0.03: stop at k=3 even though k=4 jumps
        ([0.8], 1),
        ([0.0, 0.0], 1),  # k=1 is always taken (prev starts at -100)
        ([0.5, 0.52, 0.9], 1),  # +0.02 is not a jump
        ([0.5, 0.54, 0.58, 0.62, 0.66], 5),  # +0.04 each time
        ([0.9, 0.5, 0.95], 1),  # a drop stops the scan
        ([], 0),
        ([float("nan"), 0.9], 0),
    ],
)
def test_split_features_rule(f1s, expected):
    assert split_features(f1s, 0.03) == expected


def test_split_features_threshold_is_a_parameter():
    assert split_features([0.5, 0.6, 0.61, 0.9], jump=0.005) == 4
    assert split_features([0.5, 0.6], jump=0.2) == 1
    assert split_features([0.5, 0.75], jump=0.25) == 1  # strictly greater: an improvement of exactly `jump` stops


def test_rank_latents_keeps_positive_weights_only():
    w = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.1, -0.2])
    assert rank_latents(w, 10) == [2, 0, 4]
    assert rank_latents(w, 2) == [2, 0]


def test_k_sparse_f1_on_separable_and_useless_columns():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.3
    informative = y.astype(float) + 0.05 * rng.standard_normal(400)
    noise = rng.standard_normal((400, 2))
    x = np.column_stack([noise[:, 0], informative, noise[:, 1]])
    f1 = k_sparse_f1(x[:300], y[:300], x[300:], y[300:], k_max=5)
    assert len(f1) == 3  # only 3 columns exist
    assert f1[0] < 0.7  # a noise column alone
    assert f1[1] == pytest.approx(1.0) and f1[2] == pytest.approx(1.0)
    assert split_features(f1) == 2


# ---------------------------------------------------------------------------------------------------------------
# absorption of single words, by hand
# ---------------------------------------------------------------------------------------------------------------
D = 8


def _unit(*pairs: tuple[int, float]) -> torch.Tensor:
    v = torch.zeros(D)
    for i, a in pairs:
        v[i] = a
    return v / v.norm()


def _decoder(*rows: torch.Tensor) -> torch.Tensor:
    return torch.stack(rows)


def _score(x, f, W_dec, main, **kw):
    probe = torch.zeros(D)
    probe[0] = 3.0  # any norm: the direction is e0
    frac, full = absorption_scores(x[None], f[None], probe, W_dec, main, **kw)
    return float(frac[0]), bool(full[0])


# latent 0 = main (e0, cos 1); latent 1 = absorber (cos 1/sqrt2); latent 2 = unrelated (e1, cos 0)
W3 = _decoder(_unit((0, 1)), _unit((0, 1), (1, 1)), _unit((1, 1)))
X = 2.0 * _unit((0, 1)) + 1.0 * _unit((1, 1))  # P = x . e0 = 2


def test_clean_main_latent_gives_no_absorption():
    f = torch.tensor([2.0, 0.0, 1.0])  # main carries P = 2 entirely
    assert _score(X, f, W3, [0]) == (0.0, False)


def test_planted_absorber_gives_full_absorption():
    f = torch.tensor([0.0, 2.0 * math.sqrt(2), 0.0])  # main silent; proj_1 = 2 = P
    assert _score(X, f, W3, [0]) == (1.0, True)


def test_partial_absorption_fraction_by_hand():
    # M = 0.5, T = proj_1 = 1.0, P = 2: a = min(1.0, 1.5) = 1.0, fraction = 1 / (1 + 0.5) = 2/3
    f = torch.tensor([0.5, math.sqrt(2), 0.0])
    frac, full = _score(X, f, W3, [0])
    assert frac == pytest.approx(2 / 3, abs=1e-6) and not full  # the main latent fires: never full
    # M = 1, T = 1: a = min(1, 1) = 1 -> 1/2
    f = torch.tensor([1.0, math.sqrt(2), 0.0])
    assert _score(X, f, W3, [0])[0] == pytest.approx(0.5, abs=1e-6)
    # T larger than what is missing: M = 1.5, T = 2 -> a = min(2, 0.5) = 0.5 -> 0.5 / 2 = 0.25
    f = torch.tensor([1.5, 2.0 * math.sqrt(2), 0.0])
    assert _score(X, f, W3, [0])[0] == pytest.approx(0.25, abs=1e-6)


def test_weak_absorber_below_the_projection_ratio():
    f = torch.tensor([0.0, 0.6 * math.sqrt(2), 0.0])  # proj_1 / P = 0.3 < 0.4
    assert _score(X, f, W3, [0]) == (0.0, False)
    assert _score(X, f, W3, [0], ratio=0.25) == (1.0, True)


def test_only_the_top3_absorbers_count():
    # four absorbers with cos 1/sqrt2 and projection 0.25 each: top-3 sum 0.75 -> 0.375 < 0.4 -> 0
    W = _decoder(_unit((0, 1)), *[_unit((0, 1), (i, 1)) for i in (1, 2, 3, 4)])
    f = torch.tensor([0.0] + [0.25 * math.sqrt(2)] * 4)
    assert _score(X, f, W, [0])[0] == 0.0
    assert _score(X, f, W, [0], max_absorbing=4)[0] == 1.0  # 1.0 / 2 = 0.5 >= 0.4


def test_cosine_thresholds_differ_between_fraction_and_full():
    # an absorber with cos 0.05: below 0.1 (not in A, fraction 0) but above 0.025 (full absorption)
    c = 0.05
    W = _decoder(_unit((0, 1)), _unit((0, c), (2, math.sqrt(1 - c * c))))
    f = torch.tensor([0.0, 1.0 / c])  # proj = 1.0 = P / 2
    assert _score(X, f, W, [0]) == (0.0, True)
    # cos 0.02 < 0.025: no full absorption either
    c = 0.02
    W = _decoder(_unit((0, 1)), _unit((0, c), (2, math.sqrt(1 - c * c))))
    assert _score(X, torch.tensor([0.0, 1.0 / c]), W, [0]) == (0.0, False)


def test_negative_probe_projection_is_never_absorption():
    x = -2.0 * _unit((0, 1))
    f = torch.tensor([0.0, 2.0 * math.sqrt(2), 0.0])
    assert _score(x, f, W3, [0]) == (0.0, False)


def test_several_main_latents_and_split_sum():
    # main = {0, 1}: M = 1 (latent 0) + 1 (latent 1) = 2 = P -> 0 even though latent 1 is aligned with the probe
    f = torch.tensor([1.0, math.sqrt(2), 0.0])
    assert _score(X, f, W3, [0, 1]) == (0.0, False)
    # both main latents silent, latent 2 is orthogonal to the probe: nothing absorbs
    f = torch.tensor([0.0, 0.0, 5.0])
    assert _score(X, f, W3, [0, 1]) == (0.0, False)


def test_absorption_scores_vectorised_over_words():
    xs = torch.stack([X, X, X])
    fs = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0 * math.sqrt(2), 0.0], [0.5, math.sqrt(2), 0.0]])
    probe = torch.zeros(D)
    probe[0] = 1.0
    frac, full = absorption_scores(xs, fs, probe, W3, [0])
    assert torch.allclose(frac, torch.tensor([0.0, 1.0, 2 / 3]), atol=1e-6)
    assert full.tolist() == [False, True, False]


# ---------------------------------------------------------------------------------------------------------------
# the SAE stages on constructed activations and a constructed SAE
# ---------------------------------------------------------------------------------------------------------------
def _planted_task(n_per_letter: int = 30, seed: int = 0):
    """Activations x = 4 e_letter + noise in 32 dims; dim 30 marks the test words of 'e', dim 31 half of the 'd' words.

    SAE (ReLU, linear encoder, b_dec = 0), 28 latents:
      * latent j < 26 reads e_j (decoder e_j), except that latent 'e' is switched off by the marker dim 30 and
        latent 'd' by the marker dim 31;
      * latent 26 fires (4) only on marked 'e' words, decoder e_e: a planted absorber of 'e' on the test words;
      * latent 27 fires on marked 'd' words, decoder e_d: 'd' is split over latents 3 and 27.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(26), n_per_letter)
    n = len(labels)
    is_test = split_words(labels, 0.2, seed)
    x = torch.zeros(n, 32)
    x[torch.arange(n), torch.from_numpy(labels)] = 4.0
    x[:, :26] += 0.1 * torch.from_numpy(rng.standard_normal((n, 26))).float()
    e, d = LETTERS.index("e"), LETTERS.index("d")
    marked_e = (labels == e) & is_test
    marked_d = (labels == d) & (np.arange(n) % 2 == 0)
    x[torch.from_numpy(marked_e), 30] = 1.0
    x[torch.from_numpy(marked_d), 31] = 1.0
    sae = SAE(SAEConfig(d_in=32, d_sae=28, activation="relu", hook_name="blocks.0.hook_resid_post"))
    with torch.no_grad():
        W_enc = torch.zeros(32, 28)
        W_enc[torch.arange(26), torch.arange(26)] = 1.0
        W_enc[30, e] = -100.0
        W_enc[31, d] = -100.0
        W_enc[30, 26] = 4.0
        W_enc[31, 27] = 4.0
        W_enc[d, 27] = 0.0
        W_dec = torch.zeros(28, 32)
        W_dec[torch.arange(26), torch.arange(26)] = 1.0
        W_dec[26, e] = 1.0
        W_dec[27, d] = 1.0
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return x, labels, is_test, sae


def test_score_sae_on_planted_absorption_and_splitting():
    x, labels, is_test, sae = _planted_task()
    cfg = AbsorptionConfig(k_max=4, progress=False, probe_batch_size=64, sparse_probe_batch_size=256)
    W, b = ground_truth_probe(x, labels, is_test, cfg)
    res = score_sae(sae, x, labels, is_test, W, b, cfg, AbsorptionResult())
    assert res.status == "ok"
    assert res.n_letters_qualifying == 26 and res.letters_qualifying == list(LETTERS)
    rows = {r["letter"]: r for r in res.per_letter}
    # 'e': on every probe-detected test word the main latent is silent and latent 26 carries the projection
    assert rows["e"]["split_latents"] == [LETTERS.index("e")]
    assert rows["e"]["n_probe_true_positives"] == rows["e"]["n_test"] == 6
    assert rows["e"]["full_absorption_rate"] == 1.0 and rows["e"]["absorption_fraction"] == pytest.approx(1.0)
    # 'd': two latents share the words; top-1 F1 ~ 2/3, top-2 F1 = 1 -> 2 split features and no absorption
    assert sorted(rows["d"]["split_latents"]) == [LETTERS.index("d"), 27]
    assert rows["d"]["num_split_features"] == 2
    assert rows["d"]["sparse_probe_f1"][1] == pytest.approx(1.0)
    assert rows["d"]["absorption_fraction"] == 0.0 and rows["d"]["full_absorption_rate"] == 0.0
    for letter in LETTERS:
        if letter in "de":
            continue
        assert rows[letter]["num_split_features"] == 1, letter
        assert rows[letter]["absorption_fraction"] == 0.0 and rows[letter]["full_absorption_rate"] == 0.0, letter
    assert res.mean_full_absorption_score == pytest.approx(1 / 26)
    assert res.mean_absorption_fraction_score == pytest.approx(1 / 26)
    assert res.mean_num_split_features == pytest.approx(27 / 26)
    assert set(res.timings_s) >= {"sae_encode", "sparse_probe", "absorption"}


def test_score_sae_reports_too_few_letters_instead_of_aborting():
    x, labels, is_test, sae = _planted_task(n_per_letter=10)
    cfg = AbsorptionConfig(min_letters=27, progress=False, probe_batch_size=64)
    W, b = ground_truth_probe(x, labels, is_test, cfg)
    res = score_sae(sae, x, labels, is_test, W, b, cfg, AbsorptionResult())
    assert res.status == "too_few_letters" and res.n_letters_qualifying == 26
    assert res.mean_absorption_fraction_score is None and res.per_letter == []
    # the probe gate itself: an impossible F1 threshold leaves no letter
    strict = AbsorptionConfig(min_probe_f1=1.0, progress=False)
    res = score_sae(sae, x, labels, is_test, W, b, strict, AbsorptionResult())
    assert res.n_letters_qualifying == 0 and res.status == "too_few_letters"


def test_split_words_is_stratified_and_seeded():
    labels = np.repeat(np.arange(26), [10] * 25 + [3])
    is_test = split_words(labels, 0.2, seed=1)
    assert all(is_test[labels == c].sum() == 2 for c in range(25))
    assert is_test[labels == 25].sum() == 1  # round(0.6)
    assert np.array_equal(is_test, split_words(labels, 0.2, seed=1))
    assert not np.array_equal(is_test, split_words(labels, 0.2, seed=2))
    with pytest.raises(ValueError):
        split_words(labels, 1.0, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# vocabulary, prompts and LM activations
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def test_alpha_vocab_on_bundled_tokenizer(tokenizer):
    vocab = alpha_vocab(tokenizer, min_chars=2)
    texts = {t for _, t in vocab}
    ids = dict((t, i) for i, t in vocab)
    assert 30_000 < len(vocab) < 33_000  # ~31.5k purely alphabetic single-token words with a leading space
    for t in texts:
        assert t[0] == " " and t[1] != " " and len(t) >= 3
        assert t[1:].isascii() and t[1:].isalpha()
        assert "Ġ" not in t
    assert {" the", " and", " cat", " first", " letter"} <= texts
    assert tokenizer.decode([ids[" the"]]) == " the"
    assert tokenizer(" letter", add_special_tokens=False)["input_ids"] == [ids[" letter"]]
    # single letters only with min_chars=1; no-space tokens only with leading_space=False
    one = {t for _, t in alpha_vocab(tokenizer, min_chars=1)}
    assert " a" in one and " a" not in texts and len(one) - len(texts) == 52
    both = {t for _, t in alpha_vocab(tokenizer, min_chars=2, leading_space=False)}
    assert "the" in both and "the" not in texts and texts < both
    # digits, punctuation, spaces and non-ASCII letters never pass, whatever the options
    all_texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    rejected = [t for t in all_texts if t.strip() and (any(ch.isdigit() for ch in t) or "'" in t or "-" in t or
                                                       (t.strip().isalpha() and not t.strip().isascii()))]
    assert len(rejected) > 100
    assert not set(rejected) & both


def test_first_letter_label():
    assert first_letter_label(" Zebra") == 25 and first_letter_label(" apple") == 0 and first_letter_label("cat") == 2


def test_kv_cache_shortcut_matches_full_prompts(tiny_llama_dir):
    from saelab.models.hooks import resolve_hook
    from saelab.models.lm import load_lm

    lm = load_lm(str(tiny_llama_dir))
    vocab = alpha_vocab(lm.tokenizer, min_chars=2)[:50]
    ids = np.array([i for i, _ in vocab])
    texts = [t for _, t in vocab]
    is_test = np.zeros(len(ids), dtype=bool)
    is_test[::5] = True
    order, groups = build_groups(lm, ids, texts, is_test, n_icl=4, batch_size=16, seed=0)
    assert sorted(order.tolist()) == list(range(50)) and [len(w) for _, w in groups] == [16, 16, 16, 2]
    for prefix, words in groups:
        text = lm.tokenizer.decode(prefix)
        assert prefix[0] == lm.prefix_id and text.endswith(" has the first letter: " + text.split()[-1] + "\n")
        assert text.count(" has the first letter: ") == 4
        examples = {line.split(" has the first letter:")[0] for line in text.split("\n")[1:-1]}
        test_words = {texts[i] for i in np.flatnonzero(is_test)}
        assert not examples & test_words  # ICL examples are training words only
        assert not examples & {lm.tokenizer.decode([w]) for w in words}  # and never the batch's own words
    hook = resolve_hook(lm.model, "blocks.1.hook_resid_post")
    fast = word_activations(lm, hook, groups, kv_cache=True)
    slow = word_activations(lm, hook, groups, kv_cache=False)
    assert fast.shape == (50, 32)
    assert torch.allclose(fast, slow, atol=1e-5)
    # the suffix " has the first letter:" after the word cannot change the word-token activation (causal model)
    prefix, words = groups[0]
    suffix = lm.tokenizer(" has the first letter:", add_special_tokens=False)["input_ids"]
    from saelab.models.hooks import capture

    full = capture(lm.model, hook, torch.tensor([prefix + [words[0]] + suffix]))
    assert torch.allclose(full[0, len(prefix)], fast[0], atol=1e-5)
    assert len(suffix) == 5  # SAEBench reads position -6


def test_suite_is_registered():
    suite = EVAL_SUITES.get("absorption")
    assert suite.config_cls is AbsorptionConfig and suite.run is run_absorption


# ---------------------------------------------------------------------------------------------------------------
# end to end on the real bundled model
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_absorption_end_to_end_and_cache(smollm, tmp_path):
    sae = SAE(SAEConfig(d_in=576, d_sae=1152, activation="topk", k=16, hook_name="blocks.4.hook_resid_post"))
    cfg = AbsorptionConfig(sae="random", n_words=600, batch_size=64, probe_batch_size=256, min_probe_f1=0.3,
                           k_max=3, progress=False)
    store = LMActivationStore(smollm.name, "blocks.4.hook_resid_post", root=tmp_path)
    res = run_absorption(sae, smollm, cfg, store)
    assert res.status == "ok" and not res.lm_cache_hit and not res.probe_cache_hit
    assert res.n_words == 600 and res.n_train + res.n_test == 600 and 100 < res.n_test < 140
    assert res.n_letters_qualifying >= 1 and len(res.per_letter) == res.n_letters_qualifying
    for v in (res.mean_absorption_fraction_score, res.mean_full_absorption_score, res.mean_num_split_features,
              res.average_max_decoder_cosine_sim):
        assert v is not None and math.isfinite(v)
    assert 0 <= res.mean_absorption_fraction_score <= 1 and 0 <= res.mean_full_absorption_score <= 1
    assert 1 <= res.mean_num_split_features <= 3
    assert all(math.isfinite(f) for f in res.probe_f1_by_letter.values()) and len(res.probe_f1_by_letter) == 26
    d = json.loads(json.dumps(res.to_dict()))
    assert d["suite"] == "absorption" and d["per_letter"][0]["letter"] in LETTERS
    stages = {"vocab", "lm_activations", "gt_probe", "sae_encode", "sparse_probe", "absorption", "decoder_cos"}
    assert stages <= set(res.timings_s)
    # a second SAE reuses the cached LM activations and probe: same probe gate, no LM forward
    sae2 = SAE(SAEConfig(d_in=576, d_sae=1152, activation="topk", k=16, hook_name="blocks.4.hook_resid_post"))
    res2 = run_absorption(sae2, smollm, cfg, store)
    assert res2.lm_cache_hit and res2.probe_cache_hit
    assert res2.probe_f1_by_letter == res.probe_f1_by_letter
    assert res2.timings_s["lm_activations"] < 0.5 * res.timings_s["lm_activations"]
    # lm_cache=False recomputes (same numbers up to float rounding)
    res3 = run_absorption(sae, smollm, AbsorptionConfig(**{**cfg.__dict__, "lm_cache": False}), store)
    assert not res3.lm_cache_hit and res3.letters_qualifying == res.letters_qualifying


# ---------------------------------------------------------------------------------------------------------------
# every encoder: a fully absorbed word scores absorption 1 (codes read as decoder contributions)
# ---------------------------------------------------------------------------------------------------------------
def _fully_absorbed_sae(encoder: str, x: torch.Tensor, e: int) -> SAE:
    """A ReLU SAE with unit encoder columns whose scores are inner products for every encoder (cosine laws at
    a = 1, b = 0: ``e^b ||x_c||^a cos = x_c . w_hat``; magnitude_bypass scores cosines and restores the norm).

    Latent j < 26 reads and writes e_j, except latent ``e``, which reads ``e_e - 2 e_30`` (silent when dim 30 is on);
    latent 26 reads e_30 and writes ``(e_e + e_30) / sqrt(2)``: it absorbs letter ``e`` on the marked words.
    """
    sae = SAE(SAEConfig(d_in=32, d_sae=27, activation="relu", encoder=encoder, n_groups=3,
                        hook_name="blocks.0.hook_resid_post"))
    W_enc = torch.zeros(32, 27)
    W_enc[torch.arange(26), torch.arange(26)] = 1.0
    W_enc[30, e] = -2.0
    W_enc[30, 26] = 1.0
    W_dec = torch.zeros(27, 32)
    W_dec[torch.arange(26), torch.arange(26)] = 1.0
    W_dec[26, e] = W_dec[26, 30] = 2**-0.5
    with torch.no_grad():
        sae.W_enc.copy_(W_enc / W_enc.norm(dim=0, keepdim=True))
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        for name, p in sae.encoder.named_parameters():  # a (or a_base) = 1, delta = 0, b = 0: inner-product scores
            p.fill_(1.0 if name in ("a", "a_base") else 0.0)
    return sae


@pytest.mark.parametrize("encoder", ["linear", "cosine_global", "cosine_per_feature", "cosine_base_delta",
                                     "cosine_grouped", "magnitude_bypass"])
def test_fully_absorbed_word_scores_one_for_every_encoder(encoder):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(26), 30)
    n = len(labels)
    is_test = split_words(labels, 0.2, 0)
    e = LETTERS.index("e")
    x = torch.zeros(n, 32)
    x[torch.arange(n), torch.from_numpy(labels)] = 4.0
    x[:, :26] += 0.1 * torch.from_numpy(rng.standard_normal((n, 26))).float()
    x[torch.from_numpy((labels == e) & is_test), 30] = 4.0  # the held-out 'e' words: main latent silent, 26 fires
    sae = _fully_absorbed_sae(encoder, x, e)
    with torch.no_grad():  # the identity the metric relies on: x_hat - b_dec = sum_j f_eff_j d_hat_j
        f_eff = sae.effective_codes(x)
        d_hat = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(f_eff @ d_hat, sae(x) - sae.b_dec, rtol=1e-5, atol=1e-5)
    cfg = AbsorptionConfig(k_max=4, progress=False, probe_batch_size=64, sparse_probe_batch_size=256)
    W, b = ground_truth_probe(x, labels, is_test, cfg)
    res = score_sae(sae, x, labels, is_test, W, b, cfg, AbsorptionResult())
    rows = {r["letter"]: r for r in res.per_letter}
    assert rows["e"]["split_latents"] == [e]
    assert rows["e"]["absorption_fraction"] == pytest.approx(1.0)
    assert rows["e"]["full_absorption_rate"] == 1.0
    assert res.mean_full_absorption_score == pytest.approx(1 / 26)


def test_magnitude_bypass_raw_codes_understate_contributions():
    """Without effective codes the norm-restoring encoder's absorption collapses (the bug the effective codes fix):
    its raw codes are cosines, ||x_c|| / ||r|| times smaller than the contributions the projections assume."""
    e = LETTERS.index("e")
    x = torch.zeros(4, 32)
    x[:, e] = 4.0
    x[:, 30] = 4.0
    sae = _fully_absorbed_sae("magnitude_bypass", x, e)
    with torch.no_grad():
        raw, eff = sae.encode(x), sae.effective_codes(x)
    assert raw[:, 26] == pytest.approx(2**-0.5, rel=1e-5)  # cos(x, e_30)
    assert eff[:, 26] == pytest.approx(32**0.5, rel=1e-5)  # ||x||: the whole reconstruction is along d_26
