"""Command-line flags shared by the SAE-step benchmarks (``bench_step.py``, ``bench_peers.py``) and by the harvest
benchmarks (``bench_harvest.py``, ``bench_multihook.py``: :func:`harvest_parser`).

Both time a training step of an SAE of shape ``W_enc (d_in, d_sae)`` with TopK ``k`` on a ``(batch, d_in)`` fp32
input, as the median of ``--repeats`` timed cycles after ``--warmup`` untimed ones, on ``--threads`` torch threads,
on ``--device`` (``cpu``, ``cuda``, ``cuda:N``).
"""

from __future__ import annotations

import argparse

import torch


def step_parser(doc: str | None, *, threads: int | None = None,
                warmup_help: str = "untimed cycles first",
                repeats_help: str = "timed cycles (median)") -> argparse.ArgumentParser:
    """An ``ArgumentParser`` (description ``doc``, kept verbatim) with the shared SAE-shape and timing flags.

    Flags: ``--d_in`` (576, SmolLM2-135M's width), ``--d_sae`` (9216 = 16 x d_in), ``--k`` (32), ``--batch``
    (4096 tokens per step), ``--warmup`` (2), ``--repeats`` (7), ``--threads`` (default ``threads``; 0 or None
    leaves torch's default, see :func:`apply_threads`), ``--device`` (``cpu``; resolve it with
    :func:`saelab.devices.resolve_device`). Each script adds its own flags to the returned parser.

    Args:
        doc: the script's ``__doc__``, shown by ``--help``.
        threads: default of ``--threads``.
        warmup_help, repeats_help: what one warm-up / timed unit is in this script.
    """
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_in", type=int, default=576)
    p.add_argument("--d_sae", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=2, help=warmup_help)
    p.add_argument("--repeats", type=int, default=7, help=repeats_help)
    p.add_argument("--threads", type=int, default=threads, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu", help="where the step runs: cpu, cuda or cuda:N (default cpu)")
    return p


def harvest_parser(doc: str | None, *, n_tokens: int) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` (description ``doc``) with the harvest benchmarks' flags: ``--n_tokens`` (default
    ``n_tokens``) stored rows per harvest, ``--batch_size`` (8) contexts per LM forward, ``--context_size`` (128)
    and ``--threads`` (torch's default when unset, see :func:`apply_threads`). Each script adds its hook flag."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_tokens", type=int, default=n_tokens)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--context_size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    return p


def apply_threads(args: argparse.Namespace) -> None:
    """``torch.set_num_threads(args.threads)`` unless ``--threads`` is 0 or unset."""
    if args.threads:
        torch.set_num_threads(args.threads)
