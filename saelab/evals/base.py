"""Shared plumbing of the evaluation suites: the suite registry, typed results, and a disk cache of LM activations.

Every suite registers ``EVAL_SUITES.register(name)(Suite(config_cls, run))`` where ``run(sae, lm, cfg, store)``
returns a dataclass deriving from :class:`EvalResult`; each suite's config derives from :class:`EvalConfig` (the
fields sae, model, out, threads, device, ...). ``saelab eval --suite NAME`` and :func:`saelab.evals.run_suite` both
go through the registry.

LM activations (which do not depend on the SAE) are cached on disk by :class:`LMActivationStore`, keyed by
model, hook and a description of the inputs, so several suites and several SAEs of the same model/hook reuse
them instead of re-running the LM.
"""

from __future__ import annotations

import hashlib
import json
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_write, json_default, write_json
from ..paths import cache_dir
from ..registry import Registry


@dataclass
class EvalConfig:
    """Fields every suite's config shares; each suite's config dataclass derives from it.

    They come first in every suite's field order (dataclass inheritance), so every field a suite adds needs a
    default, and configs are built by keyword (``CoreEvalConfig(sae=..., n_tokens=...)``, as the CLI and config
    files do).
    """

    sae: str = "runs/demo/sae"
    """SAE directory (cfg.json + sae_weights.safetensors)."""
    model: str | None = None
    """Model; default: the one recorded in the SAE's cfg.json."""
    out: str | None = None
    """Write the result JSON here (default: <sae>/eval_<suite>.json)."""
    threads: int | None = None
    """torch CPU threads."""
    device: str = "cpu"
    """Device of the SAE and the LM: cpu, cuda or cuda:N. The cached LM activations stay in CPU memory and each batch
    is copied to this device when it is encoded."""
    encode_batch_size: int = 4096
    """Rows (tokens, or words for absorption) per SAE encode call."""
    progress: bool = True
    """Show progress bars and per-task lines (``saelab eval`` prints the stage timings, ``result.timings_s``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Resolve a subclass's string annotations (``from __future__ import annotations``) in its own module.

        simple_parsing evaluates all of a config's annotations in the globals of the module that declares the field
        it is wrapping; for the fields above that is this module, where a subclass's ``data: DataConfig`` is unknown
        (``NameError`` in ``saelab eval --help``). Resolved annotations need no namespace. A forward reference to a
        name its module defines later leaves the strings as they are.
        """
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__annotations__")
        if not own:
            return
        try:
            hints = typing.get_type_hints(cls, include_extras=True)
        except NameError:
            return
        for name in own:
            own[name] = hints[name]


@dataclass(kw_only=True)
class EvalResult:
    """Base of every suite's result: a dataclass that serialises to JSON.

    Attributes:
        suite: suite name.
        sae: path (or name) of the evaluated SAE.
        timings_s: wall-clock seconds per stage (e.g. ``{"lm_activations": 12.1, "probes": 3.4}``).
    """

    suite: str = ""
    sae: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tensors/arrays become lists)."""
        return json.loads(json.dumps(asdict(self), default=json_default))

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` atomically as JSON."""
        return write_json(path, self.to_dict())

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Context manager adding the elapsed seconds of a stage to ``timings_s[stage]``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings_s[stage] = self.timings_s.get(stage, 0.0) + time.perf_counter() - t


@dataclass(frozen=True)
class Suite:
    """A registered evaluation suite: its dataclass config and its ``run(sae, lm, cfg, store) -> EvalResult``."""

    config_cls: type
    run: Callable[..., EvalResult]
    help: str = ""


EVAL_SUITES: Registry[Suite] = Registry("eval suite")


class LMActivationStore:
    """Disk cache of SAE-independent LM activations, as safetensors files.

    Files live in ``<root>/<model-hook digest>/<name>-<spec digest>.safetensors`` (default root
    ``saelab.paths.cache_dir("eval_activations")``) and are written atomically; a corrupt file is recomputed.
    Entries are returned as CPU tensors whatever device computed them (an eval set is larger than it needs to be
    in device memory at once): each suite copies one batch at a time to the SAE's or the LM's device.

    Args:
        model: model name/path (part of the key).
        hook_name: hook point (part of the key).
        root: cache root directory; ``None`` for the default.
    """

    def __init__(self, model: str, hook_name: str, root: str | Path | None = None) -> None:
        base = Path(root) if root is not None else cache_dir("eval_activations")
        digest = hashlib.sha256(f"{model}|{hook_name}".encode()).hexdigest()[:12]
        self.dir = base / f"{Path(str(model)).name}-{hook_name}-{digest}"
        self.model, self.hook_name = model, hook_name

    def path(self, name: str, spec: dict[str, Any]) -> Path:
        """File of the entry ``name`` computed with parameters ``spec`` (any JSON-serialisable dict)."""
        key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=json_default).encode()).hexdigest()[:16]
        return self.dir / f"{name}-{key}.safetensors"

    def get(self, name: str, spec: dict[str, Any], compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Return the cached tensors of ``(name, spec)``, computing and storing them on a miss.

        Args:
            name: entry name, e.g. ``"sparse_probing"``.
            spec: everything the tensors depend on besides model and hook (task, seeds, context size, ...).
            compute: builds the dict of tensors on a miss (contiguous CPU tensors).

        Returns:
            The dict of tensors, on the CPU.
        """
        path = self.path(name, spec)
        if path.is_file():
            try:
                return load_file(str(path))
            except Exception:  # corrupt or truncated: recompute
                path.unlink(missing_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in compute().items()}
        meta = {"model": str(self.model), "hook_name": self.hook_name, "spec": json.dumps(spec, default=json_default)}
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))
        return tensors
