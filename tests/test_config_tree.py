"""One config tree: ``TrainConfig.sae`` / ``DemoConfig.sae`` nest one ``SAEConfig`` (issue 18).

Flags keep their plain names, config files take flat or nested keys, ``SAEConfig.resolved`` fills what the
activations decide, and checkpoints written when ``TrainConfig`` held the architecture fields itself still resume.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from saelab.checkpoint import read_checkpoint
from saelab.cli import build_parser, main
from saelab.config_files import flat_key_owners, flat_view, from_dict, nest_flat_keys
from saelab.regularizers import as_regularizer_spec
from saelab.sae.config import METADATA_FIELDS, SAEConfig
from saelab.sae.model import SAE
from saelab.train import TrainConfig, _run_identity, train
from synthetic import sparse_dictionary_data, train_interrupted, write_cache

ARCH_FLAGS = ("d_sae", "expansion_factor", "activation", "k", "jumprelu_init_threshold", "jumprelu_bandwidth",
              "matryoshka_fractions", "encoder", "n_groups", "cosine_init", "transcoder", "skip")


def _parse(argv: list[str]):
    return build_parser(argv).parse_args(argv).cfg


# ---------------------------------------------------------------- SAEConfig.resolved


def test_resolved_fills_d_in_d_sae_and_metadata():
    cfg = SAEConfig(activation="batchtopk", k=8, expansion_factor=4)
    r = cfg.resolved(48, model_name="m", hook_name="blocks.1.hook_resid_post", context_size=64)
    assert (r.d_in, r.d_sae, r.k, r.activation) == (48, 192, 8, "batchtopk")
    assert (r.model_name, r.hook_name, r.context_size) == ("m", "blocks.1.hook_resid_post", 64)
    assert (cfg.d_in, cfg.d_sae, cfg.model_name) == (0, 0, "")  # the original is unchanged
    assert SAEConfig(k=2, expansion_factor=2.5).resolved(5).d_sae == 12  # Python round: 12.5 -> 12
    assert SAEConfig(d_sae=100, expansion_factor=4).resolved(48).d_sae == 100  # d_sae wins over expansion_factor
    assert SAEConfig(d_in=1, k=2).resolved(48).d_in == 48  # the width always comes from the activations


def test_resolved_copies_mutable_fields():
    """The trainer adds to the resolved config's ``extra``; the caller's config must not see it."""
    cfg = SAEConfig()
    r = cfg.resolved(8)
    r.extra["train"] = {"steps": 1}
    r.matryoshka_fractions.append(0.5)
    assert cfg.extra == {} and len(cfg.matryoshka_fractions) == 5


@pytest.mark.parametrize("cfg, d_in, meta, match", [
    (SAEConfig(k=64, expansion_factor=2), 16, {}, r"k=64 exceeds d_sae=32 .*lower k or raise d_sae / expansion_factor"),
    (SAEConfig(), 0, {}, r"d_in must be a positive integer"),
    (SAEConfig(), 16, {"k": 3}, r"\['k'\] are no metadata fields; valid: model_name"),
    (SAEConfig(expansion_factor=0.01), 16, {}, r"gives d_sae=0; raise expansion_factor or set d_sae"),
    (SAEConfig(encoder="cosine_grouped", n_groups=40, expansion_factor=2), 16, {}, r"n_groups must be in \[1, d_sae=32\]"),
])
def test_resolved_names_the_problem(cfg, d_in, meta, match):
    with pytest.raises(ValueError, match=match):
        cfg.resolved(d_in, **meta)


@pytest.mark.parametrize("kw, match", [
    (dict(d_in=-1), r"d_in must be an integer >= 0"),
    (dict(d_sae=-3), r"d_sae must be an integer >= 0"),
    (dict(k=0), r"k must be >= 1 for topk"),
    (dict(d_sae=4, k=8), r"k=8 exceeds d_sae=4"),
    (dict(expansion_factor=0), r"expansion_factor must be > 0"),
    (dict(encoder="cosine"), r"unknown encoder 'cosine'"),
])
def test_post_init_checks_what_it_can(kw, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(**kw)


def test_unset_sizes_are_allowed_until_the_sae_is_built():
    cfg = SAEConfig(k=10_000, activation="topk")  # k <= d_sae is only checked once d_sae is known
    assert cfg.d_sae == 0
    with pytest.raises(ValueError, match=r"d_in and d_sae must be set: build the SAE from cfg.resolved\(d_in\)"):
        SAE(SAEConfig())
    assert SAE(SAEConfig(k=4).resolved(8)).W_enc.shape == (8, 128)


def test_old_cfg_json_without_expansion_factor_loads_unchanged():
    old = {"d_in": 8, "d_sae": 24, "activation": "topk", "k": 3, "model_name": "m", "hook_name": "h",
           "context_size": 64, "prepend_bos": True, "extra": {"train": {"steps": 5}}}
    cfg = SAEConfig.from_dict(old)
    assert {k: cfg.to_dict()[k] for k in old} == old and cfg.expansion_factor == 16.0
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------- flat keys and the command line


def test_flat_keys_are_the_command_line_fields_of_sae():
    owners = flat_key_owners(TrainConfig)
    assert set(owners) == set(ARCH_FLAGS) and set(owners.values()) == {"sae"}
    assert not set(owners) & {"d_in", *METADATA_FIELDS}
    assert nest_flat_keys(TrainConfig, {"k": 3, "lr": 0.1, "sae": {"encoder": "cosine_global"}}) == {
        "lr": 0.1, "sae": {"encoder": "cosine_global", "k": 3}}


def test_train_help_lists_architecture_flags_once_without_metadata(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name in ARCH_FLAGS:  # one option line each: "  --k int" or "  -k int, --k int", no "--sae.k"
        assert len(re.findall(rf"^  (?:-\w+ \S+, )?--{name} ", text, re.M)) == 1, name
    for name in ("d_in", *METADATA_FIELDS):
        assert not re.search(rf"--(sae\.)?{name}\b", text), name


def test_cli_flags_keep_their_names():
    cfg = _parse(["train", "--k", "32", "--activation", "batchtopk", "--encoder", "cosine_global", "--d_sae", "4096",
                  "--expansion_factor", "8", "--lr", "0.001"])
    assert cfg.sae == SAEConfig(k=32, activation="batchtopk", encoder="cosine_global", d_sae=4096, expansion_factor=8)
    assert cfg.lr == 0.001
    demo = _parse(["run", "--k", "8", "--activation", "relu", "--encoder", "cosine_per_feature",
                   "--hook_name", "blocks.3.hook_resid_post"])
    assert (demo.sae.k, demo.sae.activation, demo.sae.encoder) == (8, "relu", "cosine_per_feature")
    assert demo.hook_name == "blocks.3.hook_resid_post" and demo.sae.hook_name == ""  # the demo's own field


def test_flat_and_nested_config_files_give_equal_configs(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("cache: c\nk: 16\nactivation: batchtopk\nexpansion_factor: 4\nlr: 0.002\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("cache: c\nsae: {k: 16, activation: batchtopk, expansion_factor: 4}\nlr: 0.002\n")
    a, b = _parse(["train", "--config", str(flat)]), _parse(["train", "--config", str(nested)])
    assert a == b and isinstance(a, TrainConfig)
    assert a.sae == SAEConfig(k=16, activation="batchtopk", expansion_factor=4) and a.lr == 0.002
    over = _parse(["train", "--config", str(flat), "--k", "8"])  # flags override the file
    assert over.sae.k == 8 and over.sae.activation == "batchtopk"
    demo = tmp_path / "demo.yaml"
    demo.write_text("k: 12\nencoder: cosine_global\nhook_name: blocks.2.hook_resid_post\n")
    d = _parse(["run", "--config", str(demo)])
    assert (d.sae.k, d.sae.encoder, d.hook_name) == (12, "cosine_global", "blocks.2.hook_resid_post")


def test_bad_config_keys_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"'k' is given both flat and as sae.k; keep one"):
        from_dict(TrainConfig, {"k": 3, "sae": {"k": 4}})
    with pytest.raises(ValueError, match=r"unknown config key 'hook_name'.*valid keys: .*activation"):
        from_dict(TrainConfig, {"hook_name": "x"})  # metadata comes from the cache, not from the config
    with pytest.raises(ValueError, match=r"unknown config key 'sae.kk'"):
        from_dict(TrainConfig, {"sae": {"kk": 3}})


# ---------------------------------------------------------------- compare arms


def test_compare_arms_and_sweeps_use_flat_keys(tmp_path):
    from saelab.compare import ExperimentConfig, _train_config, plan, validate

    exp = ExperimentConfig(out=str(tmp_path), base={"activation": "batchtopk", "k": 4, "expansion_factor": 2, "lr": 0.01},
                           arms={"baseline": {}, "cos": {"encoder": "cosine_global", "sweep": {"k": [8, 16]}}})
    validate(exp)
    cfgs = {r.label: _train_config(exp, r) for r in plan(exp)}
    assert {lab: (c.sae.encoder, c.sae.k) for lab, c in cfgs.items()} == {
        "baseline": ("linear", 4), "cos[k=8]": ("cosine_global", 8), "cos[k=16]": ("cosine_global", 16)}
    assert all(c.sae.expansion_factor == 2 and c.sae.activation == "batchtopk" and c.lr == 0.01 for c in cfgs.values())
    with pytest.raises(ValueError, match=r"k = 'x' is not a int"):
        validate(dataclasses.replace(exp, arms={"baseline": {"k": "x"}}))


# ---------------------------------------------------------------- checkpoint identity


#: the identity a checkpoint held when TrainConfig had the architecture fields itself (every field of that
#: TrainConfig except _NOT_IDENTITY, the stream fields dropped as stream is off), for the run of _old_style_cfg
OLD_IDENTITY = {
    "cache": "CACHE", "target_cache": None, "activation": "batchtopk",
    "matryoshka_fractions": [1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32], "regularizers": [str(as_regularizer_spec("c2r"))],
    "encoder": "cosine_global", "n_groups": 4, "cosine_init": "auto", "expansion_factor": 16.0, "d_sae": None,
    "k": 4, "n_tokens": 256 * 20, "batch_size": 256, "lr": 0.003, "warmup_steps": 1000, "decay_start": 0.8,
    "grad_clip": 1.0, "normalize_activations": True, "aux_k": None, "aux_coefficient": 1 / 32, "dead_tokens": None,
    "jumprelu_init_threshold": 0.001, "jumprelu_bandwidth": 0.001, "l1_coefficient": 1.0, "l0_coefficient": 1.0,
    "sparsity_warmup_steps": 0, "threshold_start_step": 1000, "seed": 0, "device": "cpu", "autocast": "none",
}


def _new_identity(cfg: TrainConfig) -> dict:
    return _run_identity({**flat_view(cfg), "regularizers": [str(as_regularizer_spec(r)) for r in cfg.regularizers]})


def _old_style_cfg(cache: str, out: str, **kw) -> TrainConfig:
    return TrainConfig(cache=cache, out=out, sae=SAEConfig(**{"activation": "batchtopk", "encoder": "cosine_global", "k": 4, **kw}),
                       regularizers=["c2r"], n_tokens=256 * 20, batch_size=256, lr=0.003, progress=False,
                       checkpoint_every=10)


def test_identity_equals_the_old_flat_identity():
    assert _new_identity(_old_style_cfg("CACHE", "o")) == OLD_IDENTITY
    assert _new_identity(_old_style_cfg("CACHE", "o", d_sae=64)) == {**OLD_IDENTITY, "d_sae": 64}
    assert _new_identity(_old_style_cfg("CACHE", "other_out", k=8)) == {**OLD_IDENTITY, "k": 8}


def test_checkpoint_with_an_old_flat_identity_resumes(tmp_path):
    """A checkpoint whose identity was written the old way resumes to the weights of an uninterrupted run."""
    x, _, _ = sparse_dictionary_data(256 * 20, d_in=16, n_features=32, k=3)
    cache = write_cache(tmp_path / "cache", x)
    full = train(_old_style_cfg(str(cache.path), str(tmp_path / "full"), d_sae=64))
    part = _old_style_cfg(str(cache.path), str(tmp_path / "part"), d_sae=64)
    train_interrupted(part, 10)
    ckpt = tmp_path / "part" / "checkpoint" / "state.json"
    state = json.loads(ckpt.read_text())
    state["identity"] = {**OLD_IDENTITY, "cache": str(cache.path), "d_sae": 64}
    ckpt.write_text(json.dumps(state))
    resumed = train(part)
    a = read_checkpoint(full.sae_dir / "checkpoint")["sae"]
    b = read_checkpoint(resumed.sae_dir / "checkpoint")["sae"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
