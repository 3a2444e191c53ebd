"""Sparse probing and OOD probing: metrics on constructed data with known answers, task builders, pooling, and
one end-to-end run on the real bundled model (tiny budget, layer 4, random SAE)."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from saelab.evals import probing as P
from saelab.evals import tasks as T


# -- constructed features ------------------------------------------------------------------------------------------

def _planted(n: int, d: int, planted: dict[int, float], seed: int, noise: float = 1.0):
    """Labels y (balanced) and features X ~ |N(0, noise)| with X[:, j] += w * y for each planted (j, w)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    X = np.abs(rng.normal(0, noise, (n, d)))
    for j, w in planted.items():
        X[:, j] += w * y
    return X, y


def test_perfect_one_latent_gives_top1_accuracy_one():
    rng = np.random.default_rng(0)
    y_tr, y_te = rng.permutation(np.arange(200) % 2), rng.permutation(np.arange(100) % 2)
    # latents are noisy and uninformative except latent 37, which equals the label exactly
    X_tr, X_te = rng.random((200, 64)), rng.random((100, 64))
    X_tr[:, 37], X_te[:, 37] = y_tr, y_te
    acc, idx = P.top_k_probe_accuracy(X_tr, y_tr, X_te, y_te, k=1)
    assert idx.tolist() == [37]
    assert acc == 1.0
    # without the planted latent, the top-1 probe is near chance
    X_tr[:, 37], X_te[:, 37] = rng.random(200), rng.random(100)
    acc0, _ = P.top_k_probe_accuracy(X_tr, y_tr, X_te, y_te, k=1)
    assert acc0 < 0.7


def test_top_k_selection_picks_planted_latents_in_order():
    X, y = _planted(400, 50, {7: 9.0, 3: 6.0, 41: 3.0}, seed=1, noise=0.5)
    rank = P.rank_by_mean_difference(X, y)
    assert rank[:3].tolist() == [7, 3, 41]
    # |mean_pos - mean_neg|: a feature lower on positives ranks as high as one higher on positives
    X[:, 20] -= 12.0 * y
    assert P.rank_by_mean_difference(X, y)[0] == 20
    with pytest.raises(ValueError):
        P.rank_by_mean_difference(X, np.ones(len(y)))


def test_sparse_probe_task_metrics_and_full_probes():
    X_sae, y = _planted(300, 40, {5: 4.0, 9: 4.0}, seed=2)
    X_lm, _ = _planted(300, 16, {}, seed=3)  # LM features carry no signal
    tr, te = slice(0, 200), slice(200, 300)
    m = P.sparse_probe_task(X_sae[tr], X_sae[te], X_lm[tr], X_lm[te], y[tr], y[te], (1, 2, 5))
    assert set(m["top_latents"][:2]) == {5, 9}
    assert m["sae_top_2_test_accuracy"] >= m["sae_top_1_test_accuracy"] - 0.02
    assert m["sae_top_2_test_accuracy"] > 0.95
    assert m["sae_test_accuracy"] > 0.9
    assert 0.3 < m["llm_test_accuracy"] < 0.7 and 0.3 < m["llm_top_1_test_accuracy"] < 0.7
    none = P.sparse_probe_task(X_sae[tr], X_sae[te], X_lm[tr], X_lm[te], y[tr], y[te], (1,), full_probes=False)
    assert none["sae_test_accuracy"] is None and none["llm_test_accuracy"] is None


def test_lm_probes_are_fitted_once_per_task_across_saes(monkeypatch):
    """The LM-feature probes do not depend on the SAE: a second SAE on the same task reuses them (same numbers),
    while different LM features or settings are fitted anew."""
    P._LM_PROBE_MEMO.clear()
    X_sae, y = _planted(300, 40, {5: 4.0}, seed=2)
    X_sae2 = X_sae[:, [9 if j == 5 else 5 if j == 9 else j for j in range(40)]]  # the signal moves to latent 9
    X_lm, _ = _planted(300, 16, {2: 2.0}, seed=3)
    tr, te = slice(0, 200), slice(200, 300)
    fits = []
    real = P.full_probe_accuracy
    monkeypatch.setattr(P, "full_probe_accuracy", lambda Xa, *a, **k: fits.append(Xa.shape[1]) or real(Xa, *a, **k))
    a = P.sparse_probe_task(X_sae[tr], X_sae[te], X_lm[tr], X_lm[te], y[tr], y[te], (1, 2))
    b = P.sparse_probe_task(X_sae2[tr], X_sae2[te], X_lm[tr], X_lm[te], y[tr], y[te], (1, 2))
    assert fits == [16, 40, 40]  # LM, SAE, SAE: the LM probe is not refitted for the second SAE
    assert {k: v for k, v in a.items() if k.startswith("llm")} == {k: v for k, v in b.items() if k.startswith("llm")}
    assert a["top_latents"][0] == 5 and b["top_latents"][0] == 9
    P._LM_PROBE_MEMO.clear()
    fresh = P.sparse_probe_task(X_sae2[tr], X_sae2[te], X_lm[tr], X_lm[te], y[tr], y[te], (1, 2))
    assert fresh == b  # a memoised result equals a recomputed one
    P.sparse_probe_task(X_sae[tr], X_sae[te], X_lm[tr] + 1.0, X_lm[te], y[tr], y[te], (1, 2))
    assert fits[-2:] == [16, 40]  # other LM features: fitted again


def test_ood_oracle_is_memoised_but_equal_to_a_fresh_fit():
    P._LM_PROBE_MEMO.clear()
    (lm, sae, y), tests = _ood_data(shared=False)
    first = P.ood_probe_aucs(lm, sae, y, tests, k=1, cv=True)
    assert len(P._LM_PROBE_MEMO) == 1
    again = P.ood_probe_aucs(lm, sae * 2.0, y, tests, k=1, cv=True)
    assert len(P._LM_PROBE_MEMO) == 1 and again["ood"]["oracle_auc"] == first["ood"]["oracle_auc"]
    P._LM_PROBE_MEMO.clear()
    assert P.ood_probe_aucs(lm, sae, y, tests, k=1, cv=True) == first


def test_auc_known_values():
    assert P.auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert P.auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert P.auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # pairs (pos, neg): (0.4 vs 0.1 ok), (0.4 vs 0.6 wrong), (0.9 vs 0.1 ok), (0.9 vs 0.6 ok) -> 3/4
    assert P.auc([0, 1, 0, 1], [0.1, 0.4, 0.6, 0.9]) == 0.75
    with pytest.raises(ValueError):
        P.auc([1, 1, 1], [0.1, 0.2, 0.3])


def _ood_data(shared: bool, seed: int = 0):
    """LM features: dim 0 = label + noise everywhere (the oracle transfers). SAE latent 0 tracks the label in
    distribution; if ``shared`` it does OOD too, else OOD the label moves to latent 1, which is silent in
    distribution (so it is never selected), and latent 0 becomes random."""
    rng = np.random.default_rng(seed)

    def split(n: int, ood: bool):
        y = rng.permutation(np.arange(n) % 2)
        lm = rng.normal(0, 1, (n, 8))
        lm[:, 0] += 4.0 * y
        sae = np.abs(rng.normal(0, 0.3, (n, 20)))
        sae[:, 1] = 0.0
        if ood and not shared:
            sae[:, 0] = rng.random(n) * 3
            sae[:, 1] = 3.0 * y
        else:
            sae[:, 0] += 3.0 * y
        return lm, sae, y

    tr = split(400, False)
    tests = {"id": split(200, False), "ood": split(200, True)}
    return tr, tests


@pytest.mark.parametrize("cv", [True, False])
def test_ood_gap_positive_when_sae_feature_does_not_transfer(cv):
    (lm, sae, y), tests = _ood_data(shared=False)
    out = P.ood_probe_aucs(lm, sae, y, tests, k=1, cv=cv)
    assert out["id"]["oracle_auc"] > 0.97 and out["id"]["sae_auc"] > 0.97
    assert abs(out["id"]["gap"]) < 0.03
    assert out["ood"]["oracle_auc"] > 0.97
    assert out["ood"]["gap"] > 0.3
    assert out["ood"]["gap"] == pytest.approx(out["ood"]["oracle_auc"] - out["ood"]["sae_auc"])
    assert out["_probe"]["k"] == 1 and out["ood"]["n"] == 200


def test_ood_gap_zero_for_a_perfect_shared_feature():
    (lm, sae, y), tests = _ood_data(shared=True)
    out = P.ood_probe_aucs(lm, sae, y, tests, k=128)  # k is capped at d_sae = 20
    assert out["_probe"]["k"] == 20
    for split in ("id", "ood"):
        assert out[split]["sae_auc"] > 0.97
        assert abs(out[split]["gap"]) < 0.03


def test_select_C_prefers_strong_regularisation_for_pure_noise_features():
    rng = np.random.default_rng(0)
    y = rng.permutation(np.arange(300) % 2)
    X = rng.normal(0, 1, (300, 100))
    X[:, 0] += 0.8 * y  # one weak real feature among 99 noise ones
    C = P.select_C(X, y, "l1", solver="liblinear")
    assert C in P.CS_SAE_PROBES and C < 10.0


# -- task builders ---------------------------------------------------------------------------------------------------

def test_even_allocation():
    rng = random.Random(0)
    assert sum(T.even_allocation(10, [100, 100, 100, 100], rng)) == 10
    c = T.even_allocation(10, [100, 100, 100, 100], rng)
    assert sorted(c) == [2, 2, 3, 3]
    c = T.even_allocation(12, [1, 100, 100], rng)  # a short class gives all it has, the rest is split evenly
    assert c[0] == 1 and sorted(c[1:]) == [5, 6]
    assert T.even_allocation(50, [3, 4], rng) == [3, 4]


def _fake_dataset(monkeypatch, counts: dict[str, int], positive=None):
    pairs = [(f"{c} text number {i}", c) for c, n in counts.items() for i in range(n)]
    pairs += [("duplicate", "a"), ("duplicate", "a"), ("ambiguous", "a"), ("ambiguous", "b"), ("   ", "a")]
    spec = T.DatasetSpec("fake", lambda: pairs, tuple(counts), tuple(positive) if positive else None)
    monkeypatch.setitem(T.PROBE_DATASETS._items, "fake", spec)


def test_build_probing_dataset_balanced_disjoint_deterministic(monkeypatch):
    _fake_dataset(monkeypatch, {"a": 500, "b": 500, "c": 500, "d": 500, "e": 500})
    ds = T.build_probing_dataset("fake", n_train_per_class=40, n_test_per_class=20, seed=3)
    assert Counter(ds.classes) == {c: 60 for c in "abcde"}
    assert "ambiguous" not in ds.texts and "" not in ds.texts and len(set(ds.texts)) == len(ds.texts)
    assert [t.positive_class for t in ds.tasks] == list("abcde")
    for task in ds.tasks:
        assert task.name == f"fake/{task.positive_class}"
        for texts, labels, index, test in ((task.train_texts, task.train_labels, task.train_index, False),
                                           (task.test_texts, task.test_labels, task.test_index, True)):
            n_pos = 40 if not test else 20
            assert len(texts) == len(labels) == 2 * n_pos and labels.sum() == n_pos
            assert [ds.texts[i] for i in index] == list(texts)
            assert all(ds.is_test[i] == test for i in index)
            cls = [ds.classes[i] for i, y in zip(index, labels)]
            assert all((c == task.positive_class) == bool(y) for c, y in zip(cls, labels))
            neg = Counter(c for c, y in zip(cls, labels) if not y)
            assert set(neg) == set("abcde") - {task.positive_class} and max(neg.values()) - min(neg.values()) == 0
        assert not set(task.train_texts) & set(task.test_texts)
    again = T.build_probing_dataset("fake", n_train_per_class=40, n_test_per_class=20, seed=3)
    assert again.texts == ds.texts
    assert all((a.train_index == b.train_index).all() for a, b in zip(again.tasks, ds.tasks))
    other = T.build_probing_dataset("fake", n_train_per_class=40, n_test_per_class=20, seed=4)
    assert other.texts != ds.texts


def test_build_probing_dataset_uneven_negatives_and_short_classes(monkeypatch):
    _fake_dataset(monkeypatch, {"a": 100, "b": 100, "c": 100, "d": 12}, positive=["a", "d"])
    ds = T.build_probing_dataset("fake", n_train_per_class=30, n_test_per_class=10, seed=0)
    assert [t.positive_class for t in ds.tasks] == ["a", "d"]
    assert Counter(ds.classes)["d"] == 12  # short class: 9 train + 3 test
    a = ds.tasks[0]
    neg = Counter(ds.classes[i] for i, y in zip(a.train_index, a.train_labels) if not y)
    assert sum(neg.values()) == 30 and neg["d"] == 9 and abs(neg["b"] - neg["c"]) <= 1  # d is exhausted
    d = ds.tasks[1]
    assert d.n_train == 18 and d.train_labels.sum() == 9


def test_gcide_and_quote_text_cleaning():
    from saelab.data.corpora import Document

    meta = {"word": "substruct", "pos": "v. t."}
    doc = Document("substruct (v. t.): To build beneath something.", "gcide", "g/1", "v.t.", meta)
    assert T.gcide_text_without_pos(doc) == "substruct: To build beneath something."
    quote = "Ron Burgundy: Stay classy.\nARTHUR:  Ni!\nThis is it: no"
    assert T.strip_speakers(quote) == "Stay classy.\nNi!\nThis is it: no"


def test_ood_tasks_registered_and_disjoint():
    assert {"sentiment", "part_of_speech"} <= set(T.OOD_TASKS.names())
    task = T.build_ood_task("sentiment", n_train_per_class=20, n_id_test_per_class=10, n_ood_per_class=10, seed=0)
    domains = {"vader_movie_reviews", "vader_amazon_reviews", "vader_nyt_editorials", "vader_tweets"}
    assert set(task.ood_splits) == domains
    train = set(task.texts_of("train"))
    for split, (idx, y) in task.splits.items():
        assert y.sum() * 2 == len(y)
        if split != "train":
            assert not train & set(task.texts_of(split))
    assert len(task.splits["train"][1]) == 40 and len(task.splits["vader_nyt_editorials"][1]) == 20


# -- pooling ----------------------------------------------------------------------------------------------------------

def test_valid_mask_and_masked_mean_match_a_manual_loop():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[0, 5, 6, 7, 8], [0, 9, 2, 4, 1], [0, 3, 1, 1, 1]])  # 1 = pad, 2 = special
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    h = torch.randn(3, 5, 4, generator=g)
    h[:, 0] += 1000.0  # a huge position-0 sink must not leak into the mean
    mask = P.valid_token_mask(ids, attn, {0, 2})
    assert mask.tolist() == [[False, True, True, True, True],
                             [False, True, False, True, False],
                             [False, True, False, False, False]]
    pooled = P.masked_mean(h, mask)
    for b in range(3):
        keep = [t for t in range(5) if t > 0 and attn[b, t] == 1 and int(ids[b, t]) not in (0, 2)]
        manual = sum(h[b, t] for t in keep) / len(keep)
        assert torch.allclose(pooled[b], manual, atol=1e-6)
    assert torch.equal(P.masked_mean(h, torch.zeros(3, 5, dtype=torch.bool)), torch.zeros(3, 4))
    # the flat (valid tokens + offsets) layout gives the same means
    flat = h[mask]
    offsets = torch.tensor([0, 4, 6, 7])
    assert torch.allclose(P.segment_mean(flat, offsets), pooled, atol=1e-6)


def test_pooled_sae_features_is_mean_of_codes_not_code_of_mean():
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE

    sae = SAE(SAEConfig(d_in=8, d_sae=32, activation="topk", k=2))
    acts = torch.randn(10, 8) * 3
    offsets = torch.tensor([0, 3, 3, 10])  # the middle text has no valid token
    feats = P.pooled_sae_features(sae, acts, offsets, chunk_tokens=4)  # chunks straddle text boundaries
    with torch.no_grad():
        expect0 = sae.encode(acts[:3]).mean(0)
        expect2 = sae.encode(acts[3:]).mean(0)
        code_of_mean = sae.encode(acts[3:].mean(0, keepdim=True))[0]
    assert torch.allclose(feats[0], expect0, atol=1e-5) and torch.allclose(feats[2], expect2, atol=1e-5)
    assert torch.equal(feats[1], torch.zeros(32))
    assert (feats[2] > 0).sum() > 2 and not torch.allclose(feats[2], code_of_mean)


def test_length_batches_respect_token_budget():
    lengths = [5, 128, 30, 30, 2, 77, 128, 9]
    batches = P._length_batches(lengths, batch_tokens=200)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 200 or len(b) == 1


# -- end to end on the real model ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_suites_end_to_end_on_bundled_model(smollm, tmp_path, monkeypatch):
    from saelab.evals.base import EVAL_SUITES, LMActivationStore
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE

    hook = "blocks.4.hook_resid_post"
    sae = SAE(SAEConfig(d_in=smollm.d_model, d_sae=256, activation="topk", k=16, hook_name=hook))
    store = LMActivationStore(smollm.name, hook, root=tmp_path / "acts")
    calls = []
    real = P.collect_token_activations
    monkeypatch.setattr(P, "collect_token_activations", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    sp_cfg = P.SparseProbingConfig(sae="random", datasets=["tweet_sentiment", "bible_testament"], n_train_per_class=16,
                                   n_test_per_class=8, progress=False)
    ood_cfg = P.OODProbingConfig(sae="random", tasks=["sentiment"], n_train_per_class=16, n_id_test_per_class=6,
                                 n_ood_per_class=6, k=32, progress=False)
    assert EVAL_SUITES.get("sparse_probing").config_cls is P.SparseProbingConfig
    sp = EVAL_SUITES.get("sparse_probing").run(sae, smollm, sp_cfg, store)
    ood = EVAL_SUITES.get("ood_probing").run(sae, smollm, ood_cfg, store)
    assert len(calls) == 3  # one LM pass per dataset / task
    for k in (1, 2, 5):
        assert 0.0 <= sp.sae_top_k_test_accuracy[k] <= 1.0
    assert sp.llm_test_accuracy > 0.6  # bible testament and tweet sentiment are easy for a linear LM probe
    assert [r["task"] for r in sp.per_task] == ["tweet_sentiment/positive", "bible_testament/NT"]
    assert set(ood.per_task["sentiment"]) == {"id", "vader_movie_reviews", "vader_amazon_reviews",
                                              "vader_nyt_editorials", "vader_tweets", "_probe"}
    assert ood.ood_gap == pytest.approx(ood.oracle_ood_auc - ood.sae_ood_auc)
    for res in (sp, ood):
        assert {"tasks", "lm_activations", "sae_encode", "probes"} <= set(res.timings_s)
        d = json.loads((res.save(tmp_path / f"{res.suite}.json")).read_text())
        assert d["suite"] == res.suite and d["timings_s"]
    saved = json.loads((tmp_path / "sparse_probing.json").read_text())
    assert saved["sae_top_k_test_accuracy"]["1"] == sp.sae_top_k_test_accuracy[1]

    # second run: LM activations come from the cache, results are identical
    sp2 = P.run_sparse_probing(sae, smollm, sp_cfg, store)
    ood2 = P.run_ood_probing(sae, smollm, ood_cfg, store)
    assert len(calls) == 3
    assert sp2.per_task == sp.per_task and ood2.per_task == ood.per_task

    # padding does not change a text's features: a text alone vs in a padded batch of longer texts
    texts = ["Short one.", "A considerably longer sentence that forces padding of the short one in its batch."]
    from saelab.models.hooks import resolve_hook

    hp = resolve_hook(smollm.model, hook)
    toks = P.tokenize_texts(smollm, texts, 128)
    both = P.collect_token_activations(smollm, hp, toks)
    alone = P.collect_token_activations(smollm, hp, toks[:1])
    a = P.segment_mean(both["acts"], both["offsets"])[0]
    b = P.segment_mean(alone["acts"], alone["offsets"])[0]
    assert torch.allclose(a, b, rtol=1e-2, atol=1e-2 * float(b.abs().max()))
    assert int(both["offsets"][1]) == len(toks[0]) - 1  # every token but the prefix is valid


def test_norm_outliers_are_left_out_of_both_poolings():
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE

    g = torch.Generator().manual_seed(1)
    acts = torch.randn(12, 8, generator=g)
    acts[4] *= 1000.0  # an attention-sink-like token inside text 1
    offsets = torch.tensor([0, 3, 8, 12])
    keep = P.norm_outlier_keep(acts, 10.0)
    assert keep.tolist() == [i != 4 for i in range(12)]
    assert P.norm_outlier_keep(acts, 0).all()
    lm = P.segment_mean(acts, offsets, keep)
    assert torch.allclose(lm[1], acts[[3, 5, 6, 7]].mean(0), atol=1e-6)
    assert torch.allclose(lm[0], acts[:3].mean(0), atol=1e-6)
    sae = SAE(SAEConfig(d_in=8, d_sae=16, activation="topk", k=3))
    f = P.pooled_sae_features(sae, acts, offsets, chunk_tokens=5, keep=keep)
    with torch.no_grad():
        assert torch.allclose(f[1], sae.encode(acts[[3, 5, 6, 7]]).mean(0), atol=1e-5)


def test_registered_datasets_and_defaults():
    expected = {"bbc_topic", "tweet_sentiment", "vader_sentiment", "wordnet_supersense", "gcide_pos",
                "bible_testament", "quote_source", "seinfeld_laugh"}
    assert set(T.PROBE_DATASETS.names()) == expected
    assert set(T.default_datasets()) == expected - {"seinfeld_laugh"}
    assert P.SparseProbingConfig().datasets == T.default_datasets()
