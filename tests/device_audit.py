"""CPU-side audits of what would go wrong on a GPU: device-less tensor factories and host-device waits.

A CPU-only machine cannot run the CUDA path, but it can watch the operations that break or stall it:

* :class:`FactoryAudit` records every tensor factory (``torch.zeros``, ``torch.tensor``, ``torch.arange``, ...)
  called from saelab's own code without an explicit ``device=``. On CPU such a call is harmless; on CUDA it makes
  a CPU tensor that the next op mixes with CUDA tensors ("Expected all tensors to be on the same device"). A
  deliberate CPU tensor names ``device="cpu"``.
* :class:`HostSyncCounter` counts the operations that make the host wait for the device on CUDA: reading a value
  (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.numpy()``, ``.cpu()``), output shapes that depend
  on values (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave``
  without ``output_size``), and Python data copied to the device (``torch.tensor(list, device=...)``). On CPU they
  cost nothing extra; on CUDA each one drains the launch queue (``torch.cuda.set_sync_debug_mode`` counts the
  same events there).

Both are ``torch`` modes (``TorchFunctionMode`` for Python-level calls, ``TorchDispatchMode`` for ATen ops,
including those of the backward pass), so they see the real step without changing it.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SAELAB_DIR = str(Path(__import__("saelab").__file__).resolve().parent)

FACTORIES = {
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.linspace,
    torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm, torch.empty_strided,
    torch.scalar_tensor,
}
"""Factories that place their result on the default device unless told otherwise."""


def saelab_caller() -> str | None:
    """``file:line`` of the innermost saelab frame on the stack (``None`` when saelab is not calling)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(SAELAB_DIR):
            return f"{Path(name).relative_to(SAELAB_DIR).as_posix()}:{f.f_lineno}"
        f = f.f_back
    return None


_MODE_FILES = (__file__, str(Path(torch.__file__).parent / "overrides.py"), str(Path(torch.__file__).parent / "_tensor.py"))
"""Frames of the mode machinery between a torch call and its caller."""


def _direct_saelab_caller() -> str | None:
    """``file:line`` when the code calling torch is saelab's own (not torch or another library on its behalf)."""
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename in _MODE_FILES:
        f = f.f_back
    if f is not None and f.f_code.co_filename.startswith(SAELAB_DIR):
        return f"{Path(f.f_code.co_filename).relative_to(SAELAB_DIR).as_posix()}:{f.f_lineno}"
    return None


class FactoryAudit(TorchFunctionMode):
    """Records ``file:line`` of each device-less factory call made directly by saelab code (:attr:`calls`).

    ``torch.as_tensor``/``torch.tensor`` of a tensor keep its device and are not recorded.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            data_is_tensor = func in (torch.tensor, torch.as_tensor) and args and isinstance(args[0], torch.Tensor)
            where = None if data_is_tensor else _direct_saelab_caller()
            if where is not None:
                self.calls[f"{func.__name__} at {where}"] += 1
        return func(*args, **kwargs)


_VALUE_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
              "_unique", "bincount", "equal", "nonzero_numpy"}
"""ATen ops whose result (or its shape) needs the tensor's values on the host."""


class _SyncDispatch(TorchDispatchMode):
    def __init__(self, counts: Counter, where: Counter) -> None:
        super().__init__()
        self.counts, self.where = counts, where

    def _add(self, name: str) -> None:
        self.counts[name] += 1
        self.where[f"{name} at {saelab_caller() or 'autograd/torch'}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in _VALUE_OPS:
            self._add(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or [])):
            self._add(f"{name}[bool mask]")
        elif name == "repeat_interleave" and func._overloadname.startswith("Tensor") and kwargs.get("output_size") is None:
            self._add("repeat_interleave")
        return func(*args, **kwargs)


_HOST_METHODS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.__array__: "__array__",
                 torch.Tensor.cpu: "cpu"}


class _SyncFunctions(TorchFunctionMode):
    def __init__(self, counts: Counter, where: Counter) -> None:
        super().__init__()
        self.counts, self.where = counts, where

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None
        if func in _HOST_METHODS:
            name = _HOST_METHODS[func]
        elif func is torch.Tensor.to and _to_host(args, kwargs):
            name = "to(cpu)"
        elif func in (torch.tensor, torch.as_tensor) and args and not isinstance(args[0], torch.Tensor):
            name = "tensor(python data)"
        if name is not None and (at := _direct_saelab_caller()) is not None:
            self.counts[name] += 1
            self.where[f"{name} at {at}"] += 1
        return func(*args, **kwargs)


def _to_host(args, kwargs) -> bool:
    dev = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            dev = a
    return dev is not None and torch.device(dev).type == "cpu"


class HostSyncCounter:
    """Context manager counting host-device synchronisation points (:attr:`counts`, :attr:`total`) of the code it
    wraps, by kind, and :attr:`where` by kind and ``file:line`` of saelab code; ``Python``-level reads are counted
    only when saelab code makes them."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.where: Counter[str] = Counter()
        self._modes = (_SyncFunctions(self.counts, self.where), _SyncDispatch(self.counts, self.where))

    @property
    def total(self) -> int:
        """All synchronisation points seen."""
        return sum(self.counts.values())

    def __enter__(self) -> "HostSyncCounter":
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)


CUDA_NONDETERMINISTIC = {
    "histc": "torch.histc",
    "median": "torch.median with indices",
    "kthvalue": "torch.kthvalue",
    "put_": "Tensor.put_",
    "nll_loss2d_forward": "NLLLoss",
    "nll_loss_forward": "NLLLoss",
    "_embedding_bag_backward": "EmbeddingBag backward with mode='max'",
    "_embedding_bag_dense_backward": "EmbeddingBag backward with mode='max'",
    "grid_sampler_2d_backward": "grid_sample backward",
    "cumsum": "torch.cumsum of a floating tensor",
    "cumsum_": "torch.cumsum of a floating tensor",
}
"""ATen ops that raise ``RuntimeError`` on CUDA under ``torch.use_deterministic_algorithms(True)`` (the list in
that function's documentation; ``bincount`` only with weights, ``scatter_reduce`` only with ``prod``, ``cumsum``
only for floating dtypes, ``median`` only with indices, EmbeddingBag's backward only for ``mode='max'``: checked
below)."""


class DeterminismAudit(TorchDispatchMode):
    """Records (:attr:`ops`) the ops of the wrapped code that would raise on CUDA under
    ``torch.use_deterministic_algorithms(True)``, with the saelab ``file:line`` that issued them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        bad = CUDA_NONDETERMINISTIC.get(name)
        if name in ("cumsum", "cumsum_") and not (args[0].is_floating_point() or args[0].is_complex()):
            bad = None
        if name == "median" and func._overloadname == "default":  # the values-only median is deterministic
            bad = None
        if name == "bincount" and (len(args) > 1 and args[1] is not None or kwargs.get("weights") is not None):
            bad = "torch.bincount with weights"
        if name.startswith("scatter_reduce") and "prod" in (list(args[3:4]) + [kwargs.get("reduce")]):
            bad = "scatter_reduce(prod)"
        if name.startswith("_embedding_bag") and _arg(func, args, kwargs, "mode") != 2:  # 2: mode='max'
            bad = None
        if bad is not None:
            self.ops[f"{bad} at {saelab_caller() or 'autograd/torch'}"] += 1
        return func(*args, **kwargs)


def _arg(func, args, kwargs, name: str):
    """The value of ``func``'s argument ``name`` in this call (by its schema position), or None."""
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return args[i] if i < len(args) else kwargs.get(name)
    return None
