"""Harvest + train wall time of `saelab run`, one stage after the other vs overlapped (`--stream`).

Runs `python -m saelab run` (cold: a fresh output folder, so the harvest and the training both run) with and
without `--stream`, alternating, and prints harvest / train / harvest+train seconds from each run's results.json
plus the FVE of the resulting SAE (streamed training reads epoch 0 in harvest order, so its SAE differs slightly).
The held-out evaluation runs too (`saelab run` always evaluates) but is not part of the compared time. Usage:

    nice -n 19 flock /tmp/saelab-cpu.lock .venv/bin/python benchmarks/bench_stream.py \
        [--n_tokens 200000] [--train_tokens 200000] [--repeats 1] [--threads 2] [-- extra saelab run flags]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_tokens", type=int, default=200_000, help="harvested activation rows")
    p.add_argument("--train_tokens", type=int, default=200_000, help="training tokens")
    p.add_argument("--repeats", type=int, default=1, help="runs per mode (alternating off/on)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval_tokens", type=int, default=1024)
    p.add_argument("extra", nargs="*", help="more `saelab run` flags (after --)")
    args = p.parse_args()
    rows: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        for r in range(args.repeats):
            for stream in (False, True):
                out = Path(tmp) / f"{'stream' if stream else 'plain'}_{r}"
                cmd = [sys.executable, "-m", "saelab", "run", "--out", str(out), "--n_tokens", str(args.n_tokens),
                       "--train_tokens", str(args.train_tokens), "--threads", str(args.threads), "--eval_tokens",
                       str(args.eval_tokens), "--stream", str(stream).lower(), *args.extra]
                print("$", " ".join(cmd[1:]), flush=True)
                subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
                res = json.loads((out / "results.json").read_text())
                rows[stream].append({**res["timings_s"], "fve": res["metrics"]["fve"], "l0": res["metrics"]["l0"]})
                t = res["timings_s"]
                print(f"  harvest {t['harvest']:.1f} s, train {t['train']:.1f} s, harvest+train {t['harvest_train']:.1f} s, "
                      f"FVE {res['metrics']['fve']:.4f}", flush=True)
    print(f"\n{args.n_tokens:,} harvested tokens, {args.train_tokens:,} training tokens, {args.threads} threads, "
          f"medians of {args.repeats}")
    print(f"| mode | harvest (s) | train (s) | harvest+train (s) | FVE | L0 |")
    print("|---|---:|---:|---:|---:|---:|")
    for stream in (False, True):
        med = {k: statistics.median(r[k] for r in rows[stream]) for k in ("harvest", "train", "harvest_train", "fve", "l0")}
        name = "`--stream` (overlapped; train = start to end of training)" if stream else "one after the other"
        print(f"| {name} | {med['harvest']:.1f} | {med['train']:.1f} | {med['harvest_train']:.1f} | {med['fve']:.4f} | "
              f"{med['l0']:.1f} |")
    a = statistics.median(r["harvest_train"] for r in rows[False])
    b = statistics.median(r["harvest_train"] for r in rows[True])
    print(f"\nharvest+train: {a:.1f} s -> {b:.1f} s with --stream ({(a - b) / a:+.1%} saved)")


if __name__ == "__main__":
    main()
