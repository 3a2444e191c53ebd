"""One SAE per hook: one ``train_many`` pass over every hook's cache against one training run per cache, in one run.

Writes ``--hooks`` synthetic caches (one per pretend hook of a multi-hook harvest, ``d_in`` 576, rows
``x = c @ D + noise`` as in ``bench_train_many.py``, a different dictionary per hook), then times, ``--repeats``
times each and alternating, (a) one ``train(cfg)`` per cache, one after the other (what training the hooks of a
multi-hook harvest costs without the pass), and (b) one ``train_many`` over all caches (``saelab train --cache
<multi-hook folder>``; each cache read once, the SAEs stepping concurrently, one per core). Every run is a whole
call: setup, ``--steps`` batches of ``--batch`` rows, checkpoints, the final save. Prints the median wall time of
each and their ratio. The two give each SAE the same batches; (b)'s weights are those of a one-thread run alone
(``tests/test_train_multicache.py``), (a)'s those of a ``--threads`` run.

Usage:
    .venv/bin/python benchmarks/bench_train_hooks.py --threads 2 [--hooks 4] [--steps 40] [--batch 2048] \\
        [--expansion 8] [--k 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from saelab.runtime import tune_cpu_memory

tune_cpu_memory()  # as the `saelab` command does, before torch loads

import torch  # noqa: E402

from saelab.config_files import from_dict  # noqa: E402
from saelab.train import TrainConfig, train, train_many  # noqa: E402

from bench_train_many import write_synthetic_cache  # noqa: E402  (the script's folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hooks", type=int, default=4)
    p.add_argument("--d_in", type=int, default=576)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = args.steps * args.batch
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        caches = [write_synthetic_cache(root / "caches" / f"blocks.{i}.hook_resid_post", rows, args.d_in,
                                        n_atoms=4 * args.d_in, k=16, seed=i).path for i in range(args.hooks)]

        def cfgs(tag: str) -> list[TrainConfig]:
            return [from_dict(TrainConfig, dict(
                cache=str(c), out=str(root / tag / Path(c).name), activation="batchtopk", k=args.k,
                expansion_factor=args.expansion, batch_size=args.batch, n_tokens=rows, progress=False,
                threads=args.threads, checkpoint_every=10**9)) for c in caches]

        times: dict[str, list[float]] = {"one run per cache": [], "one pass (train_many)": []}
        for rep in range(args.repeats):
            t = time.perf_counter()
            for c in cfgs(f"separate{rep}"):
                train(c)
            times["one run per cache"].append(time.perf_counter() - t)
            t = time.perf_counter()
            train_many(cfgs(f"pass{rep}"))
            times["one pass (train_many)"].append(time.perf_counter() - t)
    base = statistics.median(times["one run per cache"])
    print(f"{args.hooks} hooks x {rows:,} rows, d_in {args.d_in}, BatchTopK k {args.k}, {args.expansion}x, batch "
          f"{args.batch}, {args.threads} threads, median of {args.repeats}")
    print(f"| mode | wall s | SAE-tokens/s | vs one run per cache |\n|---|---:|---:|---:|")
    for mode, ts in times.items():
        s = statistics.median(ts)
        print(f"| {mode} | {s:.1f} | {args.hooks * rows / s:,.0f} | {base / s:.2f}x |")


if __name__ == "__main__":
    main()
