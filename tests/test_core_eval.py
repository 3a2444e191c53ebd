"""The core eval: the cached / partial-forward path against the three-full-forward definition, on a tiny Llama."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saelab.data.split import DataConfig
from saelab.evals.base import LMActivationStore
from saelab.evals.core import (
    CoreEvalConfig,
    CoreMetrics,
    ce_kl_from_clean_stats,
    clean_distribution_stats,
    evaluate_core,
    evaluate_core_reference,
)
from saelab.models.hooks import capture, resolve_hook
from saelab.models.lm import load_lm
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE

METRICS = [f.name for f in dataclasses.fields(CoreMetrics) if f.name not in ("seconds", "timings_s", "suite", "sae")]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


def _sae(tiny, hook: str, activation: str = "topk", seed: int = 0) -> SAE:
    """A 2x SAE whose atoms are +-(a random orthonormal basis): top-k keeps the k largest coordinates of
    ``x - b_dec`` in that basis, a partial but faithful reconstruction (FVE well inside (0, 1)). BatchTopK without a
    threshold selects per eval batch, so it also checks that both paths see the same batches."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, k=12, activation=activation, model_name="tiny", hook_name=hook))
    h = capture(tiny.model, resolve_hook(tiny.model, hook), torch.randint(3, 1000, (4, 16), generator=g))
    Q = torch.linalg.qr(torch.randn(32, 32, generator=g)).Q.T
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([Q, -Q]))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(h[:, 1:].reshape(-1, 32).mean(0))
    return sae.eval()


def _cfg(text_dir, **kw) -> CoreEvalConfig:
    data = DataConfig(corpora=[], text_files=[str(text_dir)], eval_fraction=0.5)
    return CoreEvalConfig(n_tokens=300, context_size=32, batch_size=4, progress=False, data=data, **kw)


def _assert_same(a, b):
    """Equal to float32 rounding: 1e-5 relative; CE within 2e-6 nats and KL within 3e-7 nats (both paths round the
    logits and the V-term sums in float32; the observed differences are ~6e-7 and ~1e-7 nats); the scores within
    those tolerances propagated through their denominators."""
    for k in METRICS:
        va, vb = getattr(a, k), getattr(b, k)
        if vb is None:
            assert va is None, k
        elif k.startswith("ce_") and k != "ce_loss_score":
            assert va == pytest.approx(vb, rel=1e-5, abs=2e-6), k
        elif k.startswith("kl_") and k != "kl_score":
            assert va == pytest.approx(vb, rel=1e-5, abs=3e-7), k
        elif k == "ce_loss_score":
            assert va == pytest.approx(vb, rel=1e-5, abs=6e-6 / abs(b.ce_zero - b.ce_clean)), k
        elif k == "kl_score":
            assert va == pytest.approx(vb, rel=1e-5, abs=1e-6 / b.kl_zero), k
        else:
            assert va == pytest.approx(vb, rel=1e-5, abs=1e-7), k


def test_kl_from_clean_stats_equals_the_direct_kl():
    g = torch.Generator().manual_seed(0)
    V, D, P = 300, 16, 20
    W, b = torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    h_clean, h = torch.randn(P, D, generator=g), torch.randn(P, D, generator=g)
    targets = torch.randint(0, V, (P,), generator=g)
    z_clean = F.linear(h_clean, W, b)
    lp = z_clean.double().log_softmax(-1)
    lq = F.linear(h.double(), W.double(), b.double()).log_softmax(-1)
    stats = clean_distribution_stats(z_clean, W, b, targets, chunk=7)  # several row blocks
    torch.testing.assert_close(stats["ce"], -lp.gather(-1, targets[:, None])[:, 0])
    ce, kl = ce_kl_from_clean_stats(h, W, b, targets, stats)
    torch.testing.assert_close(kl, (lp.exp() * (lp - lq)).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, -lq.gather(-1, targets[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    assert float(kl.min()) > 0.1  # distinct distributions: the check is not 0 == 0
    _, kl_self = ce_kl_from_clean_stats(h_clean, W, None, targets, clean_distribution_stats(h_clean @ W.T, W))
    assert float(kl_self.abs().max()) < 1e-5  # KL(p || p) = 0, also without a bias


@pytest.mark.parametrize("hook,activation", [("blocks.1.hook_resid_post", "topk"),
                                             ("blocks.1.hook_resid_post", "batchtopk"),
                                             ("model.layers.1.mlp", "topk")])
def test_cached_core_eval_equals_the_three_forward_reference(tiny, text_dir, tmp_path, hook, activation):
    sae = _sae(tiny, hook, activation)
    cfg = _cfg(text_dir)
    ref = evaluate_core_reference(sae, tiny, cfg)
    store = LMActivationStore(tiny.name, resolve_hook(tiny.model, hook).hook_name, root=tmp_path)
    cold = evaluate_core(sae, tiny, cfg, store)
    warm = evaluate_core(sae, tiny, cfg, store)
    for m in (cold, warm):
        _assert_same(m, ref)
        assert m.timings_s.keys() >= {"lm_stage", "sae", "spliced_forward", "total"}
    assert ref.n_tokens >= 300 and 0.3 < ref.fve < 0.99  # a real, partial reconstruction ...
    assert ref.kl_zero > 5 * ref.kl_sae > 1e-6  # ... that moves the logits, less than zero-ablation does
    assert len(list(store.dir.glob("core_lm-*.safetensors"))) == 1


def test_cached_core_eval_without_ce_kl(tiny, text_dir, tmp_path):
    sae = _sae(tiny, "blocks.1.hook_resid_post")
    cfg = _cfg(text_dir, ce_kl=False)
    ref = evaluate_core_reference(sae, tiny, cfg)
    m = evaluate_core(sae, tiny, cfg, LMActivationStore(tiny.name, "blocks.1.hook_resid_post", root=tmp_path))
    _assert_same(m, ref)
    assert m.ce_sae is None and m.fve == pytest.approx(ref.fve, rel=1e-6)


def test_a_second_sae_runs_only_the_blocks_after_the_hook(tiny, text_dir, tmp_path):
    hook = "blocks.1.hook_resid_post"
    cfg = _cfg(text_dir)
    store = LMActivationStore(tiny.name, hook, root=tmp_path)
    evaluate_core(_sae(tiny, hook, seed=0), tiny, cfg, store)
    sae2 = _sae(tiny, hook, seed=1)
    calls = {"block0": 0, "block2": 0}
    layers = tiny.model.model.layers
    handles = [layers[0].register_forward_hook(lambda *_: calls.__setitem__("block0", calls["block0"] + 1)),
               layers[2].register_forward_hook(lambda *_: calls.__setitem__("block2", calls["block2"] + 1))]
    try:
        m = evaluate_core(sae2, tiny, cfg, store)
    finally:
        for h in handles:
            h.remove()
    assert calls["block0"] == 0  # the blocks up to the hook never run for the second SAE
    assert calls["block2"] >= 1  # the blocks after it do, once per batch
    _assert_same(m, evaluate_core_reference(sae2, tiny, cfg))


def test_a_nonlinear_head_falls_back_to_the_reference(tiny_llama_dir, text_dir, tmp_path):
    lm = load_lm(str(tiny_llama_dir))
    lm.model.lm_head = nn.Sequential(lm.model.lm_head, nn.Tanh())  # soft-capped logits: the KL identity fails
    hook = "blocks.1.hook_resid_post"
    sae = _sae(lm, hook)
    cfg = _cfg(text_dir)
    m = evaluate_core(sae, lm, cfg, LMActivationStore(lm.name, hook, root=tmp_path))
    _assert_same(m, evaluate_core_reference(sae, lm, cfg))
    assert "spliced_forward" not in m.timings_s


def test_store_for_another_hook_is_refused(tiny, text_dir, tmp_path):
    sae = _sae(tiny, "blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="activation store is for hook"):
        evaluate_core(sae, tiny, _cfg(text_dir), LMActivationStore(tiny.name, "blocks.0.hook_resid_post", root=tmp_path))


@pytest.mark.slow
def test_cached_core_eval_equals_the_reference_on_the_bundled_model(smollm, tmp_path):
    """The real model and text (SmolLM2-135M, layer 15, 49,152-token vocabulary): same metrics both ways."""
    hook = "blocks.15.hook_resid_post"
    x = capture(smollm.model, resolve_hook(smollm.model, hook), torch.randint(100, 20_000, (2, 64)))[:, 1:]
    sae = SAE(SAEConfig(d_in=576, d_sae=1152, k=128, activation="topk", model_name="smollm2-135m", hook_name=hook))
    Q = torch.linalg.qr(torch.randn(576, 576)).Q.T
    with torch.no_grad():  # +-(orthonormal basis) atoms, as _sae: a partial reconstruction
        sae.W_dec.copy_(torch.cat([Q, -Q]))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(x.reshape(-1, 576).mean(0))
    cfg = CoreEvalConfig(n_tokens=512, context_size=128, batch_size=2, progress=False)
    ref = evaluate_core_reference(sae.eval(), smollm, cfg)
    m = evaluate_core(sae, smollm, cfg, LMActivationStore(smollm.name, hook, root=tmp_path))
    _assert_same(m, ref)
    assert 0.3 < ref.fve < 0.99 and ref.kl_zero > ref.kl_sae > 1e-3
