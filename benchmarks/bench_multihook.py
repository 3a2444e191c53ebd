"""Several hooks from one forward: a multi-hook harvest vs one single-hook harvest per hook, in one run.

On the bundled model, harvests ``--n_tokens`` rows at each of ``--hooks`` (default blocks 3, 7, 11 and 15
``hook_resid_post``) once per hook, then all of them in one multi-hook harvest (one early-stopped forward per batch
to the deepest hook), into temporary caches, and prints the wall-clock times, the multi-hook time over the deepest
hook's single harvest (the cost of one forward to it) and over the sum of the single harvests. It also checks that
every multi-hook cache equals its single-hook cache byte for byte. The bundled text is parsed and ordered once
before the timings (its cost is printed separately). Usage:
    .venv/bin/python benchmarks/bench_multihook.py [--hooks blocks.3.hook_resid_post ...] [--n_tokens 20000]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from saelab.runtime import tune_cpu_memory

tune_cpu_memory()  # as the `saelab` command does, before torch loads

import torch  # noqa: E402

from saelab.activations.harvest import HarvestConfig, harvest  # noqa: E402
from saelab.data.split import DataConfig, training_order  # noqa: E402
from saelab.models.hooks import capture, resolve_hook  # noqa: E402
from saelab.models.lm import load_lm  # noqa: E402

from _common import apply_threads, harvest_parser  # noqa: E402  (benchmarks/_common.py, the script's folder)

DEFAULT_HOOKS = [f"blocks.{i}.hook_resid_post" for i in (3, 7, 11, 15)]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def main() -> None:
    p = harvest_parser(__doc__, n_tokens=20_000)
    p.add_argument("--hooks", nargs="+", default=DEFAULT_HOOKS)
    args = p.parse_args()
    apply_threads(args)
    lm = load_lm()
    t = time.perf_counter()
    training_order(DataConfig(), 0)  # parse + split + order once per process, outside the timings
    load_s = time.perf_counter() - t
    capture(lm.model, resolve_hook(lm.model, args.hooks[-1]), torch.full((args.batch_size, args.context_size), 1))

    def cfg(hook_name, out: Path) -> HarvestConfig:
        return HarvestConfig(hook_name=hook_name, out=str(out), n_tokens=args.n_tokens, batch_size=args.batch_size,
                             context_size=args.context_size, progress=False)

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        single: dict[str, float] = {}
        for h in args.hooks:
            t = time.perf_counter()
            harvest(cfg(h, root / "single" / h), lm=lm)
            single[h] = time.perf_counter() - t
        t = time.perf_counter()
        caches = harvest(cfg(list(args.hooks), root / "multi"), lm=lm)
        multi = time.perf_counter() - t
        same = all(_files(Path(c.path)) == _files(root / "single" / name) for name, c in caches.items())
    deepest = max(args.hooks, key=lambda h: resolve_hook(lm.model, h).layer)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {lm.name}, {args.n_tokens:,} tokens per hook, "
          f"batch {args.batch_size}x{args.context_size}")
    print(f"{'harvest':<40}{'seconds':>9}{'tok/s per hook':>16}")
    for h, s in single.items():
        print(f"{'single ' + h:<40}{s:>9.1f}{args.n_tokens / s:>16,.0f}")
    total = sum(single.values())
    print(f"{'sum of the single harvests':<40}{total:>9.1f}")
    print(f"{f'multi-hook ({len(args.hooks)} hooks, one forward)':<40}{multi:>9.1f}{args.n_tokens / multi:>16,.0f}")
    print(f"multi / single {deepest}: {multi / single[deepest]:.2f}; multi / sum of singles: {multi / total:.2f}; "
          f"caches byte-identical to the single-hook ones: {same}; one-time corpus parse + split + order: {load_s:.1f} s")


if __name__ == "__main__":
    main()
