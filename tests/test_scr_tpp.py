"""SCR and TPP (SAEBench ``scr_and_tpp``): mechanism tests on synthetic arrays with known answers, ablation parity
against explicit per-token zero-ablation (linear and norm-restoring decoders), the SCR quadrant builder, and one
small end-to-end run of each suite on the tiny random Llama."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from saelab.evals import scr_tpp as M
from saelab.evals.base import EvalResult


def _orthonormal_atoms(d_sae: int, d_in: int, seed: int) -> np.ndarray:
    """``(d_sae, d_in)`` orthonormal rows (d_sae <= d_in)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d_in, d_sae)))
    return q.T.copy()


def _features(F: np.ndarray, W_dec: np.ndarray, seed: int, noise: float = 0.05) -> M._Features:
    """Pooled features of a linear SAE whose pooled codes are ``F``: ``X = F @ W_dec + noise`` (the error term)."""
    X = F @ W_dec + np.random.default_rng(seed).normal(0, noise, (F.shape[0], W_dec.shape[1]))
    empty = torch.zeros(0)
    return M._Features(X, F, W_dec, True, empty, empty, empty)


# -- pure core ---------------------------------------------------------------------------------------------------

def test_latent_effects_rules_and_selection():
    F = np.array([[2.0, 0.0, 1.0, 0.5], [2.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 0.5], [0.0, 1.0, 1.0, 0.5]])
    y = np.array([1, 1, 0, 0])
    W_dec = np.eye(4, 3)  # rows: e0, e1, e2, 0
    w = np.array([1.0, 3.0, 5.0])
    # Δ = (2, -1, 0, 0); g = W_dec @ w = (1, 3, 5, 0)
    assert np.allclose(M.latent_effects(F, y, w, W_dec, "abs"), [2.0, 3.0, 0.0, 0.0])
    assert np.allclose(M.latent_effects(F, y, w, W_dec, "positive"), [2.0, 0.0, 0.0, 0.0])
    e = M.latent_effects(F, y, w, W_dec, "abs")
    assert M.select_top_latents(e, 1).tolist() == [1]
    assert M.select_top_latents(e, 10).tolist() == [1, 0]  # capped at the 2 non-zero effects
    with pytest.raises(ValueError, match="rule"):
        M.latent_effects(F, y, w, W_dec, "signed")
    with pytest.raises(ValueError, match="both classes"):
        M.latent_effects(F, np.ones(4), w, W_dec, "abs")


def test_fit_probe_folds_standardisation_into_raw_weights():
    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (200, 5)) * np.array([1, 100, 0.01, 5, 1]) + 30
    y = (X[:, 1] - 30 + 50 * rng.normal(size=200) > 0).astype(int)
    p = M.fit_probe(X, y)
    from sklearn.linear_model import LogisticRegression

    mu, sd = X.mean(0), X.std(0)
    ref = LogisticRegression(max_iter=5000).fit((X - mu) / sd, y)
    assert np.allclose(X @ p.w + p.b, ref.decision_function((X - mu) / sd), atol=1e-6)
    assert p.accuracy(X, y) == pytest.approx(ref.score((X - mu) / sd, y))


def test_scr_scores_normalisation_direction_and_guard():
    acc = {"S_on_P": 0.6, "S_on_G": 0.9, "P": 0.95, "G": 0.97}
    s = M.scr_pair_scores(acc, {2: 0.81, 10: 0.95}, {2: 0.9, 10: 0.8})
    assert s["direction"] == 1  # the biased probe does worse on P: it relies on column 2, which dir1 removes
    assert s["scr_dir1_threshold_2"] == pytest.approx(0.21 / 0.35)
    assert s["scr_dir1_threshold_10"] == pytest.approx(1.0)
    assert s["scr_dir2_threshold_10"] == pytest.approx(-0.1 / 0.07)  # not clipped
    assert s["scr_metric_threshold_2"] == s["scr_dir1_threshold_2"]
    flipped = M.scr_pair_scores({"S_on_P": 0.9, "S_on_G": 0.6, "P": 0.9, "G": 0.95}, {2: 0.99}, {2: 0.7})
    assert flipped["direction"] == 2
    assert flipped["scr_dir1_threshold_2"] == 0.0  # denominator 0 < 0.001
    assert flipped["scr_metric_threshold_2"] == pytest.approx(0.1 / 0.35)
    tie = M.scr_pair_scores({"S_on_P": 0.8, "S_on_G": 0.8, "P": 0.9, "G": 0.9}, {2: 0.85}, {2: 0.85})
    assert tie["direction"] is None and "scr_metric_threshold_2" not in tie


def test_tpp_scores_indexing():
    clean = np.array([0.9, 0.8, 0.7])
    ablated = np.array([[0.5, 0.8, 0.6],   # ablating class 0 hurts probe 0 by 0.4, probe 2 by 0.1
                        [0.9, 0.8, 0.7],
                        [0.9, 0.6, 0.3]])
    s = M.tpp_scores(clean, ablated)
    assert np.allclose(s["intended"], [0.4, 0.0, 0.4])
    assert np.allclose(s["unintended"], [0.05, 0.0, 0.1])
    assert np.allclose(s["total"], s["intended"] - s["unintended"])
    with pytest.raises(ValueError):
        M.tpp_scores(clean, ablated[:2])


# -- mechanism: planted latents -------------------------------------------------------------------------------------

def _scr_synthetic(q: int = 150, seed: int = 0):
    """A two-attribute pool whose column-1 attribute (a) lives in latents 0 (a = 1) and 3 (a = 0) and column-2
    attribute (b) in latents 1 (b = 1) and 2 (b = 0); b is the stronger signal, so a probe trained where a == b
    relies mostly on b."""
    rng = np.random.default_rng(seed)
    d_sae, d_in = 24, 32
    W_dec = _orthonormal_atoms(d_sae, d_in, seed)
    cells, attrs, start = {}, [], 0
    for a_name, a in (("A", 1), ("a", 0)):
        for b_name, b in (("B", 1), ("b", 0)):
            n = 2 * (q + q)
            attrs += [(a, b)] * n
            idx = np.arange(start, start + n)
            cells[(a_name, b_name)] = {"train": idx[: 2 * q], "test": idx[2 * q:]}
            start += n
    ab = np.array(attrs, dtype=float)
    F = np.abs(rng.normal(0, 0.3, (len(ab), d_sae)))
    # each attribute has one latent per value (as "male" and "female" latents): a weak and noisy, b strong
    F[:, 0] += 0.8 * ab[:, 0] + rng.normal(0, 0.3, len(ab))
    F[:, 3] += 0.8 * (1 - ab[:, 0]) + rng.normal(0, 0.3, len(ab))
    F[:, 1] += 3.0 * ab[:, 1]
    F[:, 2] += 3.0 * (1 - ab[:, 1])
    ds = M.ScrDataset("synthetic", tuple(str(i) for i in range(len(ab))), cells, (("A", "a"),), ("B", "b"))
    return ds, _features(F, W_dec, seed + 1)


def test_scr_planted_spurious_latent_is_found_and_its_ablation_raises_scr():
    ds, feats = _scr_synthetic()
    res = M.ScrResult()
    cfg = M.ScrConfig(seed=0, n_values=[1, 2, 5])
    row = M._scr_pair(res, None, feats, ds, ("A", "a"), [1, 2, 5], cfg)
    assert row["acc_S_on_P"] < row["acc_S_on_G"] and row["direction"] == 1
    assert row["denom_dir1"] > 0.1  # the oracle P probe is clearly better than the biased one on column 1
    assert set(row["top_latents_G"][:2]) == {1, 2}  # the planted column-2 (spurious) latents
    assert set(row["top_latents_P"][:2]) == {0, 3}
    assert row["scr_metric_threshold_2"] > 0.5  # removing them moves the biased probe to column 1
    assert row["ablated_S_on_P"][2] > row["acc_S_on_P"] + 0.1
    assert {"probes", "attribution", "ablation"} <= set(res.timings_s)

    # ablating latents that carry neither attribute changes nothing
    tasks = M.scr_tasks(ds, ("A", "a"), 0)
    S = M.fit_probe(feats.X[tasks["S"].train_index], tasks["S"].train_labels)
    P = tasks["P"]
    rng = np.random.default_rng(3)
    for _ in range(5):
        rand = rng.choice(np.arange(4, 24), size=5, replace=False)
        d = M.linear_ablation_delta(feats.F[P.test_index], feats.D, rand)
        a_rand = S.accuracy(feats.X[P.test_index] + d, P.test_labels)
        score = (a_rand - row["acc_S_on_P"]) / row["denom_dir1"]
        assert abs(score) < 0.1


def _tpp_synthetic(K: int = 4, n: int = 120, seed: int = 0):
    """K classes, class c has its own planted latents 2c and 2c + 1; other latents are noise."""
    rng = np.random.default_rng(seed)
    d_sae, d_in = 24, 32
    W_dec = _orthonormal_atoms(d_sae, d_in, seed)
    cls = np.repeat(np.arange(K), 2 * n)  # per class: n train then n test
    is_test = np.tile(np.r_[np.zeros(n, bool), np.ones(n, bool)], K)
    F = np.abs(rng.normal(0, 0.3, (len(cls), d_sae)))
    for c in range(K):
        F[cls == c, 2 * c] += 1.5 + rng.normal(0, 0.3, (cls == c).sum()).clip(-1, 1)
        F[cls == c, 2 * c + 1] += 1.0
    tasks = []
    for c in range(K):
        parts = []
        for test in (False, True):
            pos = np.flatnonzero((cls == c) & (is_test == test))
            neg = np.concatenate([rng.choice(np.flatnonzero((cls == o) & (is_test == test)), n // (K - 1),
                                             replace=False) for o in range(K) if o != c])[: len(pos)]
            idx = np.r_[pos, neg]
            y = np.r_[np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)]
            order = rng.permutation(len(idx))
            parts += [idx[order], y[order]]
        tasks.append(SimpleNamespace(name=f"syn/{c}", positive_class=str(c), train_index=parts[0],
                                     train_labels=parts[1], test_index=parts[2], test_labels=parts[3]))
    return tasks, _features(F, W_dec, seed + 1), K


def test_tpp_planted_class_latents_give_positive_tpp_and_random_latents_zero():
    tasks, feats, K = _tpp_synthetic()
    rows = M._tpp_classes(M.TppResult(), None, feats, tasks, [2, 4], 1.0, 4096)
    for c, r in enumerate(rows):
        assert set(r["top_latents"][:2]) == {2 * c, 2 * c + 1}  # the class's own planted latents
        assert r["clean_accuracy"] > 0.95
        assert r["tpp_threshold_2_intended_diff_only"] > 0.3
        assert abs(r["tpp_threshold_2_unintended_diff_only"]) < 0.05
        assert r["tpp_threshold_2_total_metric"] > 0.3

    # random latents (none planted) give ~0
    X = feats.X
    probes = [M.fit_probe(X[t.train_index], t.train_labels) for t in tasks]
    clean = np.array([p.accuracy(X[t.test_index], t.test_labels) for p, t in zip(probes, tasks)])
    rng = np.random.default_rng(5)
    ablated = np.zeros((K, K))
    for i in range(K):
        rand = rng.choice(np.arange(2 * K, 24), size=4, replace=False)
        for j, (p, t) in enumerate(zip(probes, tasks)):
            d = M.linear_ablation_delta(feats.F[t.test_index], feats.D, rand)
            ablated[i, j] = p.accuracy(X[t.test_index] + d, t.test_labels)
    assert np.abs(M.tpp_scores(clean, ablated)["total"]).max() < 0.03


# -- ablation parity ---------------------------------------------------------------------------------------------

def _tokens(d_in: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(40, d_in, generator=g) * 2 + 0.5
    offsets = torch.tensor([0, 7, 7, 20, 33, 40])  # text 1 has no valid token
    keep = torch.ones(40, dtype=torch.bool)
    keep[[3, 25]] = False  # norm-outlier tokens: neither averaged nor ablated
    return acts, offsets, keep


def _explicit_pooled_delta(sae, acts, offsets, keep, S, x_norm_needed: bool):
    """Per token: decode(f with f_S = 0) + (x - decode(f)), minus x, averaged over each text's kept tokens."""
    out = []
    with torch.no_grad():
        for i in range(len(offsets) - 1):
            rows = [t for t in range(int(offsets[i]), int(offsets[i + 1])) if keep[t]]
            if not rows:
                out.append(torch.zeros(acts.shape[1], dtype=torch.float64))
                continue
            x = acts[rows]
            f = sae.encode(x)
            f0 = f.clone()
            f0[:, torch.as_tensor(S)] = 0
            kw = {"x_norm": sae.centered_norm(x)} if x_norm_needed else {}
            x_ablated = sae.decode(f0, **kw) + (x - sae.decode(f, **kw))
            out.append((x_ablated - x).double().mean(0))
    return torch.stack(out).numpy()


def test_linear_ablation_algebra_equals_explicit_per_token_ablation():
    from saelab.evals.probing import pooled_sae_features
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE

    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=8, d_sae=32, activation="relu"))
    with torch.no_grad():
        sae.b_enc.fill_(0.3)  # encode(0) != 0, so a wrongly included token would show
    acts, offsets, keep = _tokens(8, 0)
    F = pooled_sae_features(sae, acts, offsets, 16, keep).double().numpy()
    W = sae.W_dec.detach().double().numpy()
    for S in (np.array([0, 5, 9]), np.arange(32), np.array([17])):
        expect = _explicit_pooled_delta(sae, acts, offsets, keep, S, False)
        assert np.abs(expect).max() > 1e-3
        assert np.allclose(M.linear_ablation_delta(F, W, S), expect, atol=1e-5)
        got = M.per_token_ablation_deltas(sae, acts, offsets, keep, [S], chunk_tokens=6)[0]
        assert np.allclose(got, expect, atol=1e-5)


def test_norm_restoring_decoder_per_token_path_equals_explicit_decode():
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE

    torch.manual_seed(2)
    sae = SAE(SAEConfig(d_in=8, d_sae=32, activation="topk", k=6, encoder="magnitude_bypass"))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1) + 0.5)  # non-unit rows: the decode normalises them
        sae.b_dec.normal_()
    assert sae.encoder.restores_norm
    acts, offsets, keep = _tokens(8, 1)
    sets = [np.array([0, 5, 9, 12]), np.arange(16), np.array([], dtype=np.int64)]
    got = M.per_token_ablation_deltas(sae, acts, offsets, keep, sets, chunk_tokens=7)
    for S, g in zip(sets[:2], got[:2]):
        expect = _explicit_pooled_delta(sae, acts, offsets, keep, S, True)
        assert np.abs(expect).max() > 1e-3
        assert np.allclose(g, expect, atol=1e-5)
    assert np.array_equal(got[2], np.zeros_like(got[2]))

    # the suite's features for such an SAE: effective codes with unit atoms, and the per-token path
    res = EvalResult()
    cfg = SimpleNamespace(max_norm_multiple=0.0, encode_batch_size=5)
    feats = M._features(res, sae, {"acts": acts, "offsets": offsets}, cfg)
    assert not feats.linear
    assert np.allclose(np.linalg.norm(feats.D, axis=1), 1.0)
    with torch.no_grad():
        f_eff = sae.effective_codes(acts[:7]).double().mean(0).numpy()
    assert np.allclose(feats.F[0], f_eff, atol=1e-5)
    idx = np.array([4, 0])
    d = M._ablation_deltas(sae, feats, idx, [sets[0]], 5)[0]
    full = M.per_token_ablation_deltas(sae, acts, offsets, None, [sets[0]])[0]
    assert np.allclose(d, full[idx], atol=1e-6)


def test_linear_attribution_with_effective_codes_equals_raw_codes():
    """Δ(f_eff_j) (w . d̂_j) = Δ(f_j) (w . W_dec[j]) for a linear decoder with non-unit rows."""
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE

    sae = SAE(SAEConfig(d_in=8, d_sae=16, activation="relu"))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(16, 1) + 0.5)
    x = torch.randn(50, 8) * 2
    y = np.arange(50) % 2
    w = np.random.default_rng(0).normal(size=8)
    with torch.no_grad():
        f, f_eff = sae.encode(x).double().numpy(), sae.effective_codes(x).double().numpy()
    W = sae.W_dec.detach().double().numpy()
    D = W / np.linalg.norm(W, axis=1, keepdims=True)
    assert np.allclose(M.latent_effects(f, y, w, W, "abs"), M.latent_effects(f_eff, y, w, D, "abs"), atol=1e-8)


# -- SCR data ------------------------------------------------------------------------------------------------------

def test_scr_tasks_follow_saebench_quadrants(monkeypatch):
    rows = [(f"{a}{b} {i}", a, b) for a in ("x", "z") for b in ("p", "n") for i in range(40)]
    rows += [("xp 0", "z", "n")]  # the same text in two cells: dropped
    spec = M.ScrDatasetSpec("toy", lambda: rows, (("x", "z"),), ("p", "n"))
    monkeypatch.setattr(M.SCR_DATASETS, "get", lambda name: spec)
    ds = M.build_scr_dataset("toy", q_train=5, q_test=3, seed=1)
    assert "xp 0" not in ds.texts
    t = M.scr_tasks(ds, ("x", "z"), seed=1)
    cell = {i: ds.texts[i][:2] for i in range(len(ds.texts))}

    def quadrants(idx, y):
        return sorted((cell[int(i)], int(l)) for i, l in zip(idx, y))

    from collections import Counter

    assert Counter(quadrants(t["G"].train_index, t["G"].train_labels)) == {("xp", 1): 5, ("zp", 1): 5, ("xn", 0): 5,
                                                                          ("zn", 0): 5}
    assert Counter(quadrants(t["P"].test_index, t["P"].test_labels)) == {("xp", 1): 3, ("xn", 1): 3, ("zp", 0): 3,
                                                                        ("zn", 0): 3}
    assert Counter(quadrants(t["S"].train_index, t["S"].train_labels)) == {("xp", 1): 10, ("zn", 0): 10}
    train = {int(i) for k in t.values() for i in k.train_index}
    test = {int(i) for k in t.values() for i in k.test_index}
    assert not train & test
    with pytest.raises(ValueError, match="needs"):
        M.build_scr_dataset("toy", q_train=20, q_test=5)
    with pytest.raises(KeyError):
        M.scr_tasks(ds, ("z", "x"))


def test_registered_scr_datasets_have_populated_quadrants():
    for name in M.SCR_DATASETS.names():
        ds = M.build_scr_dataset(name, q_train=100, q_test=50)
        assert len(ds.texts) == len(set(ds.texts)) == 8 * 300
        for pair in ds.pairs:
            assert all(k.train_labels.mean() == 0.5 for k in M.scr_tasks(ds, pair).values())


# -- end to end on the tiny model ------------------------------------------------------------------------------------

def test_suites_end_to_end_on_tiny_model(tiny_llama_dir, tmp_path, monkeypatch):
    from saelab.evals import probing as P
    from saelab.evals.base import EVAL_SUITES, LMActivationStore
    from saelab.models.lm import load_lm
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE

    hook = "blocks.1.hook_resid_post"
    lm = load_lm(str(tiny_llama_dir))
    sae = SAE(SAEConfig(d_in=32, d_sae=48, activation="topk", k=4, model_name=str(tiny_llama_dir), hook_name=hook))
    store = LMActivationStore(lm.name, hook, root=tmp_path / "acts")
    calls = []
    real = P.collect_token_activations
    monkeypatch.setattr(P, "collect_token_activations", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    scr_cfg = M.ScrConfig(sae="tiny", datasets=["vader_domain_sentiment"], q_train=8, q_test=4, n_values=[2, 10],
                          progress=False)
    assert EVAL_SUITES.get("scr").config_cls is M.ScrConfig and EVAL_SUITES.get("tpp").config_cls is M.TppConfig
    scr = EVAL_SUITES.get("scr").run(sae, lm, scr_cfg, store)
    d = json.loads(scr.save(tmp_path / "scr.json").read_text())
    assert len(d["per_pair"]) == 4 and len(calls) == 1
    for k in ("scr_dir1_threshold_2", "scr_dir2_threshold_10"):
        assert k in d["scr_metrics"]
    assert "scr_metric_threshold_10" in d and d["scr_metric_threshold_500"] is None  # 500 not run
    for r in d["per_pair"]:
        assert {"acc_S_on_P", "acc_S_on_G", "acc_P", "acc_G", "denom_dir1", "direction"} <= set(r)
        assert r["n_test"] == {"G": 16, "P": 16, "S": 16}
    assert {"lm_activations", "sae_encode", "probes", "attribution", "ablation"} <= set(d["timings_s"])

    # TPP reads the LM activations the sparse-probing suite cached for the same texts
    sp_cfg = P.SparseProbingConfig(sae="tiny", datasets=["bbc_topic"], n_train_per_class=8, n_test_per_class=4,
                                   full_probes=False, progress=False)
    P.run_sparse_probing(sae, lm, sp_cfg, store)
    assert len(calls) == 2
    tpp_cfg = M.TppConfig(sae="tiny", datasets=["bbc_topic"], n_train_per_class=8, n_test_per_class=4,
                          n_values=[2, 5], progress=False)
    tpp = EVAL_SUITES.get("tpp").run(sae, lm, tpp_cfg, store)
    assert len(calls) == 2  # cache hit: no LM run
    d = json.loads(tpp.save(tmp_path / "tpp.json").read_text())
    for suffix in ("total_metric", "intended_diff_only", "unintended_diff_only"):
        assert f"tpp_threshold_2_{suffix}" in d["tpp_metrics"]
    assert d["tpp_threshold_5_total_metric"] == pytest.approx(d["tpp_metrics"]["tpp_threshold_5_total_metric"])
    assert len(d["per_class"]) == 5 and d["per_dataset"]["bbc_topic"]["n_classes"] == 5
    with pytest.raises(ValueError, match=">= 3"):
        M.run_tpp(sae, lm, M.TppConfig(sae="tiny", datasets=["tweet_sentiment"], n_train_per_class=4,
                                       n_test_per_class=2, progress=False), store)
