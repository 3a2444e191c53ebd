"""Per-SAE cost of the default eval suites of `saelab compare`, cold (first SAE) and warm (one more SAE).

Builds two 4x BatchTopK SAEs (d_in 576, d_sae 2,304, k 32) on the bundled model at ``--hook``: one small harvest
(``--harvest_tokens`` rows) and one training pass over it for both SAEs (``--train_tokens`` tokens each, lr 1e-3
and 5e-4, so they differ), into ``--sae_dir``, or reuses the two found there (a before/after pair then times the
same SAEs). Then, with a fresh LM-activation store in a temporary folder, it runs every suite of ``--suites`` on
SAE #1 (cold: the store is empty, so the SAE-independent LM work is done and cached) and then on SAE #2 (warm: what
one more SAE of a comparison costs), as ``saelab compare`` does (``saelab.evals.run_suite`` with one model and one
store in one process), with each suite's default config except the core eval's token count (one core run per
``--core_tokens`` value).

Prints one table per suite: its stages (``EvalResult.timings_s``), its wall time and the process CPU time (all
threads; less sensitive than wall time to other jobs on a shared machine), SAE #1 vs SAE #2. The bundled
corpus is parsed once before timing (a one-time per-process cost, printed separately). Usage:

    nice -n 19 flock /tmp/saelab-cpu.lock .venv/bin/python benchmarks/bench_evals.py \
        [--sae_dir /tmp/bench_saes] [--core_tokens 4096 16384] [--suites core absorption ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from saelab.runtime import tune_cpu_memory

tune_cpu_memory()  # as the `saelab` command does, before torch loads

import torch  # noqa: E402

from saelab.activations.harvest import HarvestConfig, harvest  # noqa: E402
from saelab.data.split import DataConfig, split_documents  # noqa: E402
from saelab.evals import EVAL_SUITES, LMActivationStore, run_suite  # noqa: E402
from saelab.models.lm import load_lm  # noqa: E402
from saelab.sae.config import SAEConfig  # noqa: E402
from saelab.train import TrainConfig, train_many  # noqa: E402

DEFAULT_SUITES = ["core", "absorption", "sparse_probing", "ood_probing", "scr", "tpp", "norm_quartiles", "cos_inner"]
"""The suites of ``experiments/default.yaml`` (cos_inner runs on a few arms there, on every SAE here)."""


def build_saes(lm, hook: str, tmp: Path, harvest_tokens: int, train_tokens: int) -> list[Path]:
    """Harvest ``harvest_tokens`` rows and train two 4x BatchTopK k 32 SAEs on them in one pass; their folders."""
    cache = tmp / "cache"
    harvest(HarvestConfig(hook_name=hook, out=str(cache), n_tokens=harvest_tokens, progress=False), lm=lm)
    outs = [tmp / "sae1", tmp / "sae2"]
    cfgs = [TrainConfig(cache=str(cache), out=str(o), sae=SAEConfig(activation="batchtopk", k=32, expansion_factor=4),
                        batch_size=2048, lr=lr, n_tokens=train_tokens, progress=False)
            for o, lr in zip(outs, (1e-3, 5e-4))]
    train_many(cfgs)
    return outs


def suite_config(name: str, sae: Path, core_tokens: int | None):
    """The suite's default config for ``sae``, quiet, with ``n_tokens = core_tokens`` for the core eval."""
    cls = EVAL_SUITES.get(name).config_cls
    kw = {"progress": False}
    if name == "core":
        kw["n_tokens"] = core_tokens
    return cls(sae=str(sae), **kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    p.add_argument("--sae_dir", default=None, help="folder of the two SAEs (sae1/, sae2/): reused if they are "
                   "there, else trained into it (default: a temporary folder)")
    p.add_argument("--harvest_tokens", type=int, default=40_000, help="activation rows harvested to train the SAEs")
    p.add_argument("--train_tokens", type=int, default=400_000, help="training tokens per SAE")
    p.add_argument("--core_tokens", type=int, nargs="+", default=[4096, 16384], help="core eval token counts")
    p.add_argument("--suites", nargs="+", default=DEFAULT_SUITES)
    p.add_argument("--store", default=None, help="LM-activation store root to use as is (default: a fresh, empty "
                   "one, so SAE #1 runs cold); with a filled one both SAEs run warm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the timings here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for s in args.suites:
        EVAL_SUITES.get(s)  # unknown suite: KeyError listing the valid ones
    lm = load_lm()
    t = time.perf_counter()
    split_documents(DataConfig())
    parse_s = time.perf_counter() - t
    runs = [(s, n) for s in args.suites for n in (args.core_tokens if s == "core" else [None])]
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_evals_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        home = Path(args.sae_dir) if args.sae_dir else tmp
        given = (home / "sae1" / "cfg.json").is_file() and (home / "sae2" / "cfg.json").is_file()
        saes = [home / "sae1", home / "sae2"] if given else build_saes(
            lm, args.hook, home, args.harvest_tokens, args.train_tokens)
        build_s = time.perf_counter() - t
        store = LMActivationStore(lm.name, args.hook, root=args.store or tmp / "store")
        for i, sae in enumerate(saes, 1):
            for suite, n in runs:
                label = f"core@{n}" if n else suite
                cfg = suite_config(suite, sae, n)
                t, c = time.perf_counter(), time.process_time()
                res = run_suite(suite, cfg, lm=lm, store=store, write=False)
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                rows.setdefault(label, []).append({**res.timings_s, "wall": wall, "cpu": cpu})
                print(f"SAE #{i} {label}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {lm.name} {args.hook}; corpus parse "
          f"{parse_s:.1f} s, SAEs built/loaded in {build_s:.1f} s ({'reused' if given else 'trained'})")
    tot = {"wall": [0.0, 0.0], "cpu": [0.0, 0.0]}
    for label, (r1, r2) in rows.items():
        print(f"\n{label}\n| stage | SAE #1 cold (s) | SAE #2 warm (s) |\n|---|---:|---:|")
        for k in r1:
            print(f"| {k} | {r1.get(k, 0.0):.2f} | {r2.get(k, 0.0):.2f} |")
        if not (label.startswith("core@") and label != f"core@{args.core_tokens[0]}"):
            for k in tot:
                tot[k][0] += r1[k]
                tot[k][1] += r2[k]
    for k, (a, b) in tot.items():
        print(f"all suites (core at {args.core_tokens[0]} tokens), {k}: SAE #1 {a:.1f} s, SAE #2 {b:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "total": tot, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
