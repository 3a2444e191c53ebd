"""Harvest throughput on the bundled model: bare early-stopped forward vs the full saelab harvest.

Prints tokens/s for (a) the early-stopped forward alone on packed contexts and (b) `saelab harvest`
(tokenisation, forward, row filtering, cache writes) into a temporary cache, with the bundled text already parsed
and ordered (done once per process; its one-time cost is printed separately). Usage:
    .venv/bin/python benchmarks/bench_harvest.py [--hook blocks.15.hook_resid_post] [--n_tokens 40000]
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time

from saelab.runtime import tune_cpu_memory

tune_cpu_memory()  # as the `saelab` command does, before torch loads (SAELAB_TUNE_MEMORY=0 to time without)

import torch  # noqa: E402

from saelab.activations.harvest import HarvestConfig, harvest
from saelab.data.split import DataConfig, iter_contexts, training_order
from saelab.models.hooks import capture, resolve_hook
from saelab.models.lm import load_lm

from _common import apply_threads, harvest_parser  # benchmarks/_common.py (the script's own folder)


def main() -> None:
    p = harvest_parser(__doc__, n_tokens=40_000)
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    args = p.parse_args()
    apply_threads(args)
    lm = load_lm()
    hook = resolve_hook(lm.model, args.hook)
    t = time.perf_counter()
    docs = training_order(DataConfig(), 0)  # the harvest's document order, made once per process
    load_s = time.perf_counter() - t
    ctxs = [c[0] for c in itertools.islice(iter_contexts(lm, docs, args.context_size), 16 * args.batch_size)]
    batches = [torch.stack(ctxs[i : i + args.batch_size]) for i in range(0, len(ctxs), args.batch_size)]
    capture(lm.model, hook, batches[0])
    times = []
    for b in batches[1:]:
        t = time.perf_counter()
        capture(lm.model, hook, b)
        times.append(time.perf_counter() - t)
    bare = args.batch_size * args.context_size / statistics.median(times)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        cache = harvest(HarvestConfig(hook_name=args.hook, out=d, n_tokens=args.n_tokens, batch_size=args.batch_size,
                                      context_size=args.context_size, progress=False), lm=lm)
        total_s = time.perf_counter() - t
        full = cache.n_tokens / total_s
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {lm.name} {args.hook}, batch {args.batch_size}x{args.context_size}")
    print(f"{'stage':<36}{'tokens/s':>10}")
    print(f"{'early-stopped forward (all tokens)':<36}{bare:>10,.0f}")
    print(f"{'saelab harvest (stored tokens)':<36}{full:>10,.0f}")
    print(f"harvest / bare forward: {full / bare:.2f} (stored tokens exclude position 0, specials and outliers: "
          f"~{1 - 1 / args.context_size:.1%} of tokens at best); one-time corpus parse + split + order: {load_s:.1f} s")


if __name__ == "__main__":
    main()
