"""Save and load SAEs in the SAELens v6 on-disk layout, so SAELens and SAEBench can load ours.

Layout (SAELens ``constants.py``): a directory with ``cfg.json`` and ``sae_weights.safetensors`` holding
``W_enc (d_in, d_sae)``, ``b_enc (d_sae)``, ``W_dec (d_sae, d_in)``, ``b_dec (d_in)`` and, for JumpReLU-style
inference, ``threshold (d_sae)``. BatchTopK is saved as JumpReLU with its scalar inference threshold
repeated per latent, as SAELens and dictionary_learning do. ``cfg.json`` carries the SAELens keys
(``architecture``, ``d_in``, ``d_sae``, ``metadata{model_name, hook_name, ...}``) plus a ``saelab`` block
with our full :class:`SAEConfig`, which our loader prefers, so a saved SAE is exactly self-describing.
Optional ``sparsity.safetensors`` holds ``{"sparsity": log10 latent density}`` (SAELens convention).

Encoders other than ``linear`` (cosine scoring, Naihin & Stambler 2026) save their parameters as
``encoder.<name>`` tensors (``encoder.a``, ``encoder.b``, ``encoder.a_base``, ``encoder.delta``) next to the
SAELens ones. SAELens cannot express their scoring, so ``cfg.json`` then says ``"saelens_compatible": false``
with a ``"saelens_note"``; ``linear`` SAEs say ``"saelens_compatible": true``. ``saelab.encoder_stats`` records
the encoder's :meth:`~saelab.sae.encoders.Encoder.scale_stats` (learned ``a``/``b`` summary) at save time.
"""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_write, read_json, write_json
from .activations import BatchTopK
from .config import SAEConfig
from .model import SAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
FORMAT_VERSION = 1
SAELENS_VERSION = "6.54.0"
"""The SAELens version whose layout we write (recorded as ``metadata.sae_lens_version``)."""


def _saelab_version() -> str:
    try:
        return md.version("saelab")
    except md.PackageNotFoundError:
        return "0+unknown"


def _hook_layer(hook_name: str) -> int | None:
    m = re.search(r"(?:blocks|layers|h)\.(\d+)", hook_name)
    return int(m.group(1)) if m else None


def save_sae(sae: SAE, path: str | Path, *, sparsity: torch.Tensor | None = None) -> Path:
    """Write ``sae`` to directory ``path`` in the SAELens v6 layout.

    Args:
        sae: the SAE (its weights must already be on the raw activation scale; see
            :meth:`SAE.fold_input_scale_`).
        path: output directory (created).
        sparsity: optional ``(d_sae,)`` latent firing densities in [0, 1]; saved as log10.

    Returns:
        The directory path. Files are written atomically; ``cfg.json`` last.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    act = sae.activation
    tensors = {
        "W_enc": sae.W_enc.detach(),
        "b_enc": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    architecture = act.saelens_architecture
    if cfg.activation == "jumprelu":
        tensors["threshold"] = act.threshold.detach()
    elif isinstance(act, BatchTopK):  # batchtopk and matryoshka_batchtopk
        if act.threshold >= 0:
            tensors["threshold"] = act.threshold.detach().expand(cfg.d_sae)
        else:  # no inference threshold estimated yet: not expressible as JumpReLU
            architecture = "batchtopk"
    tensors.update({f"encoder.{k}": v.detach() for k, v in sae.encoder.state_dict().items()})
    tensors = {k: v.to(torch.float32).contiguous().cpu() for k, v in tensors.items()}
    st_meta = {"model_name": cfg.model_name, "hook_name": cfg.hook_name, "format": "pt"}
    atomic_write(path / WEIGHTS_FILENAME, lambda p: save_file(tensors, str(p), metadata=st_meta))
    if sparsity is not None:
        log10 = torch.log10(sparsity.detach().float().cpu().clamp_min(1e-10))
        atomic_write(path / SPARSITY_FILENAME, lambda p: save_file({"sparsity": log10}, str(p)))
    meta = {
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "hook_layer": _hook_layer(cfg.hook_name),
        "hook_head_index": None,
        "context_size": cfg.context_size,
        "prepend_bos": cfg.prepend_bos,
        "exclude_special_tokens": True,
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": f"saelab-{_saelab_version()}",
    }
    doc = {
        "architecture": architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        **({"k": cfg.k, "rescale_acts_by_decoder_norm": False} if architecture == "topk" else {}),
        # legacy (SAELens v5) top-level copies, ignored by v6 loaders but read by older tools:
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "hook_layer": meta["hook_layer"],
        "context_size": cfg.context_size,
        "saelens_compatible": sae.encoder.saelens_note is None,
        **({"saelens_note": sae.encoder.saelens_note} if sae.encoder.saelens_note else {}),
        "saelab": {
            "format_version": FORMAT_VERSION, "version": _saelab_version(), "config": cfg.to_dict(),
            "encoder_stats": sae.encoder.scale_stats(),
        },
    }
    write_json(path / CFG_FILENAME, doc)
    return path


_FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}


def load_sae(path: str | Path, *, device: str = "cpu") -> SAE:
    """Load an SAE saved by :func:`save_sae` (or a plain SAELens standard/topk/jumprelu SAE).

    Args:
        path: the SAE directory.
        device: where to put the weights.

    Returns:
        The SAE in eval mode.

    Raises:
        FileNotFoundError: missing directory, ``cfg.json`` or weights (names the file).
        ValueError: unknown architecture, tensors whose shapes disagree with ``cfg.json``, missing ``encoder.*``
            tensors, or ``encoder.*`` tensors that ``cfg.json``'s encoder does not have (e.g. a cosine SAE whose
            ``saelab`` block was removed, which would otherwise load as an inner-product SAE).
    """
    path = Path(path)
    for name in (CFG_FILENAME, WEIGHTS_FILENAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: is {path} an SAE directory written by saelab/SAELens?")
    doc = read_json(path / CFG_FILENAME)
    if "saelab" in doc:
        cfg = SAEConfig.from_dict(doc["saelab"]["config"])
    else:
        arch = doc.get("architecture")
        if arch not in _FROM_SAELENS:
            raise ValueError(f"{path / CFG_FILENAME}: unsupported architecture {arch!r}; supported: {', '.join(_FROM_SAELENS)}")
        meta = doc.get("metadata") or doc.get("meta") or {}
        cfg = SAEConfig(
            d_in=doc["d_in"], d_sae=doc["d_sae"], activation=_FROM_SAELENS[arch], k=int(doc.get("k") or 1),
            model_name=meta.get("model_name") or doc.get("model_name") or "",
            hook_name=meta.get("hook_name") or doc.get("hook_name") or "",
            context_size=meta.get("context_size") or doc.get("context_size") or 128,
        )
    tensors = load_file(str(path / WEIGHTS_FILENAME))
    sae = SAE(cfg)
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
    with torch.no_grad():
        for name, shape in expected.items():
            if name not in tensors:
                raise ValueError(f"{path / WEIGHTS_FILENAME} lacks tensor {name!r}")
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"{path / WEIGHTS_FILENAME}: {name} has shape {tuple(tensors[name].shape)}, cfg.json implies {shape}")
            getattr(sae, name).copy_(tensors[name])
        enc_state = sae.encoder.state_dict()
        stray = sorted(k for k in tensors if k.startswith("encoder.") and k[len("encoder."):] not in enc_state)
        if stray:
            raise ValueError(f"{path / WEIGHTS_FILENAME} holds {stray}, which encoder {cfg.encoder!r} does not have")
        for name, param in enc_state.items():
            key = f"encoder.{name}"
            if key not in tensors:
                raise ValueError(f"{path / WEIGHTS_FILENAME} lacks tensor {key!r} (encoder {cfg.encoder!r})")
            if tensors[key].shape != param.shape:
                raise ValueError(f"{path / WEIGHTS_FILENAME}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(param.shape)}")
            param.copy_(tensors[key])
        if cfg.activation == "jumprelu":
            sae.activation.log_threshold.copy_(tensors["threshold"].clamp_min(1e-12).log())
        elif isinstance(sae.activation, BatchTopK) and "threshold" in tensors:
            sae.activation.threshold.copy_(tensors["threshold"].flatten()[0])
    return sae.to(device).eval()
