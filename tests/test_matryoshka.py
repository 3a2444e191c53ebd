"""Matryoshka BatchTopK: group sizes, the nested-prefix loss against a direct loop, and a tiny training run."""

from __future__ import annotations

import pytest
import torch

from saelab.sae import losses
from saelab.regularizers import parse_regularizer
from saelab.sae.activations import (
    DEFAULT_MATRYOSHKA_FRACTIONS,
    BatchTopK,
    MatryoshkaBatchTopK,
    matryoshka_group_sizes,
)
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE
from synthetic import sparse_dictionary_data


def _cfg(d_in=16, d_sae=64, k=4, fractions=None) -> SAEConfig:
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, activation="matryoshka_batchtopk", k=k)
    if fractions is not None:  # the lead adds SAEConfig.matryoshka_fractions; until then set it on the instance
        cfg.matryoshka_fractions = fractions
    return cfg


# -- group sizes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_sae", [9216, 36864, 1000, 100, 37])
def test_group_sizes_sum_exactly_with_remainder_in_last_group(d_sae):
    sizes = matryoshka_group_sizes(d_sae, DEFAULT_MATRYOSHKA_FRACTIONS)
    assert sum(sizes) == d_sae and len(sizes) == 5 and min(sizes) >= 1
    assert sizes[:-1] == [int(f * d_sae) for f in DEFAULT_MATRYOSHKA_FRACTIONS[:-1]]


def test_group_sizes_paper_width_and_float_rounding():
    assert matryoshka_group_sizes(9216, DEFAULT_MATRYOSHKA_FRACTIONS) == [288, 576, 1152, 2304, 4896]
    assert matryoshka_group_sizes(100, [0.29, 0.71]) == [29, 71]  # 0.29 * 100 = 28.999... in floating point


@pytest.mark.parametrize(
    "d_sae, fractions, match",
    [(64, [0.5, 0.4], "sum to 1"), (64, [], "non-empty"), (64, [1.5, -0.5], "positive"), (16, DEFAULT_MATRYOSHKA_FRACTIONS, "too small")],
)
def test_group_size_errors(d_sae, fractions, match):
    with pytest.raises(ValueError, match=match):
        matryoshka_group_sizes(d_sae, fractions)


def test_activation_is_registered_batchtopk_with_groups():
    sae = SAE(_cfg())
    act = sae.activation
    assert isinstance(act, MatryoshkaBatchTopK) and isinstance(act, BatchTopK)
    assert act.group_sizes == matryoshka_group_sizes(64, DEFAULT_MATRYOSHKA_FRACTIONS) == [2, 4, 8, 16, 34]
    assert SAE(_cfg(fractions=[0.25, 0.75])).activation.group_sizes == [16, 48]
    assert act.saelens_architecture == "jumprelu"
    with pytest.raises(ValueError, match="sum to 1"):
        SAE(_cfg(fractions=[0.5, 0.6]))


def test_tiny_d_sae_builds_and_encodes_but_has_no_groups():
    """d_sae=12 cannot give 5 groups a latent each: the SAE still works (BatchTopK at inference), the groups raise."""
    sae = SAE(_cfg(d_sae=12, k=2)).eval()
    assert sae.encode(torch.randn(5, 16)).shape == (5, 12)
    with pytest.raises(ValueError, match="too small"):
        sae.activation.group_sizes


def test_selection_and_threshold_are_batchtopk(device):
    torch.manual_seed(0)
    cfg = _cfg()
    m = MatryoshkaBatchTopK(cfg).to(device).train()
    b = BatchTopK(SAEConfig(d_in=16, d_sae=64, activation="batchtopk", k=4)).to(device).train()
    pre = torch.randn(50, 64).to(device)
    code = m(pre)
    torch.testing.assert_close(code.values, b(pre).values)
    assert int((code.values > 0).sum()) == 4 * 50
    m.update_threshold(code)
    kept = code.values[code.values > 0]
    assert torch.isclose(m.threshold, kept.min())
    m.eval()
    torch.testing.assert_close(m(pre).values, pre.relu() * (pre.relu() > kept.min()))


# -- loss -------------------------------------------------------------------------------------------------
def _direct(x, f, W, b, sizes, weights):
    """sum_m w_m mean_n ||x_n - (f[n, :p_m] W[:p_m] + b)||^2 by an explicit loop over prefixes and tokens."""
    total, p = 0.0, 0
    for size, w in zip(sizes, weights):
        p += size
        x_hat = f[:, :p] @ W[:p] + b
        total += w * sum(float(((x[n] - x_hat[n]) ** 2).sum()) for n in range(x.shape[0])) / x.shape[0]
    return total


def _problem(N=20, d_in=6, d_sae=24, seed=0, device="cpu"):
    """``(x, f, W, b)`` in float64, drawn on a seeded CPU generator (the same numbers on every device), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d_in, generator=g, dtype=torch.float64)
    f = torch.relu(torch.randn(N, d_sae, generator=g, dtype=torch.float64))
    W = torch.randn(d_sae, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_in, generator=g, dtype=torch.float64)
    return tuple(t.to(device) for t in (x, f, W, b))


@pytest.mark.parametrize("weights", [None, [1.0, 1.0, 1.0, 1.0], [0.1, 0.2, 0.3, 0.4]])
def test_loss_matches_direct_loop_over_prefixes(weights, device):
    x, f, W, b = _problem(device=device)
    sizes = [3, 5, 7, 9]
    got = losses.matryoshka_reconstruction(x, f, W, b, sizes, group_weights=weights)
    ref = _direct(x, f, W, b, sizes, weights or [0.25] * 4)
    assert float(got.loss) == pytest.approx(ref, rel=1e-12)
    assert float(losses.matryoshka_reconstruction(x, f, W, b, sizes, group_weights=weights).loss) == pytest.approx(ref, rel=1e-12)
    prefix_ref = [_direct(x, f, W, b, sizes[: m + 1], [0.0] * m + [1.0]) for m in range(4)]
    assert got.prefix_losses.tolist() == pytest.approx(prefix_ref, rel=1e-12)
    torch.testing.assert_close(got.x_hat, f @ W + b)


def test_default_is_mean_over_prefixes_not_sum(device):
    x, f, W, b = _problem(seed=1, device=device)
    sizes = [4, 8, 12]
    mean = losses.matryoshka_reconstruction(x, f, W, b, sizes).loss
    total = losses.matryoshka_reconstruction(x, f, W, b, sizes, group_weights=[1, 1, 1]).loss
    assert float(total) == pytest.approx(3 * float(mean), rel=1e-12)
    assert float(total) != pytest.approx(float(mean), rel=1e-3)


def test_one_group_is_plain_reconstruction_loss(device):
    x, f, W, b = _problem(seed=2, device=device)
    got = losses.matryoshka_reconstruction(x, f, W, b, [24]).loss
    assert float(got) == pytest.approx(float(losses.reconstruction_loss(x, f @ W + b)), rel=1e-12)


def test_gradients_match_direct_formula(device):
    x, f, W, b = _problem(seed=3, device=device)
    sizes, weights = [6, 6, 12], [0.5, 0.3, 0.2]
    params = [t.clone().requires_grad_() for t in (f, W, b)]
    g_got = torch.autograd.grad(losses.matryoshka_reconstruction(x, *params, sizes, group_weights=weights).loss, params)
    params2 = [t.clone().requires_grad_() for t in (f, W, b)]
    fr, Wr, br = params2
    direct = sum(w * (x - (fr[:, :p] @ Wr[:p] + br)).pow(2).sum(-1).mean() for w, p in zip(weights, [6, 12, 24]))
    for a, e in zip(g_got, torch.autograd.grad(direct, params2)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_loss_errors():
    x, f, W, b = _problem()
    with pytest.raises(ValueError, match="sum to d_sae=24"):
        losses.matryoshka_reconstruction(x, f, W, b, [3, 5]).loss
    with pytest.raises(ValueError, match="2 group weights for 3 groups"):
        losses.matryoshka_reconstruction(x, f, W, b, [4, 8, 12], group_weights=[0.5, 0.5]).loss


# -- training -----------------------------------------------------------------------------------------------
def test_trains_tiny_synthetic_problem_with_c2r_without_nans(device):
    """300 manual Adam steps (no trainer) on x = codes @ D: the nested loss falls, longer prefixes reconstruct
    better, the true atoms are found, and the C²R term (every 5 steps) stays finite. Data, initial weights and
    batch indices are drawn on the CPU, so every device trains on the same batches."""
    torch.manual_seed(0)
    x, D, _ = sparse_dictionary_data(4096, d_in=32, n_features=32, k=3, noise=0.01)
    x = (x / x.pow(2).sum(-1).mean().sqrt()).to(device)
    D = D.to(device)
    sae = SAE(_cfg(d_in=32, d_sae=64, k=3, fractions=[0.125, 0.375, 0.5])).to(device).train()
    sizes = sae.activation.group_sizes
    assert sizes == [8, 24, 32]
    with torch.no_grad():
        sae.b_dec.copy_(losses.geometric_median(x[:512]))
    c2r = parse_regularizer("c2r:lambda=0.05,every=5")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    first = None
    for step in range(300):
        xb = x[torch.randint(0, x.shape[0], (256,)).to(device)]
        code, _ = sae.encode_code(xb)
        rec = losses.matryoshka_reconstruction(xb, code, sae.W_dec, sae.b_dec, sizes)  # sparse code: pass the Code
        loss = rec.loss
        reg = c2r.compute(step, code, sae.W_dec)
        assert (reg is None) == (step % 5 != 0)
        if reg is not None:
            assert torch.isfinite(reg) and reg > 0
            loss = loss + reg
        assert torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad_()
        opt.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            sae.activation.update_threshold(code)
        first = first if first is not None else float(rec.loss.detach())
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    prefix = rec.prefix_losses.detach()
    print(f"nested loss {first:.3f} -> {float(rec.loss.detach()):.3f}; prefix losses {prefix.tolist()}")
    assert float(rec.loss.detach()) < 0.5 * first
    assert prefix[0] > prefix[1] > prefix[2]  # longer prefixes reconstruct better
    assert 1 - float(losses.fvu(xb, rec.x_hat.detach())) > 0.9
    cos = torch.nn.functional.normalize(D, dim=-1) @ torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1).T
    assert (cos.max(1).values > 0.9).float().mean() > 0.8


def test_matryoshka_with_a_norm_restoring_encoder_is_refused_by_its_loss():
    """The nested prefix losses need a linear decoder: SAE.loss (and the trainer, through the same check) refuses
    magnitude_bypass, naming both."""
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE

    sae = SAE(SAEConfig(d_in=8, d_sae=64, k=4, activation="matryoshka_batchtopk", encoder="magnitude_bypass")).train()
    with pytest.raises(ValueError, match=r"matryoshka_batchtopk needs a linear decoder; encoder 'magnitude_bypass'"):
        sae.loss(torch.randn(16, 8))
