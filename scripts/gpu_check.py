"""Check saelab's GPU path end to end on whatever GPU is at hand: ``bash scripts/gpu_check.sh [--device cuda]``.

Each step prints PASS, FAIL or SKIP with its numbers, and everything measured goes to ``<out>/gpu_check.json``;
the exit status is the number of failed steps. About 3 minutes on one H100-class GPU; ``--device cpu`` is the
script's self-test (the test suite runs it), where every "device" run is a CPU run.

1. device: torch and CUDA versions, the GPU's name, compute capability, native bf16, memory.
2. parity tests: the device-marked tests (``pytest -m device --device DEV``): every kernel, loss and encoder
   against its float64 reference, on the device.
3. training matrix: every activation x {linear, cosine_per_feature} x {none, C²R}, a short run on the device and
   the same run on the CPU from one synthetic cache (a known sparse dictionary): final FVE of both and the largest
   weight difference. On CUDA the runs differ by float rounding (GEMM order, TF32 off), so the check is the FVE
   gap; on CPU they must be equal bit for bit.
4. resume after ``kill -9``: a child ``saelab`` training process SIGKILLs itself between two checkpoints, the same
   run resumes in a new process, and its weights must equal an uninterrupted run's bit for bit (``--deterministic``).
5. determinism: two runs with ``--deterministic`` must be bitwise equal; two default runs are reported (on CUDA
   their per-latent sums use atomics, so they may differ in the last bits).
6. ``torchrun --nproc_per_node 1``: a process group of one rank (NCCL on CUDA, gloo on CPU) through every
   collective of the step; the weights must equal the single-process run's bit for bit.
7. speed: ``benchmarks/bench_step.py --device DEV`` and, when ``eai-sparsify`` is installed
   (``bash benchmarks/setup_peers.sh``), ``benchmarks/bench_peers.py --device DEV`` (sparsify's step on the same
   device); skipped otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ACTIVATIONS = ("topk", "batchtopk", "matryoshka_batchtopk", "relu", "jumprelu")
ENCODERS = ("linear", "cosine_per_feature")
REGULARIZERS = {"none": [], "c2r": ["c2r:every=2"]}
SPARSITY = {"relu": {"l1_coefficient": 0.3}, "jumprelu": {"l0_coefficient": 0.05}}
"""Per-activation sparsity settings of the short runs (TopK-style activations need none)."""


def device_info(device: torch.device) -> dict:
    """What the device is (printed first, so every report names its hardware)."""
    from saelab.devices import bf16_native

    info = {"torch": torch.__version__, "device": str(device), "python": platform.python_version()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, name=p.name, capability=f"{p.major}.{p.minor}",
                    memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    info["bf16_native"] = bf16_native(device)
    return info


def synthetic_cache(path: Path, n: int, d_in: int, n_features: int, k: int, seed: int = 0):
    """A finished activation cache of ``x = codes @ D + noise``: ``n`` rows, ``n_features`` unit atoms in
    ``d_in`` dimensions, ``k`` active per row with magnitudes in [1, 2)."""
    from saelab.activations.cache import ActivationCacheWriter

    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=g), dim=-1)
    idx = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :k]
    codes = torch.zeros(n, n_features).scatter_(1, idx, 1 + torch.rand(n, k, generator=g))
    x = codes @ D * 10 + 0.01 * torch.randn(n, d_in, generator=g)
    w = ActivationCacheWriter(path, model="synthetic", hook_name="blocks.0.hook_resid_post", d_in=d_in,
                              meta={"context_size": 128}, shard_rows=4096)
    w.add(x, token_ids=torch.zeros(n, dtype=torch.int32), doc_ids=torch.arange(n), positions=torch.ones(n, dtype=torch.int32))
    return w.finalize({"done": True}), x


def run_cfg(cache: Path, out: Path, device: str, **kw) -> dict:
    """Flat training config of one short run (the keys of ``saelab train --config``)."""
    cfg = dict(cache=str(cache), out=str(out), device=device, d_sae=512, k=16, batch_size=512, n_tokens=512 * 40,
               lr=3e-3, warmup_steps=4, checkpoint_every=10, log_every=10, progress=False, seed=0, dead_tokens=4096,
               threshold_start_step=10, concurrent_saes=False)
    cfg.update(kw)
    return cfg


def train_in_process(cfg: dict):
    from saelab.config_files import from_dict
    from saelab.train import TrainConfig, train

    return train(from_dict(TrainConfig, dict(cfg)))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "sae_weights.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def bitwise(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fve(out: Path, x: torch.Tensor) -> float:
    from saelab.sae.saving import load_sae

    sae = load_sae(out)
    with torch.no_grad():
        xs = x[:4096]
        x_hat = sae(xs)
    return float(1 - (xs - x_hat).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum())


def saelab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "saelab", *args]


def run_child(cmd: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


KILLER = """
import json, os, signal, sys
import saelab.train as tr
from saelab.config_files import from_dict
cfg, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])
real = tr._Run.train_step
def step(self, batch):
    if self.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no cleanup, no flush
    return real(self, batch)
tr._Run.train_step = step
tr.train(from_dict(tr.TrainConfig, cfg))
"""
"""A training process that SIGKILLs itself when it is about to take step ``kill_at``."""


class Report:
    """PASS / FAIL / SKIP lines and the numbers behind them."""

    def __init__(self) -> None:
        self.steps: dict[str, dict] = {}

    def add(self, step: str, status: str, **numbers) -> None:
        self.steps[step] = {"status": status, **numbers}
        shown = ", ".join(f"{k}={v}" for k, v in numbers.items() if not isinstance(v, (dict, list)))
        print(f"[{status}] {step}" + (f": {shown}" if shown else ""), flush=True)

    @property
    def failures(self) -> int:
        return sum(s["status"] == "FAIL" for s in self.steps.values())


def check_parity_tests(rep: Report, device: torch.device) -> None:
    if not (ROOT / "tests").is_dir():
        rep.add("parity tests", "SKIP", why="no tests/ folder (run from a clone)")
        return
    t = time.perf_counter()
    r = run_child([sys.executable, "-m", "pytest", "-q", "-m", "device", "--device", str(device), "-p", "no:cacheprovider",
                   "tests/"], timeout=1200)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    rep.add("parity tests", "PASS" if r.returncode == 0 else "FAIL", summary=tail, seconds=round(time.perf_counter() - t, 1))
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-2000:])


def check_matrix(rep: Report, device: torch.device, cache: Path, x: torch.Tensor, work: Path) -> None:
    rows = []
    t = time.perf_counter()
    ok = True
    for act in ACTIVATIONS:
        for enc in ENCODERS:
            for reg, regs in REGULARIZERS.items():
                name = f"{act}/{enc}/{reg}"
                kw = dict(activation=act, encoder=enc, regularizers=regs, **SPARSITY.get(act, {}))
                outs = {}
                for where in ("cpu", str(device)) if device.type != "cpu" else ("cpu", "cpu_again"):
                    out = work / "matrix" / name.replace("/", "_") / where.replace(":", "")
                    train_in_process(run_cfg(cache, out, "cpu" if where == "cpu_again" else where, **kw))
                    outs[where] = out
                (ref, dev) = outs.values()
                wr, wd = weights(ref), weights(dev)
                f_ref, f_dev = fve(ref, x), fve(dev, x)
                same = bitwise(wr, wd)
                good = same if device.type == "cpu" else abs(f_ref - f_dev) <= 0.01
                ok &= good
                rows.append({"arm": name, "fve_cpu": round(f_ref, 4), "fve_device": round(f_dev, 4),
                             "max_weight_diff": max_diff(wr, wd), "bitwise": same, "ok": good})
                print(f"    {name:42s} FVE cpu {f_ref:.4f}  device {f_dev:.4f}  max|dW| {max_diff(wr, wd):.2e}"
                      f"{'  (bitwise)' if same else ''}{'' if good else '  <-- FAIL'}", flush=True)
    rep.add("training matrix", "PASS" if ok else "FAIL", arms=len(rows), seconds=round(time.perf_counter() - t, 1),
            rows=rows)


def check_resume_after_kill(rep: Report, device: torch.device, cache: Path, work: Path) -> None:
    kw = dict(encoder="cosine_per_feature", regularizers=REGULARIZERS["c2r"], deterministic=True)
    full = work / "resume" / "full"
    train_in_process(run_cfg(cache, full, str(device), **kw))
    part = run_cfg(cache, work / "resume" / "killed", str(device), **kw)
    r = run_child([sys.executable, "-c", KILLER, json.dumps(part), "25"])
    killed = r.returncode == -signal.SIGKILL
    ckpt_step = json.loads((Path(part["out"]) / "checkpoint" / "state.json").read_text())["step"] if killed else None
    cfg_file = work / "resume" / "killed.json"
    cfg_file.write_text(json.dumps(part))
    r2 = run_child(saelab_cmd("train", "--config", str(cfg_file)))
    same = r2.returncode == 0 and bitwise(weights(full), weights(Path(part["out"])))
    rep.add("resume after kill -9", "PASS" if killed and same else "FAIL", killed_by_sigkill=killed,
            resumed_from_step=ckpt_step, bitwise_equal=same)
    if r2.returncode != 0:
        print(r2.stderr[-3000:])


def check_determinism(rep: Report, device: torch.device, cache: Path, work: Path) -> None:
    kw = dict(encoder="cosine_per_feature", regularizers=REGULARIZERS["c2r"])
    res = {}
    for mode, det in (("deterministic", True), ("default", False)):
        a, b = (work / "det" / f"{mode}_{i}" for i in (0, 1))
        for out in (a, b):
            train_in_process(run_cfg(cache, out, str(device), deterministic=det, **kw))
        res[mode] = bitwise(weights(a), weights(b))
    rep.add("determinism", "PASS" if res["deterministic"] else "FAIL", deterministic_bitwise=res["deterministic"],
            default_bitwise=res["default"])


def check_torchrun(rep: Report, device: torch.device, cache: Path, work: Path) -> None:
    kw = dict(activation="batchtopk", encoder="cosine_per_feature")
    single, ranked = work / "torchrun" / "single", work / "torchrun" / "rank1"
    train_in_process(run_cfg(cache, single, str(device), **kw))
    cfg_file = work / "torchrun" / "cfg.json"
    cfg_file.write_text(json.dumps(run_cfg(cache, ranked, str(device), **kw)))
    r = run_child([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "saelab",
                   "train", "--config", str(cfg_file)])
    same = r.returncode == 0 and bitwise(weights(single), weights(ranked))
    rep.add("torchrun one rank", "PASS" if same else "FAIL", backend="nccl" if device.type == "cuda" else "gloo",
            exit_code=r.returncode, bitwise_equal_single_process=same)
    if r.returncode != 0:
        print(r.stderr[-3000:])


def check_speed(rep: Report, device: torch.device, quick: bool) -> None:
    size = ["--d_in", "64", "--d_sae", "512", "--k", "16", "--batch", "512", "--repeats", "2", "--warmup", "1"] if quick else []
    r = run_child([sys.executable, "benchmarks/bench_step.py", "--device", str(device), "--activations", "topk",
                   "batchtopk", "--encoders", "linear", "cosine_per_feature", *size], timeout=900)
    rep.add("bench_step", "PASS" if r.returncode == 0 else "FAIL", table=r.stdout.strip().splitlines()[-12:])
    print(r.stdout[-3000:] if r.returncode == 0 else r.stderr[-3000:])
    try:
        import sparsify  # noqa: F401
    except ImportError:
        rep.add("bench_peers (sparsify)", "SKIP", why="eai-sparsify not installed (bash benchmarks/setup_peers.sh)")
        return
    r = run_child([sys.executable, "benchmarks/bench_peers.py", "--device", str(device), "--libraries", "saelab",
                   "sparsify", "--threads", "0", *size], timeout=900)
    rep.add("bench_peers (sparsify)", "PASS" if r.returncode == 0 else "FAIL", table=r.stdout.strip().splitlines()[-10:])
    print(r.stdout[-3000:] if r.returncode == 0 else r.stderr[-3000:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, cuda:N or cpu (the self-test); default: cuda when available")
    p.add_argument("--out", default=None, help="folder for the runs and gpu_check.json (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="tiny benchmark sizes (the CPU self-test); default on CPU")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "matrix", "resume", "determinism", "torchrun", "speed"],
                   help="steps to leave out")
    args = p.parse_args(argv)
    from saelab.devices import resolve_device

    device = resolve_device(args.device)
    work = Path(args.out or tempfile.mkdtemp(prefix="saelab_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    rep = Report()
    info = device_info(device)
    rep.add("device", "PASS", **info)
    t0 = time.perf_counter()
    cache, x = synthetic_cache(work / "cache", 32_768, d_in=64, n_features=256, k=8)
    steps = {"tests": lambda: check_parity_tests(rep, device),
             "matrix": lambda: check_matrix(rep, device, Path(cache.path), x, work),
             "resume": lambda: check_resume_after_kill(rep, device, Path(cache.path), work),
             "determinism": lambda: check_determinism(rep, device, Path(cache.path), work),
             "torchrun": lambda: check_torchrun(rep, device, Path(cache.path), work),
             "speed": lambda: check_speed(rep, device, args.quick or device.type == "cpu")}
    for name, step in steps.items():
        if name in args.skip:
            rep.add(name, "SKIP", why="--skip")
            continue
        try:
            step()
        except Exception as e:  # noqa: BLE001 - one failed step is reported; the others still run
            rep.add(name, "FAIL", error=f"{type(e).__name__}: {e}")
    total = round(time.perf_counter() - t0, 1)
    (work / "gpu_check.json").write_text(json.dumps({"info": info, "seconds": total, "steps": rep.steps}, indent=1,
                                                    default=str))
    print(f"\n{rep.failures} failed of {len(rep.steps)} steps in {total} s on {info['name']} ({device}); "
          f"details in {work / 'gpu_check.json'}")
    return rep.failures


if __name__ == "__main__":
    sys.exit(main())
