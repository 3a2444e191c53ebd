"""Data-parallel training with ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc_per_node N -m saelab train ...`` starts N processes; each reads the same global batch
stream from the activation cache, keeps its own contiguous ``1/N`` slice of every batch (the stream is sharded by
rank), computes the loss on it and the gradients are averaged over ranks with ``all_reduce`` before the
optimiser step (the semantics of ``DistributedDataParallel``; done explicitly because the trainer calls the
SAE's encode/decode methods rather than ``forward``). Since every loss term is a mean over tokens, the averaged
gradient equals the single-process gradient of the global batch for TopK/ReLU/JumpReLU SAEs. Terms that
couple tokens are computed per rank, as in sparsify's and SAELens's DDP: BatchTopK's batch-level selection, the
AuxK normaliser (residual variance) and C²R's column norms; non-parameter state (dead-latent counters,
BatchTopK's inference threshold) is synchronised every step. Backend: ``gloo`` on CPU, ``nccl`` on CUDA, where
each rank uses the GPU of its local rank (:func:`saelab.devices.resolve_device`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .devices import resolve_device

BUCKET_BYTES = 25 * 2**20
"""Gradients smaller than this are all-reduced together in one flat buffer (DistributedDataParallel's default
bucket size); larger ones (``W_enc``, ``W_dec``) alone, in place."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job: ``rank`` of ``world_size`` (1 = not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False
    """Started by torchrun, so a process group exists, one of a single rank included (its collectives are
    identities: ``torchrun --nproc_per_node 1`` checks the NCCL path on one GPU)."""

    @property
    def enabled(self) -> bool:
        """In a process group: more than one process, or launched by torchrun."""
        return self.world_size > 1 or self.launched

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and the final SAE."""
        return self.rank == 0

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice ``x[rank * B/W : (rank + 1) * B/W]`` of a global batch ``(B, ...)``.

        Raises:
            ValueError: ``B`` is not divisible by the world size.
        """
        if not self.enabled:
            return x
        n = self.shard_size(x.shape[0])
        return x[self.rank * n:(self.rank + 1) * n]

    def shard_size(self, batch_size: int) -> int:
        """Rows of a global batch of ``batch_size`` that each rank takes.

        Raises:
            ValueError: ``batch_size`` is not divisible by the world size.
        """
        if batch_size % self.world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {self.world_size} ranks; pick a multiple")
        return batch_size // self.world_size

    def average_gradients(self, params) -> None:
        """All-reduce every parameter's ``.grad`` to its mean over ranks (in place).

        Gradients of at least :data:`BUCKET_BYTES` are reduced alone, in place; the small ones (biases, the cosine
        encoders' ``a`` and ``b``, thresholds) are copied into one flat buffer and reduced in a single collective,
        so a step makes a few collectives rather than one per parameter (each has a fixed latency). With two ranks
        the mean is the same bit for bit either way; with more, the backend's reduction order of an element may
        depend on where it sits in the buffer (float rounding only)."""
        if not self.enabled:
            return
        small = []
        for p in params:
            if p.grad is None:
                continue
            g = p.grad if p.grad.is_contiguous() or p.grad.dim() != 2 else p.grad.t()  # column-major W_enc
            if g.numel() * g.element_size() >= BUCKET_BYTES:
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g.div_(self.world_size)
            else:
                small.append(g)
        for dtype in {g.dtype for g in small}:
            grads = [g for g in small if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world_size)
            for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(piece.view_as(g))

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` to its sum over ranks (in place); returns ``t``."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (e.g. BatchTopK's threshold) to every rank (DDP's ``broadcast_buffers``)."""
        if self.enabled:
            for b in module.buffers():
                dist.broadcast(b, src=0)

    def barrier(self) -> None:
        """Wait until every rank reaches this point (no-op single-process)."""
        if self.enabled:
            dist.barrier()


def init_distributed(device: str | torch.device = "cpu") -> DistInfo:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``); a no-op returning ``DistInfo()`` for a plain process (``WORLD_SIZE`` unset
    or 1 and no ``TORCHELASTIC_RUN_ID``, which torchrun sets). Each rank's device is its local rank's GPU on CUDA
    (:func:`saelab.devices.resolve_device`).

    Raises:
        ValueError: CUDA asked for but absent, or fewer GPUs than local ranks.
        RuntimeError: the group cannot be formed (torch.distributed's message names the cause).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), launched=True)
    if not dist.is_initialized():
        dev = resolve_device(device, info.local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return info
