"""Evaluate many SAEs at once: worker processes, each with its own copy of the LM and a share of the CPU threads.

``saelab compare`` runs every suite on every SAE of an experiment (81 SAEs x 6 suites in ``experiments/paper.yaml``).
One SAE's evaluation uses two CPU cores poorly: much of it is Python-level or single-threaded work (probe fits with
scikit-learn, small Adam loops, per-letter k-sparse probes, selection sorts), and its short GEMMs pay OpenMP
fork/join and spin-wait costs. Two SAEs evaluated side by side, one intra-op thread each, use the cores better
(``benchmarks/RESULTS.md``, "Evals per SAE").

Why processes and not threads: the suites register forward hooks on the LM's modules (capturing, splicing an SAE in,
replaying a cached hook output), so two evaluations cannot share one model object, and the suites' Python work holds
the GIL. Each worker loads the model once (from the dense local copy, about a second) and keeps it for all its jobs.

:func:`run_eval_jobs` first runs one job of every suite in the calling process: that job does the suite's
SAE-independent LM work (activations cached on disk by :class:`~saelab.evals.base.LMActivationStore`, LM-feature
probes memoised in :mod:`saelab.evals.probing`), which the workers then reuse instead of each redoing it. Every job
writes its own ``eval_<suite>.json`` atomically (:func:`saelab.evals.run_suite`), so an interrupted run keeps the
finished evaluations; a failed job does not stop the others, and the failures are raised together at the end.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch

from .base import LMActivationStore

_QUIET_FIELDS = ("progress", "verbose")
"""Config fields that turn a suite's progress bars off; worker jobs run quietly (their bars would interleave)."""


@dataclass(frozen=True)
class EvalJob:
    """One suite run on one SAE.

    Attributes:
        suite: suite name (``saelab.evals.EVAL_SUITES``).
        cfg: the suite's config dataclass; ``cfg.sae`` names the SAE directory.
        label: how progress lines name the job (e.g. ``"c2r[k=32] seed 1"``).
    """

    suite: str
    cfg: Any
    label: str = ""


def eval_workers(requested: int, n_jobs: int, device: str, threads: int | None = None) -> int:
    """How many evaluations run at once.

    Args:
        requested: the user's setting; ``0`` = automatic: one per CPU thread that torch would use (``threads`` or
            ``torch.get_num_threads()``), at most 8 (each worker holds a copy of the LM).
        n_jobs: jobs waiting (more workers than jobs would idle).
        device: the LM's device; an accelerator gets one worker (the jobs then share it in one process).
        threads: CPU threads for the whole pool (default: torch's current setting).

    Returns:
        A number in ``[1, max(n_jobs, 1)]``.

    Raises:
        ValueError: ``requested < 0``.
    """
    if requested < 0:
        raise ValueError(f"eval_workers must be >= 0 (0 = one per CPU thread), got {requested}")
    if torch.device(device).type != "cpu":
        return 1
    n = requested or min(threads or torch.get_num_threads(), 8)
    return max(1, min(n, n_jobs))


def _quiet(cfg: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: False for k in _QUIET_FIELDS if k in names})


# --- worker process state (one LM, one store, per process) -------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _worker_init(model: str, device: str, threads: int, store_root: str, hook_name: str,
                 lm_probe_memo: dict[str, Any]) -> None:
    from ..models.lm import load_lm
    from ..runtime import tune_cpu_memory
    from . import probing

    tune_cpu_memory()
    torch.set_num_threads(threads)
    probing._LM_PROBE_MEMO.update(lm_probe_memo)
    lm = load_lm(model, device=device)
    _WORKER.update(lm=lm, store=LMActivationStore(lm.name, hook_name, root=store_root))


def _worker_run(suite: str, cfg: Any) -> float:
    from . import run_suite

    t = time.perf_counter()
    run_suite(suite, cfg, lm=_WORKER["lm"], store=_WORKER["store"])
    return time.perf_counter() - t


def run_eval_jobs(
    jobs: Sequence[EvalJob],
    *,
    lm,
    store: LMActivationStore,
    workers: int,
    threads: int | None = None,
    on_done: Callable[[EvalJob, float], None] | None = None,
) -> None:
    """Run every job: one per suite in this process first, then the rest on ``workers`` processes.

    Args:
        jobs: the evaluations to run (finished ones should already be filtered out).
        lm: the loaded model (this process's jobs use it; workers load ``lm.name`` on the same device).
        store: LM-activation store shared with the workers (same root and hook).
        workers: processes for the rest (1 = everything in this process, in order).
        threads: CPU threads in all (default: torch's current setting); each worker gets ``threads // workers``.
        on_done: called with each finished job and its wall seconds.

    Raises:
        RuntimeError: one or more jobs failed (all of them named, with their errors); the others finished and
            wrote their results.
    """
    done = on_done or (lambda job, seconds: None)
    first: dict[str, EvalJob] = {}
    rest: list[EvalJob] = []
    for job in jobs:
        if job.suite in first:
            rest.append(job)
        else:
            first[job.suite] = job
    local = list(first.values()) + (rest if workers <= 1 else [])
    pooled = rest if workers > 1 else []
    from . import run_suite

    for job in local:
        t = time.perf_counter()
        run_suite(job.suite, job.cfg, lm=lm, store=store)
        done(job, time.perf_counter() - t)
    if not pooled:
        return
    from . import probing

    threads = threads or torch.get_num_threads()
    failures: list[str] = []
    ctx = multiprocessing.get_context("spawn")  # fork would copy this process's OpenMP and tokenizer threads
    init = (str(lm.name), str(next(lm.model.parameters()).device), max(1, threads // workers),
            str(store.dir.parent), store.hook_name, dict(probing._LM_PROBE_MEMO))
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=init) as pool:
        pending = {pool.submit(_worker_run, job.suite, _quiet(job.cfg)): job for job in pooled}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = pending.pop(fut)
                try:
                    done(job, fut.result())
                except Exception as e:  # noqa: BLE001 - every failure is reported below, the others go on
                    failures.append(f"{job.suite} on {job.cfg.sae}: {type(e).__name__}: {e}")
    if failures:
        raise RuntimeError(f"{len(failures)} evaluation(s) failed (the others finished and wrote their results; "
                           "rerun to retry only these):\n  " + "\n  ".join(failures))


__all__ = ["EvalJob", "eval_workers", "run_eval_jobs"]
