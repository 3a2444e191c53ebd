"""Cosine-paper diagnostics (saelab.evals.norm_quartiles, feature_matching, cos_inner, eval_tokens): each metric
on constructed data with a known answer, the projection ablation and its fast replay on a tiny random Llama, and
one tiny run of each suite on the real bundled model."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import saelab.evals.cos_inner as cos_inner_mod
import saelab.evals.eval_tokens as eval_tokens_mod
from saelab.evals.cos_inner import (
    CosInnerConfig,
    _last_logits,
    cos_inner_wins,
    kl_divergence,
    pearson_rows,
    project_out,
    top_latents_by_mean_activation,
)
from saelab.evals.eval_tokens import eval_token_activations, padded_code
from saelab.evals.feature_matching import (
    CrossMoments,
    FeatureMatchingConfig,
    firing_profile,
    match_latents,
    quartile_firing_counts,
    run_feature_matching,
)
from saelab.evals.norm_quartiles import (
    NormQuartilesConfig,
    assign_quartiles,
    norm_quartile_stats,
    q4_q1_ratio,
    quartile_edges,
)
from saelab.evals.base import LMActivationStore
from saelab.models.hooks import capture, is_block_hook, replay, resolve_hook, splice
from saelab.models.lm import load_lm

# -- norm quartiles ---------------------------------------------------------------------------------------


def test_quartile_edges_match_numpy_and_ties_go_to_the_lower_bin():
    v = torch.tensor([8.0, 1, 7, 2, 6, 3, 5, 4])
    edges = quartile_edges(v)
    np.testing.assert_allclose(edges.numpy(), np.percentile(v.numpy(), [25, 50, 75]))  # 2.75, 4.5, 6.25
    assert assign_quartiles(v, edges).tolist() == [3, 0, 3, 0, 2, 1, 2, 1]
    # a value equal to an edge belongs to the bin below it; above the last edge is the last bin
    vals, inner = torch.tensor([1.0, 2.0, 2.5, 3.0, 9.0]), torch.tensor([2.0, 3.0])
    assert assign_quartiles(vals, inner).tolist() == [0, 0, 1, 1, 2]
    r = torch.rand(1001)
    deciles = np.percentile(r.numpy(), np.arange(10, 100, 10))
    np.testing.assert_allclose(quartile_edges(r, 10).numpy(), deciles, rtol=1e-6)


def _four_norm_groups(n_per: int = 50, d: int = 8):
    """Tokens in 4 norm groups (group q has norms in [q + 1, q + 1.5)), shuffled."""
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(4 * n_per, d, generator=g, dtype=torch.float64), dim=-1)
    group = torch.arange(4).repeat_interleave(n_per)
    norms = group + 1 + 0.5 * torch.rand(4 * n_per, generator=g, dtype=torch.float64)
    perm = torch.randperm(4 * n_per, generator=g)
    return u[perm] * norms[perm, None], group[perm]


def test_norm_quartile_stats_on_constructed_reconstructions():
    x, group = _four_norm_groups()
    x_hat = x.clone()                                  # Q1: perfect
    x_hat[group == 1] = x[group == 1].mean(0)          # Q2: the bin mean -> FVE 0
    c = torch.full((x.shape[1],), 0.3, dtype=torch.float64)
    x_hat[group == 2] = x[group == 2] + c              # Q3: a constant offset -> residual-variance FVE 1
    x_hat[group == 3] = 0.0                            # Q4: nothing -> FVE <= 0, norm ratio 0
    l0 = torch.tensor([1.0, 2.0, 3.0, 10.0])[group]
    st = norm_quartile_stats(x, x_hat, l0)
    b = st["bins"]
    assert [r["n_tokens"] for r in b] == [50, 50, 50, 50]
    assert b[0]["fve"] == pytest.approx(1.0) and b[0]["l2_ratio"] == pytest.approx(1.0)
    assert b[1]["fve"] == pytest.approx(0.0, abs=1e-12) and b[1]["fve_resid_var"] == pytest.approx(0.0, abs=1e-12)
    x3 = x[group == 2]
    expected = 1 - 50 * float(c @ c) / float((x3 - x3.mean(0)).pow(2).sum())
    assert b[2]["fve"] == pytest.approx(expected) and b[2]["fve_resid_var"] == pytest.approx(1.0)
    assert b[3]["fve"] <= 0.0 and b[3]["l2_ratio"] == 0.0
    x4 = x[group == 3]
    assert b[3]["fve_global_mean"] == pytest.approx(1 - float(x4.pow(2).sum()) / float((x4 - x.mean(0)).pow(2).sum()))
    # firing shares: hand count 100 * (1, 2, 3, 10) / 1600
    assert [r["firing_frac"] for r in b] == pytest.approx([1 / 16, 2 / 16, 3 / 16, 10 / 16])
    assert sum(r["firing_frac"] for r in b) == pytest.approx(1.0)
    assert [r["mean_l0"] for r in b] == pytest.approx([1, 2, 3, 10])
    # edges: bins are exactly the norm groups; min and max are the extremes
    norms = x.norm(dim=-1)
    assert st["edges"][0] == pytest.approx(float(norms.min())) and st["edges"][-1] == pytest.approx(float(norms.max()))
    for q in range(4):
        gn = norms[group == q]
        assert b[q]["norm_lo"] <= float(gn.min()) and float(gn.max()) <= b[q]["norm_hi"] + 1e-12
    assert st["overall"]["n_tokens"] == 200 and st["overall"]["firing_frac"] == pytest.approx(1.0)


# -- feature matching -------------------------------------------------------------------------------------


def _codes(n: int, d: int, seed: int = 0, p: float = 0.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g) * (torch.rand(n, d, generator=g) < p)


def _moments(fa: torch.Tensor, fb: torch.Tensor, chunk: int = 97) -> CrossMoments:
    m = CrossMoments(fa.shape[1], fb.shape[1])
    for s in range(0, fa.shape[0], chunk):  # several chunks, one of them ragged
        m.add(fa[s : s + chunk], fb[s : s + chunk])
    return m


@pytest.mark.parametrize("d_a,d_b,p", [(12, 9, 0.2), (300, 250, 0.01)])  # dense product / sparse pair path
def test_cross_moments_correlations_match_numpy(d_a, d_b, p):
    fa, fb = _codes(500, d_a, 0, p), _codes(500, d_b, 1, p)
    fb[:, 3] = 2 * fa[:, 5] + 0.01 * fb[:, 3]
    ka, kb = int((fa > 0).sum(1).max()), int((fb > 0).sum(1).max())
    assert (ka * kb * 100 > d_a * d_b) == (d_a == 12)
    best = _moments(fa, fb).best_matches(block=5)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.corrcoef(fa.T.double().numpy(), fb.T.double().numpy())[:d_a, d_a:]
    alive_a, alive_b = fa.std(0) > 0, fb.std(0) > 0
    c[~alive_a.numpy()] = np.nan
    c[:, ~alive_b.numpy()] = -np.inf
    c = np.where(alive_a.numpy()[:, None], c, -np.inf)
    assert best["alive_a"].tolist() == alive_a.tolist() and best["alive_b"].tolist() == alive_b.tolist()
    a, b = alive_a.numpy(), alive_b.numpy()
    np.testing.assert_allclose(best["corr_a"].numpy()[a], c.max(1)[a], atol=1e-5)
    ia, ib = best["idx_a"].numpy(), best["idx_b"].numpy()
    np.testing.assert_allclose(c[np.arange(d_a)[a], ia[a]], c.max(1)[a], atol=1e-5)  # the argmax (up to ties)
    np.testing.assert_allclose(best["corr_b"].numpy()[b], c.max(0)[b], atol=1e-5)
    np.testing.assert_allclose(c[ib[b], np.arange(d_b)[b]], c.max(0)[b], atol=1e-5)
    assert torch.isnan(best["corr_a"][~alive_a]).all() and (best["idx_a"][~alive_a] == -1).all()
    assert best["idx_b"][3] == 5 and best["corr_b"][3] > 0.99


def test_sparse_codes_give_the_same_moments_and_counts_as_dense():
    from saelab.codes import Code

    def as_code(f):  # TopK-style (indices, values), zero-padded
        i = f.topk(int((f > 0).sum(1).max()), dim=1).indices
        return Code(f.gather(1, i), i)

    for d_a, d_b, p in ((50, 40, 0.05), (6, 5, 0.5)):  # sparse pair path / dense GEMM path
        fa, fb = _codes(300, d_a, 0, p), _codes(300, d_b, 1, p)
        idx, val = padded_code(fa)
        torch.testing.assert_close(torch.zeros_like(fa).scatter_add_(1, idx, val), fa)
        dense, sparse = CrossMoments(d_a, d_b), CrossMoments(d_a, d_b)
        dense.add(fa, fb)
        sparse.add(as_code(fa), as_code(fb))
        torch.testing.assert_close(sparse.cross, fa.T @ fb)
        torch.testing.assert_close(dense.cross, fa.T @ fb)
        for a, b in zip(dense.stats(), sparse.stats()):
            torch.testing.assert_close(a, b)
        bins = torch.randint(0, 4, (300,))
        counts = quartile_firing_counts(as_code(fa), bins, 4, d_a)
        assert torch.equal(counts, quartile_firing_counts(fa, bins, 4))
        assert torch.equal(counts[2], (fa[bins == 2] > 0).sum(0).float())


def test_permuted_copy_matches_everything_alive_and_the_and_rule():
    n, d, d_in = 600, 16, 10
    fa = _codes(n, d, 2)
    fa[:, 7] = 0.0  # a dead latent: undefined correlation -> unmatched, not alive
    W_a = F.normalize(torch.randn(d, d_in), dim=-1)
    perm = torch.randperm(d)
    fb = fa[:, perm] + 1e-4 * torch.rand(n, d)
    fb[:, (perm == 7).nonzero()[0, 0]] = 0.0
    W_b = W_a[perm] + 1e-3 * torch.randn(d, d_in)
    best = _moments(fa, fb).best_matches(block=4)
    assert int(best["alive_a"].sum()) == d - 1 and not best["alive_a"][7]
    m_a, cos_a = match_latents(best["corr_a"], best["idx_a"], W_a, W_b)
    m_b, _ = match_latents(best["corr_b"], best["idx_b"], W_b, W_a)
    alive = torch.arange(d) != 7
    assert m_a.tolist() == alive.tolist() and int(m_b.sum()) == d - 1
    assert torch.equal(perm[best["idx_a"][alive]], torch.arange(d)[alive])  # B's latent perm^-1(i) is A's i
    assert math.isnan(best["corr_a"][7]) and best["idx_a"][7] == -1 and math.isnan(cos_a[7])
    # same activations, orthogonal decoder: correlated but NOT matched (corr >= 0.7 AND cos > 0.7)
    j = int(best["idx_a"][3])
    W_b2 = W_b.clone()
    w = torch.randn(d_in)
    W_b2[j] = w - (w @ W_a[3]) * W_a[3]
    m_a2, cos2 = match_latents(best["corr_a"], best["idx_a"], W_a, W_b2)
    assert best["corr_a"][3] > 0.99 and abs(float(cos2[3])) < 1e-5 and not m_a2[3]
    assert int(m_a2.sum()) == d - 2
    # the thresholds are inclusive for the correlation, strict for the cosine
    corr, idx, eye = torch.tensor([0.75, 0.5], dtype=torch.float64), torch.tensor([0, 1]), torch.eye(2)
    assert match_latents(corr, idx, eye, eye, 0.75, 0.5)[0].tolist() == [True, False]
    assert match_latents(corr, idx, eye, eye, 0.5, 1.0)[0].tolist() == [False, False]  # cos 1 is not > 1


def test_unmatched_firing_profile_concentrated_in_q4():
    """Unmatched latents fire 4 / 4.6 / 5.1 / 86.3 % per quartile -> Q4/Q1 = 86.3 / 4 (the paper's 22x)."""
    n = 1000
    norms = torch.arange(n, dtype=torch.float64) + 1
    bins = assign_quartiles(norms, quartile_edges(norms))
    assert torch.bincount(bins).tolist() == [250] * 4
    q_tokens = [torch.nonzero(bins == q)[:, 0] for q in range(4)]
    f = torch.zeros(n, 6)
    for lat, per_q in ((0, (40, 46, 51, 250)), (1, (0, 0, 0, 250)), (2, (0, 0, 0, 113))):  # unmatched set {0, 1, 2}
        for q, c in enumerate(per_q):
            f[q_tokens[q][:c], lat] = 1.0
    f[:, 3:] = (torch.rand(n, 3) < 0.5).float()  # matched set {3, 4, 5}: uniform
    counts = quartile_firing_counts(f, bins, 4)
    assert counts[:, 0].tolist() == [40, 46, 51, 250]
    unmatched = torch.tensor([True, True, True, False, False, False])
    prof, total = firing_profile(counts, unmatched)
    assert total == 40 + 46 + 51 + 250 + 250 + 113 == 750
    assert prof == pytest.approx([40 / 750, 46 / 750, 51 / 750, 613 / 750])
    assert q4_q1_ratio(prof) == pytest.approx(613 / 40)
    prof_m, _ = firing_profile(counts, ~unmatched)
    assert q4_q1_ratio(prof_m) == pytest.approx(1.0, abs=0.3)
    assert q4_q1_ratio([0.0, 0.2, 0.3, 0.5]) is None
    assert all(math.isnan(v) for v in firing_profile(counts, torch.zeros(6, dtype=torch.bool))[0])


# -- cos > inner ------------------------------------------------------------------------------------------


def test_pearson_rows_matches_numpy_and_constant_rows_are_nan():
    a, b = torch.randn(3, 20), torch.randn(3, 20)
    r = pearson_rows(a, b)
    for i in range(3):
        assert float(r[i]) == pytest.approx(np.corrcoef(a[i].numpy(), b[i].numpy())[0, 1], abs=1e-6)
    assert math.isnan(pearson_rows(torch.full((1, 5), 0.1), torch.randn(1, 5))[0])


def test_win_rule_on_constructed_samples():
    g = torch.Generator().manual_seed(0)
    M = 40
    cos = torch.rand(4, M, generator=g, dtype=torch.float64) * 0.8 - 0.2
    norms = 1 + 9 * torch.rand(4, M, generator=g, dtype=torch.float64)  # varying norms decouple cos and inner
    inner = cos * norms
    kl = torch.stack([
        2.0 * cos[0] + 1.0,       # KL a function of cos exactly -> cos wins (both variants)
        3.0 * inner[1],           # KL a function of inner exactly -> inner wins (both)
        -inner[2] + 20.0,         # corr(inner, KL) = -1: signed -> cos "wins", absolute -> inner wins
        torch.full((M,), 0.5, dtype=torch.float64),  # constant KL: undefined -> not a win
    ])
    w = cos_inner_wins(cos, inner, kl)
    assert w["corr_cos"][0] == pytest.approx(1.0) and w["corr_inner"][1] == pytest.approx(1.0)
    assert w["corr_inner"][2] == pytest.approx(-1.0) and -1.0 < w["corr_cos"][2] < -0.1
    assert w["win_signed"].tolist() == [True, False, True, False]
    assert w["win_abs"].tolist() == [True, False, False, False]
    assert w["win_rate_signed"] == 0.5 and w["win_rate_abs"] == 0.25 and w["n_undefined"] == 1


def test_kl_and_latent_selection():
    p = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    q = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    kl = kl_divergence(p, q)  # KL([.5,.5] || [.5,.5]) = 0; KL([.75,.25] || [.5,.5]) = .75 ln 1.5 + .25 ln .5
    assert kl.tolist() == pytest.approx([0.0, 0.75 * math.log(1.5) + 0.25 * math.log(0.5)])
    sum_act = torch.tensor([10.0, 9.0, 0.0, 5.0, 8.0])
    n_fire = torch.tensor([10.0, 3.0, 0.0, 1.0, 1.0])  # means 1, 3, dead, 5, 8
    assert top_latents_by_mean_activation(sum_act, n_fire, 3).tolist() == [4, 3, 1]
    assert top_latents_by_mean_activation(sum_act, n_fire, 10).tolist() == [4, 3, 1, 0]  # only the alive ones


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


def test_projection_ablation_through_splice_removes_exactly_d(tiny):
    ids = torch.randint(3, 1000, (3, 12))
    hook = resolve_hook(tiny.model, "blocks.1.hook_resid_post")
    d = torch.randn(32) * 5  # not unit: project_out normalises
    dh = F.normalize(d, dim=0)
    seen = {}

    def grab(h):
        seen["h"] = h.clone()
        return h

    clean_h = capture(tiny.model, hook, ids)
    clean = tiny.model(ids).logits
    with splice(hook, lambda h: project_out(h, d)), splice(hook, grab):  # grab sees the ablated output
        ablated = tiny.model(ids).logits
    h = seen["h"]
    assert (h @ dh).abs().max() < 1e-5 * clean_h.norm(dim=-1).max()
    delta = clean_h - h  # only the d component was removed: delta = (h.d) d
    torch.testing.assert_close(delta, (clean_h @ dh)[..., None] * dh, atol=1e-5, rtol=1e-5)
    assert float(kl_divergence(clean[:, -1], ablated[:, -1]).max()) > 1e-8  # it matters downstream
    # start=1 spares position 0; per-row directions
    D = torch.randn(3, 32)
    out = project_out(clean_h, D, start=1)
    torch.testing.assert_close(out[:, 0], clean_h[:, 0])
    assert (out[:, 1:] * F.normalize(D, dim=-1)[:, None]).sum(-1).abs().max() < 1e-5


def test_replay_fast_path_equals_the_full_forward(tiny):
    ids = torch.randint(3, 1000, (4, 10))
    hook = resolve_hook(tiny.model, "blocks.1.hook_resid_post")
    assert is_block_hook(tiny.model, hook)
    h = capture(tiny.model, hook, ids)
    d = torch.randn(4, 32)
    ablate = lambda x: project_out(x, d)  # noqa: E731
    full_clean = _last_logits(tiny.model, ids)
    with splice(hook, ablate):
        full = _last_logits(tiny.model, ids)
    layers = list(tiny.model.model.layers)
    with replay(tiny.model, hook, h, as_tuple=False) as stub:
        replay_clean = _last_logits(tiny.model, ids)
        with splice(stub, ablate):
            replayed = _last_logits(tiny.model, ids)
    assert list(tiny.model.model.layers) == layers  # the real blocks are back
    torch.testing.assert_close(replay_clean, full_clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(replayed, full, atol=1e-5, rtol=1e-5)
    assert (full - full_clean).abs().max() > 1e-4


def test_eval_tokens_outlier_filter_reproduces_select_rows(tiny, tmp_path):
    from saelab.data.split import DataConfig, iter_contexts, select_rows, split_documents

    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(40):
        (texts / f"{i}.txt").write_text(" ".join(f"w{(i * 13 + j) % 97} text" for j in range(60)))
    data = DataConfig(corpora=[], text_files=[str(texts)], eval_fraction=0.25)
    store = LMActivationStore(str(tiny.name), "blocks.1.hook_resid_post", root=tmp_path / "store")
    tok = eval_token_activations(tiny, "blocks.1.hook_resid_post", store, n_tokens=200, context_size=16,
                                 batch_size=4, seed=3, data=data)
    assert len(tok) == 200 and int(tok.position.min()) >= 1
    _, held = split_documents(data)
    ctxs = [c for _, c in zip(range(4), iter_contexts(tiny, held.shuffle(3), 16))]
    ids = torch.stack([c[0] for c in ctxs])
    h = capture(tiny.model, resolve_hook(tiny.model, "blocks.1.hook_resid_post"), ids)
    ref = select_rows(h, ids, tiny.special_ids, 1.05)  # a tight multiple, so that some rows are dropped
    first = tok.context < 4
    assert int(first.sum()) == int(select_rows(h, ids, tiny.special_ids, None).sum())
    mine = torch.zeros_like(ref)
    kept = tok.select(first)
    mine[kept.context, kept.position] = kept.keep_mask(1.05)
    assert torch.equal(mine, ref) and 0 < int(ref.sum()) < int(first.sum())
    torch.testing.assert_close(kept.x, h[kept.context, kept.position])


# -- the three suites on the real bundled model -----------------------------------------------------------


@pytest.mark.slow
def test_suites_on_bundled_model(tmp_path, monkeypatch, smollm):
    from saelab.data.split import DataConfig
    from saelab.evals import run_suite
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE
    from saelab.sae.saving import load_sae, save_sae

    hook = "blocks.4.hook_resid_post"
    data = DataConfig(limit_per_corpus=300, eval_fraction=0.1)
    tok = eval_token_activations(smollm, hook, LMActivationStore(smollm.name, hook, root=tmp_path / "warm"),
                                 n_tokens=256, context_size=64, data=data)
    dirs = []
    for seed in (0, 1):  # two small random TopK SAEs with b_dec at the data mean
        torch.manual_seed(seed)
        sae = SAE(SAEConfig(d_in=576, d_sae=128, k=8, model_name="smollm2-135m", hook_name=hook))
        with torch.no_grad():
            sae.b_dec.copy_(tok.x.mean(0))
        dirs.append(save_sae(sae, tmp_path / f"sae{seed}"))
    store = LMActivationStore(smollm.name, hook, root=tmp_path / "store")
    common = dict(sae=str(dirs[0]), n_tokens=256, context_size=64, data=data, progress=False)
    cfgs = {
        "norm_quartiles": NormQuartilesConfig(**common),
        "feature_matching": FeatureMatchingConfig(**common, sae_b=str(dirs[1])),
        "cos_inner": CosInnerConfig(**common, n_latents=3, n_texts=4, text_size=24, ablation_batch=4),
    }
    results = {name: run_suite(name, cfg, lm=smollm, store=store) for name, cfg in cfgs.items()}
    nq, fm, ci = results["norm_quartiles"], results["feature_matching"], results["cos_inner"]
    assert nq.n_tokens + nq.n_outliers_excluded == 256 and len(nq.bins) == 4
    assert sum(b["n_tokens"] for b in nq.bins) == nq.n_tokens
    assert sum(b["firing_frac"] for b in nq.bins) == pytest.approx(1.0)
    assert all(math.isfinite(b[k]) for b in nq.bins for k in ("fve", "fve_global_mean", "l2_ratio", "mean_l0"))
    assert fm.n_alive_a > 0 and 0 <= fm.n_matched_a <= fm.n_alive_a and sum(fm.profiles["a_all"]) == pytest.approx(1.0)
    assert fm.firings["a_all"] == pytest.approx(8 * fm.n_tokens, rel=0.01)  # TopK k=8 fires 8 latents per token
    # a random SAE against itself: every alive latent matched
    self_match = run_feature_matching(load_sae(dirs[0]), smollm, FeatureMatchingConfig(
        **{**common, "sae_b": str(dirs[0])}), store)
    assert self_match.n_matched_a == self_match.n_alive_a == self_match.n_matched_b > 0
    assert self_match.firings["a_unmatched"] == 0 and math.isnan(self_match.profiles["a_unmatched"][0])
    assert ci.n_latents == 3 and ci.n_texts == 4 and len(ci.latents) == 3
    assert 0.0 <= ci.win_rate_signed <= 1.0 and 0.0 <= ci.win_rate_abs <= 1.0
    assert all(r["mean_kl"] > 0 for r in ci.latents) and ci.fast_path and ci.fast_path_check < 1e-3
    assert ci.sink_norm > 10 * float(np.median(ci.samples["x_norm"]))  # position 0 is the attention sink
    full = run_suite("cos_inner", dataclasses.replace(cfgs["cos_inner"], fast_path=False), lm=smollm, store=store,
                     write=False)  # the full forward gives the same KLs as the replay of the cached hook output
    assert not full.fast_path
    np.testing.assert_allclose(full.samples["kl"], ci.samples["kl"], rtol=1e-3, atol=1e-7)
    for name in cfgs:
        saved = json.loads((dirs[0] / f"eval_{name}.json").read_text())
        assert saved["suite"] == name and saved["timings_s"]["lm_activations"] >= 0
    # a second run reuses the cached LM activations and clean texts: no capture, no corpus loading
    def boom(*a, **k):
        raise AssertionError("the LM activations should come from the store")

    monkeypatch.setattr(eval_tokens_mod, "capture", boom)
    monkeypatch.setattr(eval_tokens_mod, "split_documents", boom)
    monkeypatch.setattr(cos_inner_mod, "split_documents", boom)
    again = run_suite("cos_inner", cfgs["cos_inner"], lm=smollm, store=store, write=False)
    assert again.win_rate_signed == ci.win_rate_signed
    assert [r["corr_cos"] for r in again.latents] == pytest.approx([r["corr_cos"] for r in ci.latents])
    nq2 = run_suite("norm_quartiles", NormQuartilesConfig(**{**common, "max_norm_multiple": 0}), lm=smollm,
                    store=store, write=False)  # another filter setting, same cache entry
    assert nq2.n_tokens == 256 and nq2.n_outliers_excluded == 0
