"""Fixed-seed training runs of every activation x encoder x regularizer, to check that a refactor keeps the weights.

``--out DIR`` trains one SAE per combination with ``saelab.train.train`` on the same synthetic activation cache
(a known sparse dictionary plus noise, written under ``DIR``) and keeps each SAE's ``sae_weights.safetensors``.
``--compare BEFORE AFTER`` prints, for every combination and tensor, whether the two runs' weights are bitwise
equal and their largest absolute difference. Run ``--out`` on the commit before a change (a ``git worktree``) and
on the commit after it, then ``--compare`` the two folders.

Usage:
    .venv/bin/python benchmarks/weights_parity.py --out /tmp/parity_before
    .venv/bin/python benchmarks/weights_parity.py --out /tmp/parity_after
    .venv/bin/python benchmarks/weights_parity.py --compare /tmp/parity_before /tmp/parity_after
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk")
ENCODERS = ("linear", "cosine_per_feature")
REGULARIZERS = {"none": [], "c2r": ["c2r:lambda=5,every=2"]}


def _cache(root: Path) -> Path:
    """The synthetic cache: 16k rows of d_in 64, 8 active features of 256 per row, 5 % noise."""
    from saelab.activations.cache import ActivationCacheWriter

    path = root / "cache"
    if (path / "manifest.json").is_file():
        return path
    g = torch.Generator().manual_seed(0)
    n, d_in, n_feat, k = 16384, 64, 256, 8
    D = torch.nn.functional.normalize(torch.randn(n_feat, d_in, generator=g), dim=-1)
    idx = torch.rand(n, n_feat, generator=g).argsort(-1)[:, :k]
    codes = torch.zeros(n, n_feat).scatter_(1, idx, torch.rand(n, k, generator=g) * 2 + 0.5)
    x = codes @ D + 0.05 * torch.randn(n, d_in, generator=g)
    w = ActivationCacheWriter(path, model="synthetic", hook_name="blocks.0.hook_resid_post", d_in=d_in,
                              meta={"context_size": 128}, shard_rows=4096)
    w.add(x, token_ids=torch.zeros(n, dtype=torch.int32), doc_ids=torch.arange(n),
          positions=torch.ones(n, dtype=torch.int32))
    w.finalize({"done": True})
    return path


def _train_config(**kw):
    """A ``TrainConfig`` from flat architecture + training fields, nesting the architecture under ``sae`` when the
    installed saelab's ``TrainConfig`` has such a field."""
    from dataclasses import fields

    from saelab.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    if "sae" in names:
        from saelab.sae.config import SAEConfig

        arch = {f.name for f in fields(SAEConfig)}
        sae_kw = {k: kw.pop(k) for k in list(kw) if k in arch and k not in names}
        return TrainConfig(sae=SAEConfig(d_in=1, **sae_kw), **kw)
    return TrainConfig(**kw)


def run(out: Path, selection_gemm: str, d_sae: int) -> None:
    from saelab.train import train

    out.mkdir(parents=True, exist_ok=True)
    cache = _cache(out)
    for act, enc, reg in itertools.product(ACTIVATIONS, ENCODERS, REGULARIZERS):
        name = f"{act}-{enc}-{reg}"
        cfg = _train_config(
            cache=str(cache), out=str(out / name), activation=act, encoder=enc, regularizers=REGULARIZERS[reg],
            d_sae=d_sae, k=16, batch_size=512, n_tokens=512 * 60, warmup_steps=5, threshold_start_step=10,
            dead_tokens=2048, aux_k=32, l1_coefficient=0.05, l0_coefficient=0.05, jumprelu_init_threshold=0.01,
            jumprelu_bandwidth=0.05, seed=0, threads=2, progress=False, selection_gemm=selection_gemm,
            checkpoint_every=1000, log_every=20,
        )
        res = train(cfg)
        print(f"{name}: fvu {res.final.get('fvu', float('nan')):.4f} l0 {res.final.get('l0', float('nan')):.1f}",
              flush=True)


def compare(a: Path, b: Path) -> int:
    rows, worst = [], 0.0
    names = sorted(p.name for p in a.iterdir() if (p / "sae_weights.safetensors").is_file())
    for name in names:
        wa, wb = load_file(a / name / "sae_weights.safetensors"), load_file(b / name / "sae_weights.safetensors")
        if wa.keys() != wb.keys():
            rows.append((name, "tensors differ", sorted(wa.keys() ^ wb.keys()), ""))
            worst = float("inf")
            continue
        bitwise = all(torch.equal(wa[k], wb[k]) for k in wa)
        diff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
        scale = max(float(wa[k].double().abs().max()) for k in wa)
        worst = max(worst, diff)
        rows.append((name, "yes" if bitwise else "no", f"{diff:.2e}", f"{scale:.2e}"))
    print("| run | bitwise | max abs diff | max abs weight |\n|---|---|---:|---:|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print(json.dumps({"runs": len(rows), "bitwise": sum(r[1] == "yes" for r in rows), "max_abs_diff": worst}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="train every combination into this folder")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"))
    p.add_argument("--selection_gemm", default="fp32", help="TrainConfig.selection_gemm of the runs (fp32, bf16, auto)")
    p.add_argument("--d_sae", type=int, default=512,
                   help="latents; from 1024 C²R's neighbour search is screened where a bf16 GEMM is fast")
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        p.error("pass --out DIR or --compare BEFORE AFTER")
    run(args.out, args.selection_gemm, args.d_sae)
    return 0


if __name__ == "__main__":
    sys.exit(main())
