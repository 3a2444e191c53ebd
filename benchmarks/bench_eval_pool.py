"""Per-SAE evaluation cost when many SAEs are evaluated, as ``saelab compare`` does, with 1 or more worker processes.

Takes N trained SAEs (``--saes DIR ...``, e.g. the ``arms/*/*/seed*`` folders of a compare run), warms the
LM-activation store and the in-process LM-probe memo with one run of every suite on the first SAE (untimed: that is
the SAE-independent work a comparison does once), then for each ``--workers`` value runs every suite on every SAE
through :func:`saelab.evals.parallel.run_eval_jobs` (results written to a temporary folder, never into the SAE
folders) and prints wall seconds per SAE. ``--suites`` and ``--overrides`` default to the paper experiment's evals.
Usage:

    nice -n 19 .venv/bin/python benchmarks/bench_eval_pool.py --saes runs/paper/arms/baseline/k=32/seed{0,1,2} \
        runs/paper/arms/c2r/k=32,c2r.lambda=5/seed{0,1,2} [--workers 1 2] [--suites core absorption ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from saelab.runtime import tune_cpu_memory

tune_cpu_memory()  # as the `saelab` command does, before torch loads

import torch  # noqa: E402

from saelab.compare import load_experiment  # noqa: E402
from saelab.evals import EVAL_SUITES, LMActivationStore, run_suite  # noqa: E402
from saelab.evals.parallel import EvalJob, run_eval_jobs  # noqa: E402
from saelab.models.lm import load_lm  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saes", nargs="+", required=True, help="SAE folders (cfg.json + sae_weights.safetensors)")
    p.add_argument("--experiment", default="paper", help="take suites and eval_overrides from this experiment")
    p.add_argument("--suites", nargs="+", default=None, help="default: the experiment's evals")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the timings here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    exp = load_experiment(args.experiment)
    suites = args.suites or exp.evals
    lm = load_lm(exp.model)
    store = LMActivationStore(lm.name, exp.hook_name)

    def config(suite: str, sae: str, out: Path):
        cls = EVAL_SUITES.get(suite).config_cls
        names = {f.name for f in dataclasses.fields(cls)}
        over = dict(exp.eval_overrides.get(suite, {}))
        over.update({k: False for k in ("progress", "verbose") if k in names})
        if "data" in names:
            over["data"] = exp.data
        if "sae_b" in names:
            over["sae_b"] = args.saes[0]
        return cls(**over, sae=sae, out=str(out / f"{suite}.json"))

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_eval_pool_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        for suite in suites:  # the SAE-independent work, once
            run_suite(suite, config(suite, args.saes[0], tmp / "warmup"), lm=lm, store=store, write=False)
        print(f"warm-up (one SAE, every suite): {time.perf_counter() - t:.1f} s", flush=True)
        for w in args.workers:
            out = tmp / f"w{w}"
            jobs = [EvalJob(s, config(s, sae, out / str(i)), f"{s} #{i}") for s in suites
                    for i, sae in enumerate(args.saes)]
            per_suite: dict[str, float] = {}
            t = time.perf_counter()
            run_eval_jobs(jobs, lm=lm, store=store, workers=w, threads=args.threads,
                          on_done=lambda job, s: per_suite.__setitem__(job.suite, per_suite.get(job.suite, 0.0) + s))
            wall = time.perf_counter() - t
            results[w] = {"wall_s": wall, "per_sae_s": wall / len(args.saes), "job_seconds": per_suite}
            print(f"{w} worker(s): {wall:.1f} s for {len(args.saes)} SAEs x {len(suites)} suites = "
                  f"{wall / len(args.saes):.1f} s per SAE", flush=True)
    print(f"\ntorch {torch.__version__}, {args.threads} threads, {lm.name} {exp.hook_name}, suites {', '.join(suites)}")
    print("| workers | wall (s) | per SAE (s) | " + " | ".join(f"{s} job-s" for s in suites) + " |")
    print("|---:|---:|---:|" + "---:|" * len(suites))
    for w, r in results.items():
        print(f"| {w} | {r['wall_s']:.1f} | {r['per_sae_s']:.1f} | "
              + " | ".join(f"{r['job_seconds'].get(s, 0.0):.1f}" for s in suites) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
