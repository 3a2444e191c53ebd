"""Harvest: context packing, row filtering, cache contents, resume and refusal of mismatched caches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saelab.activations.cache import ActivationCache, CacheMismatchError
from saelab.activations.harvest import HarvestConfig, harvest
from saelab.data.split import DataConfig, iter_contexts, select_rows
from saelab.data import Document
from saelab.models.hooks import capture, resolve_hook
from saelab.models.lm import load_lm


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


def _cfg(tiny_llama_dir, text_dir, out, **kw):
    base = dict(model=str(tiny_llama_dir), hook_name="blocks.1.hook_resid_post", out=str(out), n_tokens=1500,
                context_size=32, batch_size=4, checkpoint_every=2, progress=False,
                data=DataConfig(corpora=[], text_files=[str(text_dir)], eval_fraction=0.1))
    base.update(kw)
    return HarvestConfig(**base)


def test_iter_contexts_packs_documents(tiny):
    docs = [Document(text="hello world " * n, source="u", doc_id=f"u/{n}") for n in (3, 40, 1, 7)]
    ctxs = list(iter_contexts(tiny, docs, 16))
    assert all(ids.shape == (16,) and ids[0] == tiny.prefix_id for ids, _ in ctxs)
    assert all(doc[0] == -1 for _, doc in ctxs)
    flat_doc = torch.cat([doc[1:] for _, doc in ctxs])
    assert (flat_doc.diff() >= 0).all()  # document order preserved
    flat_ids = torch.cat([ids[1:] for ids, _ in ctxs])
    # documents are separated by the prefix token, which belongs to the next document
    boundaries = (flat_doc.diff() > 0).nonzero().flatten() + 1
    assert (flat_ids[boundaries] == tiny.prefix_id).all()
    n_tokens = sum(len(tiny.tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs) + len(docs) - 1
    assert len(flat_ids) == (n_tokens // 15) * 15


def test_select_rows_drops_position0_specials_and_outliers():
    h = torch.ones(2, 6, 4)
    h[1, 3] *= 100.0  # norm outlier
    ids = torch.tensor([[0, 5, 6, 1, 7, 8], [0, 5, 6, 7, 8, 9]])
    keep = select_rows(h, ids, {0, 1}, 10.0)
    assert keep.tolist() == [[False, True, True, False, True, True], [False, True, True, False, True, True]]
    assert select_rows(h, ids, {0, 1}, 0.0)[1, 3]


def test_harvest_writes_a_described_cache(tiny_llama_dir, text_dir, tmp_path, tiny):
    cache = harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "c"), lm=tiny)
    m = cache.manifest
    assert cache.n_tokens == 1500 and cache.d_in == 32
    assert m["model"] == str(tiny_llama_dir) and m["hook_name"] == "blocks.1.hook_resid_post" and m["complete"]
    assert m["context_size"] == 32 and m["prefix_id"] == 0 and m["max_norm_multiple"] == 10.0
    pos, tok, doc = cache.meta_column("positions"), cache.meta_column("token_ids"), cache.meta_column("doc_ids")
    assert pos.min() >= 1 and (tok != 0).all() and doc.min() >= 0
    docs = json.loads((tmp_path / "c" / "documents.json").read_text())
    assert len(docs) > doc.max() and docs[0]["doc_id"].startswith("user/")
    # rows are the activations of their token in context: recompute the first context
    hook = resolve_hook(tiny.model, "blocks.1.hook_resid_post")
    first = cache.read_rows(np.arange(5))
    ctx = next(iter_contexts(tiny, _train_docs(tiny_llama_dir, text_dir), 32))[0]
    h = capture(tiny.model, hook, ctx[None])[0]
    torch.testing.assert_close(first, h[torch.as_tensor(pos[:5]).long()])


def _train_docs(tiny_llama_dir, text_dir):
    from saelab.data.split import split_documents

    return split_documents(DataConfig(corpora=[], text_files=[str(text_dir)], eval_fraction=0.1))[0].shuffle(0)


def test_resume_matches_uninterrupted(tiny_llama_dir, text_dir, tmp_path, tiny, monkeypatch):
    full = harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "full"), lm=tiny)
    import saelab.activations.harvest as hv
    from synthetic import crash_on_call

    crash_on_call(monkeypatch, hv, "capture", 6)  # killed mid-harvest, after the checkpoint at batch 4
    with pytest.raises(KeyboardInterrupt):
        harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "part"), lm=tiny)
    monkeypatch.undo()
    with pytest.raises(Exception, match="did not finish|incomplete|resume"):
        ActivationCache.open(tmp_path / "part")
    resumed = harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "part"), lm=tiny)
    assert resumed.n_tokens == full.n_tokens
    all_rows = np.arange(full.n_tokens)
    torch.testing.assert_close(resumed.read_rows(all_rows), full.read_rows(all_rows), rtol=0, atol=0)
    np.testing.assert_array_equal(resumed.meta_column("token_ids"), full.meta_column("token_ids"))


def test_mismatched_cache_is_refused(tiny_llama_dir, text_dir, tmp_path, tiny):
    harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "c", n_tokens=300), lm=tiny)
    with pytest.raises(CacheMismatchError, match="hook_name"):
        harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "c", n_tokens=300, hook_name="blocks.0.hook_resid_post"), lm=tiny)


def test_unknown_hook_is_refused_before_any_work(tiny_llama_dir, text_dir, tmp_path, tiny):
    with pytest.raises(ValueError, match="Valid residual hooks"):
        harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "c", hook_name="blocks.7.hook_resid_post"), lm=tiny)
    assert not (tmp_path / "c").exists()


def test_too_little_text_is_a_clear_error(tiny_llama_dir, text_dir, tmp_path, tiny):
    with pytest.raises(ValueError, match="ran out"):
        harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "c", n_tokens=10**6), lm=tiny)


def test_training_order_is_made_once_for_bundled_text_and_reread_for_files(tmp_path):
    """Bundled corpora: the split and the harvest's shuffled order are pure functions of the settings, made once
    per process (the same objects come back) and equal to splitting and shuffling by hand. Text files are read
    again on every call, so an edited file is seen."""
    from saelab.data.split import split_documents, training_order

    data = DataConfig(corpora=["bbc_news", "quotes"], limit_per_corpus=40, eval_fraction=0.25, split_seed=2)
    order = training_order(data, 7)
    assert training_order(data, 7) is order and split_documents(data) is split_documents(data)
    by_hand = split_documents(data)[0].shuffle(7)
    assert [d.text for d in order] == [d.text for d in by_hand] and len(order) == 60
    assert [d.text for d in training_order(data, 8)] != [d.text for d in order]

    f = tmp_path / "a.txt"
    f.write_text("first version of the text")
    files = DataConfig(corpora=[], text_files=[str(tmp_path)], eval_fraction=0.5)
    assert [d.text for d in training_order(files, 0)] == ["first version of the text"]  # round(0.5) = 0 held out
    (tmp_path / "b.txt").write_text("a second file")
    assert len(split_documents(files)[0]) + len(split_documents(files)[1]) == 2
