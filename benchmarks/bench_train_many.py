"""Throughput of ``saelab.train.train_many`` in the sweep regime: many small SAEs trained in one pass.

Writes a synthetic activation cache (``d_in`` 576 by default, rows ``x = c @ D + noise`` with ``--cache_k``
active unit-norm atoms of a random dictionary of ``--n_atoms``, so the SAEs see sparse structure as on real
activations), then times whole ``train_many`` calls (setup, every step, checkpoints, the final save) for each
``N`` in ``--n_saes``: ``N`` SAEs of ``--expansion`` x ``d_in`` latents trained together on ``--steps`` batches
of ``--batch`` rows. Prints tokens/s (batches read per second x batch) and SAE-tokens/s (N x tokens/s), and, for
reference, one ``--ref_expansion`` x SAE trained alone on the same batches.

Arms (``--arms``): ``plain``: every SAE BatchTopK k 32, linear encoder (the seeds/sparsities of one arm);
``mixed``: the same, except that the second SAE is TopK, the third uses the ``cosine_per_feature`` encoder and the
fourth has the C²R regularizer (registry defaults), so N >= 4 exercises every per-SAE step variant.

Usage:
    nice -n 19 flock /tmp/saelab-cpu.lock .venv/bin/python benchmarks/bench_train_many.py --threads 2 \\
        [--n_saes 1 5 10] [--arms plain mixed] [--steps 250] [--batch 2048] [--repeats 1] \\
        [--modes sequential concurrent]

``--modes``: ``sequential`` is ``TrainConfig.concurrent_saes=False`` (every SAE steps on the batch in turn, on all
threads), ``concurrent`` the default (one SAE per thread).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from saelab.runtime import tune_cpu_memory

tune_cpu_memory()  # as the `saelab` command does, before torch loads (SAELAB_TUNE_MEMORY=0 to time without)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from saelab.activations.cache import ActivationCache, ActivationCacheWriter  # noqa: E402
from saelab.config_files import from_dict  # noqa: E402
from saelab.train import TrainConfig, train_many  # noqa: E402


def write_synthetic_cache(path: Path, n_rows: int, d_in: int, n_atoms: int, k: int, seed: int = 0,
                          shard_rows: int = 16384) -> ActivationCache:
    """A finished cache of ``n_rows`` rows ``x = c @ D + 0.05 * noise``: ``D (n_atoms, d_in)`` unit rows,
    ``k`` active atoms per row with magnitudes uniform in [0.5, 2.5] (the construction of ``tests/synthetic.py``)."""
    g = torch.Generator().manual_seed(seed)
    D = F.normalize(torch.randn(n_atoms, d_in, generator=g), dim=-1)
    w = ActivationCacheWriter(path, model="synthetic", hook_name="blocks.0.hook_resid_post", d_in=d_in,
                              meta={"context_size": 128}, shard_rows=shard_rows)
    for start in range(0, n_rows, shard_rows):
        n = min(shard_rows, n_rows - start)
        idx = torch.randint(0, n_atoms, (n, k), generator=g)
        vals = torch.rand(n, k, generator=g) * 2 + 0.5
        x = F.embedding_bag(idx, D, per_sample_weights=vals, mode="sum") + 0.05 * torch.randn(n, d_in, generator=g)
        w.add(x, token_ids=torch.zeros(n, dtype=torch.int32), doc_ids=torch.arange(start, start + n),
              positions=torch.ones(n, dtype=torch.int32))
    return w.finalize({"done": True})


def arm_configs(arms: str, n: int, base: dict) -> list[dict]:
    """``n`` per-SAE config overrides of arm set ``arms`` (see the module docstring); seeds are shared (one pass)."""
    out = []
    for i in range(n):
        c = {**base, "activation": "batchtopk", "encoder": "linear", "regularizers": [], "k": 32}
        if arms == "mixed":
            if i % 5 == 1:
                c["activation"] = "topk"
            elif i % 5 == 2:
                c["encoder"] = "cosine_per_feature"
            elif i % 5 == 3:
                c["regularizers"] = ["c2r"]
        out.append(c)
    return out


def time_train_many(cache: Path, out: Path, per_sae: list[dict], steps: int, batch: int, threads: int | None,
                    concurrent: bool = True) -> float:
    """Wall seconds of one ``train_many`` call over ``steps`` batches (fresh output folders, no resume)."""
    # the per-SAE dicts use flat keys (activation, k, expansion_factor, ...): from_dict nests them under sae
    cfgs = [from_dict(TrainConfig, dict(cache=str(cache), out=str(out / f"sae{i}"), n_tokens=steps * batch,
                                        batch_size=batch, threads=threads, progress=False, concurrent_saes=concurrent, **c))
            for i, c in enumerate(per_sae)]
    t = time.perf_counter()
    train_many(cfgs)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_in", type=int, default=576)
    p.add_argument("--expansion", type=float, default=4.0, help="d_sae / d_in of the swept SAEs")
    p.add_argument("--ref_expansion", type=float, default=16.0, help="d_sae / d_in of the reference SAE (0: skip)")
    p.add_argument("--n_saes", type=int, nargs="*", default=[1, 5, 10])
    p.add_argument("--arms", nargs="*", default=["plain"], choices=["plain", "mixed"])
    p.add_argument("--steps", type=int, default=250, help="batches per train_many call (a checkpoint every 200)")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--cache_rows", type=int, default=131072, help="synthetic cache rows (epochs repeat)")
    p.add_argument("--n_atoms", type=int, default=8192)
    p.add_argument("--cache_k", type=int, default=24)
    p.add_argument("--repeats", type=int, default=1, help="calls per configuration (median)")
    p.add_argument("--threads", type=int, default=2, help="TrainConfig.threads (0: torch's default)")
    p.add_argument("--modes", nargs="*", default=["concurrent"], choices=["sequential", "concurrent"],
                   help="TrainConfig.concurrent_saes off / on; several modes alternate within each configuration")
    args = p.parse_args()
    threads = args.threads or None
    with tempfile.TemporaryDirectory(prefix="bench_train_many_") as tmp:
        cache = Path(tmp) / "cache"
        write_synthetic_cache(cache, args.cache_rows, args.d_in, args.n_atoms, args.cache_k)
        base = {"expansion_factor": args.expansion}
        jobs = [(f"{a}", n, arm_configs(a, n, base)) for a in args.arms for n in args.n_saes]
        if args.ref_expansion:
            jobs.append((f"{args.ref_expansion:g}x alone", 1, [{"expansion_factor": args.ref_expansion,
                                                                 "activation": "batchtopk", "k": 32}]))
        print(f"torch {torch.__version__}, threads {threads or torch.get_num_threads()}, d_in {args.d_in}, "
              f"{args.expansion:g}x SAEs (d_sae {int(round(args.expansion * args.d_in))}), batch {args.batch}, "
              f"{args.steps} steps per call, median of {args.repeats}\n")
        print("| arms | N SAEs | SAEs stepped | seconds | tokens/s | SAE-tokens/s |")
        print("|---|---:|---|---:|---:|---:|")
        for name, n, per_sae in jobs:
            # one SAE steps alone whatever the mode (concurrent_saes needs two): time it once
            times: dict[str, list[float]] = {m: [] for m in (args.modes if n > 1 else args.modes[:1])}
            for r in range(args.repeats):
                for m in times:  # alternating, so machine noise hits every mode alike
                    out = Path(tmp) / f"run_{name}_{n}_{m}_{r}".replace(" ", "_")
                    times[m].append(time_train_many(cache, out, per_sae, args.steps, args.batch, threads,
                                                    concurrent=m == "concurrent"))
            for m, ts in times.items():
                secs = statistics.median(ts)
                tps = args.steps * args.batch / secs
                print(f"| {name} | {n} | {m if n > 1 else 'alone'} | {secs:.1f} | {tps:,.0f} | {n * tps:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
