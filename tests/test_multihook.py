"""Several hooks from one LM forward pass: hook-set expansion, ``capture_many``, and multi-hook harvests that equal,
byte for byte, the single-hook harvests of the same hooks (clean, masked + paired, resumed in-process and after a
real ``kill -9``)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

import saelab.activations.harvest as hv
from saelab.activations.cache import ActivationCache
from saelab.activations.harvest import HarvestConfig, harvest
from saelab.data.split import DataConfig
from saelab.models.hooks import capture, capture_many, expand_hook_names, is_multi_hook, resolve_hooks
from saelab.models.lm import load_lm

# three hooks of the 3-block tiny Llama: two residual hooks and a sub-module; a tight outlier filter makes the
# per-hook row filter keep different rows per hook (so the caches end at different batches)
HOOKS = ["blocks.0.hook_resid_post", "model.layers.1.mlp", "blocks.2.hook_resid_post"]
N = 600
MNM = 1.5


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_lm(str(tiny_llama_dir))


def _cfg(tiny_llama_dir, text_dir, out, hook_name, **kw):
    base = dict(model=str(tiny_llama_dir), hook_name=hook_name, out=str(out), n_tokens=N, context_size=32,
                batch_size=4, checkpoint_every=2, progress=False, max_norm_multiple=MNM,
                data=DataConfig(corpora=[], text_files=[str(text_dir)], eval_fraction=0.1))
    base.update(kw)
    return HarvestConfig(**base)


def _files(d: Path) -> dict[str, bytes]:
    """Every file of a cache directory -> bytes (the empty flock file excluded)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file() and p.name != ".lock"}


def _assert_same_dir(got: Path, want: Path) -> None:
    a, b = _files(got), _files(want)
    assert sorted(a) == sorted(b), f"{got} vs {want}: file sets differ"
    for name in b:
        assert a[name] == b[name], f"{got}/{name} differs from {want}/{name}"


@pytest.fixture(scope="module")
def singles(tiny_llama_dir, text_dir, tiny, tmp_path_factory) -> dict[str, Path]:
    """The single-hook harvests of every hook of :data:`HOOKS` (canonical name -> cache dir)."""
    root = tmp_path_factory.mktemp("singles")
    out = {}
    for h in HOOKS:
        c = harvest(_cfg(tiny_llama_dir, text_dir, root / h, h), lm=tiny)
        out[c.manifest["hook_name"]] = Path(c.path)
    return out


# ----------------------------------------------------------------------------------------------- expansion


def test_expansion_of_globs_ranges_and_aliases(tiny):
    m = tiny.model
    resid = [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert expand_hook_names(m, "blocks.*.hook_resid_post") == resid
    assert expand_hook_names(m, ["blocks.1-2.hook_resid_post"]) == resid[1:]
    assert expand_hook_names(m, "model.layers.0-1.mlp") == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert expand_hook_names(m, "model.layers.[02]") == ["model.layers.0", "model.layers.2"]
    # aliases of one hook are kept once, at the first position
    assert [h.hook_name for h in resolve_hooks(m, ["model.layers.2", "blocks.0.hook_resid_post",
                                                   "blocks.2.hook_resid_post"])] == [resid[2], resid[0]]
    assert not is_multi_hook("blocks.1.hook_resid_post") and not is_multi_hook(["model.layers.1"])
    assert is_multi_hook(["a", "b"]) and is_multi_hook("blocks.*.hook_resid_post") and is_multi_hook(["blocks.0-1.x"])


@pytest.mark.parametrize("spec, match", [
    ("blocks.*.hook_resid_pre", "matches no hook"),
    ("blocks.2-1.hook_resid_post", "reversed"),
    (["blocks.0.hook_resid_post", "blocks.9.hook_resid_post"], "unknown hook"),
    ([], "empty"),
])
def test_bad_hook_sets_are_refused(tiny, spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_hooks(tiny.model, spec)


def test_capture_many_equals_capture_and_stops_after_the_deepest_hook(tiny):
    m = tiny.model
    hooks = resolve_hooks(m, ["model.layers.1.mlp", "blocks.0.hook_resid_post"])
    ids = torch.randint(0, 1000, (2, 9))
    calls = []
    handle = m.model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = capture_many(m, hooks, ids)
    finally:
        handle.remove()
    assert list(got) == ["model.layers.1.mlp", "blocks.0.hook_resid_post"]
    assert not calls, "the forward ran past the deepest hook"
    for h in hooks:
        assert torch.equal(got[h.hook_name], capture(m, h, ids))
    with pytest.raises(ValueError, match="distinct"):
        capture_many(m, hooks + hooks[:1], ids)


# ----------------------------------------------------------------------------------------------- harvest


def test_multi_hook_harvest_equals_single_hook_harvests(tiny_llama_dir, text_dir, tiny, singles, tmp_path):
    res = harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "multi", HOOKS), lm=tiny)
    assert sorted(res) == sorted(singles)
    for name, cache in res.items():
        assert Path(cache.path) == tmp_path / "multi" / name and cache.n_tokens == N
        _assert_same_dir(tmp_path / "multi" / name, singles[name])
    ends = {json.loads((singles[n] / "manifest.json").read_text())["progress"]["contexts_done"] for n in singles}
    assert len(ends) > 1, "the per-hook row filters should make the caches end at different batches"
    # a finished multi-hook harvest re-run is a no-op returning the same caches
    again = harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "multi", HOOKS), lm=tiny)
    assert {k: v.n_tokens for k, v in again.items()} == {k: N for k in singles}


def _rows_by_token(cache) -> dict[tuple[int, int], torch.Tensor]:
    """``(context number, position) -> activation row`` of a cache; a context starts where the position falls."""
    x = torch.cat([torch.tensor(cache.shard_arrays(i)[0]) for i in range(cache.n_shards)])
    pos = [int(t) for i in range(cache.n_shards) for t in cache.shard_arrays(i)[1]["positions"]]
    ctx, out = 0, {}
    for i, t in enumerate(pos):
        if i and t <= pos[i - 1]:
            ctx += 1
        out[(ctx, t)] = x[i]
    return out


def test_shared_rows_make_the_hooks_caches_row_aligned(tiny_llama_dir, text_dir, tiny, singles, tmp_path):
    """With shared_rows a token is kept where every hook's filter keeps it: the caches hold the same tokens row by
    row (the transcoder trainer's check passes), and each holds exactly the tokens all single-hook caches share,
    with the same activations."""
    from saelab.train import _check_row_aligned

    res = harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "shared", HOOKS, shared_rows=True, n_tokens=N // 3),
                  lm=tiny)
    caches = list(res.values())
    for c in caches[1:]:
        _check_row_aligned(caches[0], c)
        assert c.manifest["shared_rows"] == HOOKS[:1] + ["model.layers.1.mlp"] + HOOKS[2:]
    single = {h: _rows_by_token(ActivationCache.open(singles[h])) for h in res}
    got = {h: _rows_by_token(c) for h, c in res.items()}
    last = max(k[0] for k in got[HOOKS[0]])  # the last context is cut by n_tokens: compare the ones before it
    assert all(last < max(k[0] for k in rows) for rows in single.values()), "the single harvests must cover it"
    common = set.intersection(*({k for k in rows if k[0] < last} for rows in single.values()))
    assert any(len(common) < sum(k[0] < last for k in rows) for rows in single.values())  # the filters disagree
    for h in res:
        assert {k for k in got[h] if k[0] < last} == common
        assert all(torch.equal(got[h][k], single[h][k]) for k in common)
    with pytest.raises(hv.CacheMismatchError, match="shared_rows"):  # a resume without the flag is refused
        harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "shared", HOOKS, n_tokens=N // 3), lm=tiny)


def test_masked_multi_hook_harvest_with_paired_clean_caches(tiny_llama_dir, text_dir, tiny, tmp_path):
    hooks = ["blocks.0-2.hook_resid_post"]  # a range: three hooks
    kw = dict(mask_prob=0.3, n_tokens=300)
    multi = harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "m", hooks, paired_clean_out=str(tmp_path / "p"), **kw),
                    lm=tiny)
    assert len(multi) == 3
    for name in multi:
        harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "s" / name, name,
                     paired_clean_out=str(tmp_path / "sp" / name), **kw), lm=tiny)
        _assert_same_dir(tmp_path / "m" / name, tmp_path / "s" / name)
        _assert_same_dir(tmp_path / "p" / name, tmp_path / "sp" / name)


def _crash_at_checkpoint(monkeypatch, n: int, cfg: HarvestConfig, lm) -> None:
    """Run ``harvest(cfg)`` killed (KeyboardInterrupt) at the ``n``-th cache checkpoint of the run: with three caches
    checkpointing in hook order, ``n`` = 5 leaves cache 0 one checkpoint ahead of caches 1 and 2, ``n`` = 6 caches 0
    and 1 ahead of cache 2."""
    real = hv.ActivationCacheWriter.checkpoint
    calls = {"n": 0}

    def dying(self, progress):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, progress)

    with monkeypatch.context() as m:
        m.setattr(hv.ActivationCacheWriter, "checkpoint", dying)
        with pytest.raises(KeyboardInterrupt):
            harvest(cfg, lm=lm)


@pytest.mark.filterwarnings("ignore:activation cache .* closed without checkpoint")
def test_multi_hook_resume_after_a_crash_between_two_caches_checkpoints(tiny_llama_dir, text_dir, tiny, singles,
                                                                       tmp_path, monkeypatch):
    """A crash after one cache committed a checkpoint and before the others did: the caches stand at different
    checkpoints; the resumed harvest brings each to the single-hook cache."""
    out = tmp_path / "multi"
    _crash_at_checkpoint(monkeypatch, 5, _cfg(tiny_llama_dir, text_dir, out, HOOKS), tiny)  # cache 0 ahead
    done = [json.loads((out / n / "manifest.json").read_text())["progress"].get("contexts_done", 0) for n in singles]
    assert len(set(done)) == 2, f"expected caches at different checkpoints, got {done}"
    res = harvest(_cfg(tiny_llama_dir, text_dir, out, HOOKS), lm=tiny)
    for name in res:
        _assert_same_dir(out / name, singles[name])


@pytest.mark.filterwarnings("ignore:activation cache .* closed without checkpoint")
def test_shared_rows_resume_after_a_crash_between_two_caches_checkpoints(tiny_llama_dir, text_dir, tiny, tmp_path,
                                                                        monkeypatch):
    """With shared_rows the filter reads every hook, including a cache a crash left a checkpoint ahead: the resumed
    caches equal those of an uninterrupted shared harvest byte for byte."""
    want = tmp_path / "uninterrupted"
    harvest(_cfg(tiny_llama_dir, text_dir, want, HOOKS, shared_rows=True), lm=tiny)
    out = tmp_path / "resumed"
    _crash_at_checkpoint(monkeypatch, 6, _cfg(tiny_llama_dir, text_dir, out, HOOKS, shared_rows=True), tiny)  # 0, 1 ahead
    done = {json.loads(p.read_text())["progress"].get("contexts_done", 0) for p in out.glob("*/manifest.json")}
    assert len(done) == 2, f"expected caches at different checkpoints, got {done}"
    res = harvest(_cfg(tiny_llama_dir, text_dir, out, HOOKS, shared_rows=True), lm=tiny)
    for name in res:
        _assert_same_dir(out / name, want / name)


def test_streamed_multi_hook_harvest_and_a_single_hook_out_are_refused(tiny_llama_dir, text_dir, tiny, tmp_path):
    with pytest.raises(ValueError, match="background .*follows one cache"):
        harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "m", HOOKS), lm=tiny, ready=threading.Event())
    assert not (tmp_path / "m").exists()
    harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "one", HOOKS[0], n_tokens=100), lm=tiny)
    with pytest.raises(ValueError, match="holds a single-hook activation cache"):
        harvest(_cfg(tiny_llama_dir, text_dir, tmp_path / "one", HOOKS), lm=tiny)


def test_cli_takes_several_hook_names():
    from saelab.cli import build_parser

    argv = ["harvest", "--hook_name", "blocks.1.hook_resid_post", "blocks.*.hook_resid_post"]
    assert build_parser(argv).parse_args(argv).cfg.hook_name == argv[2:]
    assert build_parser(["harvest"]).parse_args(["harvest"]).cfg.hook_name == "blocks.15.hook_resid_post"


# ----------------------------------------------------------------------------------------------- kill -9


def test_multi_hook_harvest_killed_resumes_to_identical_caches(tiny_llama_dir, text_dir, tmp_path):
    """Real processes: SIGKILL right after one cache's manifest commit (the others a checkpoint behind, uncommitted
    shards on disk), re-run, and every cache equals the uninterrupted multi-hook run's, byte for byte."""
    from test_kill_resume import _HOOK_SRC, Runner

    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "sitecustomize.py").write_text(_HOOK_SRC)
    cfg = tmp_path / "data.json"
    cfg.write_text(json.dumps({"data": {"corpora": [], "text_files": [str(text_dir)], "eval_fraction": 0.1}}))

    def cmd(out: Path) -> list[str]:
        return ["harvest", "--config", str(cfg), "--model", str(tiny_llama_dir), "--hook_name", *HOOKS,
                "--out", str(out), "--n_tokens", str(N), "--context_size", "32", "--batch_size", "4",
                "--checkpoint_every", "2", "--max_norm_multiple", str(MNM), "--threads", "1", "--progress", "false"]

    run = Runner(tmp_path / "hooks", tmp_path / "logs", {"shard_rows": 50})
    run.complete(cmd(tmp_path / "ref"))
    # manifest.json commits: 3 at creation, then 3 per checkpoint; the 8th is cache 1's 2nd checkpoint
    run.kill_at(cmd(tmp_path / "out"), {"on": "replace", "name": "manifest.json", "n": 8, "phase": "after"})
    done = [json.loads((tmp_path / "out" / h / "manifest.json").read_text())["progress"].get("contexts_done", 0)
            for h in ("blocks.0.hook_resid_post", "model.layers.1.mlp", "blocks.2.hook_resid_post")]
    assert done[0] == done[1] > done[2], f"expected the last cache a checkpoint behind, got {done}"
    run.complete(cmd(tmp_path / "out"))
    for h in ("blocks.0.hook_resid_post", "model.layers.1.mlp", "blocks.2.hook_resid_post"):
        _assert_same_dir(tmp_path / "out" / h, tmp_path / "ref" / h)
        ActivationCache.open(tmp_path / "out" / h, verify=True)
