"""Hook names, early-stopped capture and splicing, on small random HF models of two families."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from saelab.models.hooks import (capture, capture_many, expand_hook_names, resolve_hook, resolve_hooks, splice,
                                 valid_hook_names)
from saelab.models.lm import load_lm


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


def test_both_naming_schemes_resolve_to_the_same_block(tiny):
    a = resolve_hook(tiny.model, "blocks.1.hook_resid_post")
    b = resolve_hook(tiny.model, "model.layers.1")
    c = resolve_hook(tiny.model, "layers.1")
    assert a.module is b.module is c.module
    assert a.hook_name == b.hook_name == c.hook_name == "blocks.1.hook_resid_post"
    assert a.layer == 1
    sub = resolve_hook(tiny.model, "model.layers.2.mlp")
    assert sub.hook_name == "model.layers.2.mlp" and sub.layer == 2


@pytest.mark.parametrize("bad", ["blocks.3.hook_resid_post", "model.layers.9", "blocks.1.hook_resid_pre", "lm_head", "nonsense"])
def test_unknown_hooks_list_valid_ones(tiny, bad):
    with pytest.raises(ValueError) as e:
        resolve_hook(tiny.model, bad)
    assert "blocks.0.hook_resid_post .. blocks.2.hook_resid_post" in str(e.value)
    assert bad in str(e.value)


def test_capture_equals_full_forward_hidden_state(tiny):
    ids = torch.randint(3, 1000, (2, 10))
    for layer in range(3):
        h = capture(tiny.model, resolve_hook(tiny.model, f"blocks.{layer}.hook_resid_post"), ids)
        full = tiny.model(ids, output_hidden_states=True).hidden_states[layer + 1]
        if layer < 2:  # the last hidden_states entry is after the final norm
            torch.testing.assert_close(h, full)
        assert h.shape == (2, 10, 32)


def test_capture_stops_early(tiny):
    """Blocks after the hook and the LM head never run."""
    calls = []
    hooks = [blk.register_forward_hook(lambda m, i, o, n=n: calls.append(n)) for n, blk in enumerate(tiny.model.model.layers)]
    head = tiny.model.lm_head.register_forward_hook(lambda m, i, o: calls.append("head"))
    try:
        capture(tiny.model, resolve_hook(tiny.model, "blocks.0.hook_resid_post"), torch.randint(3, 100, (1, 5)))
    finally:
        for h in hooks + [head]:
            h.remove()
    assert calls == [0]


def test_splice_identity_and_zero_ablation(tiny):
    ids = torch.randint(3, 1000, (2, 8))
    hook = resolve_hook(tiny.model, "blocks.1.hook_resid_post")
    clean = tiny.model(ids).logits
    with splice(hook, lambda h: h):
        same = tiny.model(ids).logits
    with splice(hook, torch.zeros_like):
        ablated = tiny.model(ids).logits
    torch.testing.assert_close(same, clean)
    assert (ablated - clean).abs().max() > 1e-3
    after = tiny.model(ids).logits  # the hook is removed on exit
    torch.testing.assert_close(after, clean)


def test_other_architecture_gpt2():
    """Nothing is Llama-specific: GPT-2 keeps its blocks in transformer.h."""
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).eval()
    names = valid_hook_names(model)
    assert "blocks.1.hook_resid_post" in names and "transformer.h.1" in names
    hp = resolve_hook(model, "transformer.h.0")
    ids = torch.randint(0, 50, (1, 6))
    h = capture(model, hp, ids)
    torch.testing.assert_close(h, model(ids, output_hidden_states=True).hidden_states[1])


def test_prefix_is_endoftext_for_smollm_tokenizer(tiny):
    assert tiny.prefix_id == 0
    assert tiny.tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert tiny.d_model == 32 and tiny.n_layers == 3


def test_transformerlens_sub_hook_aliases_name_the_hf_modules(tiny):
    """blocks.L.hook_mlp_out / ln2.hook_normalized / hook_attn_out / ln1.hook_normalized resolve to the Llama block's
    mlp / post_attention_layernorm / self_attn / input_layernorm, under the HF path (one cache for both spellings),
    and capture exactly what the MLP consumes and produces."""
    m = tiny.model
    want = {"hook_mlp_out": "mlp", "ln2.hook_normalized": "post_attention_layernorm", "hook_attn_out": "self_attn",
            "ln1.hook_normalized": "input_layernorm"}
    for sub, mod in want.items():
        hp = resolve_hook(m, f"blocks.2.{sub}")
        assert hp.hook_name == hp.module_path == f"model.layers.2.{mod}" and hp.layer == 2
        assert hp.module is m.model.layers[2].get_submodule(mod)
    ids = torch.randint(3, 1000, (2, 8))
    got = capture_many(m, resolve_hooks(m, ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]), ids)
    x, y = got["model.layers.1.post_attention_layernorm"], got["model.layers.1.mlp"]
    torch.testing.assert_close(m.model.layers[1].mlp(x), y)  # the pair a transcoder learns
    assert expand_hook_names(m, "blocks.*.hook_mlp_out") == [f"blocks.{i}.hook_mlp_out" for i in range(3)]
    assert [h.hook_name for h in resolve_hooks(m, ["blocks.0.hook_mlp_out", "model.layers.0.mlp"])] == ["model.layers.0.mlp"]
    with pytest.raises(ValueError, match="module input.*blocks.1.ln2.hook_normalized"):
        resolve_hook(m, "blocks.1.hook_mlp_in")
    with pytest.raises(ValueError, match="the model has 3 blocks"):
        resolve_hook(m, "blocks.3.hook_mlp_out")


def test_sub_hook_aliases_on_gpt2_and_a_gemma_style_block():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).eval()
    assert resolve_hook(model, "blocks.1.ln2.hook_normalized").module_path == "transformer.h.1.ln_2"
    assert resolve_hook(model, "blocks.0.hook_attn_out").module_path == "transformer.h.0.attn"
    block = model.transformer.h[0]
    block.pre_feedforward_layernorm = torch.nn.LayerNorm(16)  # norms around the MLP: the TL meaning differs
    with pytest.raises(ValueError, match="Gemma-style"):
        resolve_hook(model, "blocks.0.hook_mlp_out")
