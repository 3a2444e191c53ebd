"""Data-parallel training with ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc_per_node N -m saelab train ...`` starts N processes; each reads the same global batch
stream from the activation cache, keeps its own contiguous ``1/N`` slice of every batch (the stream is sharded by
rank), computes the loss on it and the gradients are averaged over ranks with ``all_reduce`` before the
optimiser step (the semantics of ``DistributedDataParallel``; done explicitly because the trainer calls the
SAE's encode/decode methods rather than ``forward``). Since every loss term is a mean over tokens, the averaged
gradient equals the single-process gradient of the global batch for TopK/ReLU/JumpReLU SAEs. Terms that
couple tokens are computed per rank, as in sparsify's and SAELens's DDP: BatchTopK's batch-level selection, the
AuxK normaliser (residual variance) and C²R's column norms; non-parameter state (dead-latent counters,
BatchTopK's inference threshold) is synchronised every step. Backend: ``gloo`` on CPU, ``nccl`` on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job: ``rank`` of ``world_size`` (1 = not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

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
        """All-reduce every parameter's ``.grad`` to its mean over ranks (in place)."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is not None:
                g = p.grad if p.grad.is_contiguous() or p.grad.dim() != 2 else p.grad.t()  # column-major W_enc
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g.div_(self.world_size)

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


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``); a no-op returning ``DistInfo()`` when ``WORLD_SIZE`` is unset or 1.

    Raises:
        RuntimeError: the group cannot be formed (torch.distributed's message names the cause).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return info
