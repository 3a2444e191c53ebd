"""HTML feature browser: statistics against brute force, output files, escaping, and a headless-Chromium render."""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saelab.activations.cache import ActivationCache
from saelab.activations.harvest import HarvestConfig, harvest
from saelab.data.split import DataConfig
from saelab.models.lm import load_lm
from saelab.reports import browser
from saelab.reports.browser import (BrowserConfig, build_feature_browser, context_bounds, decoder_neighbours,
                                    logit_lens, read_js_data, scan_latents, unembedding)
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE
from saelab.sae.saving import load_sae, save_sae

from chromium import run_chromium

HOOK = "blocks.1.hook_resid_post"
NASTY = '<script>alert(1)</script>&"\n'
N_SCAN, N_CTX, WINDOW = 1000, 6, 5
DEAD = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def cache(tiny_llama_dir, tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser_data")
    texts = root / "texts"
    texts.mkdir()
    words = "the cat sat on a mat while seven quiet dogs watched the river bend".split()
    rng = np.random.default_rng(0)
    for i in range(40):
        (texts / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, size=60)) + "\n\nend")
    cfg = HarvestConfig(model=str(tiny_llama_dir), hook_name=HOOK, out=str(root / "cache"), n_tokens=1500,
                        context_size=32, batch_size=4, checkpoint_every=2, progress=False,
                        data=DataConfig(corpora=[], text_files=[str(texts)], eval_fraction=0.1))
    return harvest(cfg, lm=tiny)


@pytest.fixture(scope="module")
def sae_dir(tiny_llama_dir, tmp_path_factory):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, activation="relu", model_name=str(tiny_llama_dir), hook_name=HOOK))
    with torch.no_grad():
        sae.b_enc[list(DEAD)] = -1e3  # never fire
    return save_sae(sae, tmp_path_factory.mktemp("browser_sae") / "sae")


@pytest.fixture(scope="module")
def dense(cache, sae_dir):
    """Brute force: the dense codes of every cache row."""
    with torch.no_grad():
        return load_sae(sae_dir).encode(cache.read_rows(np.arange(cache.n_tokens))).numpy()


@pytest.fixture(scope="module")
def nasty_id(cache):
    """The most frequent token of the scanned rows: its string is replaced by NASTY in the built browser."""
    return int(np.bincount(cache.meta_column("token_ids")[:N_SCAN]).argmax())


@pytest.fixture(scope="module")
def built(cache, sae_dir, tiny, dense, nasty_id, tmp_path_factory):
    first = int(np.argmax((dense[:N_SCAN] > 0).sum(0)))
    real = browser._token_strings
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(browser, "_token_strings",
                   lambda tok, ids: [NASTY if i == nasty_id else s for i, s in zip(ids, real(tok, ids))])
        index = build_feature_browser(BrowserConfig(
            sae=str(sae_dir), cache=str(cache.path), out=str(tmp_path_factory.mktemp("browser_out") / "fb"),
            max_rows=N_SCAN, n_contexts=N_CTX, window=WINDOW, n_logit_tokens=7, n_neighbours=4, shard_size=20,
            batch_size=128, explanations={first: "fires <b>everywhere</b> & \"often\""}), lm=tiny)
    return index, first


def _shards(out: Path) -> dict[int, dict]:
    recs: dict[int, dict] = {}
    for p in sorted((out / "data").glob("latents_*.js")):
        recs.update({int(k): v for k, v in read_js_data(p).items()})
    return recs


# ------------------------------------------------------------------------------------------------ statistics


def test_context_bounds_stop_at_context_and_document_breaks():
    pos = np.array([1, 2, 3, 4, 1, 2, 3, 5, 6, 7])
    doc = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    lo, hi = context_bounds(pos, doc, np.array([0, 2, 5, 6, 7, 9]), 2)
    assert lo.tolist() == [0, 0, 4, 4, 7, 8] and hi.tolist() == [2, 3, 6, 6, 7, 9]


@pytest.mark.parametrize("stored", [20_000_000, 0, 5000], ids=["one-pass", "two-pass", "budget-exceeded"])
def test_scan_matches_brute_force(cache, sae_dir, dense, stored):
    sae = load_sae(sae_dir)
    st = scan_latents(sae, cache, max_rows=N_SCAN, n_contexts=N_CTX, window=WINDOW, n_bins=20, batch_size=96,
                      max_stored_codes=stored)
    assert st.extra["passes"] == (1 if stored > 40_000 else 2)
    f = dense[:N_SCAN]
    counts = (f > 0).sum(0)
    assert st.n_scanned == N_SCAN
    np.testing.assert_array_equal(st.counts, counts)
    np.testing.assert_allclose(st.density, counts / N_SCAN)
    np.testing.assert_allclose(st.max_act, f.max(0), rtol=1e-6)
    assert set(np.flatnonzero(counts == 0)) == set(DEAD)
    # latents shown: every live one, densest first, ties by id
    alive = [j for j in range(64) if counts[j] > 0]
    assert st.latents.tolist() == sorted(alive, key=lambda j: (-counts[j], j))
    for j in range(64):
        v = f[:, j]
        want_rows = np.argsort(-v, kind="stable")[:N_CTX]
        want_rows = want_rows[v[want_rows] > 0]
        got = st.top_rows[j][st.top_rows[j] >= 0]
        # identical rows (e.g. the same first token of two documents) tie, so compare values, not row ids
        assert len(got) == len(want_rows) and len(set(got.tolist())) == len(got), j
        np.testing.assert_allclose(st.top_vals[j][: len(got)], v[want_rows], rtol=1e-6)
        np.testing.assert_allclose(v[got], st.top_vals[j][: len(got)], rtol=1e-6)
        assert (np.diff(st.top_vals[j]) <= 0).all()
        if counts[j]:
            want_hist, _ = np.histogram(v[v > 0], bins=20, range=(0, v.max()))
            np.testing.assert_array_equal(st.hist[j], want_hist)
        else:
            assert not st.hist[j].any() and (st.top_rows[j] == -1).all()
    # context windows: contiguous rows of one context and document, activations = dense codes
    pos, doc = cache.meta_column("positions"), cache.meta_column("doc_ids")
    for li, j in enumerate(st.latents):
        for c in range(N_CTX):
            rows = st.ctx_rows[li, c]
            centre = st.top_rows[j, c]
            assert rows[WINDOW] == centre
            if centre < 0:
                assert (rows == -1).all()
                continue
            r = rows[rows >= 0]
            assert (np.diff(r) == 1).all() and (np.diff(pos[r]) == 1).all() and (doc[r] == doc[centre]).all()
            if r[0] > centre - WINDOW and r[0] > 0:  # cut short: the previous row is another context/document
                assert pos[r[0] - 1] != pos[r[0]] - 1 or doc[r[0] - 1] != doc[r[0]]
            if r[-1] < centre + WINDOW and r[-1] + 1 < cache.n_tokens:
                assert pos[r[-1] + 1] != pos[r[-1]] + 1 or doc[r[-1] + 1] != doc[r[-1]]
            np.testing.assert_allclose(st.ctx_acts[li, c][rows >= 0], dense[r, j], rtol=1e-5, atol=1e-7)
    top10 = scan_latents(sae, cache, max_rows=N_SCAN, n_contexts=2, window=1, max_latents=10, batch_size=500)
    assert top10.latents.tolist() == st.latents[:10].tolist() and top10.ctx_rows.shape == (10, 2, 3)


def test_scan_of_a_topk_sae_uses_sparse_codes(cache, tiny_llama_dir):
    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=32, d_sae=48, activation="topk", k=3, model_name=str(tiny_llama_dir), hook_name=HOOK))
    st = scan_latents(sae, cache, max_rows=700, n_contexts=4, window=2, batch_size=64)
    with torch.no_grad():
        f = sae.encode(cache.read_rows(np.arange(cache.n_tokens))).numpy()
    np.testing.assert_array_equal(st.counts, (f[:700] > 0).sum(0))
    assert st.extra == {"passes": 1, "stored_codes": int((f[:702] > 0).sum())}
    for j in range(48):
        want = np.sort(f[:700, j])[::-1][:4]
        np.testing.assert_allclose(st.top_vals[j], np.where(want > 0, want, 0), rtol=1e-6)
    for li, j in enumerate(st.latents):
        ok = st.ctx_rows[li] >= 0
        np.testing.assert_allclose(st.ctx_acts[li][ok], f[st.ctx_rows[li][ok], j], rtol=1e-6)


def test_decoder_neighbours_match_brute_force(sae_dir):
    W = load_sae(sae_dir).W_dec.detach()
    ids, cos = decoder_neighbours(W, 5, chunk=7)
    sims = F.normalize(W, dim=-1) @ F.normalize(W, dim=-1).T
    sims.fill_diagonal_(-2)
    want = torch.argsort(sims, dim=1, descending=True)[:, :5]
    np.testing.assert_array_equal(ids, want.numpy())
    np.testing.assert_allclose(cos, sims.gather(1, want).numpy(), atol=1e-6)
    sub, _ = decoder_neighbours(W, 5, np.array([9, 3]))
    np.testing.assert_array_equal(sub, want[[9, 3]].numpy())


def test_logit_lens_is_norm_weighted_decoder_times_unembedding(sae_dir, tiny):
    W = load_sae(sae_dir).W_dec.detach()
    W_U, g = unembedding(tiny.model)
    assert torch.equal(W_U, tiny.model.lm_head.weight) and torch.equal(g, tiny.model.model.norm.weight)
    with torch.no_grad():
        tiny.model.model.norm.weight.mul_(torch.linspace(0.5, 2.0, 32))  # make the gain matter
        try:
            W_U, g = unembedding(tiny.model)
            logits = (W * tiny.model.model.norm.weight) @ tiny.model.lm_head.weight.T
            ti, tv, bi, bv = logit_lens(W, W_U, g, 6, chunk=10)
        finally:
            tiny.model.model.norm.weight.div_(torch.linspace(0.5, 2.0, 32))
    order = torch.argsort(logits, dim=1, descending=True)
    np.testing.assert_array_equal(ti, order[:, :6].numpy())
    np.testing.assert_array_equal(bi, order.flip(1)[:, :6].numpy())
    np.testing.assert_allclose(tv, logits.gather(1, order[:, :6]).numpy(), rtol=1e-4, atol=1e-6)
    assert (np.diff(bv, axis=1) >= 0).all()
    ti0, *_ = logit_lens(W, W_U, None, 3)  # no final norm weight: d_j @ W_U^T
    np.testing.assert_array_equal(ti0, torch.argsort(W @ W_U.T, dim=1, descending=True)[:, :3].numpy())


# ------------------------------------------------------------------------------------------------ output files


def test_build_writes_consistent_static_files(built, cache, dense, sae_dir, tiny):
    index, first = built
    out = index.parent
    meta = read_js_data(out / "data" / "meta.js")
    recs = _shards(out)
    f = dense[:N_SCAN]
    counts = (f > 0).sum(0)
    alive = sorted((j for j in range(64) if counts[j]), key=lambda j: (-counts[j], j))
    assert [row[0] for row in meta["latents"]] == alive and sorted(recs) == sorted(alive)
    s = meta["summary"]
    assert (s["n_scanned"], s["n_alive"], s["n_shown"], s["d_sae"]) == (N_SCAN, len(alive), len(alive), 64)
    assert sorted(p.name for p in (out / "data").glob("latents_*.js")) == [f"latents_{k:04d}.js" for k in range(4)]
    W = load_sae(sae_dir).W_dec.detach()
    nb_ids, nb_cos = decoder_neighbours(W, 4)
    ti, _, bi, _ = logit_lens(W, *unembedding(tiny.model), 7)
    tokens = cache.meta_column("token_ids")
    for j, rec in recs.items():
        assert rec["n"] == counts[j] and rec["max"] == pytest.approx(f[:, j].max(), rel=1e-3)
        assert rec["hist"] == np.histogram(f[f[:, j] > 0, j], bins=20, range=(0, f[:, j].max()))[0].tolist()
        assert [a for a, _ in rec["nb"]] == nb_ids[j].tolist()
        np.testing.assert_allclose([c for _, c in rec["nb"]], nb_cos[j], atol=1e-3)
        assert [a for a, _ in rec["lp"]] == ti[j].tolist() and [a for a, _ in rec["ln"]] == bi[j].tolist()
        top = np.sort(f[:, j])[::-1][:N_CTX]
        assert len(rec["ctx"]) == min(N_CTX, counts[j])
        for c, want in zip(rec["ctx"], top):
            r = c["row"]
            assert c["a"][c["c"]] == pytest.approx(want, rel=6e-3) and c["t"][c["c"]] == tokens[r]
            rows = np.arange(r - c["c"], r - c["c"] + len(c["t"]))
            assert c["t"] == tokens[rows].tolist()
            np.testing.assert_allclose(c["a"], dense[rows, j], rtol=6e-3, atol=1e-6)
            assert c["src"].startswith("user/") and c["pos"] == cache.meta_column("positions")[r]
    assert recs[first]["expl"] == 'fires <b>everywhere</b> & "often"'
    assert sum(1 for r in recs.values() if "expl" in r) == 1
    search = read_js_data(out / "data" / "search.js")
    assert [row[0] for row in search] == alive
    html = index.read_text("utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "fetch(" not in html
    assert "@import" not in html and "url(" not in html
    build = json.loads((out / "build.json").read_text())
    assert build["total_bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.suffix in (".js", ".html"))


def test_token_strings_are_escaped_in_data_files(built, nasty_id):
    out = built[0].parent
    for p in (out / "data").glob("*.js"):
        body = p.read_text("utf-8")
        assert "<" not in body and "\u2028" not in body, p.name  # data can never close a <script> element
    vocab = read_js_data(out / "data" / "vocab.js")
    assert vocab[str(nasty_id)] == NASTY
    assert read_js_data(out / "data" / "meta.js")["latents"]  # and everything still parses


def test_an_sae_that_never_fires_gives_an_empty_browser(cache, tiny, tiny_llama_dir, tmp_path):
    sae = SAE(SAEConfig(d_in=32, d_sae=16, activation="relu", model_name=str(tiny_llama_dir), hook_name=HOOK))
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)
    index = build_feature_browser(BrowserConfig(sae=str(save_sae(sae, tmp_path / "sae")), cache=str(cache.path),
                                                out=str(tmp_path / "o"), max_rows=200), lm=tiny)
    meta = read_js_data(index.parent / "data" / "meta.js")
    assert meta["latents"] == [] and meta["summary"]["n_alive"] == 0 and _shards(index.parent) == {}


def test_rejects_a_cache_of_another_width(tmp_path, sae_dir, tiny):
    from synthetic import write_cache

    write_cache(tmp_path / "c", torch.randn(50, 16))
    with pytest.raises(ValueError, match="d_in=16"):
        build_feature_browser(BrowserConfig(sae=str(sae_dir), cache=str(tmp_path / "c"), out=str(tmp_path / "o")),
                              lm=tiny)



# ------------------------------------------------------------------------------------------------ page assets


def test_index_is_the_page_with_its_css_and_js_inlined(built):
    html = built[0].read_text("utf-8")
    assert html == browser.page_html()
    assets = files("saelab.reports") / "assets"
    css, js = (assets / "browser.css").read_text("utf-8"), (assets / "browser.js").read_text("utf-8")
    # one <style> holding exactly browser.css, one inline <script> holding exactly browser.js, no marker left over
    assert re.findall(r"<style>\n(.*?)</style>", html, re.S) == [css]
    assert re.findall(r"<script>\n(.*?)</script>", html, re.S) == [js]
    assert "@inline" not in html and css.startswith(":root {") and js.startswith('"use strict";')
    shell = (assets / "browser.html").read_text("utf-8")
    assert html == shell.replace("/* @inline browser.css */\n", css).replace("/* @inline browser.js */\n", js)


def test_page_html_replaces_every_inline_line_with_its_asset(monkeypatch):
    fake = {"browser.html": "<a>\n/* @inline x.css */\nmid /* @inline y.js */\n/* @inline y.js */\n</a>\n",
            "x.css": "X {}\n", "y.js": "let y;\n"}
    monkeypatch.setattr(browser, "_asset", fake.__getitem__)
    # only whole lines are markers: an inline mention in running text stays as it is
    assert browser.page_html() == "<a>\nX {}\nmid /* @inline y.js */\nlet y;\n</a>\n"


def test_a_missing_asset_names_the_file_and_the_fix():
    with pytest.raises(FileNotFoundError, match=r"'nope\.css'.*reinstall saelab"):
        browser._asset("nope.css")


# ------------------------------------------------------------------------------------------------ headless Chromium


def _chromium(tmp_path: Path, url: str, *extra: str) -> str:
    res = run_chromium(tmp_path, url, *extra)
    console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line]
    assert not [line for line in console if "Uncaught" in line or "Error" in line], console  # no JS errors
    return res.stdout


def _ids_in_list(dom: str) -> list[int]:
    lst = dom[dom.index('id="latent-list"'):dom.index("</ol>", dom.index('id="latent-list"'))]
    return [int(x) for x in re.findall(r'<li data-id="(\d+)"', lst)]


def test_renders_in_headless_chromium(built, tmp_path, nasty_id):
    index, first = built
    out = index.parent
    meta = read_js_data(out / "data" / "meta.js")
    dom = _chromium(tmp_path, index.as_uri(), "--dump-dom")
    # the list: one entry per shown latent, densest first; the first one is opened
    assert _ids_in_list(dom) == [row[0] for row in meta["latents"]]
    assert f'<h2 id="latent-title">Latent {first}</h2>' in dom
    detail = dom[dom.index('id="detail"'):]
    assert detail.count('class="ctx"') == N_CTX and detail.count('class="tok hi"') == N_CTX
    assert re.search(r'<span class="tok[^"]*" title="[^"]*act [0-9.e-]+', detail)  # hover shows the activation
    assert detail.count('class="bar"') == 20 and 'id="logit-lens"' in detail and 'id="neighbours"' in detail
    assert 'fires &lt;b&gt;everywhere&lt;/b&gt; &amp; "often"' in detail  # explanation shown as text
    # the nasty token string renders as text (newline shown as ↵), never as markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;\"\u21b5" in dom and "<script>alert" not in dom
    # shards load on demand: only the first latent's
    assert re.findall(r'src="data/(latents_\d+\.js)"', dom) == [f"latents_{first // 20:04d}.js"]


def test_hash_navigation_and_search(built, tmp_path):
    index, _ = built
    out = index.parent
    recs = _shards(out)
    j = sorted(recs)[-1]
    dom = _chromium(tmp_path, index.as_uri() + f"#latent={j}", "--dump-dom")
    assert f'<h2 id="latent-title">Latent {j}</h2>' in dom and f'<li data-id="{j}" class="sel">' in dom
    detail = dom[dom.index('id="detail"'):]
    assert detail.count('class="tok hi"') == len(recs[j]["ctx"])
    for nb, _ in recs[j]["nb"]:  # neighbours link to their latent, dead ones are plain text
        assert (f'href="#latent={nb}" data-id="{nb}">#{nb}</a>' in detail) == (nb in recs)
    dom = _chromium(tmp_path, index.as_uri() + f"#latent={DEAD[0]}", "--dump-dom")
    assert 'id="not-found"' in dom and "never fired" in dom
    # token search: every latent whose top-activating or logit-lens tokens contain "cat" (case-insensitive)
    vocab = read_js_data(out / "data" / "vocab.js")
    want = {i for i, acts, lens, _ in read_js_data(out / "data" / "search.js")
            if any("cat" in vocab[str(t)].lower() for t in acts + lens)}
    assert want
    dom = _chromium(tmp_path, index.as_uri() + "#search=cat", "--dump-dom")
    assert set(_ids_in_list(dom)) == want and f"{len(want)} latents match" in dom
    exact = {i for i, acts, _, _ in read_js_data(out / "data" / "search.js")
             if any(vocab[str(t)].strip().lower() == "cat" for t in acts)}
    if exact:  # latents firing on the token itself rank first
        assert _ids_in_list(dom)[0] in exact


def test_screenshot_is_a_real_page(built, tmp_path):
    import matplotlib.pyplot as plt

    index, first = built
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, index.as_uri(), "--hide-scrollbars", "--window-size=1280,900", f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 20_000
    img = plt.imread(shot)
    assert img.shape[:2] == (900, 1280)
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not blank
    assert len(np.unique((rgb.reshape(-1, 3) * 255).astype(np.uint8), axis=0)) > 100  # text, bars, highlights
