"""Transcoders and skip-transcoders (Dunefsky et al. 2024; Paulo et al. 2025): a known sparse input->output map is
recovered, the skip term captures a planted linear part, save/load round trip, sparse path = dense reference."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from saelab.config_files import from_dict
from saelab.kernels.mode import dense_reference
from saelab.kernels.sparse_step import uses_sparse_path
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE
from saelab.sae.objective import LossWeights
from saelab.sae.saving import load_sae, save_sae
from saelab.train import TrainConfig, train
from synthetic import write_cache

D_IN, D_OUT, N_FEAT, K = 32, 20, 40, 2
DENSE_DIMS = 8


def transcoder_data(n: int, *, linear: float = 0.0, dense_dims: int = 0, seed: int = 0):
    """``x = [c D_in, g]``, ``y = c D_out + linear x A^T``: ``K`` of ``N_FEAT`` features active per row with
    amplitudes in [1, 2], unit-norm atoms ``D_in`` on the first ``D_IN - dense_dims`` coordinates, ``g`` standard
    Gaussian on the last ``dense_dims`` (a dense part no sparse code can explain, so ``A`` is identifiable there),
    ``A (D_OUT, D_IN)`` Gaussian / sqrt(D_IN). Returns ``(x, y, D_out, A)``."""
    g = torch.Generator().manual_seed(seed)
    d_feat = D_IN - dense_dims
    D_in = F.normalize(torch.randn(N_FEAT, d_feat, generator=g), dim=-1)
    D_out = F.normalize(torch.randn(N_FEAT, D_OUT, generator=g), dim=-1)
    A = torch.randn(D_OUT, D_IN, generator=g) / D_IN**0.5
    idx = torch.rand(n, N_FEAT, generator=g).argsort(-1)[:, :K]
    c = torch.zeros(n, N_FEAT).scatter_(1, idx, torch.rand(n, K, generator=g) + 1.0)
    x = torch.cat([c @ D_in, torch.randn(n, dense_dims, generator=g)], dim=1)
    y = c @ D_out + linear * x @ A.T
    return x, y, D_out, linear * A


def fve(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Fraction of variance of ``y`` explained: ``1 - sum||y - y_hat||^2 / sum||y - mean y||^2``."""
    return float(1 - (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def _train(tmp_path, x, y, name, **kw):
    xs = write_cache(tmp_path / f"{name}_in", x, hook_name="blocks.0.ln2.hook_normalized")
    ys = write_cache(tmp_path / f"{name}_out", y, hook_name="blocks.0.hook_mlp_out")
    base = dict(cache=str(xs.path), target_cache=str(ys.path), out=str(tmp_path / name), activation="topk",
                d_sae=64, k=K, batch_size=256, lr=3e-3, warmup_steps=10, checkpoint_every=10_000, log_every=50,
                progress=False, seed=0, n_tokens=96_000, transcoder=True, normalize_activations=False)
    base.update(kw)
    return load_sae(train(from_dict(TrainConfig, base)).sae_dir)


def test_transcoder_recovers_a_known_sparse_map(tmp_path):
    """Mechanism: y = c D_out with c the sparse codes of x = c D_in; the transcoder predicts y (d_out != d_in) and
    its decoder rows find the true output atoms."""
    x, y, D_out, _ = transcoder_data(12_000)
    sae = _train(tmp_path, x, y, "tc", lr=1e-2, n_tokens=160_000)
    assert sae.cfg.transcoder and sae.cfg.d_out == D_OUT and sae.W_dec.shape == (64, D_OUT)
    assert sae.cfg.hook_name_out == "blocks.0.hook_mlp_out"
    with torch.no_grad():
        assert fve(y, sae(x)) > 0.95
        cos = F.normalize(D_out, dim=-1) @ F.normalize(sae.W_dec, dim=-1).T  # (N_FEAT, d_sae)
    assert (cos.max(1).values > 0.95).float().mean() >= 0.85  # 36 of 40 atoms at cos > 0.99 with seed 0


def test_skip_term_captures_a_planted_linear_part(tmp_path):
    """Mechanism: y = c D_out + x A^T where x also has DENSE_DIMS Gaussian coordinates that no feature uses: the
    skip-transcoder's W_skip recovers A on those coordinates (on the feature coordinates x A^T = c D_in A^T is
    also a sparse code's image, so W_skip is not identifiable there), and without the skip term the FVE of y is
    lower (the image of the Gaussian part is no sparse code)."""
    x, y, _, A = transcoder_data(12_000, linear=1.5, dense_dims=DENSE_DIMS, seed=1)
    kw = dict(lr=1e-2, n_tokens=160_000)
    skip = _train(tmp_path, x, y, "skip", skip=True, **kw)
    plain = _train(tmp_path, x, y, "plain", **kw)
    with torch.no_grad():
        f_skip, f_plain = fve(y, skip(x)), fve(y, plain(x))
        block = slice(D_IN - DENSE_DIMS, D_IN)
        rel = float((skip.W_skip[:, block] - A[:, block]).norm() / A[:, block].norm())
    assert f_skip > 0.95
    assert f_skip > f_plain + 0.1
    assert rel < 0.1


def test_skip_transcoder_save_load_round_trip(tmp_path):
    cfg = SAEConfig(d_in=D_IN, d_sae=32, k=K, transcoder=True, skip=True, d_out=D_OUT,
                    hook_name="blocks.3.ln2.hook_normalized", hook_name_out="blocks.3.hook_mlp_out")
    torch.manual_seed(0)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.W_skip.normal_()
        sae.b_dec.normal_()
    save_sae(sae, tmp_path / "s")
    doc = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert doc["architecture"] == "topk_skip_transcoder" and doc["saelens_compatible"] is False
    assert doc["d_out"] == D_OUT and doc["hook_name_out"] == "blocks.3.hook_mlp_out" and doc["hook_layer_out"] == 3
    assert doc["apply_b_dec_to_input"] is False
    back = load_sae(tmp_path / "s")
    assert back.cfg == cfg
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"):
        torch.testing.assert_close(getattr(back, name), getattr(sae, name), rtol=0, atol=0)
    assert back.W_skip.shape == (D_OUT, D_IN) and back.b_dec.shape == (D_OUT,)
    x = torch.randn(7, D_IN)
    torch.testing.assert_close(back(x), sae.eval()(x))


def test_relu_skip_transcoder_saves_as_saelens_skip_transcoder(tmp_path):
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=32, activation="relu", transcoder=True, skip=True, d_out=D_OUT))
    save_sae(sae, tmp_path / "s")
    doc = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert doc["architecture"] == "skip_transcoder" and doc["saelens_compatible"] is True
    del doc["saelab"]  # a SAELens-only cfg.json: the transcoder keys alone rebuild it
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(doc))
    back = load_sae(tmp_path / "s")
    assert back.cfg.transcoder and back.cfg.skip and back.cfg.d_out == D_OUT
    torch.testing.assert_close(back.W_skip, sae.W_skip)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "matryoshka_batchtopk"])
@pytest.mark.parametrize("encoder", ["linear", "cosine_per_feature"])
def test_sparse_path_equals_dense_reference(activation, encoder):
    """One loss + backward of a skip-transcoder on the sparse path and inside dense_reference(): equal values and
    gradients (W_skip included), float64."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=64, k=K, activation=activation, encoder=encoder, transcoder=True,
                        skip=True, d_out=D_OUT, matryoshka_fractions=[0.25, 0.75])).double().train()
    with torch.no_grad():
        sae.W_skip.normal_()
        sae.b_dec.normal_()
    x, y = torch.randn(32, D_IN, dtype=torch.float64), torch.randn(32, D_OUT, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    out = []
    for ctx in (contextlib.nullcontext(), dense_reference()):
        with ctx:
            assert uses_sparse_path(sae) == isinstance(ctx, contextlib.nullcontext)
            sae.zero_grad()
            res = sae.loss(x, y, dead=dead, weights=LossWeights(aux_k=8))
            res.loss.backward()
            out.append((res.loss.detach(), res.x_hat.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()
                                                               if p.grad is not None}))
    (ls, xs, gs), (ld, xd, gd) = out
    torch.testing.assert_close(ls, ld, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xs, xd, rtol=1e-12, atol=1e-12)
    assert gs.keys() == gd.keys() and "W_skip" in gs and "b_dec" in gs
    for name in gs:
        torch.testing.assert_close(gs[name], gd[name], rtol=1e-9, atol=1e-12, msg=name)
    # the skip term is in x_hat: reconstruct it by hand
    code, _ = sae.encode_code(x)
    torch.testing.assert_close(xs, code.dense(64) @ sae.W_dec + sae.b_dec + x @ sae.W_skip.T)


def test_transcoder_input_is_not_centred_by_the_output_bias():
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=32, k=K, transcoder=True, d_out=D_OUT))
    with torch.no_grad():
        sae.b_dec.fill_(5.0)
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(sae.pre_acts(x), x @ sae.W_enc + sae.b_enc)


@pytest.mark.parametrize("kw, match", [
    (dict(skip=True), "skip=True needs transcoder=True"),
    (dict(d_out=8, d_in=24), "d_out=8 differs from d_in=24"),
    (dict(transcoder=True, encoder="magnitude_bypass"), "magnitude_bypass"),
])
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(**kw)


def test_skip_decode_needs_the_input_and_loss_needs_targets():
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=32, k=K, transcoder=True, skip=True, d_out=D_OUT))
    with pytest.raises(ValueError, match="pass the encoded inputs"):
        sae.decode(torch.zeros(2, 32))
    with pytest.raises(ValueError, match="pass its targets y"):
        sae.loss(torch.randn(2, D_IN))


def test_trainer_refuses_a_transcoder_without_target_cache(tmp_path):
    x, *_ = transcoder_data(512)
    xs = write_cache(tmp_path / "in", x)
    cfg = from_dict(TrainConfig, dict(cache=str(xs.path), out=str(tmp_path / "o"), transcoder=True, d_sae=32,
                                         k=K, batch_size=256, progress=False))
    with pytest.raises(ValueError, match="--target_cache"):
        train(cfg)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "matryoshka_batchtopk", "relu", "jumprelu"])
@pytest.mark.parametrize("encoder, regs", [("linear", []), ("cosine_per_feature", ["c2r"])])
def test_every_activation_encoder_and_regularizer_trains_a_skip_transcoder(tmp_path, activation, encoder, regs):
    """Composition: a short run of each activation x (linear | cosine + C²R) skip-transcoder lowers the loss and
    saves/loads with d_out-wide decoder and W_skip."""
    x, y, _, _ = transcoder_data(2048, linear=1.0, dense_dims=DENSE_DIMS)
    sae = _train(tmp_path, x, y, "run", activation=activation, encoder=encoder, regularizers=regs, skip=True,
                 n_tokens=256 * 12, d_sae=32, log_every=4, matryoshka_fractions=[0.25, 0.75])
    assert sae.W_dec.shape == (32, D_OUT) and sae.W_skip.shape == (D_OUT, D_IN) and sae.W_skip.abs().max() > 0
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["fvu"] < log[0]["fvu"]
