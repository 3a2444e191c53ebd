"""Trainer: learns a known dictionary, resumes exactly, refuses mismatched checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from saelab.config_files import from_dict
from saelab.sae.saving import load_sae
from saelab.train import TrainConfig, train, train_many
from synthetic import sparse_dictionary_data, train_interrupted, write_cache


def _cfg(tmp_path, cache, **kw) -> TrainConfig:
    base = dict(cache=str(cache), out=str(tmp_path / "sae"), activation="topk", d_sae=128, k=4, batch_size=256,
                lr=3e-3, warmup_steps=10, checkpoint_every=20, log_every=10, progress=False, seed=0)
    base.update(kw)
    return from_dict(TrainConfig, base)  # flat keys (activation, k, d_sae) go into TrainConfig.sae


@pytest.fixture()
def dict_cache(tmp_path):
    x, D, _ = sparse_dictionary_data(24_000, d_in=32, n_features=64, k=4, noise=0.01, scale=50.0)
    return write_cache(tmp_path / "cache", x), x, D


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu"])
def test_recovers_known_dictionary(tmp_path, dict_cache, activation):
    """Mechanism: on x = codes @ D (64 true features), the SAE reaches high FVE and finds the true atoms."""
    cache, x, D = dict_cache
    extra = {
        "relu": dict(l1_coefficient=0.3),
        "jumprelu": dict(l0_coefficient=0.05, jumprelu_init_threshold=0.1, jumprelu_bandwidth=0.05),
    }.get(activation, {})
    res = train(_cfg(tmp_path, cache.path, activation=activation, n_tokens=128_000, **extra))
    sae = load_sae(res.sae_dir)
    with torch.no_grad():
        x_hat = sae(x[:4000])
        fve = 1 - (x[:4000] - x_hat).pow(2).sum() / (x[:4000] - x[:4000].mean(0)).pow(2).sum()
        cos = F.normalize(D, dim=-1) @ F.normalize(sae.W_dec, dim=-1).T
        recovered = (cos.max(dim=1).values > 0.9).float().mean()
        l0 = (sae.encode(x[:4000]) > 0).sum(-1).float().mean()
    print(f"{activation}: FVE={fve:.3f} recovered={recovered:.2f} L0={l0:.1f}")
    assert fve > 0.8
    assert recovered > 0.8
    assert l0 < 12


def test_resume_gives_identical_weights(tmp_path, dict_cache):
    cache, _, _ = dict_cache
    full = train(_cfg(tmp_path, cache.path, out=str(tmp_path / "full"), n_tokens=256 * 60))
    # an interrupted run: train 40 of 60 steps (checkpoint at 40), then resume to 60
    part_cfg = _cfg(tmp_path, cache.path, out=str(tmp_path / "part"), n_tokens=256 * 60)
    train_interrupted(part_cfg, 40)
    resumed = train(part_cfg)
    a, b = load_sae(full.sae_dir), load_sae(resumed.sae_dir)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    steps = [json.loads(l)["step"] for l in open(tmp_path / "part" / "train_log.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 60


def test_checkpoint_from_other_config_is_refused(tmp_path, dict_cache):
    cache, _, _ = dict_cache
    train(_cfg(tmp_path, cache.path, n_tokens=256 * 20))
    with pytest.raises(ValueError, match="different configuration.*k"):
        train(_cfg(tmp_path, cache.path, n_tokens=256 * 20, k=8))


def test_normalisation_is_folded_into_saved_weights(tmp_path, dict_cache):
    """Trained on x / s, saved for raw x: the saved SAE reconstructs raw-scale inputs."""
    cache, x, _ = dict_cache
    res = train(_cfg(tmp_path, cache.path, n_tokens=256 * 200))
    sae = load_sae(res.sae_dir)
    scale = sae.cfg.extra["train"]["norm_scale"]
    assert scale > 10  # data scale 50: normalisation was active
    with torch.no_grad():
        fve = 1 - (x[:2000] - sae(x[:2000])).pow(2).sum() / (x[:2000] - x[:2000].mean(0)).pow(2).sum()
    print(f"folded FVE={fve:.3f}")
    assert fve > 0.7


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk"])
def test_bf16_autocast_trains_like_fp32(tmp_path, dict_cache, activation):
    """--autocast bf16 (the mixed-precision GPU path, also on CPU): fp32 weights and optimiser state, and the same
    dictionary quality as fp32 to within bf16 noise; a dense (ReLU) step really runs its GEMMs in bf16, so its
    weights differ from the fp32 run, while the sparse TopK step has no autocast GEMM and matches it closely."""
    cache, x, D = dict_cache
    extra = dict(l1_coefficient=0.3) if activation == "relu" else {}
    runs = {}
    for mode in ("none", "bf16"):
        res = train(_cfg(tmp_path, cache.path, out=str(tmp_path / mode), activation=activation, n_tokens=64_000,
                         autocast=mode, **extra))
        sae = load_sae(res.sae_dir)
        assert all(p.dtype == torch.float32 for p in sae.parameters())
        with torch.no_grad():
            x_hat = sae(x[:4000])
            runs[mode] = (sae, float(1 - (x[:4000] - x_hat).pow(2).sum() / (x[:4000] - x[:4000].mean(0)).pow(2).sum()))
    (fp32, fve32), (bf16, fve16) = runs["none"], runs["bf16"]
    assert fve32 > 0.7 and abs(fve16 - fve32) < 0.03, (fve32, fve16)
    diff = float((fp32.W_dec - bf16.W_dec).detach().abs().max())
    if activation == "relu":
        assert diff > 1e-4  # bf16 GEMMs changed the trajectory
    else:
        assert diff < 1e-3


def test_unknown_autocast_is_rejected(tmp_path, dict_cache):
    cache, _, _ = dict_cache
    with pytest.raises(ValueError, match="unknown autocast 'fp16'; choose one of none, bf16"):
        train(_cfg(tmp_path, cache.path, autocast="fp16", n_tokens=2560))


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_compiled_forward_trains_like_eager(tmp_path, dict_cache, activation):
    """--compile (torch.compile of the forward and losses) gives the eager run's weights up to float reordering; a
    compiled run resumes an eager checkpoint (compile is not part of the run's identity)."""
    cache, _, _ = dict_cache
    extra = dict(l1_coefficient=0.3) if activation == "relu" else {}
    n = 256 * 30
    eager = load_sae(train(_cfg(tmp_path, cache.path, out=str(tmp_path / "eager"), activation=activation, n_tokens=n,
                                **extra)).sae_dir)
    part = _cfg(tmp_path, cache.path, out=str(tmp_path / "compiled"), activation=activation, n_tokens=n,
                checkpoint_every=10, **extra)
    train_interrupted(part, 20)
    part.compile = True
    compiled = load_sae(train(part).sae_dir)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=1e-3, atol=1e-4, msg=name)


def test_resume_transposes_adam_moments_saved_for_the_transposed_w_enc():
    """A checkpoint whose optimiser saw W_enc as its (d_sae, d_in) transpose (the layout of earlier versions) resumes
    through _match_state_layout to bit-identical weights."""
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE
    from saelab.train import _match_state_layout

    def make():
        torch.manual_seed(0)
        return SAE(SAEConfig(d_in=16, d_sae=64, activation="topk", k=4)).train()

    def step(sae, opt, x):
        opt.zero_grad(set_to_none=True)
        (x - sae(x)).pow(2).sum().backward()
        opt.step()

    x = torch.randn(32, 16)
    a, c = make(), make()
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2, fused=True)
    for _ in range(3):
        step(a, opt_a, x)
    state = copy.deepcopy(opt_a.state_dict())
    i = next(i for i, p in enumerate(a.parameters()) if p is a.W_enc)
    for key in ("exp_avg", "exp_avg_sq"):  # the moments as the transposed parameter had them
        state["state"][i][key] = state["state"][i][key].t().contiguous()
    assert state["state"][i]["exp_avg"].shape == (64, 16)
    c.load_state_dict(a.state_dict())
    opt_c = torch.optim.Adam(c.parameters(), lr=1e-2, fused=True)
    opt_c.load_state_dict(state)
    _match_state_layout(opt_c)
    step(a, opt_a, x)
    step(c, opt_c, x)
    assert torch.equal(a.W_enc, c.W_enc) and torch.equal(a.W_dec, c.W_dec)


def _many_cfgs(tmp_path, cache, name, **kw) -> list[TrainConfig]:
    arms = {"btk": dict(activation="batchtopk"), "topk": dict(k=8), "cos": dict(activation="batchtopk", encoder="cosine_global"),
            "c2r": dict(regularizers=["c2r:lambda=5,every=2,chunk=512"])}
    return [_cfg(tmp_path, cache, out=str(tmp_path / name / arm), d_sae=1024, batch_size=1024, n_tokens=1024 * 12,
                 checkpoint_every=5, **{**a, **kw}) for arm, a in arms.items()]


def test_concurrent_train_many_gives_the_weights_of_runs_alone_on_their_thread_share(tmp_path, dict_cache):
    """train_many with concurrent_saes on 2 threads steps each SAE on 1 intra-op thread: every SAE (SAEs of unequal
    cost, one with a regularizer on its own RNG) gets bit for bit the weights of a run alone with threads=1. The
    sizes are large enough that torch splits reductions across threads (so a wrong thread count would show)."""
    cache, _, _ = dict_cache
    together = train_many(_many_cfgs(tmp_path, cache.path, "together", threads=2))
    for cfg, res in zip(_many_cfgs(tmp_path, cache.path, "alone", threads=1), together):
        a, b = load_sae(train(cfg).sae_dir), load_sae(res.sae_dir)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (cfg.out, name)
        assert (res.sae_dir / "train_log.jsonl").read_text().count("\n") == 2  # steps 10 and 12


def test_concurrent_train_many_uses_one_thread_per_sae(tmp_path, dict_cache, monkeypatch):
    """Mechanism: with concurrent_saes the steps run on 2 worker threads of 1 intra-op thread each, every SAE takes
    its batches in order, and the caller's thread count is restored; with it off, every step runs on the caller's
    thread with all threads."""
    import threading

    import saelab.train as tr

    cache, _, _ = dict_cache
    seen: list[tuple[str, int, int, int]] = []
    real = tr._Run.train_step

    def spy(self, batch):
        seen.append((threading.current_thread().name, torch.get_num_threads(), self.step, int(batch.x[0, 0].view(torch.int32))))
        return real(self, batch)

    monkeypatch.setattr(tr._Run, "train_step", spy)
    for concurrent in (True, False):
        seen.clear()
        train_many(_many_cfgs(tmp_path, cache.path, f"c{concurrent}", threads=2, concurrent_saes=concurrent)[:3])
        assert torch.get_num_threads() == 2
        names = {s[0] for s in seen}
        if concurrent:
            assert names == {"saelab-sae-0", "saelab-sae-1"} and {s[1] for s in seen} == {1}
        else:
            assert names == {threading.current_thread().name} and {s[1] for s in seen} == {2}
        by_step: dict[int, set[int]] = {}
        for _, _, step, first in seen:
            by_step.setdefault(step, set()).add(first)
        assert sorted(by_step) == list(range(12)) and all(len(v) == 1 for v in by_step.values())  # same batch per step
        assert len(seen) == 3 * 12


def test_concurrent_train_many_reraises_a_failed_step(tmp_path, dict_cache, monkeypatch):
    """A step that raises in a worker thread stops the pass and is re-raised by train_many (no hang, threads
    restored); an interrupt from the batch stream likewise."""
    import saelab.train as tr

    cache, _, _ = dict_cache
    real = tr._Run.train_step

    def failing(self, batch):
        if self.cfg.sae.activation == "topk" and self.step == 3:
            raise ValueError("boom in step 3")
        return real(self, batch)

    monkeypatch.setattr(tr._Run, "train_step", failing)
    with pytest.raises(ValueError, match="boom in step 3"):
        train_many(_many_cfgs(tmp_path, cache.path, "fail", threads=2))
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(tr._Run, "train_step", real)
    real_iter = tr.ActivationCache.iter_batches

    def limited(self, *a, **k):
        for i, b in enumerate(real_iter(self, *a, **k)):
            if i >= 7:
                raise KeyboardInterrupt
            yield b

    monkeypatch.setattr(tr.ActivationCache, "iter_batches", limited)
    with pytest.raises(KeyboardInterrupt):
        train_many(_many_cfgs(tmp_path, cache.path, "interrupted", threads=2))
    assert torch.get_num_threads() == 2


def test_train_many_refuses_mixed_concurrent_saes(tmp_path, dict_cache):
    cache, _, _ = dict_cache
    cfgs = _many_cfgs(tmp_path, cache.path, "mixed")[:2]
    cfgs[1].concurrent_saes = False
    with pytest.raises(ValueError, match="share 'concurrent_saes'"):
        train_many(cfgs)
