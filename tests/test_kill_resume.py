"""Exact resume after ``kill -9``: real ``python -m saelab harvest|train`` processes are SIGKILL-ed mid-run, the
same command is re-run to completion, and the result must equal an uninterrupted run with the same seed:

* harvest: byte-identical cache directory (manifest with every shard's SHA-256 in the same order, shards, per-row
  columns, documents.json) and no stray files;
* train: byte-identical ``sae_weights.safetensors`` and the same ``train_log.jsonl`` rows (every value equal,
  except the wall-clock ``tokens_per_s``).

Kill points are made deterministic by a test-only ``sitecustomize`` module (written to a temporary directory and
put on the child's ``PYTHONPATH``; the library has no test hooks). Driven by the ``SAELAB_KILLTEST`` JSON
environment variable, it logs events to a file and can

* count *units of work* (one ``ActivationCacheWriter.add`` = one harvest forward batch; one batch drawn from
  ``ActivationCache.iter_batches`` = one training step) and hang at the n-th one, or sleep in each;
* intercept ``os.replace`` (the commit point of every atomic write in saelab) and, for the n-th replace onto a
  given file name, hang with the temporary file cut to half its size (= killed in the middle of writing it),
  complete but not yet renamed, or just after the rename; or rewrite every temporary file slowly so that random
  kills land inside checkpoint writes;
* force a small ``shard_rows`` so that the harvest writes uncommitted shards between checkpoints.

The test waits for the child to report that it hangs at the chosen point, checks the partial state it left on
disk (a checkpoint present, the final output absent), sends ``SIGKILL`` and resumes. Random-time kills loop a few
times and check after each that the on-disk checkpoint is either the previous one or the next one of the
uninterrupted run (never a corrupt or unknown state).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.activations.cache import ActivationCache
from saelab.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 300.0  # generous: the 2-core machine is shared; a healthy child reaches its kill point in seconds

_HOOK_SRC = r'''
"""Test-only process hooks for tests/test_kill_resume.py (imported as sitecustomize by the child)."""
import json
import os
import time


def _install():
    spec = os.environ.get("SAELAB_KILLTEST")
    if not spec:
        return
    cfg = json.loads(spec)
    events = cfg["events"]
    block = cfg.get("block") or {}
    unit_sleep = float(cfg.get("unit_sleep", 0.0))
    write_sleep = float(cfg.get("write_sleep", 0.0))
    counts = {}

    def emit(**ev):
        with open(events, "a") as f:
            f.write(json.dumps(ev) + "\n")

    def hang(**ev):
        emit(ev="blocked", **ev)
        while True:  # wait for SIGKILL
            time.sleep(3600)

    real_replace = os.replace

    def replace(src, dst, *a, **k):
        name = os.path.basename(os.fspath(dst))
        n = counts[name] = counts.get(name, 0) + 1
        hit = block.get("on") == "replace" and block.get("name") == name and block.get("n") == n
        tmp = os.path.basename(os.fspath(src))
        atomic = tmp.startswith(".") and tmp.endswith(".tmp") and os.path.isfile(src)
        if hit and block["phase"] == "mid":
            size = os.path.getsize(src)
            os.truncate(src, size // 2)  # the state a kill in the middle of writing the file leaves
            hang(name=name, n=n, phase="mid", size=size)
        if write_sleep and atomic:  # rewrite the temporary file slowly: random kills land mid-write
            emit(ev="write_begin", name=name, n=n)
            with open(src, "rb") as f:
                data = f.read()
            with open(src, "r+b") as f:
                f.truncate(0)
                step = max(1, -(-len(data) // 4))
                for i in range(0, len(data), step):
                    f.write(data[i:i + step])
                    f.flush()
                    time.sleep(write_sleep / 4)
        if hit and block["phase"] == "before":
            hang(name=name, n=n, phase="before")
        real_replace(src, dst, *a, **k)
        emit(ev="replace", name=name, n=n)
        if hit and block["phase"] == "after":
            hang(name=name, n=n, phase="after")

    os.replace = replace

    from saelab.activations import cache as C

    def unit():
        n = counts["<unit>"] = counts.get("<unit>", 0) + 1
        emit(ev="unit", n=n)
        if block.get("on") == "unit" and block.get("n") == n:
            hang(n=n)
        if unit_sleep:
            time.sleep(unit_sleep)

    real_add = C.ActivationCacheWriter.add

    def add(self, *a, **k):
        unit()
        return real_add(self, *a, **k)

    C.ActivationCacheWriter.add = add
    real_iter = C.ActivationCache.iter_batches

    def iter_batches(self, *a, **k):
        it = real_iter(self, *a, **k)  # argument errors stay eager

        def gen():
            while True:
                unit()
                try:
                    x = next(it)
                except StopIteration:
                    return
                yield x

        return gen()

    C.ActivationCache.iter_batches = iter_batches
    if cfg.get("shard_rows"):
        real_init = C.ActivationCacheWriter.__init__

        def init(self, *a, **k):
            k["shard_rows"] = int(cfg["shard_rows"])
            real_init(self, *a, **k)

        C.ActivationCacheWriter.__init__ = init
    emit(ev="installed", pid=os.getpid())


_install()
'''


# ----------------------------------------------------------------------------------------------- child processes


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("killhooks")
    (d / "sitecustomize.py").write_text(_HOOK_SRC)
    return d


class Runner:
    """Starts ``python -m saelab ...`` children with the test hooks and kills them."""

    def __init__(self, hook_dir: Path, logs: Path, hook: dict) -> None:
        self.hook_dir, self.logs, self.hook = hook_dir, logs, hook
        self.n = 0
        logs.mkdir(parents=True, exist_ok=True)

    def _start(self, args: list[str], **hook: object) -> tuple[subprocess.Popen, Path, Path]:
        self.n += 1
        events = self.logs / f"events_{self.n}.jsonl"
        err = self.logs / f"stderr_{self.n}.txt"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.hook_dir), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["SAELAB_KILLTEST"] = json.dumps({**self.hook, **hook, "events": str(events)})
        with open(self.logs / f"stdout_{self.n}.txt", "w") as out, open(err, "w") as e:
            proc = subprocess.Popen([sys.executable, "-m", "saelab", *args], cwd=REPO, env=env, stdout=out, stderr=e)
        return proc, events, err

    @staticmethod
    def _events(path: Path) -> list[dict]:
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def complete(self, args: list[str], **hook: object) -> list[dict]:
        """Run to completion (exit code 0 asserted); returns the child's events."""
        proc, events, err = self._start(args, **hook)
        try:
            rc = proc.wait(timeout=WAIT_S)
        finally:
            _reap(proc)
        assert rc == 0, f"`saelab {' '.join(args)}` exited with {rc}:\n{err.read_text()[-4000:]}"
        evs = self._events(events)
        assert evs and evs[0]["ev"] == "installed", f"test hooks not loaded in the child:\n{err.read_text()[-4000:]}"
        return evs

    def kill_at(self, args: list[str], block: dict, **hook: object) -> dict:
        """Run until the child hangs at ``block``, then SIGKILL it. Returns the 'blocked' event."""
        proc, events, err = self._start(args, block=block, **hook)
        try:
            deadline = time.monotonic() + WAIT_S
            while True:
                hit = [e for e in self._events(events) if e["ev"] == "blocked"]
                if hit:
                    break
                if proc.poll() is not None:
                    pytest.fail(f"child exited ({proc.returncode}) before reaching the kill point {block}:\n"
                                f"{err.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"child did not reach the kill point {block} within {WAIT_S:.0f}s")
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            _reap(proc)
        return hit[0]

    def kill_after(self, args: list[str], delay: float, **hook: object) -> tuple[bool, list[dict]]:
        """Start, wait for its first unit of work, sleep ``delay`` s, SIGKILL. Returns (killed, events)."""
        proc, events, err = self._start(args, **hook)
        try:
            deadline = time.monotonic() + WAIT_S
            while not any(e["ev"] == "unit" for e in self._events(events)):
                if proc.poll() is not None:
                    pytest.fail(f"child exited ({proc.returncode}) before any work:\n{err.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"child did no work within {WAIT_S:.0f}s")
                time.sleep(0.02)
            time.sleep(delay)
            if proc.poll() is not None:
                assert proc.returncode == 0, err.read_text()[-4000:]
                return False, self._events(events)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            _reap(proc)
        return True, self._events(events)


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:  # only on a failing test: never leave a child (ours, by pid) behind
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def _killed_mid_write(events: list[dict]) -> bool:
    """The kill landed between a slow write's start and its rename (for the report only)."""
    open_writes = set()
    for e in events:
        if e["ev"] == "write_begin":
            open_writes.add((e["name"], e["n"]))
        elif e["ev"] == "replace":
            open_writes.discard((e["name"], e["n"]))
    return bool(open_writes)


def _files(d: Path) -> dict[str, bytes]:
    """Every file of a run directory (recursively) -> bytes; the flock file is excluded (empty, a lock)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------------------------- harvest

N_HARVEST = 1500
HARVEST_HOOK = {"shard_rows": 50}  # every forward batch (~124 rows) writes shards: uncommitted ones exist at a kill


@pytest.fixture(scope="module")
def harvest_cmd(tiny_llama_dir, text_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("harvest_cfg")
    cfg = d / "data.json"
    cfg.write_text(json.dumps({"data": {"corpora": [], "text_files": [str(text_dir)], "eval_fraction": 0.1}}))

    def cmd(out: Path) -> list[str]:
        return ["harvest", "--config", str(cfg), "--model", str(tiny_llama_dir), "--hook_name",
                "blocks.1.hook_resid_post", "--out", str(out), "--n_tokens", str(N_HARVEST), "--context_size", "32",
                "--batch_size", "4", "--checkpoint_every", "2", "--threads", "1", "--progress", "false"]

    return cmd


@pytest.fixture(scope="module")
def harvest_ref(harvest_cmd, hook_dir, tmp_path_factory) -> Path:
    """The uninterrupted harvest (same settings, same hooks, no kill)."""
    d = tmp_path_factory.mktemp("harvest_ref")
    Runner(hook_dir, d / "logs", HARVEST_HOOK).complete(harvest_cmd(d / "cache"))
    cache = ActivationCache.open(d / "cache", verify=True)
    assert cache.n_tokens == N_HARVEST and cache.n_shards > 10
    return d / "cache"


def _manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def _assert_committed_prefix(cache: Path, ref: dict, *, may_be_complete: bool = False) -> dict:
    """The on-disk cache after a kill is a valid checkpoint of the uninterrupted run: its committed shards are the
    reference's first shards (same rows: SHA-256, sizes, checkpoint numbers and progress), every one intact."""
    m = _manifest(cache)  # parses: the manifest is never torn
    assert may_be_complete or not m["complete"]
    shards = m["shards"]
    assert shards == ref["shards"][: len(shards)], "committed shards differ from the uninterrupted run's"
    if shards:
        assert m["progress"] == shards[-1]["progress"] and m["checkpoints"] == shards[-1]["checkpoint"]
    ActivationCache.open(cache, allow_incomplete=True, verify=True)  # every committed file matches its SHA-256
    return m


def _assert_same_cache(cache: Path, ref: Path) -> None:
    got, want = _files(cache), _files(ref)
    assert sorted(got) == sorted(want), f"file sets differ: extra {sorted(set(got) - set(want))}, " \
                                        f"missing {sorted(set(want) - set(got))}"
    assert _manifest(cache) == _manifest(ref)  # rows' SHA-256 in the same order, progress, stats
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run's"
    a, b = ActivationCache.open(cache, verify=True), ActivationCache.open(ref)
    rows = torch.arange(b.n_tokens).numpy()
    assert torch.equal(a.read_rows(rows), b.read_rows(rows))


def test_harvest_killed_mid_batch_resumes_to_identical_cache(harvest_cmd, harvest_ref, hook_dir, tmp_path):
    run = Runner(hook_dir, tmp_path / "logs", HARVEST_HOOK)
    out = tmp_path / "cache"
    # hang while adding the 6th forward batch: checkpoints after batches 2 and 4 committed, batch 5's rows added
    # (written as uncommitted shards, shard_rows=50), batch 6 computed
    run.kill_at(harvest_cmd(out), {"on": "unit", "n": 6})
    ref = _manifest(harvest_ref)
    m = _assert_committed_prefix(out, ref)
    assert m["progress"]["contexts_done"] == 4 * 4 and 0 < m["n_tokens"] < N_HARVEST
    listed = {s[k] for s in m["shards"] for k in ("file", "meta_file")}
    on_disk = {p.name for p in out.glob("shard_*")}
    assert on_disk - listed, "the killed run should have left uncommitted shard files (batch 5's rows)"
    assert not (out / "documents.json").exists()
    run.complete(harvest_cmd(out))
    _assert_same_cache(out, harvest_ref)


def test_harvest_killed_inside_checkpoint_writes(harvest_cmd, harvest_ref, hook_dir, tmp_path):
    run = Runner(hook_dir, tmp_path / "logs", HARVEST_HOOK)
    out = tmp_path / "cache"
    ref = _manifest(harvest_ref)
    # 1. killed in the middle of writing checkpoint 2's manifest (a new cache's first manifest write is the empty
    #    one, so this is manifest write #3): checkpoint 1 stays, its rows intact, checkpoint 2's shards uncommitted
    run.kill_at(harvest_cmd(out), {"on": "replace", "name": "manifest.json", "n": 3, "phase": "mid"})
    m1 = _assert_committed_prefix(out, ref)
    assert m1["checkpoints"] == 1 and list(out.glob(".manifest.json.*.tmp"))
    assert len(list(out.glob("shard_*"))) > 2 * len(m1["shards"])  # checkpoint 2's shards were on disk
    # 2. resumed, then killed right after its first checkpoint's manifest was renamed: the new one is used
    run.kill_at(harvest_cmd(out), {"on": "replace", "name": "manifest.json", "n": 1, "phase": "after"})
    m2 = _assert_committed_prefix(out, ref)
    assert m2["checkpoints"] == 2 and not list(out.glob(".manifest.json.*.tmp"))
    # 3. resumed, then killed in the middle of writing documents.json (after the last batch)
    run.kill_at(harvest_cmd(out), {"on": "replace", "name": "documents.json", "n": 1, "phase": "mid"})
    m3 = _assert_committed_prefix(out, ref)
    assert m3["checkpoints"] > 2 and not (out / "documents.json").exists()
    assert list(out.glob(".documents.json.*.tmp"))  # the torn temporary file: must not survive the resume
    run.complete(harvest_cmd(out))
    _assert_same_cache(out, harvest_ref)


def test_harvest_random_kills_resume_to_identical_cache(harvest_cmd, harvest_ref, hook_dir, tmp_path):
    run = Runner(hook_dir, tmp_path / "logs", HARVEST_HOOK)
    out = tmp_path / "cache"
    ref = _manifest(harvest_ref)
    rng = random.Random(6)
    kills, mid_write, last = 0, 0, -1
    for _ in range(3):
        killed, evs = run.kill_after(harvest_cmd(out), rng.uniform(0.0, 1.5), unit_sleep=0.05, write_sleep=0.08)
        if not killed:
            break
        kills += 1
        mid_write += _killed_mid_write(evs)
        # the previous or the next checkpoint, never a torn one (complete if killed while exiting)
        m = _assert_committed_prefix(out, ref, may_be_complete=True)
        assert m["checkpoints"] >= last
        last = m["checkpoints"]
        if m["complete"]:
            break
    assert kills >= 1, "no kill landed before the harvest finished"
    print(f"harvest: {kills} random kills, {mid_write} inside a file write, last checkpoint {last}")
    run.complete(harvest_cmd(out))
    _assert_same_cache(out, harvest_ref)


# ----------------------------------------------------------------------------------------------- train

TRAIN_STEPS = 24
CKPT_EVERY = 4


@pytest.fixture(scope="module")
def train_cmd(tmp_path_factory):
    from synthetic import sparse_dictionary_data, write_cache

    d = tmp_path_factory.mktemp("train_cache")
    x, _, _ = sparse_dictionary_data(256 * 16, d_in=32, n_features=64, k=4, noise=0.01, scale=50.0)
    write_cache(d / "cache", x, shard_rows=1024)
    cfg = d / "train.json"
    # a C2R regularizer with small random chunks: the resumed run must restore the RNG state exactly
    cfg.write_text(json.dumps({"regularizers": ["c2r:lambda=5,every=5,chunk=16"]}))

    def cmd(out: Path, *, regularized: bool = False) -> list[str]:
        return ["train", *(["--config", str(cfg)] if regularized else []), "--cache", str(d / "cache"),
                "--out", str(out), "--activation", "topk", "--d_sae", "128", "--k", "4", "--batch_size", "256",
                "--lr", "0.003", "--warmup_steps", "4", "--n_tokens", str(256 * TRAIN_STEPS),
                "--checkpoint_every", str(CKPT_EVERY), "--log_every", "2", "--seed", "0", "--threads", "1",
                "--progress", "false"]

    return cmd


@pytest.fixture(scope="module")
def train_ref(train_cmd, hook_dir, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs, plain and with the C2R regularizer."""
    d = tmp_path_factory.mktemp("train_ref")
    run = Runner(hook_dir, d / "logs", {})
    refs = {}
    for reg in (False, True):
        out = d / ("reg" if reg else "plain")
        run.complete(train_cmd(out, regularized=reg))
        refs["reg" if reg else "plain"] = out
    return refs


WEIGHTS = "sae_weights.safetensors"


def _log(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("tokens_per_s")  # wall-clock throughput: the only value allowed to differ
    return rows


def _assert_same_weights(out: Path, ref: Path) -> None:
    a, b = load_file(out / WEIGHTS), load_file(ref / WEIGHTS)
    assert sorted(a) == sorted(b)
    for name in b:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume (max |diff| " \
                                              f"{(a[name] - b[name]).abs().max():.3g})"
    # the file's bytes may differ only in the order of the header's JSON keys (safetensors writes its metadata
    # map in hash order), so compare the parsed headers: dtypes, shapes, data offsets and metadata
    assert _st_header(out / WEIGHTS) == _st_header(ref / WEIGHTS)


def _st_header(path: Path) -> dict:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n])


def _ckpt_step(out: Path) -> int:
    state = read_checkpoint(out / "checkpoint")  # loads: never torn
    return int(state["step"])


def _train_partial(out: Path) -> int:
    """Assert a killed training run left a usable checkpoint and no final SAE; returns its step."""
    assert (out / "checkpoint" / "state.json").is_file() and not (out / WEIGHTS).exists()
    step = _ckpt_step(out)
    assert 0 < step < TRAIN_STEPS and step % CKPT_EVERY == 0
    return step


def test_train_killed_mid_run_resumes_to_identical_weights(train_cmd, train_ref, hook_dir, tmp_path):
    run = Runner(hook_dir, tmp_path / "logs", {})
    out = tmp_path / "sae"
    # hang drawing the 12th batch: the prefetcher (queue depth 2) has handed over at least 9 batches, so step 8
    # and its checkpoint are done whatever the machine's load, and at most 11 steps ran (no step-12 checkpoint)
    run.kill_at(train_cmd(out), {"on": "unit", "n": 12})
    assert _train_partial(out) == 8
    run.complete(train_cmd(out))
    _assert_same_weights(out, train_ref["plain"])
    assert _log(out) == _log(train_ref["plain"])


def test_train_killed_inside_checkpoint_and_final_writes(train_cmd, train_ref, hook_dir, tmp_path):
    run = Runner(hook_dir, tmp_path / "logs", {})
    out = tmp_path / "sae"
    # 1. killed in the middle of writing the 3rd checkpoint (step 12): the log rows up to step 12 are appended,
    #    the temporary file is torn, the step-8 checkpoint stays in place and loads
    run.kill_at(train_cmd(out), {"on": "replace", "name": "state.json", "n": 3, "phase": "mid"})
    assert _train_partial(out) == 8 and list((out / "checkpoint").glob(".state.json.*.tmp"))
    assert max(r["step"] for r in _log(out)) == 12  # rows past the checkpoint: the resume must drop them
    # 2. resumed, then killed during the final save: weights renamed into place, cfg.json not written yet
    run.kill_at(train_cmd(out), {"on": "replace", "name": "cfg.json", "n": 1, "phase": "before"})
    assert _ckpt_step(out) == TRAIN_STEPS and (out / WEIGHTS).exists() and not (out / "cfg.json").exists()
    run.complete(train_cmd(out))
    _assert_same_weights(out, train_ref["plain"])
    assert _log(out) == _log(train_ref["plain"])
    assert json.loads((out / "cfg.json").read_text()) == json.loads((train_ref["plain"] / "cfg.json").read_text())


def test_train_random_kills_resume_to_identical_weights(train_cmd, train_ref, hook_dir, tmp_path):
    run = Runner(hook_dir, tmp_path / "logs", {})
    out = tmp_path / "sae"
    rng = random.Random(6)
    kills, mid_write, last = 0, 0, 0
    for _ in range(3):
        killed, evs = run.kill_after(train_cmd(out), rng.uniform(0.0, 1.2), unit_sleep=0.03, write_sleep=0.3)
        if not killed:
            break
        kills += 1
        mid_write += _killed_mid_write(evs)
        if (out / "checkpoint" / "state.json").exists():  # the previous or the next checkpoint, never a torn one
            step = _ckpt_step(out)
            assert step >= last and (step % CKPT_EVERY == 0 or step == TRAIN_STEPS)
            last = step
    assert kills >= 1, "no kill landed before training finished"
    print(f"train: {kills} random kills, {mid_write} inside a file write, last checkpoint step {last}")
    run.complete(train_cmd(out))
    _assert_same_weights(out, train_ref["plain"])
    assert _log(out) == _log(train_ref["plain"])


@pytest.fixture(scope="module")
def train_reg_resumed(train_cmd, hook_dir, tmp_path_factory) -> Path:
    """The C2R-regularized run killed after its step-8 checkpoint (at step 11) and resumed."""
    d = tmp_path_factory.mktemp("train_reg")
    run = Runner(hook_dir, d / "logs", {})
    out = d / "sae"
    run.kill_at(train_cmd(out, regularized=True), {"on": "unit", "n": 12})
    assert _train_partial(out) == 8
    run.complete(train_cmd(out, regularized=True))
    return out


def test_train_regularized_resume_identical_weights(train_reg_resumed, train_ref):
    _assert_same_weights(train_reg_resumed, train_ref["reg"])


def test_train_regularized_resume_identical_log(train_reg_resumed, train_ref):
    assert _log(train_reg_resumed) == _log(train_ref["reg"])


def test_train_resume_after_torn_log_append(train_cmd, train_ref, hook_dir, tmp_path):
    """A SIGKILL inside ``_append_log`` (a multi-syscall buffered write) leaves a torn last line; the checkpoint
    is then the previous one. Simulated on a real killed run: killed with the step-12 rows appended and the step-12
    checkpoint not renamed, then the log's last line is cut in half as a kill inside the append would leave it."""
    run = Runner(hook_dir, tmp_path / "logs", {})
    out = tmp_path / "sae"
    run.kill_at(train_cmd(out), {"on": "replace", "name": "state.json", "n": 3, "phase": "before"})
    assert _train_partial(out) == 8
    log = out / "train_log.jsonl"
    text = log.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    log.write_text(text[: len(text) - len(last) // 2 - 1])  # the last row torn in the middle
    run.complete(train_cmd(out))
    _assert_same_weights(out, train_ref["plain"])
    assert _log(out) == _log(train_ref["plain"])
