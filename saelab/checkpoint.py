"""Resumable training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory holds two files that form one checkpoint:

- ``state.safetensors``: every tensor. ``sae.<name>`` (the SAE's ``state_dict``), ``opt.<param index>.<key>``
  (the optimiser's per-parameter state, e.g. Adam's ``step``, ``exp_avg``, ``exp_avg_sq``), and any other
  top-level tensor of the state under its own name (``since_fired``, ``rng``). Its metadata holds the checkpoint's
  token.
- ``state.json``: everything else (identity, step, scale, ``last_reg``, ``log_bytes``, the optimiser's
  ``param_groups``, the scheduler's ``state_dict``), the optimiser state keys held as tensors, and the same token.

Loading runs no pickle: :func:`safetensors.torch.load_file` and :mod:`json` only.

Writing the pair is atomic. The tensors go first to ``state.next.safetensors`` (itself an atomic write), then
``state.json`` is atomically replaced (the commit point), then ``state.next.safetensors`` is renamed to
``state.safetensors``. A kill before the commit leaves the previous pair intact (a stale ``state.next`` file is
ignored, its token does not match); a kill after it leaves ``state.json`` naming the token of
``state.next.safetensors``, which the reader picks up (and the trainer renames into place). A pair whose tokens
differ (files copied from two checkpoints) or whose tensors file is unreadable is refused with an error naming the
files and the fix.

Checkpoints of earlier versions (``state.pt``, a pickle) are read only with ``torch.load(weights_only=True)``,
whose unpickler refuses every global outside torch's allow-list instead of calling it, and converted to the pair;
a file that the safe loader refuses is reported, never unpickled (unless the caller passes ``trust_pickle=True``
to :func:`convert_checkpoint`).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .io import atomic_write, json_default, read_json, write_json

#: the tensors file of a checkpoint
TENSORS = "state.safetensors"
#: the JSON file of a checkpoint (written last: its presence marks a checkpoint)
META = "state.json"
#: the tensors of a checkpoint being written (renamed to TENSORS once META is committed)
PENDING = "state.next.safetensors"
#: the pickled checkpoint file of earlier versions
LEGACY = "state.pt"
#: the version of the layout described in the module docstring
FORMAT = 1
_TOKEN_KEY = "saelab_checkpoint_token"
_TOP_TENSORS = ("since_fired", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: corrupt, mismatched, or in the old pickle format the safe loader refuses."""


def has_checkpoint(ckpt_dir: str | Path) -> bool:
    """Whether ``ckpt_dir`` holds a checkpoint to resume (the JSON half of a pair, or an old ``state.pt``)."""
    d = Path(ckpt_dir)
    return (d / META).is_file() or (d / LEGACY).is_file()


def _restart_hint(d: Path) -> str:
    return f"delete {d} to start the run over"


def split_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a training state into its tensors and its JSON part (see the module docstring for the names).

    Args:
        state: ``identity``, ``sae`` (state_dict), ``opt`` (optimiser state_dict), ``sched`` (scheduler
            state_dict), ``since_fired``, ``step``, ``scale``, ``rng``, ``last_reg``, ``log_bytes``.

    Returns:
        (tensors: contiguous CPU-or-device tensors by name, meta: JSON-serialisable dict).
    """
    tensors: dict[str, Tensor] = {f"sae.{k}": v for k, v in state["sae"].items()}
    opt_tensors: dict[str, list[str]] = {}
    opt_values: dict[str, dict[str, Any]] = {}
    for i, per_param in state["opt"]["state"].items():
        opt_tensors[str(i)] = [k for k, v in per_param.items() if isinstance(v, Tensor)]
        for k, v in per_param.items():
            if isinstance(v, Tensor):
                tensors[f"opt.{i}.{k}"] = v
            else:
                opt_values.setdefault(str(i), {})[k] = v
    for k in _TOP_TENSORS:
        tensors[k] = state[k]
    # safetensors stores dense row-major buffers: the values are kept, the strides are restored on load
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta = {k: v for k, v in state.items() if k not in ("sae", "opt", *_TOP_TENSORS)}
    meta["opt_param_groups"] = state["opt"]["param_groups"]
    meta["opt_tensors"] = opt_tensors
    meta["opt_values"] = opt_values
    return tensors, json.loads(json.dumps(meta, default=json_default))


def join_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_state`: the training state in the layout :func:`split_state` takes.

    Raises:
        KeyError: a tensor named by ``meta`` is missing.
    """
    state = {k: v for k, v in meta.items() if k not in ("opt_param_groups", "opt_tensors", "opt_values", "format", "token",
                                                         "tensors_bytes")}
    state["sae"] = {k[len("sae."):]: v for k, v in tensors.items() if k.startswith("sae.")}
    opt_state = {}
    for i, keys in meta["opt_tensors"].items():
        opt_state[int(i)] = {**meta["opt_values"].get(i, {}), **{k: tensors[f"opt.{i}.{k}"] for k in keys}}
    state["opt"] = {"state": opt_state, "param_groups": meta["opt_param_groups"]}
    for k in _TOP_TENSORS:
        state[k] = tensors[k]
    return state


def write_checkpoint(ckpt_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (see :func:`split_state`) as the pair ``state.safetensors`` + ``state.json``, atomically.

    Returns:
        the path of ``state.json``.
    """
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    tensors, meta = split_state(state)
    token = secrets.token_hex(16)  # random, so two checkpoints never share one (cheaper than hashing the tensors)
    pending = atomic_write(d / PENDING, lambda p: save_file(tensors, str(p), metadata={_TOKEN_KEY: token}))
    meta = {"format": FORMAT, "token": token, "tensors_bytes": pending.stat().st_size, **meta}
    write_json(d / META, meta)  # the commit point: the pair is now this checkpoint
    os.replace(pending, d / TENSORS)
    legacy = d / LEGACY
    if legacy.exists():  # converted: the old pickle is no longer needed
        legacy.unlink()
    return d / META


def _token(path: Path) -> tuple[str | None, str]:
    """(token, "") of a tensors file, or (None, why it has none)."""
    if not path.is_file():
        return None, "missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(_TOKEN_KEY), ""
    except Exception as e:  # noqa: BLE001 - any unreadable header (truncated, not safetensors) is reported
        return None, f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


def read_checkpoint(ckpt_dir: str | Path, *, roll_forward: bool = False) -> dict[str, Any]:
    """Read the checkpoint in ``ckpt_dir`` (no pickle), as the state dict :func:`write_checkpoint` took, on the CPU.

    The tensors stay on the CPU: ``load_state_dict`` copies them into the model and optimiser wherever those live,
    and the RNG state must be a CPU byte tensor for ``torch.Generator.set_state`` (the regularizers' generator is a
    CPU generator on every device).

    An old ``state.pt`` (and no ``state.json``) is read with ``torch.load(weights_only=True)``; it is not converted
    here (see :func:`convert_checkpoint`).

    Args:
        ckpt_dir: the checkpoint directory (``<out>/checkpoint``).
        roll_forward: rename a committed ``state.next.safetensors`` to ``state.safetensors`` (the writer's last
            step, undone by a kill); only the process that writes checkpoints should pass True.

    Raises:
        FileNotFoundError: no checkpoint in ``ckpt_dir``.
        CheckpointError: a corrupt or mismatched pair, or an old pickle the safe loader refuses; the message names
            the files and the fix.
    """
    d = Path(ckpt_dir)
    meta_path = d / META
    if not meta_path.is_file():
        if (d / LEGACY).is_file():
            return _load_legacy(d / LEGACY)
        raise FileNotFoundError(f"no checkpoint in {d} (neither {META} nor {LEGACY})")
    try:
        meta = read_json(meta_path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {meta_path} ({e}); {_restart_hint(d)}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not meta.get("token"):
        raise CheckpointError(f"{meta_path} is not a saelab checkpoint of format {FORMAT}; {_restart_hint(d)}")
    why = []
    for name in (TENSORS, PENDING):
        path = d / name
        token, problem = _token(path)
        if token == meta["token"]:
            break
        if name == TENSORS or path.exists():
            why.append(f"{path} is {problem}" if problem else f"{path} belongs to another checkpoint (token {token})")
    else:
        raise CheckpointError(f"checkpoint {meta_path} (token {meta['token']}) has no matching tensors file: "
                              f"{'; '.join(why)}; {_restart_hint(d)}")
    if name == PENDING and roll_forward:
        os.replace(path, d / TENSORS)
        path = d / TENSORS
    size = path.stat().st_size
    if meta.get("tensors_bytes") is not None and size != meta["tensors_bytes"]:
        raise CheckpointError(f"checkpoint tensors {path} hold {size} bytes, {meta_path} expects {meta['tensors_bytes']} "
                              f"(truncated or modified); {_restart_hint(d)}")
    try:
        tensors = load_file(str(path), device="cpu")
        return join_state(tensors, meta)
    except Exception as e:  # noqa: BLE001 - a corrupt body or a missing tensor: one message naming the file
        raise CheckpointError(f"cannot read checkpoint tensors {path} ({type(e).__name__}: {e}); "
                              f"{_restart_hint(d)}") from e


def _load_legacy(path: Path, trust_pickle: bool = False) -> dict[str, Any]:
    """An old pickled ``state.pt``, on the CPU: through torch's allow-list unpickler unless ``trust_pickle``."""
    try:
        return torch.load(path, weights_only=not trust_pickle, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - UnpicklingError for a refused global, or a corrupt file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is a checkpoint in the old pickle format that the safe loader refuses ({first}); "
            f"delete {path.parent} to restart the run, or, only if you trust where the file comes from, convert it "
            f"once with `python -c \"from saelab.checkpoint import convert_checkpoint; "
            f"convert_checkpoint('{path.parent}', trust_pickle=True)\"`"
        ) from e


def convert_checkpoint(ckpt_dir: str | Path, *, trust_pickle: bool = False) -> Path:
    """Convert an old ``state.pt`` in ``ckpt_dir`` to the safetensors + JSON pair and delete it.

    Args:
        ckpt_dir: the checkpoint directory (``<out>/checkpoint``).
        trust_pickle: unpickle with ``weights_only=False``, which runs whatever code the file holds: only for
            files of known origin that the safe loader refuses.

    Returns:
        the path of the new ``state.json``.

    Raises:
        FileNotFoundError: no ``state.pt`` in ``ckpt_dir``.
        CheckpointError: the safe loader refuses the file (without ``trust_pickle``).
    """
    d = Path(ckpt_dir)
    if not (d / LEGACY).is_file():
        raise FileNotFoundError(f"no {LEGACY} in {d} to convert")
    return write_checkpoint(d, _load_legacy(d / LEGACY, trust_pickle=trust_pickle))
