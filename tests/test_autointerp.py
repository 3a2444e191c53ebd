"""Auto-interp (saelab.evals.autointerp / judges): window sampling against brute force, the lenient parsers on nasty
replies, scoring and the bootstrap, the rate limiter and cache key, and end-to-end runs on a tiny random Llama with
scripted judges and with the local transformers judge (the tiny model itself)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.data.split import DataConfig
from saelab.evals import EVAL_SUITES, run_suite
from saelab.evals import autointerp as ai
from saelab.evals.base import LMActivationStore
from saelab.evals.judges import JUDGES, JudgeUsage, LocalJudge, OpenAIJudge, RateLimiter, cache_key, make_judge
from saelab.models.lm import load_lm
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE
from saelab.sae.saving import save_sae

HOOK = "blocks.1.hook_resid_post"


# ------------------------------------------------------------------------------------------------ windows


def _brute_top(acts: torch.Tensor, k: int, b: int) -> list[tuple[int, int]]:
    """Reference: scan every (value, context, position) by decreasing value, keep those > b apart from the kept."""
    C, T = acts.shape
    cands = sorted(((float(acts[c, p]), c * T + p, c, p) for c in range(C) for p in range(b, T - b) if acts[c, p] > 0),
                   key=lambda t: (-t[0], t[1]))
    out: list[tuple[int, int]] = []
    for _, _, c, p in cands:
        if all(c != c2 or abs(p - p2) > b for c2, p2 in out):
            out.append((c, p))
        if len(out) == k:
            break
    return out


@pytest.mark.parametrize("b", [0, 1, 3])
def test_top_windows_match_brute_force(b):
    g = torch.Generator().manual_seed(1)
    acts = torch.rand(5, 20, generator=g) * (torch.rand(5, 20, generator=g) < 0.4)
    acts[2, 7] = acts[2, 8] = 5.0  # a tie next to each other: the lower flat index wins, the other is blocked (b>0)
    for k in (1, 4, 9, 100):
        got = [tuple(r) for r in ai.top_windows(acts, k, b).tolist()]
        assert got == _brute_top(acts, k, b)
    vals = [float(acts[c, p]) for c, p in ai.top_windows(acts, 100, b).tolist()]
    assert vals == sorted(vals, reverse=True) and min(vals) > 0


def test_top_windows_never_leave_the_context_and_ignore_zeros():
    acts = torch.zeros(2, 12)
    acts[0, 1] = 9.0   # too close to the start for buffer 2
    acts[1, 11] = 9.0  # too close to the end
    acts[1, 5] = 1.0
    assert ai.top_windows(acts, 5, 2).tolist() == [[1, 5]]
    assert ai.top_windows(torch.zeros(3, 12), 5, 2).shape == (0, 2)
    with pytest.raises(ValueError, match="too short"):
        ai.top_windows(acts, 1, 6)


def test_iw_windows_respect_threshold_and_sample_in_proportion_to_squared_activation():
    acts = torch.zeros(1, 10)
    acts[0, 3], acts[0, 6], acts[0, 8] = 1.0, 2.0, 7.0  # 7.0 is above the threshold: never drawn
    picks = []
    for s in range(3000):
        r = ai.iw_windows(acts, 1, 1, threshold=5.0, generator=torch.Generator().manual_seed(s))
        picks.append(tuple(r[0].tolist()))
    assert set(picks) == {(0, 3), (0, 6)}
    frac = picks.count((0, 6)) / len(picks)
    assert abs(frac - 4 / 5) < 0.03  # P(2.0) = 2^2 / (1^2 + 2^2)
    two = ai.iw_windows(acts, 2, 1, 5.0, torch.Generator().manual_seed(0))
    assert sorted(map(tuple, two.tolist())) == [(0, 3), (0, 6)]  # without replacement
    assert ai.iw_windows(acts, 3, 1, 5.0, torch.Generator().manual_seed(0)) is None  # only 2 qualify
    assert ai.iw_windows(acts, 0, 1, 5.0, torch.Generator()).shape == (0, 2)


def _silent_contexts(n_fire: int = 28, n_silent: int = 12, T: int = 30, seed: int = 0):
    """Synthetic ``(C, T)`` activations: ``n_silent`` contexts at shuffled rows never fire; each firing context has 3
    spikes, at positions 4, 15 and 26 (its windows between them are all-zero: the old zero-window negatives)."""
    g = torch.Generator().manual_seed(seed)
    C = n_fire + n_silent
    rows = torch.randperm(C, generator=g)
    silent = sorted(rows[:n_silent].tolist())
    acts = torch.zeros(C, T)
    for c in rows[n_silent:].tolist():
        acts[c, [4, 15, 26]] = 0.5 + torch.rand(3, generator=g)
    ids = torch.randint(0, 1000, (C, T), generator=g)
    return acts, ids, silent


def test_never_firing_windows_pick_exactly_the_silent_contexts():
    acts, _, silent = _silent_contexts()
    b = 3
    seen_ctx, seen_pos = set(), set()
    for s in range(200):
        z = ai.never_firing_windows(acts, 10, b, torch.Generator().manual_seed(s))
        assert z.shape == (10, 2) and len(set(z[:, 0].tolist())) == 10  # distinct contexts
        assert set(z[:, 0].tolist()) <= set(silent)
        assert all(b <= p < 30 - b for p in z[:, 1].tolist())
        seen_ctx |= set(z[:, 0].tolist())
        seen_pos |= set(z[:, 1].tolist())
    assert seen_ctx == set(silent) and seen_pos == set(range(b, 30 - b))  # uniform: every silent context and centre
    exact = ai.never_firing_windows(acts, 12, b, torch.Generator().manual_seed(0))
    assert sorted(exact[:, 0].tolist()) == silent
    assert ai.never_firing_windows(acts, 13, b, torch.Generator()) is None  # only 12 contexts never fire
    acts[silent[0], 29] = 1e-6  # one activation anywhere in a context disqualifies it
    assert ai.never_firing_windows(acts, 12, b, torch.Generator()) is None
    g = torch.Generator().manual_seed(5)
    before = g.get_state().clone()
    assert ai.never_firing_windows(acts, 0, b, g).shape == (0, 2) and torch.equal(g.get_state(), before)
    with pytest.raises(ValueError, match="too short"):
        ai.never_firing_windows(acts, 1, 15, g)


def test_c2r_plan_follows_the_fork():
    """5 top + 10 negatives scored, 15 top + 5 negatives explained; negatives are windows of never-firing contexts
    and the explanation's negatives are scoring negatives."""
    acts, ids, silent = _silent_contexts()
    cfg = ai.AutoInterpConfig(protocol="c2r", buffer=3)
    proto = cfg.sampling()
    for seed in range(5):
        cfg.sample_seed = seed
        plan = ai._plan_latent(11, 84, acts, ids, proto, cfg)
        kinds = lambda ws: sorted(w.kind for w in ws)  # noqa: E731
        assert kinds(plan.gen) == ["top"] * 15 and kinds(plan.gen_neg) == ["zero"] * 5
        assert kinds(plan.score) == ["top"] * 5 + ["zero"] * 10
        neg = [w for w in plan.score if w.kind == "zero"]
        assert {w.context for w in neg} <= set(silent) and len({w.context for w in neg}) == 10
        where = lambda ws: [(w.context, w.position) for w in ws]  # noqa: E731
        assert set(where(plan.gen_neg)) <= set(where(neg))
        assert not set(where(plan.gen)) & set(where(plan.score))  # top windows: split, never shown twice
        for w in neg + plan.gen_neg:
            assert w.token_ids == ids[w.context, w.position - 3 : w.position + 4].tolist() and max(w.acts) == 0
        assert plan.threshold == pytest.approx(0.01 * plan.max_act)
        assert len(plan.example) == 5
    # exactly 10 silent contexts: the negatives are exactly those; 9: the latent is skipped
    acts10, ids10, silent10 = _silent_contexts(n_silent=10)
    plan = ai._plan_latent(3, 84, acts10, ids10, proto, cfg)
    assert sorted(w.context for w in plan.score if w.kind == "zero") == silent10
    acts9, ids9, _ = _silent_contexts(n_silent=9)
    assert ai._plan_latent(3, 84, acts9, ids9, proto, cfg) is None


# the saebench protocol's windows as the code before the C²R-fork change drew them (same generator stream)
SAEBENCH_SNAPSHOT = {
    (0, 7): ([("top", 20, 20), ("top", 16, 5), ("top", 4, 12), ("top", 22, 11), ("top", 12, 18), ("top", 6, 36),
              ("top", 29, 3), ("top", 22, 20), ("top", 18, 11), ("top", 9, 3), ("iw", 6, 23), ("iw", 11, 3),
              ("iw", 27, 6), ("iw", 0, 15), ("iw", 6, 3)],
             [("iw", 2, 19), ("random", 18, 9), ("random", 1, 32), ("random", 23, 5), ("random", 3, 26),
              ("random", 7, 21), ("random", 16, 12), ("top", 14, 28), ("random", 1, 3), ("random", 17, 9),
              ("random", 3, 15), ("iw", 9, 26), ("random", 15, 34), ("top", 28, 13)], [1, 4, 11, 12]),
    (1, 123): ([("top", 23, 24), ("iw", 24, 34), ("top", 11, 32), ("top", 18, 10), ("top", 12, 7), ("top", 5, 19),
                ("top", 3, 12), ("top", 13, 19), ("iw", 13, 17), ("top", 23, 9), ("top", 18, 27), ("top", 22, 35),
                ("iw", 2, 31), ("iw", 21, 29), ("iw", 10, 34)],
               [("random", 0, 36), ("random", 17, 17), ("random", 13, 21), ("random", 6, 3), ("iw", 11, 20),
                ("random", 18, 32), ("top", 24, 35), ("random", 7, 27), ("random", 8, 31), ("iw", 17, 26),
                ("random", 6, 18), ("random", 2, 28), ("top", 27, 4), ("random", 16, 5)], [2, 8, 9, 10]),
}


def test_saebench_protocol_samples_are_unchanged():
    for (seed, latent), (gen, score, example) in SAEBENCH_SNAPSHOT.items():
        g = torch.Generator().manual_seed(seed)
        acts = torch.rand(30, 40, generator=g) * (torch.rand(30, 40, generator=g) < 0.1)
        ids = torch.randint(0, 1000, (30, 40), generator=g)
        cfg = ai.AutoInterpConfig(buffer=3, sample_seed=seed)
        plan = ai._plan_latent(latent, 99, acts, ids, cfg.sampling(), cfg)
        assert [(w.kind, w.context, w.position) for w in plan.gen] == gen
        assert [(w.kind, w.context, w.position) for w in plan.score] == score
        assert plan.example == example and plan.gen_neg == []
    # and its prompts (sha256 of the explanation and scoring messages as the code before the change wrote them)
    import hashlib

    msgs = [ai._explain_messages(["a<<b>>c", "d<<e>>"], [], 20), ai._score_messages("cats", ["abc", "def", "ghi"], [2])]
    digest = hashlib.sha256(json.dumps(msgs).encode()).hexdigest()
    assert digest == "52537e7e2dd4527906ae6a0e337b7ac60a6592737e1fd97e8269bc789dc4ef98"
    p = ai.AutoInterpConfig().sampling()
    assert (p.explain_prompt, p.explanation_max_tokens, p.explanation_words) == ("saebench", 30, 20)


def test_c2r_explanation_prompt_is_the_forks():
    m = ai._explain_messages_c2r(["a<<b[act:1.5]>>", "c<<d[act:0.7]>>"], ["x y", "z"], 30)
    assert "ACTIVATE documents (where the neuron fires, ordered by strength)" in m[0]["content"]
    assert "limited to 30 words or less" in m[0]["content"]
    assert m[1]["content"] == ("The relevant documents are given below:\n\nACTIVATE (1). a<<b[act:1.5]>>\n"
                               "ACTIVATE (2). c<<d[act:0.7]>>\n\nINACTIVATE (3). x y\nINACTIVATE (4). z\n\n"
                               "Complete the sentence: This neuron activates on")
    assert "INACTIVATE" not in ai._explain_messages_c2r(["a"], [], 30)[1]["content"]
    p = ai.AutoInterpConfig(protocol="c2r").sampling()
    assert (p.explain_prompt, p.explanation_max_tokens, p.explanation_words) == ("c2r", 64, 30)


def test_random_windows_are_in_range():
    r = ai.random_windows(4, 30, 500, 3, torch.Generator().manual_seed(0))
    assert r[:, 0].min() == 0 and r[:, 0].max() == 3
    assert r[:, 1].min() >= 3 and r[:, 1].max() <= 26


def test_labels_and_marking():
    w = [ai.Window("top", 0, 1, [1, 2, 3], [0.0, 0.5, 0.02]), ai.Window("random", 0, 1, [1, 2, 3], [0.0, 0.01, 0.0])]
    assert ai.window_labels(w, 0.01) == [True, False]  # strictly greater than the threshold
    toks = [" the", "\n", "cat\ufffd"]
    assert ai.format_window(toks, [0.0, 0.5, 0.02], 0.01) == " the<<↵>><<cat>>"
    assert ai.format_window(toks, [0.0, 0.5, 0.02], None) == " the↵cat"
    assert ai.format_window(toks, [0.0, 0.5, 0.0], 0.01, mark_values=True) == " the<<↵[act:0.5]>>cat"


# ------------------------------------------------------------------------------------------------ parsing

NASTY_VERDICTS = [
    ("2, 5, 9", 14, [2, 5, 9], "ok"),
    ("2,5 and 9.", 14, [2, 5, 9], "ok"),
    ("[1, 4]", 14, [1, 4], "ok"),
    ("Excerpts 3 and 7 activate; 3 again", 14, [3, 7], "ok"),
    ("1-4, 10", 14, [1, 2, 3, 4, 10], "ok"),
    ("3 to 5", 14, [3, 4, 5], "ok"),
    ("None", 14, [], "none"),
    ("none of them.", 14, [], "none"),
    ("There are no examples where it activates", 14, [], "none"),
    ("", 14, [], "unparseable"),
    ("   \n ", 14, [], "unparseable"),
    ("The feature is about cats.", 14, [], "unparseable"),
    ("I'm sorry, but I can't help with that.", 14, [], "refusal"),
    ("As an AI, I cannot determine this", 14, [], "refusal"),
    ("15, 99, 0", 14, [], "out_of_range_only"),
    ("2, 15, 2, 3", 14, [2, 3], "ok"),
    ("three and five", 14, [3, 5], "ok"),
    ("1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16", 14, list(range(1, 15)), "ok"),
    ("99999999999999999999", 14, [], "unparseable"),  # absurd digit runs are not indices
    ("<<2>>, **4**", 14, [2, 4], "ok"),
    ("1-1000", 14, [1, 1000], "ok"),  # an absurd range is not expanded; its ends are read as numbers
    ("1. At the movies.\n2.  There is a small Brazilian cafe", 14, [], "echo"),  # SmolLM2 repeating the excerpts
    ("2, 5\n3. The cat sat on the mat in 1961", 14, [2, 5], "ok"),  # an echoed excerpt after a verdict is ignored
    ("1.\n4.\n9.", 14, [1, 4, 9], "ok"),
    ("1. yes", 14, [1], "ok"),
    ("1. 2, 7, 9, 11\n\nExcerpts:\n\n1. 2, 7, 9", 14, [2, 7, 9, 11], "ok"),  # SmolLM2: a list marker, then the answer
    ("1. 4. 7.", 14, [1, 4, 7], "ok"),
]


@pytest.mark.parametrize("text,n,indices,status", NASTY_VERDICTS)
def test_parse_predictions_is_lenient_and_never_raises(text, n, indices, status):
    p = ai.parse_predictions(text, n)
    assert p.indices == [i for i in indices if 1 <= i <= n]
    assert p.status == status


def test_parse_predictions_counts_dropped_indices():
    p = ai.parse_predictions("2, 15, 2, 3, 0", 14)
    assert (p.indices, p.out_of_range, p.duplicates) == ([2, 3], 2, 1)
    assert ai.parse_predictions(None, 5).status == "unparseable"  # type: ignore[arg-type]


@pytest.mark.parametrize("text,expected,status", [
    ("This feature activates on the word 'knows' in rhetorical questions.", "the word 'knows' in rhetorical questions",
     "ok"),
    ("the word cat", "the word cat", "ok"),
    ("\n\n  \"fires on numbers at the start of lines.\"  \nExplanation: more", "numbers at the start of lines", "ok"),
    ("**This neuron is active on verbs**", "verbs", "ok"),
    ("", "", "empty"),
    ("This feature activates on", "", "empty"),
    ("I'm sorry, I can't help with that.", "", "refusal"),
    (" ".join(["word"] * 50), " ".join(["word"] * 5), "ok"),
])
def test_parse_explanation(text, expected, status):
    assert ai.parse_explanation(text, max_words=5 if text.startswith("word") else 30) == (expected, status)


# ------------------------------------------------------------------------------------------------ scoring


def test_score_predictions_is_accuracy_over_all_windows():
    active = [True, False, False, True, False]
    s = ai.score_predictions([1, 2], active)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (1, 1, 1, 2)
    assert s["score"] == pytest.approx(3 / 5)
    assert ai.score_predictions([], active)["score"] == pytest.approx(3 / 5)
    assert ai.score_predictions([1, 4], active)["score"] == 1.0
    assert ai.score_predictions([2, 3, 5], active)["score"] == 0.0


def test_bootstrap_ci_brackets_the_mean_and_matches_a_direct_resampling():
    x = [0.5, 0.6, 0.9, 1.0, 0.7, 0.8]
    lo, hi = ai.bootstrap_ci(x, n_boot=4000, seed=3)
    assert lo < np.mean(x) < hi
    rng = np.random.default_rng(3)
    means = np.asarray(x)[rng.integers(0, 6, size=(4000, 6))].mean(1)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert all(math.isnan(v) for v in ai.bootstrap_ci([0.5]))


def test_protocol_overrides_and_bad_counts():
    cfg = ai.AutoInterpConfig(protocol="c2r", n_zero_score=7)
    p = cfg.sampling()
    assert (p.n_top_gen, p.n_zero_gen, p.n_top_score, p.n_zero_score, p.mark_values) == (15, 5, 5, 7, True)
    c2r = ai.AutoInterpConfig(protocol="c2r").sampling()
    assert (c2r.n_top_gen, c2r.n_iw_gen, c2r.n_zero_gen) == (15, 0, 5)
    assert (c2r.n_top_score, c2r.n_iw_score, c2r.n_random_score, c2r.n_zero_score) == (5, 0, 0, 10)
    with pytest.raises(ValueError, match="subset of the scoring negatives"):
        ai.AutoInterpConfig(protocol="c2r", n_zero_score=3).sampling()
    assert ai.AutoInterpConfig().sampling().n_score == 14
    with pytest.raises(ValueError, match=">= 0"):
        ai.AutoInterpConfig(n_random_score=-1).sampling()
    with pytest.raises(ValueError, match="n_top_gen"):
        ai.AutoInterpConfig(n_top_gen=0).sampling()
    with pytest.raises(KeyError, match="saebench"):
        ai.AutoInterpConfig(protocol="nope").sampling()


# ------------------------------------------------------------------------------------------------ judge plumbing


def test_rate_limiter_spaces_events():
    now = [100.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    rl = RateLimiter(120, clock=lambda: now[0], sleep=sleep)  # one event per 0.5 s
    assert rl.wait() == 0.0
    now[0] += 0.2
    assert rl.wait() == pytest.approx(0.3)
    now[0] += 2.0
    assert rl.wait() == 0.0  # idle long enough: no wait
    assert slept == [pytest.approx(0.3)]
    free = RateLimiter(None, clock=lambda: 0.0, sleep=lambda s: pytest.fail("must not sleep"))
    assert [free.wait() for _ in range(3)] == [0.0, 0.0, 0.0]


def test_cache_key_depends_on_model_messages_and_params_only():
    m = [{"role": "user", "content": "hi"}]
    k = cache_key("gpt", m, {"max_tokens": 5, "temperature": 0.0})
    assert k == cache_key("gpt", [dict(reversed(list(m[0].items())))], {"temperature": 0.0, "max_tokens": 5})
    assert k != cache_key("gpt2", m, {"max_tokens": 5, "temperature": 0.0})
    assert k != cache_key("gpt", [{"role": "user", "content": "hi!"}], {"max_tokens": 5, "temperature": 0.0})
    assert k != cache_key("gpt", m, {"max_tokens": 6, "temperature": 0.0})


def test_openai_judge_config_errors(monkeypatch):
    cfg = ai.AutoInterpConfig(judge="openai", judge_model=None)
    with pytest.raises(ValueError, match="--judge_model"):
        make_judge(cfg)
    monkeypatch.delenv("SAELAB_TEST_NO_KEY", raising=False)
    cfg = ai.AutoInterpConfig(judge="openai", judge_model="m", api_key_env="SAELAB_TEST_NO_KEY", judge_cache="")
    with pytest.raises(ValueError, match="SAELAB_TEST_NO_KEY"):
        make_judge(cfg)
    cfg.base_url = "http://127.0.0.1:9/v1"  # loopback: no key needed
    assert isinstance(make_judge(cfg), OpenAIJudge)
    cfg.base_url = "ftp://x"
    with pytest.raises(ValueError, match="base_url"):
        make_judge(cfg)
    with pytest.raises(KeyError, match="local, openai"):
        make_judge(ai.AutoInterpConfig(judge="gpt"))
    assert JUDGES.names() == ["local", "openai"]


def test_suite_is_registered_and_left_out_of_all():
    assert "autointerp" in EVAL_SUITES.names()
    assert EVAL_SUITES.get("autointerp").config_cls is ai.AutoInterpConfig
    assert ai.AutoInterpConfig.include_in_all is False


# ------------------------------------------------------------------------------------------------ end to end


class ScriptedJudge:
    """Answers every explanation prompt with a fixed sentence and every scoring prompt with ``verdict(n)``."""

    def __init__(self, verdict):
        self.verdict = verdict
        self.description = "scripted test judge"
        self.usage = JudgeUsage()
        self.prompts: list = []

    def complete(self, conversations, max_tokens):
        out = []
        for conv in conversations:
            self.prompts.append(conv)
            user = conv[-1]["content"]
            if user.startswith("Explanation:"):
                n = sum(1 for line in user.splitlines() if line[:1].isdigit() and ". " in line[:5])
                out.append(self.verdict(n))
            else:
                out.append("This feature activates on the word cat.")
        self.usage.n_calls += len(conversations)
        return out


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ai_texts")
    words = "the cat sat on a mat while seven quiet dogs watched the river bend".split()
    rng = np.random.default_rng(0)
    for i in range(30):
        (d / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, size=120)))
    return d


@pytest.fixture(scope="module")
def sae_dir(tiny_llama_dir, tmp_path_factory):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=48, activation="topk", k=4, model_name=str(tiny_llama_dir), hook_name=HOOK))
    with torch.no_grad():
        sae.b_enc[:4] = -1e3  # dead latents: never sampled
    return save_sae(sae, tmp_path_factory.mktemp("ai_sae") / "sae")


def _cfg(sae_dir, texts, **kw):
    base = dict(sae=str(sae_dir), n_tokens=1500, context_size=48, buffer=5, n_latents=6, progress=False,
                data=DataConfig(corpora=[], text_files=[str(texts)], eval_fraction=0.5), n_bootstrap=500)
    return ai.AutoInterpConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny):
    return LMActivationStore(tiny.name, HOOK, root=tmp_path_factory.mktemp("ai_store"))


def _encoded(sae_dir, tiny, cfg, store):
    """Brute force: the eval tokens, their contexts and every latent's dense activation map ``(d_sae, C, T)``."""
    from saelab.evals.eval_tokens import eval_token_activations
    from saelab.sae.saving import load_sae

    sae = load_sae(sae_dir)
    tok = eval_token_activations(tiny, HOOK, store, n_tokens=cfg.n_tokens, context_size=cfg.context_size,
                                 batch_size=cfg.batch_size, seed=cfg.seed, data=cfg.data)
    n_ctx = int(tok.context.max())
    keep = (tok.context < n_ctx) & tok.keep_mask(cfg.max_norm_multiple)
    with torch.no_grad():
        f = sae.encode(tok.x[keep])
    dense = torch.zeros(sae.cfg.d_sae, n_ctx, cfg.context_size)
    dense[:, tok.context[keep], tok.position[keep]] = f.T
    return sae, dense


@pytest.mark.parametrize("verdict,expect", [("none", "chance"), ("all", "positives")])
def test_scripted_judges_score_exactly_the_label_fractions(sae_dir, texts, tiny, store, verdict, expect):
    from saelab.sae.saving import load_sae

    cfg = _cfg(sae_dir, texts)
    judge = ScriptedJudge((lambda n: "None") if verdict == "none" else (lambda n: ", ".join(map(str, range(1, n + 1)))))
    res = ai.run_autointerp(load_sae(sae_dir), tiny, cfg, store, judge=judge)
    assert res.n_scored == len(res.latents) == 6 and res.n_unscored == 0
    assert res.judge == "scripted test judge"
    _, dense = _encoded(sae_dir, tiny, cfg, store)
    fires = (dense > 0).flatten(1).sum(1)
    for rec in res.latents:
        j = rec["latent"]
        assert fires[j] >= cfg.min_activations and j >= 4  # alive, never a dead latent
        assert rec["n_fires"] == int(fires[j])
        n = len(rec["kinds"])
        assert n == 14 and sorted(rec["kinds"]) == sorted(["top"] * 2 + ["iw"] * 2 + ["random"] * 10)
        frac_pos = len(rec["active"]) / n
        assert rec["score"] == pytest.approx(1 - frac_pos if verdict == "none" else frac_pos)
        assert rec["explanation"] == "the word cat" and rec["explanation_status"] == "ok"
        # the top and importance-sampled windows are positives by construction
        assert {i + 1 for i, kind in enumerate(rec["kinds"]) if kind in ("top", "iw")} <= set(rec["active"])
    scores = [r["score"] for r in res.latents]
    assert res.mean_score == pytest.approx(np.mean(scores))
    assert res.ci95_low <= res.mean_score <= res.ci95_high
    if verdict == "none":
        assert res.mean_score == pytest.approx(res.chance_score)
        assert res.parse["prediction_none"] == 6 and res.mean_recall == 0.0
    else:
        assert res.mean_recall == 1.0 and res.parse["prediction_ok"] == 6
    # windows shown in the explanation prompt: the latent's strongest activations are marked, sorted by strength
    gen = [p for p in judge.prompts if not p[-1]["content"].startswith("Explanation:")]
    assert len(gen) == 6 and all(p[-1]["content"].count("<<") >= 15 for p in gen)


def test_windows_in_the_result_match_the_brute_force_top_activations(sae_dir, texts, tiny, store):
    from saelab.sae.saving import load_sae

    cfg = _cfg(sae_dir, texts, n_latents=3, keep_prompts=True, n_top_gen=3, n_iw_gen=0, n_top_score=1, n_iw_score=0,
               n_random_score=2)
    sae, dense = _encoded(sae_dir, tiny, cfg, store)
    ids = ai._contexts(tiny, cfg, dense.shape[1])
    text = ai._TokenText(tiny)
    judge = ScriptedJudge(lambda n: "1")
    res = ai.run_autointerp(load_sae(sae_dir), tiny, cfg, store, judge=judge)
    b = cfg.buffer
    for rec in res.latents:
        acts = dense[rec["latent"]]
        top = _brute_top(acts, 4, b)
        # SAEBench's max: over every token of the top windows (a neighbour near the context edge may beat the centre)
        assert rec["max_act"] == pytest.approx(max(float(acts[c, p - b : p + b + 1].max()) for c, p in top))
        thr = cfg.act_threshold_frac * rec["max_act"]
        expected = {c * 1000 + p: ai.format_window(text(ids[c, p - b : p + b + 1].tolist()),
                                                   acts[c, p - b : p + b + 1].tolist(), thr) for c, p in top}
        # the explanation prompt shows 3 of the 4 brute-force top windows, by decreasing window maximum (SAEBench
        # Examples order); the 4th is scored
        shown = rec["prompts"]["explain"][-1]["content"].split("\n\n")[1].splitlines()
        assert [s.split(". ", 1)[0] for s in shown] == ["1", "2", "3"]
        bodies = [s.split(". ", 1)[1] for s in shown]
        keys = [next(k for k, v in expected.items() if v == body) for body in bodies]
        strengths = [float(acts[k // 1000, k % 1000 - b : k % 1000 + b + 1].max()) for k in keys]  # window max
        assert strengths == sorted(strengths, reverse=True) and len(set(keys)) == 3
        assert rec["kinds"].count("top") == 1


def test_unparseable_verdicts_are_counted_not_scored_and_never_crash(sae_dir, texts, tiny, store):
    from saelab.sae.saving import load_sae

    replies = iter(["I'm sorry, I can't do that.", "", "the cat", "5, 77", "None", "2 and 3"])
    cfg = _cfg(sae_dir, texts)
    res = ai.run_autointerp(load_sae(sae_dir), tiny, cfg, store, judge=ScriptedJudge(lambda n: next(replies)))
    p = res.parse
    got = (p["prediction_refusal"], p["prediction_unparseable"], p["prediction_none"], p["prediction_ok"])
    assert got == (1, 2, 1, 2)
    assert p["out_of_range_indices"] == 1 and res.n_unscored == 3 and res.n_scored == 3
    assert [r["score"] is None for r in res.latents] == [True, True, True, False, False, False]
    cfg2 = ai.AutoInterpConfig(**{**cfg.__dict__, "unparseable_as_none": True})
    res2 = ai.run_autointerp(load_sae(sae_dir), tiny, cfg2, store, judge=ScriptedJudge(lambda n: "I'm sorry"))
    assert res2.n_scored == 6 and res2.mean_score == pytest.approx(res2.chance_score)


def test_c2r_protocol_scores_on_never_firing_contexts(sae_dir, texts, tiny, store):
    from saelab.sae.saving import load_sae

    cfg = _cfg(sae_dir, texts, protocol="c2r", n_latents=4, min_activations=5, n_top_gen=4, n_zero_gen=2,
               n_top_score=2, n_zero_score=4, keep_prompts=True)
    judge = ScriptedJudge(lambda n: "None")
    res = ai.run_autointerp(load_sae(sae_dir), tiny, cfg, store, judge=judge)
    assert res.protocol == "c2r" and res.n_scored >= 1
    _, dense = _encoded(sae_dir, tiny, cfg, store)
    ids = ai._contexts(tiny, cfg, dense.shape[1])
    text = ai._TokenText(tiny)
    b, T = cfg.buffer, cfg.context_size
    for rec in res.latents:
        assert sorted(rec["kinds"]) == ["top", "top", "zero", "zero", "zero", "zero"]
        assert sorted(rec["active"]) == [i + 1 for i, k in enumerate(rec["kinds"]) if k == "top"]
        assert rec["score"] == pytest.approx(4 / 6)
        # brute force: every window of every context on which this latent never fires
        acts = dense[rec["latent"]]
        silent = [c for c in range(acts.shape[0]) if float(acts[c].abs().max()) == 0]
        allowed = {ai.format_window(text(ids[c, p - b : p + b + 1].tolist()), [0.0] * (2 * b + 1), None)
                   for c in silent for p in range(b, T - b)}
        excerpts = rec["prompts"]["score"][-1]["content"].split("\n\n")[2].splitlines()
        negatives = [e.split(". ", 1)[1] for e, k in zip(excerpts, rec["kinds"]) if k == "zero"]
        assert len(negatives) == 4 and set(negatives) <= allowed
        explain = rec["prompts"]["explain"][-1]["content"]
        shown_neg = [ln.split(". ", 1)[1] for ln in explain.splitlines() if ln.startswith("INACTIVATE (")]
        assert len(shown_neg) == 2 and set(shown_neg) <= set(negatives)  # explanation negatives are scored ones
        assert sum(ln.startswith("ACTIVATE (") for ln in explain.splitlines()) == 4 and "[act:" in explain


def test_explicit_latents_and_bad_input(sae_dir, texts, tiny, store):
    from saelab.sae.saving import load_sae

    sae = load_sae(sae_dir)
    res = ai.run_autointerp(sae, tiny, _cfg(sae_dir, texts, latents=[0, 7, 9]), store,
                            judge=ScriptedJudge(lambda n: "1"))
    assert [r["latent"] for r in res.latents] == [7, 9] and res.n_skipped_insufficient == 1  # 0 is dead
    with pytest.raises(ValueError, match="d_sae=48"):
        ai.run_autointerp(sae, tiny, _cfg(sae_dir, texts, latents=[48]), store, judge=ScriptedJudge(lambda n: "1"))
    with pytest.raises(ValueError, match="too short"):
        ai.run_autointerp(sae, tiny, _cfg(sae_dir, texts, buffer=30), store, judge=ScriptedJudge(lambda n: "1"))


@pytest.fixture(scope="module")
def cache(tiny, tiny_llama_dir, texts, tmp_path_factory):
    from saelab.activations.harvest import HarvestConfig, harvest

    data = DataConfig(corpora=[], text_files=[str(texts)], eval_fraction=0.5)
    out = str(tmp_path_factory.mktemp("ai_cache"))
    return harvest(HarvestConfig(model=str(tiny_llama_dir), hook_name=HOOK, out=out, n_tokens=800, context_size=48,
                                 batch_size=4, progress=False, data=data), lm=tiny)


def test_local_judge_end_to_end_is_deterministic_and_feeds_the_browser(sae_dir, texts, tiny, tiny_llama_dir, store,
                                                                       cache, tmp_path):
    """The real local judge (transformers generate on the tiny random Llama) through run_suite, twice."""
    from saelab.reports.browser import BrowserConfig, build_feature_browser, read_js_data

    cfg = _cfg(sae_dir, texts, judge="local", judge_model=str(tiny_llama_dir), n_latents=3, judge_batch_size=2,
               explanation_max_tokens=8, prediction_max_tokens=6, out=str(tmp_path / "a.json"))
    r1 = run_suite("autointerp", cfg, lm=tiny, store=store)
    r2 = run_suite("autointerp", ai.AutoInterpConfig(**{**cfg.__dict__, "out": str(tmp_path / "b.json")}), lm=tiny,
                   store=store)
    assert r1.judge.startswith(f"local: {tiny_llama_dir}") and r1.judge_kind == "local"
    assert len(r1.latents) == 3 and r1.usage["n_calls"] == 6 and r1.usage["completion_tokens"] <= 3 * (8 + 6)
    assert r1.usage["prompt_tokens"] > 3 * 14 * 11  # 14 scoring windows of 11 tokens, at least
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["judge"] == r1.judge and a["config"]["judge"] == "local" and len(a["latents"]) == 3
    # greedy: the same replies on a re-run
    assert [r["explanation_raw"] for r in r1.latents] == [r["explanation_raw"] for r in r2.latents]
    assert [r["prediction_raw"] for r in r1.latents] == [r["prediction_raw"] for r in r2.latents]
    # the browser shows each explanation and its score
    out = tmp_path / "fb"
    build_feature_browser(BrowserConfig(sae=str(sae_dir), cache=str(cache.path), out=str(out),
                                        autointerp=str(tmp_path / "a.json")), lm=tiny)
    recs = {}
    for p in sorted((out / "data").glob("latents_*.js")):
        recs.update({int(k): v for k, v in read_js_data(p).items()})
    meta = read_js_data(out / "data" / "meta.js")
    assert meta["summary"]["autointerp_judge"] == r1.judge
    for r in r1.latents:
        if r["latent"] in recs:
            assert recs[r["latent"]]["expl"] == r["explanation"]
            assert recs[r["latent"]].get("expl_score") == (None if r["score"] is None else pytest.approx(r["score"]))


def test_local_judge_matches_a_plain_greedy_loop(tiny, tiny_llama_dir):
    """Reference: argmax decoding with full forwards (no KV cache, no padding) over the chat-templated prompt."""
    convs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a cat."}],
             [{"role": "user", "content": "The river bends while seven quiet dogs watch; what bends?"}]]
    judge = LocalJudge(tiny, batch_size=2)
    got = judge.complete(convs, max_tokens=7)
    tok = tiny.tokenizer
    for conv, reply in zip(convs, got):
        ids = list(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)["input_ids"])
        new = []
        with torch.no_grad():
            for _ in range(7):
                nxt = int(tiny.model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                new.append(nxt)
                if nxt == tok.eos_token_id:
                    break
        assert reply == tok.decode(new, skip_special_tokens=True).strip()
    assert judge.usage.n_calls == 2 and judge.usage.completion_tokens <= 14


def test_local_judge_needs_a_chat_template(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    lm = load_lm(str(tiny_llama_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tok.chat_template = None
    lm.tokenizer = tok
    with pytest.raises(ValueError, match="chat template"):
        LocalJudge(lm)
    with pytest.raises(ValueError, match=">= 1"):
        LocalJudge(load_lm(str(tiny_llama_dir)), batch_size=0)


def test_cli_runs_the_suite_with_a_judge_flag(sae_dir, texts, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    from saelab.cli import main

    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))  # the CLI's default activation store
    out = tmp_path / "cli.json"
    rc = main(["eval", "--suite", "autointerp", "--sae", str(sae_dir), "--judge", "local", "--judge_model",
               str(tiny_llama_dir), "--n_latents", "2", "--n_tokens", "1500", "--context_size", "48", "--buffer", "5",
               "--corpora", "--text_files", str(texts), "--eval_fraction", "0.5", "--explanation_max_tokens", "4",
               "--prediction_max_tokens", "4", "--noprogress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"judge: local: {tiny_llama_dir}" in printed and "mean_score" in printed
    assert len(json.loads(out.read_text())["latents"]) == 2
    assert list((tmp_path / "cache" / "eval_activations").iterdir())
    rc = main(["eval", "--suite", "autointerp", "--sae", str(sae_dir), "--judge", "nope", "--noprogress"])
    assert rc == 2 and "local, openai" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_compare_report_has_an_autointerp_row_per_arm_and_names_the_judge(tmp_path):
    from saelab.compare import ArmRun, ExperimentConfig
    from saelab.io import write_json
    from saelab.reports.compare import write_report

    exp = ExperimentConfig(out=str(tmp_path), arms={"baseline": {}, "c2r": {}}, evals=["autointerp"], browsers=False)
    runs = []
    for arm, score in (("baseline", 0.75), ("c2r", 0.8125)):
        d = tmp_path / "arms" / arm / "seed0"
        res = ai.AutoInterpResult(suite="autointerp", judge="local: smollm2-135m (test)", mean_score=score,
                                  chance_score=0.7, latents=[{"latent": 1, "score": score}])
        write_json(d / "eval_autointerp.json", res.to_dict())
        runs.append(ArmRun(arm, {}, 0, d, tmp_path / "cache", 0.0))
    md = write_report(exp, runs).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| autointerp.mean_score"))
    assert "0.75" in row and "0.8125" in row and "Δ +0.0625" in row
    assert "Auto-interp judge: local: smollm2-135m (test)" in md
    assert "Auto-interp judge: local: smollm2-135m (test)" in (tmp_path / "report" / "report.html").read_text()


def test_eval_all_skips_autointerp(monkeypatch, capsys):
    import saelab.evals as evals
    from saelab.cli import EvalAllConfig, _run_eval

    ran = []

    def fake_run_suite(name, cfg, **kw):
        ran.append(name)
        return ai.AutoInterpResult(suite=name)

    monkeypatch.setattr(evals, "run_suite", fake_run_suite)
    _run_eval(EvalAllConfig(sae="x"), "all")
    assert "autointerp" not in ran and "core" in ran
    assert "[autointerp] skipped: run it with --suite autointerp" in capsys.readouterr().out


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk"])
def test_latent_activations_match_dense_encoding(activation):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=40, activation=activation, k=5)).eval()
    if activation == "batchtopk":
        sae.activation.threshold.fill_(0.05)  # a trained BatchTopK SAE infers with its threshold (per token)
    x = torch.randn(103, 16)
    got = ai._latent_acts(sae, x, [5, 1, 39, 7], batch=17)
    with torch.no_grad():
        ref = sae.encode(x)[:, [5, 1, 39, 7]]
    torch.testing.assert_close(got, ref)
    assert (got > 0).any()
    with torch.no_grad():
        counts = ai._fire_counts(sae, x, 17)
    assert counts.tolist() == (sae.encode(x) > 0).sum(0).tolist()


def test_browser_picks_up_eval_autointerp_json_and_renders_the_score(sae_dir, tiny, cache, tmp_path):
    import shutil
    import subprocess

    from saelab.io import write_json
    from saelab.reports.browser import BrowserConfig, build_feature_browser, read_js_data

    sae = tmp_path / "sae"
    shutil.copytree(sae_dir, sae)
    first = build_feature_browser(BrowserConfig(sae=str(sae), cache=str(cache.path), out=str(tmp_path / "plain")),
                                  lm=tiny)
    meta = read_js_data(first.parent / "data" / "meta.js")
    j1, j2 = meta["latents"][0][0], meta["latents"][1][0]
    assert meta["summary"]["autointerp_judge"] is None
    judge = "openai: test-model at http://127.0.0.1:1/v1"
    write_json(sae / "eval_autointerp.json", {"judge": judge, "latents": [
        {"latent": j1, "explanation": "cats <b>sitting</b>", "score": 0.75},
        {"latent": j2, "explanation": "dogs", "score": None}]})
    out = tmp_path / "fb"
    index = build_feature_browser(BrowserConfig(sae=str(sae), cache=str(cache.path), out=str(out)), lm=tiny)  # default
    recs = {}
    for p in sorted((out / "data").glob("latents_*.js")):
        recs.update({int(k): v for k, v in read_js_data(p).items()})
    assert (recs[j1]["expl"], recs[j1]["expl_score"]) == ("cats <b>sitting</b>", 0.75)
    assert recs[j2]["expl"] == "dogs" and recs[j2]["expl_score"] is None
    assert read_js_data(out / "data" / "meta.js")["summary"]["autointerp_judge"] == judge
    # explicit explanations win over the auto-interp ones (and then no auto-interp score is shown for them)
    build_feature_browser(BrowserConfig(sae=str(sae), cache=str(cache.path), out=str(tmp_path / "fb2"),
                                        explanations={j1: "mine"}), lm=tiny)
    recs2 = {}
    for p in sorted((tmp_path / "fb2" / "data").glob("latents_*.js")):
        recs2.update({int(k): v for k, v in read_js_data(p).items()})
    assert recs2[j1]["expl"] == "mine" and "expl_score" not in recs2[j1] and recs2[j2]["expl"] == "dogs"
    build_feature_browser(BrowserConfig(sae=str(sae), cache=str(cache.path), out=str(tmp_path / "fb3"), autointerp=""),
                          lm=tiny)
    assert all("expl" not in r for p in (tmp_path / "fb3" / "data").glob("latents_*.js")
               for r in read_js_data(p).values())
    with pytest.raises(ValueError, match="not an auto-interp result"):
        write_json(tmp_path / "bad.json", {"suite": "core"})
        build_feature_browser(BrowserConfig(sae=str(sae), cache=str(cache.path), out=str(tmp_path / "fb4"),
                                            autointerp=str(tmp_path / "bad.json")), lm=tiny)
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("/usr/bin/chromium is missing: run scripts/install_chromium.sh (Debian package 'chromium')")
    doms = {}
    for j, text in ((j1, "auto-interp score 0.75 \u00b7 judge " + judge),
                    (j2, "auto-interp score \u2013 (verdict unparseable)")):
        res = subprocess.run([str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
                              "--virtual-time-budget=5000", "--dump-dom", index.as_uri() + f"#latent={j}"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert f'<h2 id="latent-title">Latent {j}</h2>' in res.stdout
        assert 'id="expl-score"' in res.stdout and text in res.stdout
        doms[j] = res.stdout
    assert "cats &lt;b&gt;sitting&lt;/b&gt;" in doms[j1]  # the explanation is text, never markup
