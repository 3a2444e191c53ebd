"""Which device a command runs on, and the few facts about it that the rest of saelab needs.

Every entry point takes ``--device`` (``cpu``, ``cuda``, ``cuda:N``) and resolves it here once:
:func:`resolve_device` checks the device exists and, under ``torchrun``, gives each rank its own GPU (the local
rank), whatever index the user typed (as ``DistributedDataParallel`` expects: one process per GPU).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Names of the dtypes a user may pick for the LM (``--lm_dtype``) and their torch types."""


def resolve_device(device: str | torch.device, local_rank: int | None = None) -> torch.device:
    """The torch device for ``device``; with ``local_rank`` (torchrun), CUDA maps to ``cuda:<local_rank>``.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or any ``torch.device`` string).
        local_rank: this process's rank on its node under torchrun, or ``None`` single-process. Every rank of a
            multi-GPU job uses the GPU of its local rank, so ``cuda`` and ``cuda:0`` alike give ``cuda:<local_rank>``.

    Returns:
        The device, with an explicit index for CUDA (``cuda`` alone means the current device, ``cuda:0`` by default).

    Raises:
        ValueError: ``device`` is not a device name, or names CUDA (or a GPU index) this machine does not have;
            the message names the devices it has.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r} is not a device name ({e}); use cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return dev
    if local_rank is not None:
        dev = torch.device("cuda", local_rank)
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device} asks for CUDA but torch.cuda.is_available() is False on this machine "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu")
    n = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= n:
        raise ValueError(f"--device {device} (rank {local_rank}) names GPU {index}, but this machine has {n} "
                         f"(cuda:0 .. cuda:{n - 1}); pick one of those or lower --nproc_per_node")
    return torch.device("cuda", index)


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 GEMMs natively with fp32 accumulation: a CUDA GPU of compute capability 8.0
    or higher (Ampere, Hopper and later; older GPUs emulate bf16 slower than fp32), or a CPU where oneDNN supports
    bf16 (AVX-512 BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (timers need it on CUDA; a no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``name`` (a key of :data:`DTYPES`).

    Raises:
        ValueError: unknown name (lists the valid ones).
    """
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


@contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Inside the block, ``torch.use_deterministic_algorithms(True)`` when ``enabled`` (the previous setting comes
    back after it), with ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless set (cuBLAS needs it for reproducible GEMMs on
    CUDA >= 10.2; it is read when the first cuBLAS handle is made, so it only helps a process that has not run a CUDA
    GEMM yet). On CUDA, index_add_, scatter_add_ and the backward of index_select then use deterministic kernels
    instead of atomics, and an operation that has none raises ``RuntimeError`` naming it (PyTorch's
    "Reproducibility" notes). ``enabled=False`` changes nothing."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)
