"""Time one SAE training step (forward + backward + decoder constraints + Adam) per architecture.

Prints a table of tokens/s (median of --repeats timed steps after --warmup steps). Usage:
    .venv/bin/python benchmarks/bench_step.py [--d_in 576] [--d_sae 9216] [--k 32] [--batch 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saelab import losses
from saelab.sae.activations import ACTIVATIONS
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE


def step_fn(sae: SAE, opt: torch.optim.Optimizer, x: torch.Tensor):
    code, pre = sae.encode_code(x)
    x_hat = sae.decode_code(code)
    loss = losses.reconstruction_loss(x, x_hat)
    if sae.cfg.activation == "relu":
        loss = loss + losses.l1_penalty(code.values, sae.W_dec)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_decoder_grad_()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    sae.normalize_decoder_()


def bench(activation: str, args) -> float:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=args.d_in, d_sae=args.d_sae, activation=activation, k=args.k)).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.d_in)
    for _ in range(args.warmup):
        step_fn(sae, opt, x)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        step_fn(sae, opt, x)
        times.append(time.perf_counter() - t)
    return args.batch / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--d_in", type=int, default=576)
    p.add_argument("--d_sae", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--activations", nargs="*", default=ACTIVATIONS.names())
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # encoder matmul bound: 2*B*d_in*d_sae FLOPs forward; measure this machine's fp32 GEMM rate
    a, b = torch.randn(args.batch, args.d_in), torch.randn(args.d_in, args.d_sae)
    gemm = []
    for _ in range(7):
        t = time.perf_counter()
        a @ b
        gemm.append(time.perf_counter() - t)
    gflops = 2 * args.batch * args.d_in * args.d_sae / statistics.median(gemm[2:]) / 1e9
    bound = gflops * 1e9 / (2 * args.d_in * args.d_sae)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch}")
    print(f"fp32 GEMM {gflops:.0f} GFLOP/s -> encoder-matmul bound {bound:,.0f} tokens/s")
    print(f"{'activation':<22}{'tokens/s':>12}{'% of bound':>12}")
    for act in args.activations:
        tps = bench(act, args)
        print(f"{act:<22}{tps:>12,.0f}{100 * tps / bound:>11.1f}%")


if __name__ == "__main__":
    main()
