"""SAEs of several caches (the hooks of one multi-hook harvest) trained in one pass: every SAE gets bit for bit the
weights it gets trained alone, a resumed pass too; `saelab train --cache <multi-hook folder>` trains one SAE per
hook; caches that cannot share a pass are refused with the fix."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.activations.cache import hook_cache_dirs
from saelab.cli import main
from saelab.config_files import from_dict
from saelab.sae.saving import load_sae
from saelab.train import TrainConfig, hook_configs, train, train_many
from synthetic import sparse_dictionary_data, train_interrupted, write_cache

N = 1024 * 12


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Three row-aligned caches of a pretend multi-hook harvest: different widths, data and scales."""
    root = tmp_path_factory.mktemp("multi")
    xa, _, _ = sparse_dictionary_data(N, d_in=32, n_features=64, k=4, noise=0.01, seed=1, scale=50.0)
    xb, _, _ = sparse_dictionary_data(N, d_in=24, n_features=48, k=3, noise=0.01, seed=2, scale=3.0)
    xc = torch.tanh(xa[:, :16]) * 7.0  # a function of xa's rows: a transcoder target aligned with cache a
    return {name: write_cache(root / name, x, hook_name=name, shard_rows=4096).path
            for name, x in (("blocks.0.hook_resid_post", xa), ("blocks.1.hook_resid_post", xb), ("model.layers.1.mlp", xc))}


def _cfg(out, cache, **kw) -> TrainConfig:
    base = dict(cache=str(cache), out=str(out), activation="topk", d_sae=256, k=4, batch_size=1024, n_tokens=N,
                lr=3e-3, warmup_steps=2, checkpoint_every=4, log_every=4, progress=False, seed=0, threads=1)
    base.update(kw)
    return from_dict(TrainConfig, base)


def _arms(tmp_path, caches, name, **kw) -> list[TrainConfig]:
    a, b, c = caches.values()
    return [_cfg(tmp_path / name / "a", a, **kw),
            _cfg(tmp_path / name / "b", b, activation="batchtopk", regularizers=["c2r:lambda=5,every=2,chunk=512"], **kw),
            _cfg(tmp_path / name / "a_wide", a, d_sae=512, **kw),
            _cfg(tmp_path / name / "tc", a, target_cache=str(c), transcoder=True, skip=True, **kw)]


def _assert_same_weights(a_dir, b_dir) -> None:
    a, b = load_sae(a_dir), load_sae(b_dir)
    for name, p in a.state_dict().items():
        assert torch.equal(p, b.state_dict()[name]), (a_dir, name)


@pytest.mark.parametrize("concurrent", [False, True])
def test_one_pass_over_several_caches_gives_each_sae_its_weights_alone(tmp_path, caches, concurrent):
    """Mechanism: each SAE reads its own cache's batches (own input scale, own width), the same as trained alone;
    an SAE and a transcoder share a stream. With concurrent_saes on 2 threads each SAE steps on 1 thread, as alone."""
    together = train_many(_arms(tmp_path, caches, "together", threads=2 if concurrent else 1,
                                concurrent_saes=concurrent))
    for cfg, res in zip(_arms(tmp_path, caches, "alone"), together):
        _assert_same_weights(train(cfg).sae_dir, res.sae_dir)
    assert load_sae(together[1].sae_dir).cfg.d_in == 24 and load_sae(together[3].sae_dir).cfg.d_out == 16


def test_a_resumed_pass_over_several_caches_equals_an_uninterrupted_one(tmp_path, caches):
    """One SAE killed after 4 steps, the others not started: the pass resumes the first from its checkpoint, the
    rest from step 0, and every weight equals the uninterrupted runs'."""
    cfgs = _arms(tmp_path, caches, "resumed")
    train_interrupted(cfgs[1], 4)
    resumed = train_many(cfgs)
    for cfg, res in zip(_arms(tmp_path, caches, "alone"), resumed):
        _assert_same_weights(train(cfg).sae_dir, res.sae_dir)


def test_caches_of_different_sizes_need_n_tokens(tmp_path, caches):
    short = write_cache(tmp_path / "short", torch.randn(N // 2, 32)).path
    a = next(iter(caches.values()))
    with pytest.raises(ValueError, match="--n_tokens"):
        train_many([_cfg(tmp_path / "x", a, n_tokens=None), _cfg(tmp_path / "y", short, n_tokens=None)])
    res = train_many([_cfg(tmp_path / "x", a, n_tokens=N // 2), _cfg(tmp_path / "y", short, n_tokens=N // 2)])
    assert [r.steps for r in res] == [6, 6]
    with pytest.raises(ValueError, match="stream follows one cache"):
        train_many([_cfg(tmp_path / "s1", a, stream=True), _cfg(tmp_path / "s2", short, stream=True)])


def test_cli_trains_one_sae_per_hook_of_a_multi_hook_folder(tmp_path, caches, capsys):
    root = next(iter(caches.values())).parent
    assert list(hook_cache_dirs(root)) == sorted(caches)
    assert hook_cache_dirs(next(iter(caches.values()))) == {}  # a single cache is not a folder of caches
    with pytest.raises(FileNotFoundError, match="multi-hook harvest.*pass one of them"):
        train(_cfg(tmp_path / "one", root))
    with pytest.raises(ValueError, match="--target_cache <folder>/<output hook>"):
        hook_configs(_cfg(tmp_path / "tc", root, transcoder=True))
    main(["train", "--cache", str(root), "--out", str(tmp_path / "saes"), "--k", "4", "--d_sae", "128",
          "--batch_size", "1024", "--n_tokens", str(N // 2), "--progress", "false", "--threads", "1"])
    printed = capsys.readouterr().out
    for name in caches:
        cfg = json.loads((tmp_path / "saes" / name / "cfg.json").read_text())
        assert cfg["hook_name"] == name and str(tmp_path / "saes" / name) in printed
    # the CLI's pass equals the SAE trained alone on that hook's cache
    _assert_same_weights(tmp_path / "saes" / "blocks.1.hook_resid_post",
                         train(_cfg(tmp_path / "alone_b", caches["blocks.1.hook_resid_post"], d_sae=128,
                                    n_tokens=N // 2, warmup_steps=1000, lr=None, checkpoint_every=200,
                                    log_every=25)).sae_dir)
