"""Trainer integration (proposed): Matryoshka BatchTopK and C²R/OrtSAE regularizers through train()."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from saelab.sae.config import SAEConfig
from saelab.sae.saving import load_sae
from saelab.train import TrainConfig, train
from synthetic import sparse_dictionary_data, write_cache


@pytest.fixture()
def dict_cache(tmp_path):
    x, D, _ = sparse_dictionary_data(24_000, d_in=32, n_features=64, k=4, noise=0.01, scale=50.0)
    return write_cache(tmp_path / "cache", x), x, D


@pytest.mark.parametrize("activation, regs", [
    ("matryoshka_batchtopk", ["c2r:lambda=0.05,every=5"]),
    ("matryoshka_batchtopk", []),
    ("topk", ["c2r:lambda=0.05"]),
    ("batchtopk", [{"name": "ortho", "lambda": 0.02}]),
])
def test_train_with_regularizers(tmp_path, dict_cache, activation, regs):
    cache, x, D = dict_cache
    cfg = TrainConfig(cache=str(cache.path), out=str(tmp_path / "sae"),
                      sae=SAEConfig(activation=activation, d_sae=128, k=4, matryoshka_fractions=[0.25, 0.25, 0.5]),
                      batch_size=256, lr=3e-3, warmup_steps=10, checkpoint_every=20, log_every=10, progress=False,
                      n_tokens=128_000, regularizers=regs)
    res = train(cfg)
    sae = load_sae(res.sae_dir)
    assert sae.cfg.activation == activation
    with torch.no_grad():
        fve = 1 - (x[:4000] - sae(x[:4000])).pow(2).sum() / (x[:4000] - x[:4000].mean(0)).pow(2).sum()
        cos = F.normalize(D, dim=-1) @ F.normalize(sae.W_dec, dim=-1).T
        recovered = (cos.max(dim=1).values > 0.9).float().mean()
    rows = [json.loads(l) for l in open(tmp_path / "sae" / "train_log.jsonl")]
    name = (regs[0]["name"] if isinstance(regs[0], dict) else regs[0].split(":")[0]) if regs else "mse"
    print(activation, regs, f"FVE={fve:.3f} recovered={recovered:.2f}", {k: rows[-1].get(k) for k in ("mse", "matryoshka", name)})
    assert all(name in r for r in rows)
    extra = json.loads((tmp_path / "sae" / "cfg.json").read_text())["saelab"]["config"]["extra"]
    assert len(extra["regularizers"]) == len(regs) and all(r.startswith(name) for r in extra["regularizers"])
    assert fve > (0.75 if activation == "matryoshka_batchtopk" else 0.8) and recovered > (0.5 if activation == "matryoshka_batchtopk" else 0.8)
    if activation == "matryoshka_batchtopk":
        assert sae.activation.group_sizes == [32, 32, 64] and sae.activation.threshold > 0
        assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["architecture"] == "jumprelu"


def test_bad_regularizer_fails_before_training(tmp_path, dict_cache):
    cache, _, _ = dict_cache
    with pytest.raises(ValueError, match="valid regularizers: c2r, ortho"):
        train(TrainConfig(cache=str(cache.path), out=str(tmp_path / "s"), regularizers=["c2x"], progress=False))


def test_matryoshka_with_one_group_trains_like_batchtopk(tmp_path, dict_cache):
    cache, x, _ = dict_cache
    kw = dict(cache=str(cache.path), batch_size=256, lr=3e-3, warmup_steps=10, progress=False, n_tokens=256 * 60)
    a = load_sae(train(TrainConfig(out=str(tmp_path / "a"), sae=SAEConfig(activation="batchtopk", d_sae=128, k=4), **kw)).sae_dir)
    b = load_sae(train(TrainConfig(out=str(tmp_path / "b"), sae=SAEConfig(activation="matryoshka_batchtopk", d_sae=128, k=4,
                                                                          matryoshka_fractions=[1.0]), **kw)).sae_dir)
    torch.testing.assert_close(a.W_dec, b.W_dec, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(a.activation.threshold, b.activation.threshold, rtol=1e-3, atol=1e-3)


def _near_duplicate_coactivation(f: torch.Tensor, W_dec: torch.Tensor, min_cos: float = 0.3) -> float:
    """(1/M) sum_j 1[cos(d_j, d_nu(j)) > min_cos] * P(f_j > 0 and f_nu(j) > 0): how often latents fire together
    with their nearest decoder neighbour, counted only for near-duplicate directions."""
    W = F.normalize(W_dec, dim=-1)
    S = W @ W.T
    S.fill_diagonal_(-2.0)
    cos, nu = S.max(dim=1)
    active = (f > 0).float()
    both = (active * active[:, nu]).mean(0)
    return float(((cos > min_cos).float() * both).mean())


def test_c2r_reduces_coactivation_of_near_duplicates_in_the_absorption_setup(tmp_path):
    """Mechanism (Jin et al. 2026): parents always co-occur with one of their children. Without C²R the SAE learns
    near-duplicate decoder directions that fire together; C²R lowers their co-activation at a small FVE cost."""
    from saelab.regularizers import c2r_loss
    from synthetic import hierarchical_data

    x, _, _ = hierarchical_data(30_000)
    cache = write_cache(tmp_path / "cache", x[:24_000])
    held_out = x[24_000:]
    results = {}
    for lam in (0.0, 0.1):
        cfg = TrainConfig(cache=str(cache.path), out=str(tmp_path / f"sae{lam}"), sae=SAEConfig(activation="topk", d_sae=64, k=6),
                          batch_size=256, lr=3e-3, warmup_steps=10, n_tokens=256 * 300, progress=False,
                          regularizers=[f"c2r:lambda={lam},every=1,scale=raw"] if lam else [])
        sae = load_sae(train(cfg).sae_dir)
        with torch.no_grad():
            f = sae.encode(held_out)
            fve = 1 - (held_out - sae(held_out)).pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum()
            results[lam] = {
                "fve": float(fve),
                "c2r_statistic": float(c2r_loss(f / f.norm(dim=0).max(), sae.W_dec, chunk_size=10**6)),
                "near_duplicate_coactivation": _near_duplicate_coactivation(f, sae.W_dec),
            }
    print("\nC2R absorption toy (held-out):", json.dumps(results, indent=1))
    base, reg = results[0.0], results[0.1]
    assert reg["near_duplicate_coactivation"] < 0.5 * base["near_duplicate_coactivation"]
    assert reg["c2r_statistic"] < 0.5 * base["c2r_statistic"]
    assert base["fve"] - reg["fve"] < 0.05  # stated tolerance: reconstruction within 0.05 FVE
