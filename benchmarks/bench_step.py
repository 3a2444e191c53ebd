"""Time one SAE training step (the trainer's: forward + losses + backward + decoder constraints + clipping + Adam).

Every combination of the listed activations x encoders x paths x optimisers x regularizers x dead fractions is
timed: median of --repeats timed cycles after --warmup cycles; a cycle is as many steps as the longest
regularizer period (C²R every 5 steps: 5 steps, one of them with the C²R term), so tokens/s include the
regularizer's amortised cost. Prints a markdown table with tokens/s and the percentage of the encoder-matmul
bound (one ``(B, d_in) @ (d_in, d_sae)`` fp32 GEMM at this machine's measured rate).

Paths: ``sparse`` is the sparse training path of TopK-style activations (saelab.kernels.sparse_step) with the pairs selected
from the full fp32 scores; ``screened`` the same with the bf16-screened selection (``set_selection_gemm(sae,
"bf16")``, the trainer's default on CPUs with AVX-512 BF16/AMX and on CUDA; encoders without a one-GEMM score fall
back to fp32); ``dense`` runs the same step inside ``saelab.kernels.mode.dense_reference()`` (autograd through the full pre-activations, dense
BatchTopK codes). relu and jumprelu have only the dense path. Optimisers: ``adam`` is ``torch.optim.Adam``
(foreach), ``fused`` is ``torch.optim.Adam(fused=True)``. ``--dead_frac f`` marks a fraction f of the latents
dead so that AuxK (k_aux = d_in / 2, coefficient 1/32) runs.

``--device`` (``cpu``, ``cuda``, ``cuda:N``) is where the SAE, its optimiser state and the batches live. The SAE's
initial weights and the batches are drawn on the CPU (the same numbers on every device) and moved there. Each timer
starts and stops after ``saelab.devices.synchronize(device)``, so the GPU work a cycle queues is inside its time (a
no-op on the CPU); warm-up cycles are not timed.

Usage:
    nice -n 19 flock /tmp/saelab-cpu.lock .venv/bin/python benchmarks/bench_step.py --threads 2 \\
        [--activations topk batchtopk] [--encoders linear] [--paths sparse dense] [--optimizers fused] \\
        [--regularizers none c2r] [--dead_frac 0 0.05] [--d_in 576 --d_sae 9216 --k 32 --batch 4096] \\
        [--device cuda]
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time

from saelab.runtime import tune_cpu_memory

tune_cpu_memory()  # as the `saelab` command does, before torch loads (SAELAB_TUNE_MEMORY=0 to time without)

import torch  # noqa: E402

from _common import apply_threads, step_parser  # benchmarks/_common.py (the script's own folder)
from saelab.devices import resolve_device, synchronize
from saelab.regularizers import parse_regularizer
from saelab.sae.activations import ACTIVATIONS
from saelab.sae.config import SAEConfig
from saelab.sae.encoders import ENCODERS
from saelab.sae.model import SAE
from saelab.sae.objective import LossWeights
from saelab.kernels.mode import dense_reference
from saelab.kernels.sparse_step import set_selection_gemm

N_BATCHES = 16
"""Distinct random batches the Stepper cycles through."""

REGULARIZER_SPECS = {"none": [], "c2r": ["c2r"], "ortho": ["ortho"]}
"""--regularizers choices -> specs (registry defaults: c2r lambda 5, every 5, chunk 8192)."""


class Stepper:
    """One configuration: the SAE, its optimiser and the trainer's step (saelab/train.py ``train_step``)."""

    def __init__(self, args, activation: str, encoder: str, optimizer: str, regs: list[str], dead_frac: float,
                 autocast: str = "none") -> None:
        self.device = torch.device(getattr(args, "device", "cpu"))  # callers' args may lack --device: the CPU
        torch.manual_seed(0)
        cfg = SAEConfig(d_in=args.d_in, d_sae=args.d_sae, activation=activation, k=args.k, encoder=encoder)
        self.sae = SAE(cfg).to(self.device).train()  # initialised on the CPU: the same weights on every device
        set_selection_gemm(self.sae, "auto")  # as the trainer (TrainConfig.selection_gemm)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=1e-4, fused=optimizer == "fused")
        self.regs = [parse_regularizer(r) for r in regs]
        self.dead = (torch.rand(args.d_sae) < dead_frac).to(self.device)
        self.aux_k = args.d_in // 2
        # a rotation of fresh batches: repeating one batch lets the SAE overfit it, whose top-k scores then crowd
        # together and defeat the screened selection's certificate (more tokens redone every step: a bench artefact)
        self.batches = [torch.randn(args.batch, args.d_in).to(self.device) for _ in range(N_BATCHES)]
        self.step = 0
        self.cycle = max([r.every for r in self.regs], default=1)
        self.autocast = autocast == "bf16"  # as TrainConfig.autocast: the forward and losses only

    @property
    def x(self) -> torch.Tensor:
        """This step's batch ``(batch, d_in)``."""
        return self.batches[self.step % len(self.batches)]

    @x.setter
    def x(self, value: torch.Tensor) -> None:  # one fixed batch (bench_peers: the batch every contestant gets)
        self.batches = [value]

    def __call__(self) -> None:
        with torch.autocast(self.x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, code = self.forward()
        sae = self.sae
        sae.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad_()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        self.opt.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            code.active_mask_counts(sae.cfg.d_sae)
        self.step += 1

    def forward(self):
        """``(loss, code)`` of one step (the trainer's ``_Run._forward``: the SAE's loss plus the regularizers)."""
        sae = self.sae
        out = sae.loss(self.x, dead=self.dead, weights=LossWeights(aux_k=self.aux_k))
        loss = out.loss
        for spec in self.regs:
            term = spec.compute(self.step, out.code, sae.W_dec)
            if term is not None:
                loss = loss + term
        return loss, out.code


def bench(args, activation, encoder, path, optimizer, reg, dead_frac, autocast="none") -> float:
    """Median tokens/s of one configuration on ``args.device`` (each timed cycle bracketed by device syncs)."""
    stepper = Stepper(args, activation, encoder, optimizer, REGULARIZER_SPECS[reg], dead_frac, autocast)
    set_selection_gemm(stepper.sae, "bf16" if path == "screened" else "fp32")
    ctx = dense_reference if path == "dense" else contextlib.nullcontext
    times = []
    with ctx():
        for i in range(args.warmup + args.repeats):
            synchronize(stepper.device)  # the previous cycle's queued work is not this cycle's
            t = time.perf_counter()
            for _ in range(stepper.cycle):
                stepper()
            synchronize(stepper.device)  # this cycle's queued work is
            if i >= args.warmup:
                times.append((time.perf_counter() - t) / stepper.cycle)
    return args.batch / statistics.median(times)


def gemm_bound(args) -> tuple[float, float]:
    """(fp32 GEMM GFLOP/s, encoder-matmul bound in tokens/s) for ``(batch, d_in) @ (d_in, d_sae)`` on
    ``args.device``: median of 7 timed products after 2 untimed, each bracketed by device syncs."""
    device = torch.device(args.device)
    a, b = torch.randn(args.batch, args.d_in).to(device), torch.randn(args.d_in, args.d_sae).to(device)
    times = []
    for _ in range(9):
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t)
    gflops = 2 * args.batch * args.d_in * args.d_sae / statistics.median(times[2:]) / 1e9
    return gflops, gflops * 1e9 / (2 * args.d_in * args.d_sae)


def main() -> None:
    p = step_parser(__doc__)
    p.add_argument("--activations", nargs="*", default=ACTIVATIONS.names(), choices=ACTIVATIONS.names())
    p.add_argument("--encoders", nargs="*", default=["linear"], choices=ENCODERS.names())
    p.add_argument("--paths", nargs="*", default=["screened", "sparse"], choices=["screened", "sparse", "dense"])
    p.add_argument("--optimizers", nargs="*", default=["fused"], choices=["adam", "fused"])
    p.add_argument("--regularizers", nargs="*", default=["none"], choices=list(REGULARIZER_SPECS))
    p.add_argument("--dead_frac", nargs="*", type=float, default=[0.0])
    p.add_argument("--autocast", nargs="*", default=["none"], choices=["none", "bf16"],
                   help="TrainConfig.autocast: bf16 autocast of the forward and losses")
    args = p.parse_args()
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    args.device = str(device)
    apply_threads(args)
    gflops, bound = gemm_bound(args)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"torch {torch.__version__}, device {device}{name}, threads {torch.get_num_threads()}, d_in={args.d_in} "
          f"d_sae={args.d_sae} k={args.k} batch={args.batch}; median of {args.repeats} after {args.warmup} warm-up")
    print(f"fp32 GEMM {gflops:.0f} GFLOP/s -> encoder-matmul bound {bound:,.0f} tokens/s\n")
    print(f"| activation | encoder | path | Adam | regularizers | dead | autocast | tokens/s on {device} | % of bound |")
    print("|---|---|---|---|---|---|---|---:|---:|")
    seen = set()
    for act, enc, path, opt, reg, dead, amp in itertools.product(
        args.activations, args.encoders, args.paths, args.optimizers, args.regularizers, args.dead_frac, args.autocast
    ):
        if act in ("relu", "jumprelu"):
            path, dead = "dense", 0.0  # no sparse path; no AuxK
        key = (act, enc, path, opt, reg, dead, amp)
        if key in seen:
            continue
        seen.add(key)
        tps = bench(args, *key)
        row = (f"| {act} | {enc} | {path} | {opt} | {reg} | {dead:.0%} | {amp} | {tps:,.0f} | "
               f"{100 * tps / bound:.0f} % |")
        print(row, flush=True)


if __name__ == "__main__":
    main()
