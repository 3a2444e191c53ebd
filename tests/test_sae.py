"""SAE module: activations, shapes, constraints, parity with direct formulas, save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from saelab.sae.activations import ACTIVATIONS
from saelab.codes import Code
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE
from saelab.sae.saving import load_sae, save_sae


def make(activation="topk", d_in=16, d_sae=64, k=4, device="cpu", **kw) -> SAE:
    """A random SAE, its parameters drawn on the CPU (the same numbers on every device), then moved to ``device``."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=k, hook_name="blocks.3.hook_resid_post", model_name="m", **kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    return sae.to(device)


@pytest.mark.parametrize("activation", ACTIVATIONS.names())
def test_encode_any_leading_dims_matches_flat(activation, device):
    sae = make(activation, device=device).eval()
    x = torch.randn(3, 5, 16).to(device)
    f = sae.encode(x)
    assert f.shape == (3, 5, 64)
    torch.testing.assert_close(f.reshape(15, 64), sae.encode(x.reshape(15, 16)))
    assert sae(x).shape == x.shape
    assert (f >= 0).all()


def test_wrong_width_is_a_clear_error():
    sae = make()
    with pytest.raises(ValueError, match="d_in=16"):
        sae.encode(torch.randn(4, 17))


def test_topk_matches_direct_formula(device):
    sae = make("topk", device=device)
    x = torch.randn(32, 16).to(device)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(4, dim=-1)
    f_ref = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    torch.testing.assert_close(sae.encode(x), f_ref)
    torch.testing.assert_close(sae(x), f_ref @ sae.W_dec + sae.b_dec)
    assert ((sae.encode(x) > 0).sum(-1) <= 4).all()


def test_sparse_decode_matches_dense_values_and_grads(device):
    sae = make("topk", device=device)
    x = torch.randn(16, 16).to(device)
    code, _ = sae.encode_code(x)
    out_sparse = sae.decode_code(code)
    g_sparse = torch.autograd.grad(out_sparse.pow(2).sum(), [sae.W_dec, sae.W_enc], retain_graph=True)
    out_dense = sae.decode(code.dense(64))
    g_dense = torch.autograd.grad(out_dense.pow(2).sum(), [sae.W_dec, sae.W_enc])
    torch.testing.assert_close(out_sparse, out_dense)
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b)


def test_batchtopk_keeps_k_times_batch_and_threshold_at_eval(device):
    sae = make("batchtopk", device=device).train()
    x = torch.randn(50, 16).to(device)
    code, pre = sae.encode_code(x)
    f = code.dense(64)  # training codes are sparse (padded (N, w)); compare in the dense layout
    n_active = int((f > 0).sum())
    assert n_active == 4 * 50  # random pre-acts: ReLU leaves far more than k*B positives
    kept = f[f > 0]
    rest = pre.relu()[f == 0]
    assert kept.min() >= rest.max()  # exactly the largest k*B values
    sae.activation.update_threshold(code)
    assert torch.isclose(sae.activation.threshold, kept.min())
    sae.eval()
    f = sae.encode(x)
    torch.testing.assert_close(f, pre.relu() * (pre.relu() > kept.min()))


def test_jumprelu_forward_and_threshold_gradient(device):
    sae = make("jumprelu", device=device, jumprelu_init_threshold=0.5, jumprelu_bandwidth=0.2)
    pre = torch.tensor([[0.45, 0.55, 0.7, 0.2] + [0.0] * 60], device=device)
    code = sae.activation(pre)
    assert code.values[0, :4].tolist() == pytest.approx([0.0, 0.55, 0.7, 0.0])
    # STE (Rajamanoharan et al. 2024 Eq. 11): d/dtheta = -(theta/eps) K((pre-theta)/eps), K rectangle on |u|<1/2
    code.values.sum().backward()
    g = sae.activation.log_threshold.grad  # chain rule through theta = exp(log_theta): * theta
    theta, eps = 0.5, 0.2
    expect = [-(theta / eps) * theta, -(theta / eps) * theta, 0.0, 0.0]  # |0.45-.5|,|0.55-.5| < .1
    assert g[:4].tolist() == pytest.approx(expect, rel=1e-5)
    l0 = sae.activation.l0(pre)
    assert float(l0.detach()) == 2.0


def test_decoder_constraints(device):
    sae = make(device=device)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64, device=device))
    sae.W_dec.grad = torch.randn(sae.W_dec.shape).to(device)
    sae.remove_parallel_decoder_grad_()
    dots = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert dots.abs().max() < 1e-5


def test_w_enc_is_w_dec_transpose_at_init():
    sae = SAE(SAEConfig(d_in=8, d_sae=32, activation="topk", k=2))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32))


@pytest.mark.parametrize("activation", ACTIVATIONS.names())
def test_fold_input_scale_gives_same_reconstruction(activation, device):
    sae = make(activation, device=device).eval()
    if activation in ("batchtopk", "matryoshka_batchtopk"):
        sae.activation.threshold.fill_(0.3)
    s = 7.5
    x = torch.randn(20, 16).to(device) * s
    x_hat_scaled = sae(x / s) * s
    f_scaled = sae.encode(x / s)
    sae.fold_input_scale_(s)
    torch.testing.assert_close(sae(x), x_hat_scaled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.encode(x), f_scaled * s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ACTIVATIONS.names())
def test_save_load_round_trip(tmp_path, activation, device):
    """Saving an SAE that lives on ``device`` writes the same file as on the CPU; the loaded copy (on the CPU,
    moved to ``device``) gives the same outputs."""
    sae = make(activation, device=device).eval()
    if activation in ("batchtopk", "matryoshka_batchtopk"):
        sae.activation.threshold.fill_(0.2)
    save_sae(sae, tmp_path / "sae", sparsity=torch.full((64,), 0.01, device=device))
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 64
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post" and cfg["metadata"]["hook_layer"] == 3
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "matryoshka_batchtopk": "jumprelu"}[activation]
    loaded = load_sae(tmp_path / "sae").to(device)
    x = torch.randn(10, 16).to(device)
    torch.testing.assert_close(loaded(x), sae(x))
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert tensors["W_enc"].shape == (16, 64) and tensors["W_dec"].shape == (64, 16)
    assert ("threshold" in tensors) == (cfg["architecture"] == "jumprelu")


def test_saelens_batchtopk_file_is_a_plain_jumprelu(tmp_path):
    """A BatchTopK SAE saved as JumpReLU loads through the SAELens path (no saelab block) to the same codes."""
    sae = make("batchtopk").eval()
    sae.activation.threshold.fill_(0.25)
    save_sae(sae, tmp_path / "s")
    cfg_path = tmp_path / "s" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["saelab"]
    cfg_path.write_text(json.dumps(cfg))
    as_jumprelu = load_sae(tmp_path / "s")
    assert as_jumprelu.cfg.activation == "jumprelu"
    x = torch.randn(30, 16)
    torch.testing.assert_close(as_jumprelu.encode(x), sae.encode(x))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)
    sae = make()
    save_sae(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    cfg["saelab"]["config"]["d_sae"] = 65
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_sae(tmp_path / "s")


def test_unknown_activation_lists_valid():
    with pytest.raises(KeyError, match="topk"):
        SAE(SAEConfig(d_in=4, d_sae=8, activation="nope"))


def test_code_helpers():
    code = Code(torch.tensor([[1.0, 0.0], [2.0, 3.0]]), torch.tensor([[0, 2], [2, 3]]))
    assert code.dense(4).tolist() == [[1, 0, 0, 0], [0, 0, 2, 3]]
    assert code.active_mask_counts(4).tolist() == [1, 0, 1, 1]
    assert code.l0().tolist() == [1, 2]
