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

Transcoders follow SAELens's transcoder layout (``sae_lens/saes/transcoder.py``: ``Transcoder``,
``SkipTranscoder``, ``JumpReLUTranscoder``): ``W_dec (d_sae, d_out)``, ``b_dec (d_out)``, for skip-transcoders
``W_skip (d_out, d_in)`` (applied as ``x @ W_skip^T``, as SAELens and sparsify's ``skip_connection`` store it), and
top-level ``cfg.json`` keys ``d_out``, ``hook_name_out``, ``hook_layer_out``, ``hook_head_index_out`` with
``apply_b_dec_to_input: false`` (the input is not centred). The architecture is ``transcoder`` (ReLU),
``skip_transcoder`` (ReLU with skip) or ``jumprelu_transcoder`` (JumpReLU, BatchTopK with its threshold); any other
combination (TopK, JumpReLU/BatchTopK with skip, a cosine encoder) has no SAELens class and is saved with
``"saelens_compatible": false`` and a ``saelens_note``: saelab-only. Regularizers (C²R, OrtSAE) change only
training, so a linear C²R transcoder loads like any other; a cosine-scored one is saelab-only.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_write, write_json
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
    note = sae.encoder.saelens_note
    if cfg.skip:
        tensors["W_skip"] = sae.W_skip.detach()
    if cfg.transcoder:
        architecture, tc_note = _transcoder_layout(sae, architecture)
        note = "; ".join(n for n in (note, tc_note) if n) or None
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
        "apply_b_dec_to_input": not cfg.transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        **({"k": cfg.k, "rescale_acts_by_decoder_norm": False} if act.saelens_architecture == "topk" else {}),
        **({"d_out": cfg.out_dim, "hook_name_out": cfg.hook_name_out, "hook_layer_out": _hook_layer(cfg.hook_name_out),
            "hook_head_index_out": None} if cfg.transcoder else {}),
        # legacy (SAELens v5) top-level copies, ignored by v6 loaders but read by older tools:
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "hook_layer": meta["hook_layer"],
        "context_size": cfg.context_size,
        "saelens_compatible": note is None,
        **({"saelens_note": note} if note else {}),
        "saelab": {
            "format_version": FORMAT_VERSION, "version": _saelab_version(), "config": cfg.to_dict(),
            "encoder_stats": sae.encoder.scale_stats(),
        },
    }
    write_json(path / CFG_FILENAME, doc)
    return path


_TRANSCODER_ARCH = {("standard", False): "transcoder", ("standard", True): "skip_transcoder",
                    ("jumprelu", False): "jumprelu_transcoder"}
"""SAELens transcoder architectures by (SAE architecture, skip term)."""


def _transcoder_layout(sae: SAE, architecture: str) -> tuple[str, str | None]:
    """``(architecture, note)`` of a transcoder's ``cfg.json``: the SAELens transcoder class it maps to and, where
    there is none, a note saying why it is saelab-only (None when SAELens can load it)."""
    arch = _TRANSCODER_ARCH.get((architecture, sae.cfg.skip))
    if arch is not None:
        return arch, None
    kind = "skip-transcoder" if sae.cfg.skip else "transcoder"
    return f"{architecture}_{kind.replace('-', '_')}", (
        f"a {architecture} {kind}: SAELens has transcoder classes only for transcoder (ReLU), skip_transcoder (ReLU "
        "with W_skip) and jumprelu_transcoder; this one loads with saelab only")


_SAELENS_TRANSCODERS = {"transcoder": "standard", "skip_transcoder": "standard", "jumprelu_transcoder": "jumprelu"}
"""SAELens transcoder architectures (read without a ``saelab`` block) by the SAE architecture they extend."""

_FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}

NOT_AN_SAE_DIR = "this is not an SAE directory: pass the folder holding cfg.json and sae_weights.safetensors"
"""The fix named when the path given to :func:`load_sae` is not an SAE directory."""
RESAVE = "re-save or re-train the SAE"
"""The fix named when an SAE directory's files are damaged."""


class SAELoadError(ValueError):
    """An SAE directory that cannot be loaded, as ONE line ``"<file>: <what is wrong>; <fix>"``.

    A ``ValueError``, so the ``saelab`` CLI prints it as one ``saelab: error:`` line and exits non-zero.

    Attributes:
        file: the file (or directory) at fault.
        problem: what is wrong with it.
        fix: what to do.
    """

    def __init__(self, file: str | Path, problem: str, fix: str) -> None:
        self.file, self.problem, self.fix = Path(file), problem, fix
        super().__init__(f"{file}: {problem}; {fix}")


class SAEFileMissingError(SAELoadError, FileNotFoundError):
    """:class:`SAELoadError` for a missing directory or file; also a ``FileNotFoundError``, so callers that
    catch a missing file keep working."""


def _read_cfg_json(path: Path) -> dict:
    """The parsed ``cfg.json`` at ``path``. Raises :class:`SAELoadError` for an unreadable, malformed
    (position given) or non-object file."""
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise SAELoadError(path, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}; truncated?)", RESAVE) from e
    except (OSError, UnicodeDecodeError) as e:
        raise SAELoadError(path, f"cannot be read ({e})", RESAVE) from e
    if not isinstance(doc, dict):
        raise SAELoadError(path, f"holds a JSON {type(doc).__name__}, not an object", NOT_AN_SAE_DIR)
    return doc


def _config_from_doc(doc: dict, cfg_path: Path) -> SAEConfig:
    """The :class:`SAEConfig` a ``cfg.json`` describes: the ``saelab`` block when present, else the SAELens keys.

    Raises:
        SAELoadError: a missing or mistyped key, an unsupported SAELens architecture, or a value that
            :class:`SAEConfig` rejects (unknown encoder, ``k > d_sae``, ...).
    """
    made_by = f" (written by saelab {doc['saelab'].get('version')})" if isinstance(doc.get("saelab"), dict) else ""
    fix = f"fix the value in cfg.json, load it with the saelab version that wrote it{made_by}, or {RESAVE}"
    try:
        if "saelab" in doc:
            block = doc["saelab"]
            if not isinstance(block, dict) or not isinstance(block.get("config"), dict):
                raise SAELoadError(cfg_path, "its 'saelab' block lacks a 'config' object", RESAVE)
            return SAEConfig.from_dict(block["config"])
        arch = doc.get("architecture")
        tc = {"d_out": doc["d_out"], "transcoder": True, "skip": arch == "skip_transcoder",
              "hook_name_out": doc.get("hook_name_out") or ""} if arch in _SAELENS_TRANSCODERS else {}
        arch = _SAELENS_TRANSCODERS.get(arch, arch)
        if arch not in _FROM_SAELENS:
            raise SAELoadError(cfg_path, f"unsupported architecture {arch!r}",
                               f"supported: {', '.join(_FROM_SAELENS)} (or a cfg.json written by saelab)")
        meta = doc.get("metadata") or doc.get("meta") or {}
        return SAEConfig(
            d_in=doc["d_in"], d_sae=doc["d_sae"], activation=_FROM_SAELENS[arch], k=int(doc.get("k") or 1),
            model_name=meta.get("model_name") or doc.get("model_name") or "",
            hook_name=meta.get("hook_name") or doc.get("hook_name") or "",
            context_size=meta.get("context_size") or doc.get("context_size") or 128, **tc,
        )
    except KeyError as e:
        raise SAELoadError(cfg_path, f"lacks the key {e.args[0]!r}", fix) from e
    except (TypeError, ValueError) as e:
        if isinstance(e, SAELoadError):
            raise
        raise SAELoadError(cfg_path, str(e), fix) from e


def _build_sae(cfg: SAEConfig, cfg_path: Path, version: object) -> SAE:
    """``SAE(cfg)``, with an unknown activation/encoder name or a rejected value reported against ``cfg.json``.

    Raises:
        SAELoadError: the registries do not know the names (``KeyError``, listing the valid ones) or the SAE
            rejects the config.
    """
    try:
        return SAE(cfg)
    except (KeyError, ValueError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        made_by = f" (written by saelab {version})" if version else ""
        raise SAELoadError(cfg_path, str(msg), f"fix the name in cfg.json or load it with the saelab version that "
                                               f"wrote it{made_by}") from e


def load_sae(path: str | Path, *, device: str = "cpu") -> SAE:
    """Load an SAE saved by :func:`save_sae` (or a plain SAELens standard/topk/jumprelu SAE).

    Every damaged, missing or malformed input is reported as ONE line ``"<file>: <what is wrong>; <fix>"``.

    Args:
        path: the SAE directory.
        device: where to put the weights (a device name or ``torch.device``).

    Returns:
        The SAE in eval mode, weights ``W_enc (d_in, d_sae)``, ``b_enc (d_sae)``, ``W_dec (d_sae, d_in)``,
        ``b_dec (d_in)`` (plus ``threshold (d_sae)`` and ``encoder.*``) as stored.

    Raises:
        SAEFileMissingError: (an :class:`SAELoadError` and a ``FileNotFoundError``) missing directory,
            ``cfg.json`` or ``sae_weights.safetensors``.
        SAELoadError: (a ``ValueError``) ``path`` is a file; ``cfg.json`` unreadable, not valid JSON (with the
            position), lacking a key, or naming an unknown architecture / activation / encoder; the safetensors
            file truncated or unreadable; a missing tensor; a tensor whose shape disagrees with ``cfg.json``'s
            ``d_in``/``d_sae``; ``encoder.*`` tensors that ``cfg.json``'s encoder does not have (e.g. a cosine SAE
            whose ``saelab`` block was removed, which would otherwise load as an inner-product SAE).
    """
    path = Path(path)
    if not path.exists():
        raise SAEFileMissingError(path, "no such directory",
                                  "check the path: pass the folder holding cfg.json and sae_weights.safetensors")
    if not path.is_dir():
        raise SAELoadError(path, "is a file, not a directory", NOT_AN_SAE_DIR)
    cfg_path, w_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    if not cfg_path.is_file():
        raise SAEFileMissingError(cfg_path, "not found", NOT_AN_SAE_DIR)
    if not w_path.is_file():
        raise SAEFileMissingError(w_path, f"not found next to {CFG_FILENAME}", RESAVE)
    doc = _read_cfg_json(cfg_path)
    cfg = _config_from_doc(doc, cfg_path)
    version = doc["saelab"].get("version") if isinstance(doc.get("saelab"), dict) else None
    with torch.device("cpu"):  # built on the CPU, filled from the file there, then moved once to ``device``
        sae = _build_sae(cfg, cfg_path, version)
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (no ValueError) or OSError
        raise SAELoadError(w_path, f"truncated or unreadable safetensors file ({w_path.stat().st_size} bytes: {e})",
                           RESAVE) from e
    held = ", ".join(sorted(tensors)) or "none"
    shape_fix = f"{RESAVE}, or fix d_in/d_sae in {CFG_FILENAME}"
    d_out = cfg.out_dim
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, d_out), "b_dec": (d_out,)}
    if cfg.skip:
        expected["W_skip"] = (d_out, cfg.d_in)
    if cfg.activation == "jumprelu":
        expected["threshold"] = (cfg.d_sae,)
    with torch.no_grad():
        for name, shape in expected.items():
            if name not in tensors:
                raise SAELoadError(w_path, f"lacks tensor {name!r} (holds: {held})", RESAVE)
            if tuple(tensors[name].shape) != shape:
                widths = f"d_in={cfg.d_in}, d_sae={cfg.d_sae}" + (f", d_out={d_out}" if cfg.transcoder else "")
                raise SAELoadError(w_path, f"{name} has shape {tuple(tensors[name].shape)}, but {CFG_FILENAME} "
                                           f"({widths}) implies {shape}", shape_fix)
            if name != "threshold":
                getattr(sae, name).copy_(tensors[name])
        enc_state = sae.encoder.state_dict()
        stray = sorted(k for k in tensors if k.startswith("encoder.") and k[len("encoder."):] not in enc_state)
        if stray:
            raise SAELoadError(w_path, f"holds {stray}, which encoder {cfg.encoder!r} does not have",
                               f"restore the 'saelab' block of {CFG_FILENAME} (it names the encoder), or {RESAVE}")
        for name, param in enc_state.items():
            key = f"encoder.{name}"
            if key not in tensors:
                raise SAELoadError(w_path, f"lacks tensor {key!r} (encoder {cfg.encoder!r}; holds: {held})", RESAVE)
            if tensors[key].shape != param.shape:
                raise SAELoadError(w_path, f"{key} has shape {tuple(tensors[key].shape)}, expected {tuple(param.shape)}",
                                   shape_fix)
            param.copy_(tensors[key])
        if cfg.activation == "jumprelu":
            sae.activation.log_threshold.copy_(tensors["threshold"].clamp_min(1e-12).log())
        elif isinstance(sae.activation, BatchTopK) and "threshold" in tensors:
            if tensors["threshold"].numel() == 0:
                raise SAELoadError(w_path, "tensor 'threshold' is empty", RESAVE)
            sae.activation.threshold.copy_(tensors["threshold"].flatten()[0])
    return sae.to(device).eval()
