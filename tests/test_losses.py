"""Losses against slow, direct computations of their formulas."""

from __future__ import annotations

import torch

from saelab.sae import losses


def test_reconstruction_and_fvu_direct(device):
    x, x_hat = torch.randn(50, 8).to(device), torch.randn(50, 8).to(device)
    mse = sum(float(((x[i] - x_hat[i]) ** 2).sum()) for i in range(50)) / 50
    assert abs(float(losses.reconstruction_loss(x, x_hat)) - mse) < 1e-5
    mean = x.mean(0)
    den = sum(float(((x[i] - mean) ** 2).sum()) for i in range(50))
    num = sum(float(((x[i] - x_hat[i]) ** 2).sum()) for i in range(50))
    assert abs(float(losses.fvu(x, x_hat)) - num / den) < 1e-5


def test_l1_penalty_weights_by_decoder_norm(device):
    f = torch.rand(4, 6).to(device)
    W = torch.randn(6, 3).to(device)
    ref = sum(float(f[n, j]) * float(W[j].norm()) for n in range(4) for j in range(6)) / 4
    assert abs(float(losses.l1_penalty(f, W)) - ref) < 1e-4


def test_auxk_matches_slow_reference(device):
    torch.manual_seed(1)
    N, d_sae, d_in, k_aux = 12, 20, 5, 3
    pre, W = torch.randn(N, d_sae).to(device), torch.randn(d_sae, d_in).to(device)
    dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
    dead[[1, 4, 7, 9, 15]] = True
    e = torch.randn(N, d_in).to(device)
    got = float(losses.auxk_loss(e, pre, dead, W, k_aux))
    dead_ids = dead.nonzero().flatten().tolist()
    num = 0.0
    for n in range(N):
        best = sorted(dead_ids, key=lambda j: -float(pre[n, j]))[:k_aux]
        e_hat = sum(max(float(pre[n, j]), 0.0) * W[j] for j in best)
        num += float(((e[n] - e_hat) ** 2).sum())
    den = float(((e - e.mean(0)) ** 2).sum())
    assert abs(got - num / den) < 1e-4


def test_auxk_zero_without_dead_and_k_capped_by_dead_count(device):
    pre, W, e = torch.randn(4, 10).to(device), torch.randn(10, 3).to(device), torch.randn(4, 3).to(device)
    assert float(losses.auxk_loss(e, pre, torch.zeros(10, dtype=torch.bool, device=device), W, 5)) == 0.0
    one = torch.zeros(10, dtype=torch.bool, device=device)
    one[2] = True  # k_aux = 5 but only one dead latent: must not error, uses 1
    assert torch.isfinite(losses.auxk_loss(e, pre, one, W, 5))


def test_auxk_gradient_reaches_only_dead_latents(device):
    pre = torch.randn(8, 10).to(device).requires_grad_()
    dead = torch.zeros(10, dtype=torch.bool, device=device)
    dead[:3] = True
    losses.auxk_loss(torch.randn(8, 4).to(device), pre, dead, torch.randn(10, 4).to(device), 2).backward()
    assert pre.grad[:, 3:].abs().sum() == 0
    assert pre.grad[:, :3].abs().sum() > 0


def test_geometric_median_optimality_and_robustness(device):
    x = torch.randn(200, 4)
    x[:5] += 1000.0
    x = x.to(device)  # outliers drag the mean, not the median
    m = losses.geometric_median(x)
    # first-order condition of min sum ||x_n - m||: the unit vectors towards the points sum to ~0
    u = (x - m) / (x - m).norm(dim=-1, keepdim=True)
    assert u.sum(0).norm() < 1.0
    assert m.norm() < 2.0 < x.mean(0).norm()
