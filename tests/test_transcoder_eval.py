"""A transcoder in the forward pass: the splice at the MLP output is right, and the core eval judges a transcoder
on its target hook (FVE of the MLP output, CE/KL with the transcoder standing in for the MLP)."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.evals.core import CoreEvalConfig, evaluate_core, evaluate_core_transcoder
from saelab.data.split import DataConfig
from saelab.models.hooks import resolve_hook, splice_transcoder
from saelab.models.lm import load_lm
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE

MLP_IN, MLP_OUT = "model.layers.1.post_attention_layernorm", "model.layers.1.mlp"


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


def test_splicing_the_true_mlp_reproduces_the_model(lm):
    """With the block's own MLP as the stand-in, the spliced forward equals the clean one: the splice reads the MLP
    input of the same forward and replaces exactly the MLP output. A zero stand-in changes the logits (the splice is
    live)."""
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    hook_in, hook_out = resolve_hook(lm.model, MLP_IN), resolve_hook(lm.model, MLP_OUT)
    mlp = hook_out.module
    with torch.no_grad():
        clean = lm.model(input_ids=ids).logits
        with splice_transcoder(hook_in, hook_out, lambda x, y: mlp.forward(x)):  # forward: no hooks (ours would recurse)
            spliced = lm.model(input_ids=ids).logits
        with splice_transcoder(hook_in, hook_out, lambda x, y: torch.zeros_like(y)):
            zeroed = lm.model(input_ids=ids).logits
    torch.testing.assert_close(spliced, clean, rtol=0, atol=0)
    assert (zeroed - clean).abs().max() > 1e-3


def test_splice_refuses_an_input_hook_downstream_of_the_output(lm):
    hook_in, hook_out = resolve_hook(lm.model, "model.layers.2.mlp"), resolve_hook(lm.model, MLP_OUT)
    with pytest.raises(RuntimeError, match="must be upstream"), torch.no_grad():
        with splice_transcoder(hook_in, hook_out, lambda x, y: y):
            lm.model(input_ids=torch.ones(1, 4, dtype=torch.long))


def test_core_eval_of_a_transcoder_judges_the_target(lm, tiny_llama_dir, text_dir, monkeypatch):
    """``evaluate_core`` routes a transcoder to the two-hook eval. With the block's MLP made linear (``y = x A^T``), a
    skip-transcoder whose skip term is ``A`` and whose decoder is off predicts the MLP exactly: FVE 1, the spliced
    model equals the clean one (KL 0, CE-loss score 1); the same transcoder with a wrong skip term scores lower."""
    torch.manual_seed(0)
    A = torch.randn(32, 32) * 0.5
    monkeypatch.setattr(resolve_hook(lm.model, MLP_OUT).module, "forward", lambda x: x @ A.T)
    cfg = SAEConfig(d_in=32, d_sae=48, activation="topk", k=4, transcoder=True, skip=True, d_out=32,
                    model_name=str(tiny_llama_dir), hook_name=MLP_IN, hook_name_out=MLP_OUT)
    tc = SAE(cfg)
    with torch.no_grad():
        tc.W_skip.copy_(A)
        tc.W_dec.zero_()
        tc.b_dec.zero_()
    ecfg = CoreEvalConfig(sae="tiny", n_tokens=300, context_size=32, batch_size=4, progress=False,
                          data=DataConfig(corpora=[], text_files=[str(text_dir)], eval_fraction=0.5))
    m = evaluate_core(tc, lm, ecfg)
    assert m.n_tokens >= 300 and m.fve == pytest.approx(1.0, abs=1e-5)
    assert m.kl_zero > 1e-3 and m.kl_sae == pytest.approx(0.0, abs=1e-6)
    assert m.ce_sae == pytest.approx(m.ce_clean, abs=1e-5) and m.ce_loss_score == pytest.approx(1.0, abs=1e-3)
    with torch.no_grad():
        tc.W_skip.mul_(0.5)  # half the MLP: worse on every count, still better than zero-ablation
    worse = evaluate_core_transcoder(tc, lm, ecfg)
    assert worse.fve < 0.9 and 0 < worse.kl_sae < worse.kl_zero and math.isfinite(worse.ce_loss_score)
    with pytest.raises(ValueError, match="needs a transcoder"):
        evaluate_core_transcoder(SAE(SAEConfig(d_in=32, d_sae=48, activation="topk", k=4)), lm, ecfg)
