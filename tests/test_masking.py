"""Masked regularization on the harvest side (arXiv 2604.06495): masks, mask token, masked
harvest, resume, cache identity, and the paired clean cache of the denoising variant."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from saelab.activations.cache import BASE_COLUMNS, ActivationCache, ActivationCacheWriter, CacheMismatchError
from saelab.activations.harvest import HarvestConfig, check_paired_caches, harvest
from saelab.activations.masking import apply_mask, context_generator, mask_contexts, mask_token_id
from saelab.data.split import DataConfig, iter_contexts, split_documents
from saelab.models.hooks import capture, resolve_hook
from saelab.models.lm import load_lm

MASK_ID = 2026  # "..." in the bundled SmolLM2 tokenizer
P = 0.15
CTX = 32


# ------------------------------------------------------------------------------------------ pure masking


def _ids(b, t, seed=0, low=10, high=2000):
    """Random ids that never contain MASK_ID, so 'changed' == 'masked'."""
    return torch.randint(low, high, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("p", [0.05, 0.15, 0.5])
def test_realized_mask_rate_matches_p(p):
    ids = _ids(256, 64)
    protect = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.1
    _, mask = mask_contexts(ids, p, MASK_ID, seed=3, context_indices=range(256), protect=protect)
    eligible = ~protect
    eligible[:, 0] = False
    n = int(eligible.sum())
    rate = mask[eligible].float().mean().item()
    assert abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / n), (rate, p, n)
    assert not mask[~eligible].any()


def test_position0_and_protected_never_masked_and_replacement_is_1to1():
    ids = _ids(64, 40)
    protect = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.3
    out, mask = apply_mask(ids, 0.9, MASK_ID, torch.Generator().manual_seed(0), protect=protect)
    assert out.shape == ids.shape and out.dtype == ids.dtype and mask.dtype == torch.bool
    assert not mask[:, 0].any() and not (mask & protect).any()
    assert mask.sum() > 0.8 * (~protect[:, 1:]).sum()  # p=0.9: most eligible positions are masked
    assert (out[mask] == MASK_ID).all() and torch.equal(out[~mask], ids[~mask])
    assert set(out.unique().tolist()) <= set(ids.unique().tolist()) | {MASK_ID}
    # p = 1 masks exactly the eligible positions; p = 0 nothing
    out1, mask1 = apply_mask(ids, 1.0, MASK_ID, torch.Generator().manual_seed(0), protect=protect)
    expected = ~protect
    expected[:, 0] = False
    assert torch.equal(mask1, expected)
    out0, mask0 = apply_mask(ids, 0.0, MASK_ID, torch.Generator().manual_seed(0))
    assert not mask0.any() and torch.equal(out0, ids)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        apply_mask(ids, 1.5, MASK_ID, torch.Generator())
    with pytest.raises(ValueError, match="protect"):
        apply_mask(ids, 0.1, MASK_ID, torch.Generator(), protect=protect[:, :5])


def test_masks_depend_only_on_seed_and_context_index():
    ids = _ids(8, 48)
    a = mask_contexts(ids, P, MASK_ID, seed=0, context_indices=range(100, 108))
    b = mask_contexts(ids, P, MASK_ID, seed=0, context_indices=range(100, 108))
    c = mask_contexts(ids, P, MASK_ID, seed=1, context_indices=range(100, 108))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    ones = [mask_contexts(ids[i:i + 1], P, MASK_ID, 0, [100 + i])[1] for i in range(8)]
    fours = [mask_contexts(ids[i:i + 4], P, MASK_ID, 0, range(100 + i, 104 + i))[1] for i in (0, 4)]
    assert torch.equal(torch.cat(ones), a[1]) and torch.equal(torch.cat(fours), a[1])
    # a context's mask does not depend on its neighbours' ids or on its position in the batch
    shuffled = mask_contexts(ids.flip(0), P, MASK_ID, 0, list(range(107, 99, -1)))[1]
    assert torch.equal(shuffled.flip(0), a[1])
    # distinct contexts get distinct masks
    assert len({tuple(m.tolist()) for m in a[1]}) == 8
    assert context_generator(0, 5).initial_seed() != context_generator(0, 6).initial_seed()


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


def test_mask_token_id_on_the_bundled_tokenizer(tiny):
    mid, how = mask_token_id(tiny.tokenizer)
    assert mid == MASK_ID and "'...'" in how and "2026" in how
    assert mask_token_id(tiny.tokenizer, " ...")[0] == 4563
    with pytest.raises(ValueError, match=r"(?s)not a single token.*-> \[.*,.*\].*--mask_token_id"):
        mask_token_id(tiny.tokenizer, "a long mask phrase")


class _FakeTok:
    """'...' is two tokens, ' ...' one: the leading-space variant must be chosen and said so."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": {"...": [13, 13], " ...": [77]}.get(text, [1, 2, 3])}


def test_mask_token_id_falls_back_to_the_leading_space_variant():
    mid, how = mask_token_id(_FakeTok())
    assert mid == 77 and "' ...'" in how and "[13, 13]" in how


# ------------------------------------------------------------------------------------------ harvests


def _cfg(tiny_llama_dir, text_dir, out, **kw):
    base = dict(model=str(tiny_llama_dir), hook_name="blocks.1.hook_resid_post", out=str(out), n_tokens=1500,
                context_size=CTX, batch_size=4, checkpoint_every=2, progress=False,
                data=DataConfig(corpora=[], text_files=[str(text_dir)], eval_fraction=0.1))
    base.update(kw)
    return HarvestConfig(**base)


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, text_dir, tiny, tmp_path_factory):
    """The clean, masked and paired (masked + clean target) harvests of the same text."""
    root = tmp_path_factory.mktemp("runs")
    clean = harvest(_cfg(tiny_llama_dir, text_dir, root / "clean"), lm=tiny)
    masked = harvest(_cfg(tiny_llama_dir, text_dir, root / "masked", mask_prob=P), lm=tiny)
    pm = harvest(_cfg(tiny_llama_dir, text_dir, root / "pm", mask_prob=P, paired_clean_out=str(root / "pc")), lm=tiny)
    return {"clean": clean, "masked": masked, "pm": pm, "pc": ActivationCache.open(root / "pc"), "root": root}


def _ctx_index(cache):
    """Context index of each row: rows come in context order with increasing positions within a context."""
    pos = cache.meta_column("positions")
    return np.concatenate([[0], np.cumsum(np.diff(pos) <= 0)])


def _contexts(tiny, tiny_llama_dir, text_dir, k):
    docs = split_documents(DataConfig(corpora=[], text_files=[str(text_dir)], eval_fraction=0.1))[0].shuffle(0)
    it = iter_contexts(tiny, docs, CTX)
    return torch.stack([next(it)[0] for _ in range(k)])


def test_clean_harvest_manifest_is_unchanged(runs):
    m = runs["clean"].manifest
    assert m["columns"] == BASE_COLUMNS
    assert not any(k.startswith("mask") or k == "pair_role" for k in m)
    assert set(m["progress"]) == {"contexts_done", "max_doc"}


def test_masked_harvest_contents(runs, tiny, tiny_llama_dir, text_dir):
    cache, clean = runs["masked"], runs["clean"]
    m = cache.manifest
    assert cache.n_tokens == 1500 and m["complete"]
    assert m["mask_prob"] == P and m["mask_token_id"] == MASK_ID and m["mask_string"] == "..."
    assert "2026" in m["mask_choice"] and m["mask_seed"] == 0 and m["progress"]["batch_size"] == 4
    assert {"mask_prob", "mask_token_id", "mask_string", "mask_choice", "mask_seed"} <= set(m["meta_keys"])
    assert m["columns"]["masked"] == "bool" and "input_ids" in m["columns"]
    masked, inp, tok = cache.meta_column("masked"), cache.meta_column("input_ids"), cache.meta_column("token_ids")
    pos = cache.meta_column("positions")
    n = len(masked)
    assert abs(masked.mean() - P) <= 5 * math.sqrt(P * (1 - P) / n), masked.mean()
    assert np.array_equal(inp == MASK_ID, masked)  # the corpus has no literal "..."
    assert np.array_equal(inp[~masked], tok[~masked]) and (tok != MASK_ID).all()  # token_ids are the originals

    # ground truth: regenerate the contexts and their masks (one batch of all contexts, not the harvest's 4)
    ctx = _ctx_index(cache)
    k = int(ctx.max()) + 1
    ids = _contexts(tiny, tiny_llama_dir, text_dir, k)
    protect = torch.isin(ids, torch.tensor(sorted(tiny.special_ids)))
    ids_in, full_mask = mask_contexts(ids, P, MASK_ID, 0, range(k), protect=protect)
    ci, pi = torch.as_tensor(ctx), torch.as_tensor(pos).long()
    assert np.array_equal(tok, ids[ci, pi].numpy()) and np.array_equal(masked, full_mask[ci, pi].numpy())
    # rows are the activations of the masked context (first two contexts recomputed)
    hook = resolve_hook(tiny.model, "blocks.1.hook_resid_post")
    h = capture(tiny.model, hook, ids_in[:2])
    sel = np.flatnonzero(ctx < 2)
    torch.testing.assert_close(cache.read_rows(sel), h[ci[sel], pi[sel]])

    # against the clean harvest at the same (context, position)
    ckey = _ctx_index(clean) * CTX + clean.meta_column("positions")
    mkey = ctx * CTX + pos
    both = np.isin(mkey, ckey)
    crow = np.searchsorted(ckey, mkey[both])
    mrow = np.flatnonzero(both)
    assert np.array_equal(clean.meta_column("token_ids")[crow], tok[mrow])
    assert np.array_equal(clean.meta_column("doc_ids")[crow], cache.meta_column("doc_ids")[mrow])
    first = torch.where(full_mask.any(1), full_mask.float().argmax(1), torch.full((k,), CTX)).numpy()
    before = pos[mrow] < first[ctx[mrow]]
    at_mask = masked[mrow]
    assert before.sum() > 50 and at_mask.sum() > 50
    a_m, a_c = cache.read_rows(mrow), clean.read_rows(crow)
    torch.testing.assert_close(a_m[before], a_c[before], rtol=0, atol=1e-6)
    assert ((a_m[at_mask] - a_c[at_mask]).norm(dim=1) > 1e-3 * a_c[at_mask].norm(dim=1)).all()


def test_masked_resume_matches_uninterrupted(runs, tiny_llama_dir, text_dir, tiny, tmp_path, monkeypatch):
    import saelab.activations.harvest as hv
    from synthetic import crash_on_call

    crash_on_call(monkeypatch, hv, "capture", 6)  # killed mid-harvest, after the checkpoint at batch 4
    with pytest.raises(KeyboardInterrupt):
        harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "part", mask_prob=P), lm=tiny)
    monkeypatch.undo()
    part = ActivationCache.open(tmp_path / "part", allow_incomplete=True)
    assert 0 < part.n_tokens < 1500 and part.manifest["progress"]["contexts_done"] == 16
    resumed = harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "part", mask_prob=P), lm=tiny)
    _assert_same_cache(resumed, runs["masked"])


def _assert_same_cache(a, b, same_shards=True):
    assert a.n_tokens == b.n_tokens and (np.array_equal(a.shard_rows, b.shard_rows) or not same_shards)
    rows = np.arange(b.n_tokens)
    torch.testing.assert_close(a.read_rows(rows), b.read_rows(rows), rtol=0, atol=0)
    assert a.columns == b.columns
    for col in b.columns:
        np.testing.assert_array_equal(a.meta_column(col), b.meta_column(col))


def test_clean_and_masked_caches_refuse_each_other(runs, tiny_llama_dir, text_dir, tiny):
    clean, masked = runs["clean"].path, runs["masked"].path
    with pytest.raises(CacheMismatchError, match="mask_prob"):
        harvest(_cfg(tiny_llama_dir, text_dir, clean, mask_prob=P), lm=tiny)
    with pytest.raises(CacheMismatchError, match="mask_prob"):
        harvest(_cfg(tiny_llama_dir, text_dir, masked), lm=tiny)
    with pytest.raises(CacheMismatchError, match="mask_seed"):
        harvest(_cfg(tiny_llama_dir, text_dir, masked, mask_prob=P, mask_seed=1), lm=tiny)
    with pytest.raises(CacheMismatchError, match="mask_token_id"):
        harvest(_cfg(tiny_llama_dir, text_dir, masked, mask_prob=P, mask_token_id=4563), lm=tiny)
    assert ActivationCache.open(clean, verify=True).n_tokens == 1500  # untouched by the refusals
    assert ActivationCache.open(masked, verify=True).n_tokens == 1500


def test_bad_mask_settings_fail_before_any_work(tiny_llama_dir, text_dir, tiny, tmp_path):
    out = tmp_path / "c"
    with pytest.raises(ValueError, match="--mask_token_id"):
        harvest(_cfg(tiny_llama_dir, text_dir, out, mask_prob=P, mask_string="a long mask phrase"), lm=tiny)
    with pytest.raises(ValueError, match="special token"):
        harvest(_cfg(tiny_llama_dir, text_dir, out, mask_prob=P, mask_token_id=tiny.prefix_id), lm=tiny)
    with pytest.raises(ValueError, match="mask_prob > 0"):
        harvest(_cfg(tiny_llama_dir, text_dir, out, paired_clean_out=str(tmp_path / "p")), lm=tiny)
    with pytest.raises(ValueError, match="differ from out"):
        harvest(_cfg(tiny_llama_dir, text_dir, out, mask_prob=P, paired_clean_out=str(out)), lm=tiny)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        harvest(_cfg(tiny_llama_dir, text_dir, out, mask_prob=1.5), lm=tiny)
    assert not out.exists() and not (tmp_path / "p").exists()


# ------------------------------------------------------------------------------------------ paired (denoising)


def _row_index_twin(cache, path):
    """A cache with the same shard sizes as ``cache`` whose one activation value per row is its global index."""
    w = ActivationCacheWriter(path, model="twin", hook_name="row_index", d_in=1, shard_rows=int(cache.shard_rows.max()),
                              fsync=False)
    off = 0
    for n in cache.shard_rows.tolist():
        z = np.zeros(n, dtype=np.int64)
        w.add(np.arange(off, off + n, dtype=np.float32)[:, None], token_ids=z, doc_ids=z, positions=z)
        off += n
        w.checkpoint({"rows": off})
    twin = w.finalize()
    assert np.array_equal(twin.shard_rows, cache.shard_rows)
    return twin


def test_paired_caches_are_row_aligned(runs, tmp_path):
    pm, pc, clean = runs["pm"], runs["pc"], runs["clean"]
    _assert_same_cache(pm, runs["masked"])  # the masked stream does not depend on writing a pair
    assert pc.manifest["pair_role"] == "clean_target" and pc.manifest["mask_prob"] == P
    assert pc.n_shards >= 4 and np.array_equal(pm.shard_rows, pc.shard_rows)
    check_paired_caches(pm, pc, full=True)
    with pytest.raises(ValueError, match="not a paired clean cache"):
        check_paired_caches(pm, runs["masked"])
    for col in ("token_ids", "doc_ids", "positions", "input_ids", "masked"):
        np.testing.assert_array_equal(pm.meta_column(col), pc.meta_column(col))

    # the pair's rows are the clean activations of the same (context, position)
    ckey = _ctx_index(clean) * CTX + clean.meta_column("positions")
    pkey = _ctx_index(pc) * CTX + pc.meta_column("positions")
    both = np.isin(pkey, ckey)
    assert both.mean() > 0.95
    torch.testing.assert_close(pc.read_rows(np.flatnonzero(both)), clean.read_rows(np.searchsorted(ckey, pkey[both])),
                               rtol=0, atol=0)
    masked_rows = np.flatnonzero(pc.meta_column("masked"))
    assert (pc.read_rows(masked_rows) - pm.read_rows(masked_rows)).norm(dim=1).min() > 0

    # iter_batches with the same seed yields row-aligned batches from both caches
    tm, tc = _row_index_twin(pm, tmp_path / "tm"), _row_index_twin(pc, tmp_path / "tc")
    kw = dict(seed=7, shuffle_window_shards=2, epochs=2)
    n_b = 0
    for xm, xc, im, ic in zip(pm.iter_batches(100, **kw), pc.iter_batches(100, **kw),
                              tm.iter_batches(100, **kw), tc.iter_batches(100, **kw), strict=True):
        im, ic = im[:, 0].long().numpy(), ic[:, 0].long().numpy()
        assert np.array_equal(im, ic)
        torch.testing.assert_close(xm, pm.read_rows(im), rtol=0, atol=0)  # the twin follows the real order
        torch.testing.assert_close(xc, pc.read_rows(ic), rtol=0, atol=0)
        for col in ("token_ids", "positions", "doc_ids"):
            assert np.array_equal(pm.meta_column(col)[im], pc.meta_column(col)[ic])
        n_b += 1
    assert n_b == 2 * (1500 // 100)
    assert im.tolist() != sorted(im.tolist())  # shuffled, so alignment is not trivial


@pytest.mark.filterwarnings("ignore:activation cache .* closed without checkpoint")
def test_paired_resume_after_crash_between_the_two_checkpoints(runs, tiny_llama_dir, text_dir, tiny, tmp_path,
                                                               monkeypatch):
    import saelab.activations.harvest as hv

    calls = {"n": 0}

    class Dying(ActivationCacheWriter):
        def checkpoint(self, progress):
            if self.path.name == "pc":
                calls["n"] += 1
                if calls["n"] == 3:  # the masked cache has committed this checkpoint, the pair has not
                    raise KeyboardInterrupt
            super().checkpoint(progress)

    cfg = _cfg(tiny_llama_dir, text_dir, tmp_path / "pm", mask_prob=P, paired_clean_out=str(tmp_path / "pc"))
    monkeypatch.setattr(hv, "ActivationCacheWriter", Dying)
    with pytest.raises(KeyboardInterrupt):
        harvest(cfg, lm=tiny)
    monkeypatch.undo()
    pm_part = ActivationCache.open(tmp_path / "pm", allow_incomplete=True).manifest["progress"]
    pc_part = ActivationCache.open(tmp_path / "pc", allow_incomplete=True).manifest["progress"]
    assert pm_part["contexts_done"] == 24 and pc_part["contexts_done"] == 16  # unequal: the pair must catch up
    with pytest.raises(ValueError, match="--batch_size 4"):
        harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "pm", mask_prob=P, paired_clean_out=str(tmp_path / "pc"),
                     batch_size=8), lm=tiny)
    # resume with another checkpoint interval: the pair must still checkpoint where the masked cache did
    cfg3 = _cfg(tiny_llama_dir, text_dir, tmp_path / "pm", mask_prob=P, paired_clean_out=str(tmp_path / "pc"),
                checkpoint_every=3)
    resumed = harvest(cfg3, lm=tiny)
    pc = ActivationCache.open(tmp_path / "pc")
    check_paired_caches(resumed, pc, full=True)
    _assert_same_cache(resumed, runs["pm"], same_shards=False)
    _assert_same_cache(pc, runs["pc"], same_shards=False)
    assert (pc.manifest["progress"]["clean_outlier_rows"]
            == runs["pc"].manifest["progress"]["clean_outlier_rows"])


def test_pair_can_be_added_to_a_finished_masked_cache(runs, tiny_llama_dir, text_dir, tiny, tmp_path):
    import shutil

    shutil.copytree(runs["masked"].path, tmp_path / "pm")
    # another checkpoint interval than the masked run's: the pair must copy the masked cache's checkpoints
    cache = harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "pm", mask_prob=P, paired_clean_out=str(tmp_path / "pc"),
                         checkpoint_every=3), lm=tiny)
    _assert_same_cache(cache, runs["masked"])
    _assert_same_cache(ActivationCache.open(tmp_path / "pc"), runs["pc"])


def test_paired_counts_rows_the_clean_pass_would_drop(tiny_llama_dir, text_dir, tiny, tmp_path):
    from saelab.data.split import select_rows

    mult = 1.1  # tight norm filter, so the clean and masked passes disagree on some rows
    pm = harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "pm", n_tokens=300, mask_prob=0.5, max_norm_multiple=mult,
                      paired_clean_out=str(tmp_path / "pc")), lm=tiny)
    pc = ActivationCache.open(tmp_path / "pc")
    check_paired_caches(pm, pc, full=True)
    ctx, pos = _ctx_index(pm), pm.meta_column("positions")
    k = -(-(int(ctx.max()) + 1) // 4) * 4
    ids = _contexts(tiny, tiny_llama_dir, text_dir, k)
    hook = resolve_hook(tiny.model, "blocks.1.hook_resid_post")
    dropped = 0
    for j in range(0, k, 4):  # the harvest's batches of 4 contexts (the norm filter uses the batch median)
        ck = select_rows(capture(tiny.model, hook, ids[j:j + 4]), ids[j:j + 4], tiny.special_ids, mult)
        sel = (ctx >= j) & (ctx < j + 4)
        dropped += int((~ck[torch.as_tensor(ctx[sel] - j), torch.as_tensor(pos[sel]).long()]).sum())
    assert dropped > 0 and pc.manifest["progress"]["clean_outlier_rows"] == dropped


# ------------------------------------------------------------------------- denoising through the trainer


def test_trainer_denoising_reconstructs_the_paired_clean_rows(runs, tmp_path, monkeypatch):
    """With target_cache, the loss target is the clean row aligned with each masked input row."""
    import saelab.train as tr
    from saelab.sae.config import SAEConfig
    from saelab.train import TrainConfig, train

    seen = []
    real = tr.losses.reconstruction_loss
    monkeypatch.setattr(tr.losses, "reconstruction_loss", lambda y, x_hat: (seen.append(y.detach().clone()), real(y, x_hat))[1])
    cfg = TrainConfig(cache=str(runs["pm"].path), target_cache=str(runs["pc"].path), out=str(tmp_path / "sae"),
                      sae=SAEConfig(d_sae=64, k=4), batch_size=100, n_tokens=300, progress=False, normalize_activations=False)
    res = train(cfg)
    extra = json.loads((res.sae_dir / "cfg.json").read_text())["saelab"]["config"]["extra"]
    assert extra["masking"]["mask_prob"] == P and extra["masking"]["mask_token_id"] == MASK_ID
    assert extra["denoising_target_cache"] == str(runs["pc"].path)
    want = next(runs["pc"].iter_batches(100, seed=0, epochs=None))
    inputs = next(runs["pm"].iter_batches(100, seed=0, epochs=None))
    torch.testing.assert_close(seen[0], want)
    assert not torch.equal(seen[0], inputs)  # masked inputs differ from their clean targets


def test_trainer_refuses_a_target_that_is_not_the_pair(runs, tmp_path):
    from saelab.sae.config import SAEConfig
    from saelab.train import TrainConfig, train

    cfg = TrainConfig(cache=str(runs["pm"].path), target_cache=str(runs["clean"].path), out=str(tmp_path / "sae"),
                      sae=SAEConfig(d_sae=64, k=4), batch_size=100, n_tokens=300, progress=False)
    with pytest.raises(ValueError, match="paired clean cache"):
        train(cfg)
