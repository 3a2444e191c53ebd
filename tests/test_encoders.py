"""Encoder scorings (saelab.sae.encoders): parity with the formulas of Naihin & Stambler 2026 (arXiv 2606.15054,
the cosine paper's encoder formula), invariances, norm-adaptive init, input-scale folding, save/load, gradients."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from saelab.sae.activations import ACTIVATIONS
from saelab.codes import Code
from saelab.sae.config import SAEConfig
from saelab.sae.encoders import ENCODERS, CosineEncoder
from saelab.sae.model import SAE
from saelab.sae.saving import load_sae, save_sae

COSINE = [e for e in ENCODERS.names() if issubclass(ENCODERS.get(e), CosineEncoder)]
D_IN, D_SAE, G = 8, 12, 5  # 12 latents in 5 groups: group size 2, the last group also takes the 2 remainder latents


def make(encoder="linear", activation="topk", d_in=D_IN, d_sae=D_SAE, k=3, n_groups=G, randomize=True, device="cpu",
         **kw) -> SAE:
    """An SAE with random non-trivial parameters drawn on the CPU (the same numbers on every device), on ``device``."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=k, encoder=encoder, n_groups=n_groups,
                        hook_name="blocks.3.hook_resid_post", model_name="m", **kw))
    if randomize:
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.1)
            sae.b_dec.normal_(0, 0.3)
            sae.W_enc.mul_(torch.empty(1, d_sae).uniform_(0.5, 2.0))  # non-unit columns: normalisation must matter
            for name, p in sae.encoder.named_parameters():
                p.normal_(0, 0.3)
                if name == "b":
                    p.add_(math.log(math.sqrt(d_in)))
    return sae.to(device)


def set_threshold(sae: SAE, value: float) -> None:
    """Give BatchTopK-style activations an inference threshold (eval uses it)."""
    act = sae.activation
    if not hasattr(act, "log_threshold") and isinstance(getattr(act, "threshold", None), torch.Tensor):
        act.threshold.fill_(value)


def latent_ab(sae: SAE, i: int) -> tuple[float, float]:
    """(a_i, b_i) of latent ``i``, written out per variant (the cosine paper's table of a-parameterisations)."""
    enc, name = sae.encoder, sae.cfg.encoder
    if name == "cosine_global":
        return float(enc.a), float(enc.b)
    if name == "cosine_per_feature":
        return float(enc.a[i]), float(enc.b[i])
    if name == "cosine_base_delta":
        return float(enc.a_base) + float(enc.delta[i]), float(enc.b[i])
    if name == "cosine_grouped":
        g = min(i // (sae.cfg.d_sae // sae.cfg.n_groups), sae.cfg.n_groups - 1)
        return float(enc.a[g]), float(enc.b[g])
    raise AssertionError(name)


@torch.no_grad()
def reference_scores(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Slow per-(token, latent) evaluation of each scoring formula with python floats."""
    name = sae.cfg.encoder
    W, b_enc, b_dec = sae.W_enc.double().tolist(), sae.b_enc.double().tolist(), sae.b_dec.double().tolist()
    out = torch.zeros(x.shape[0], sae.cfg.d_sae, dtype=torch.float64, device=x.device)
    for n, row in enumerate(x.double().tolist()):
        xc = [v - b for v, b in zip(row, b_dec)]
        nx = max(math.sqrt(sum(v * v for v in xc)), 1e-8)
        for i in range(sae.cfg.d_sae):
            col = [W[j][i] for j in range(len(xc))]
            dot = sum(u * w for u, w in zip(xc, col))
            cos = dot / (nx * math.sqrt(sum(w * w for w in col)))
            if name == "linear":
                s = dot + b_enc[i]
            elif name == "magnitude_bypass":
                s = max(cos, 0.0)
            else:
                a, b = latent_ab(sae, i)
                s = math.exp(a * math.log(nx) + b) * cos + b_enc[i]
            out[n, i] = s
    return out


def zero_a(sae: SAE, value: float = 0.0) -> None:
    """Set every latent's ``a`` to ``value`` (base+delta: a_base = value, delta = 0)."""
    with torch.no_grad():
        for name, p in sae.encoder.named_parameters():
            if name in ("a", "a_base"):
                p.fill_(value)
            elif name == "delta":
                p.zero_()


# -- formulas -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ENCODERS.names())
def test_scores_match_slow_reference(encoder, device):
    sae = make(encoder, device=device)
    x = torch.randn(6, D_IN).to(device) * 3
    torch.testing.assert_close(sae.pre_acts(x).double(), reference_scores(sae, x), rtol=1e-5, atol=1e-5)


def test_global_exponent_a_scales_scores_by_c_to_the_a(device):
    sae = make("cosine_global", device=device)
    with torch.no_grad():
        sae.encoder.a.fill_(0.37)
        sae.b_enc.zero_()
    x = torch.randn(10, D_IN).to(device)
    c = 5.0
    torch.testing.assert_close(sae.pre_acts(sae.b_dec + c * (x - sae.b_dec)), c**0.37 * sae.pre_acts(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder", COSINE + ["magnitude_bypass"])
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_a_zero_codes_invariant_to_rescaling_around_b_dec(encoder, activation, device):
    sae = make(encoder, activation, device=device).train()
    zero_a(sae)
    x = torch.randn(16, D_IN).to(device)
    f = sae.encode(x)
    assert (f > 0).any()
    for c in (0.05, 13.0):
        torch.testing.assert_close(sae.encode(sae.b_dec + c * (x - sae.b_dec)), f, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder", COSINE)
def test_a_one_b_zero_is_inner_product_with_unit_encoder_columns(encoder, device):
    sae = make(encoder, device=device)
    zero_a(sae, 1.0)
    if encoder == "cosine_base_delta":  # a_i = a_base + delta_i = 1 with both parts non-trivial
        with torch.no_grad():
            sae.encoder.a_base.fill_(0.25)
            sae.encoder.delta.fill_(0.75)
    with torch.no_grad():
        sae.encoder.b.zero_()
    lin = make("linear", randomize=False, device=device)
    lin.load_state_dict({k: v for k, v in sae.state_dict().items() if not k.startswith("encoder.")})
    with torch.no_grad():
        lin.W_enc.copy_(F.normalize(sae.W_enc, dim=0))
    x = torch.randn(20, D_IN).to(device) * 4
    torch.testing.assert_close(sae.pre_acts(x), lin.pre_acts(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), lin(x), rtol=1e-5, atol=1e-5)


def _copy_shared(dst: SAE, src: SAE) -> None:
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if not k.startswith("encoder.")}, strict=False)


def test_grouped_one_group_is_global_and_d_sae_groups_is_per_feature(device):
    x = torch.randn(15, D_IN).to(device) * 2
    glob = make("cosine_global", device=device)
    g1 = make("cosine_grouped", n_groups=1, device=device)
    _copy_shared(g1, glob)
    with torch.no_grad():
        g1.encoder.a.copy_(glob.encoder.a.reshape(1))
        g1.encoder.b.copy_(glob.encoder.b.reshape(1))
    torch.testing.assert_close(g1.pre_acts(x), glob.pre_acts(x))
    per = make("cosine_per_feature", device=device)
    gd = make("cosine_grouped", n_groups=D_SAE, device=device)
    _copy_shared(gd, per)
    with torch.no_grad():
        gd.encoder.a.copy_(per.encoder.a)
        gd.encoder.b.copy_(per.encoder.b)
    torch.testing.assert_close(gd.pre_acts(x), per.pre_acts(x))


@pytest.mark.parametrize(("d_sae", "n_groups", "expect"), [
    (12, 5, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4]),
    (10, 3, [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]),
    (7, 7, [0, 1, 2, 3, 4, 5, 6]),
])
def test_grouped_remainder_takes_last_group(d_sae, n_groups, expect, device):
    sae = make("cosine_grouped", d_sae=d_sae, n_groups=n_groups, k=2, device=device)
    with torch.no_grad():
        sae.encoder.a.copy_(torch.arange(n_groups, dtype=torch.float32))
        sae.encoder.b.copy_(10.0 + torch.arange(n_groups, dtype=torch.float32))
    assert sae.encoder.a_latent().tolist() == expect
    assert sae.encoder.b_latent().tolist() == [10.0 + g for g in expect]
    x = torch.randn(4, D_IN).to(device)
    torch.testing.assert_close(sae.pre_acts(x).double(), reference_scores(sae, x), rtol=1e-5, atol=1e-5)


# -- magnitude bypass decoder ---------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS.names())
def test_magnitude_bypass_restores_input_norm(activation, device):
    sae = make("magnitude_bypass", activation, device=device).eval()
    set_threshold(sae, 0.1)
    with torch.no_grad():  # decoder atoms are normalised inside decode
        sae.W_dec.mul_(torch.empty(D_SAE, 1).uniform_(0.3, 3.0).to(device))
    x = torch.randn(25, D_IN).to(device) * 6
    f = sae.encode(x)
    assert ((f > 0).sum(-1) > 0).all()
    x_hat = sae(x)
    torch.testing.assert_close((x_hat - sae.b_dec).norm(dim=-1), (x - sae.b_dec).norm(dim=-1), rtol=1e-5, atol=1e-5)
    r = f @ F.normalize(sae.W_dec, dim=-1)  # the formula, written directly
    expect = r * (x - sae.b_dec).norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True).clamp_min(1e-8) + sae.b_dec
    torch.testing.assert_close(x_hat, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(f, x_norm=sae.centered_norm(x)), expect, rtol=1e-5, atol=1e-5)


def test_magnitude_bypass_sparse_and_dense_decode_agree_with_grads(device):
    sae = make("magnitude_bypass", "topk", device=device)
    x = torch.randn(16, D_IN).reshape(4, 4, D_IN).to(device)
    code, _ = sae.encode_code(x.reshape(16, D_IN))
    assert code.indices is not None and code.x_norm.shape == (16,)
    out_sparse = sae.decode_code(code)
    g_sparse = torch.autograd.grad(out_sparse.pow(2).sum(), [sae.W_dec, sae.W_enc, sae.b_dec], retain_graph=True)
    out_dense = sae.decode(code.dense(D_SAE).reshape(4, 4, D_SAE), x_norm=sae.centered_norm(x)).reshape(16, D_IN)
    g_dense = torch.autograd.grad(out_dense.pow(2).sum(), [sae.W_dec, sae.W_enc, sae.b_dec])
    torch.testing.assert_close(out_sparse, out_dense)
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b)


def test_magnitude_bypass_decode_without_norm_is_a_clear_error():
    sae = make("magnitude_bypass")
    f = sae.encode(torch.randn(3, D_IN))
    with pytest.raises(ValueError, match="x_norm"):
        sae.decode(f)
    with pytest.raises(ValueError, match="x_norm"):
        sae.decode_code(Code(f))
    with pytest.raises(ValueError, match="shape"):
        sae.decode(f, x_norm=torch.ones(4))
    lin = make("linear")  # other encoders ignore x_norm
    torch.testing.assert_close(lin.decode(f, x_norm=torch.ones(3)), lin.decode(f))


# -- norm-adaptive init ---------------------------------------------------------------------------------------
def _with_norms(norms: list[float], d_in: int = 16) -> torch.Tensor:
    return F.normalize(torch.randn(len(norms), d_in), dim=-1) * torch.tensor(norms)[:, None]


@pytest.mark.parametrize("encoder", COSINE)
@pytest.mark.parametrize(("mode", "norms", "expect"), [
    ("auto", [1.0, 17.0], math.log(9.0)),  # mean 9 > 2*sqrt(16): adapt (to the mean norm, not the RMS 12.04)
    ("auto", [0.5, 3.1], math.log(1.8)),  # mean 1.8 < sqrt(16)/2: adapt
    ("auto", [6.0, 8.0], math.log(4.0)),  # mean 7 within 2x: keep ln sqrt(d)
    ("auto", [2.0, 2.2], math.log(4.0)),  # mean 2.1 within 2x
    ("sqrt_d", [1.0, 17.0], math.log(4.0)),
    ("norm_adaptive", [6.0, 8.0], math.log(7.0)),
])
def test_norm_adaptive_init(encoder, mode, norms, expect, device):
    sae = make(encoder, d_in=16, cosine_init=mode, device=device)
    a_before = {k: v.clone() for k, v in sae.encoder.state_dict().items() if k != "b"}
    got = sae.encoder.init_from_data_(_with_norms(norms).to(device))
    assert got == pytest.approx(expect, rel=1e-6)
    assert torch.allclose(sae.encoder.b, torch.full_like(sae.encoder.b, expect))
    for k, v in a_before.items():
        assert torch.equal(sae.encoder.state_dict()[k], v)  # a (a_base, delta) untouched


@pytest.mark.parametrize("encoder", ["linear", "magnitude_bypass"])
def test_init_from_data_is_a_noop_without_scale(encoder, device):
    sae = make(encoder, d_in=16, device=device)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    assert sae.encoder.init_from_data_(_with_norms([50.0, 70.0]).to(device)) is None
    assert all(torch.equal(v, before[k]) for k, v in sae.state_dict().items())


def test_fresh_cosine_init_values():
    for enc in COSINE:
        sae = make(enc, d_in=64, randomize=False)
        assert torch.all(sae.encoder.b_latent() == math.log(8.0)) and torch.all(sae.encoder.a_latent() == 0)


# -- stats ----------------------------------------------------------------------------------------------------
def test_scale_stats(device):
    """The logged stats of the scale laws, from parameters on ``device`` (the histogram included)."""
    assert make("linear", device=device).encoder.scale_stats() == {}
    assert make("magnitude_bypass", device=device).encoder.scale_stats() == {}
    glob = make("cosine_global", device=device).encoder.scale_stats()
    assert glob["a_min"] == glob["a_max"] == pytest.approx(glob["a_mean"]) and "a_hist_counts" not in glob
    sae = make("cosine_grouped", device=device)
    with torch.no_grad():
        sae.encoder.a.copy_(torch.tensor([0.0, 0.1, 0.2, 0.3, 0.6]))
        sae.encoder.b.fill_(1.5)
    st = sae.encoder.scale_stats()
    per_latent = [0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.6, 0.6, 0.6, 0.6]  # stats are over latents
    assert st["a_mean"] == pytest.approx(sum(per_latent) / 12) and st["a_min"] == 0.0 and st["a_max"] == pytest.approx(0.6)
    assert st["b_mean"] == pytest.approx(1.5) and st["a_frac_abs_below_0.05"] == pytest.approx(2 / 12)
    assert sum(st["a_hist_counts"]) == 12 and len(st["a_hist_edges"]) == 21 and st["a_hist_counts"][-1] == 4
    bd = make("cosine_base_delta", device=device).encoder
    st = bd.scale_stats()
    a_base = float(bd.a_base.detach())
    assert st["a_mean"] == pytest.approx(a_base + float(bd.delta.detach().mean()), abs=1e-6) and st["a_base"] == a_base
    json.dumps(st)


# -- folding an input scale -----------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ENCODERS.names())
@pytest.mark.parametrize("activation", ACTIVATIONS.names())
def test_fold_input_scale_exact(encoder, activation, device):
    sae = make(encoder, activation, device=device).eval()
    set_threshold(sae, 0.2)
    s = 7.5
    x = torch.randn(20, D_IN).to(device) * s
    x_hat_scaled = sae(x / s) * s
    f_scaled = sae.encode(x / s)
    assert (f_scaled > 0).any()
    sae.fold_input_scale_(s)
    torch.testing.assert_close(sae(x), x_hat_scaled, rtol=1e-4, atol=1e-4)
    code_factor = 1.0 if encoder == "magnitude_bypass" else s  # bypass codes are cosines: scale-free
    torch.testing.assert_close(sae.encode(x), f_scaled * code_factor, rtol=1e-4, atol=1e-4)
    assert torch.equal(sae.encode(x) > 0, f_scaled > 0)  # identical latent indices


# -- save / load ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ENCODERS.names())
@pytest.mark.parametrize("activation", ACTIVATIONS.names())
def test_save_load_round_trip(tmp_path, encoder, activation, device):
    """An SAE on ``device`` saves and loads (to the CPU, then moved back) to the same parameters and outputs."""
    sae = make(encoder, activation, device=device).eval()
    set_threshold(sae, 0.2)
    save_sae(sae, tmp_path / "sae")
    doc = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    tensors = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    expect_enc = {f"encoder.{k}" for k in sae.encoder.state_dict()}
    assert {k for k in tensors if k.startswith("encoder.")} == expect_enc
    assert doc["saelab"]["config"]["encoder"] == encoder and doc["saelab"]["config"]["n_groups"] == G
    if encoder == "linear":
        assert doc["saelens_compatible"] is True and "saelens_note" not in doc and not expect_enc
    else:
        assert doc["saelens_compatible"] is False and "SAELens" in doc["saelens_note"]
    assert doc["saelab"]["encoder_stats"] == json.loads(json.dumps(sae.encoder.scale_stats()))
    loaded = load_sae(tmp_path / "sae").to(device)
    assert loaded.cfg.encoder == encoder and type(loaded.encoder) is type(sae.encoder)
    for k, v in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    x = torch.randn(10, D_IN).to(device) * 2
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded(x), sae(x))


def test_load_rejects_cosine_weights_without_saelab_block_and_missing_tensors(tmp_path):
    sae = make("cosine_per_feature", "topk")
    save_sae(sae, tmp_path / "s")
    cfg_path = tmp_path / "s" / "cfg.json"
    doc = json.loads(cfg_path.read_text())
    stripped = {k: v for k, v in doc.items() if k != "saelab"}  # what a SAELens-path load would see
    cfg_path.write_text(json.dumps(stripped))
    with pytest.raises(ValueError, match="encoder.a"):
        load_sae(tmp_path / "s")
    doc["saelab"]["config"]["encoder"] = "cosine_base_delta"  # expects encoder.a_base / encoder.delta
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="encoder"):
        load_sae(tmp_path / "s")


# -- gradients and config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", COSINE)
def test_gradients_reach_scale_parameters(encoder, device):
    sae = make(encoder, "relu", randomize=False)  # fresh init: a = 0, b = ln sqrt(d)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
    sae.to(device)
    x = torch.randn(64, D_IN).to(device) * 2
    (sae(x) - x).pow(2).sum().backward()
    names = {n for n, _ in sae.encoder.named_parameters()}
    assert names == {"cosine_base_delta": {"a_base", "delta", "b"}}.get(encoder, {"a", "b"})
    for name, p in sae.encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert (p.grad != 0).all(), name  # every latent/group/global entry gets a signal
    assert sae.W_enc.grad is not None and (sae.W_enc.grad != 0).any()


def test_magnitude_bypass_ignores_b_enc(device):
    sae = make("magnitude_bypass", "relu", device=device)
    x = torch.randn(8, D_IN).to(device)
    sae(x).pow(2).sum().backward()
    assert sae.b_enc.grad is None and sae.W_enc.grad is not None


def test_config_validation():
    with pytest.raises(ValueError, match="cosine_global.*magnitude_bypass"):
        SAEConfig(d_in=4, d_sae=8, k=2, encoder="cosine")
    with pytest.raises(ValueError, match="sqrt_d"):
        SAEConfig(d_in=4, d_sae=8, k=2, cosine_init="median")
    with pytest.raises(ValueError, match="n_groups"):
        SAEConfig(d_in=4, d_sae=8, k=2, encoder="cosine_grouped", n_groups=9)
    with pytest.raises(ValueError, match="n_groups"):
        SAEConfig(d_in=4, d_sae=8, k=2, encoder="cosine_grouped", n_groups=0)
    assert SAEConfig(d_in=4, d_sae=2, k=1, n_groups=4).encoder == "linear"  # n_groups only checked when grouped
    assert SAEConfig.from_dict({"d_in": 4, "d_sae": 8, "k": 2}).encoder == "linear"  # older cfg.json files


def test_column_norms_equal_clamped_norm_in_both_layouts_with_a_zero_column(device):
    """Column-major (the training layout: vector_norm) and row-major (sum of squares) give torch.norm's value and
    gradient, clamped at 1e-12, and gradient 0 for a zero column."""
    from saelab.kernels.scores import column_norms

    WT = torch.randn(9, 5, dtype=torch.float64)
    WT[2] = 0
    WT = WT.to(device)
    weights = torch.arange(9, dtype=torch.float64, device=device)
    ref_w = WT.t().clone().requires_grad_()
    ref = ref_w.norm(dim=0).clamp_min(1e-12)
    (ref * weights).sum().backward()
    row_major = WT.t().contiguous().requires_grad_()  # (5, 9), strides (9, 1)
    col_major = WT.clone().requires_grad_()  # its transpose (5, 9) has strides (1, 5)
    for leaf, W in ((row_major, row_major), (col_major, col_major.t())):
        assert (W.stride(0) == 1) == (leaf is col_major)
        got = column_norms(W)
        torch.testing.assert_close(got, ref, rtol=1e-14, atol=0)
        (got * weights).sum().backward()
        grad = leaf.grad if leaf is row_major else leaf.grad.t()
        torch.testing.assert_close(grad, ref_w.grad, rtol=1e-12, atol=0)
        assert not grad[:, 2].any()


def test_row_dots_equals_vecdot_across_blocks(device):
    from saelab.kernels.topk import row_dots

    a, b = torch.randn(2500, 7, dtype=torch.float64).to(device), torch.randn(2500, 7, dtype=torch.float64).to(device)
    torch.testing.assert_close(row_dots(a, b, rows=1024), (a * b).sum(-1), rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="one shape"):
        row_dots(a, b[:-1])
