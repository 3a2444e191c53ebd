"""Held-out eval tokens at an SAE's hook, shared by the cosine-paper diagnostics and auto-interp.

Source: Naihin & Stambler 2026, "Size Doesn't Matter: Cosine-Scored Sparse Autoencoders", arXiv 2606.15054
(code github ``SilenNaihin/cosine-scored-saes``). The suites that read these tokens:
:mod:`saelab.evals.norm_quartiles`, :mod:`saelab.evals.feature_matching`, :mod:`saelab.evals.cos_inner`, and
:mod:`saelab.evals.autointerp`.

Eval tokens (shared by the three diagnostics suites and auto-interp)
    Held-out documents of ``cfg.data`` (the split the harvest never trains on), shuffled by ``cfg.seed`` and
    packed into contexts by :func:`~saelab.data.split.iter_contexts` exactly as the core eval does.
    Position 0 (the prefix token, an attention sink of norm ~25,000 from layer 12 on in SmolLM2) and special
    tokens are always dropped. Norm outliers (norm > ``max_norm_multiple`` x the median of their forward batch,
    :func:`~saelab.data.split.select_rows`) are dropped by default (10, as in training, so the SAEs are
    evaluated on the distribution they were trained on); ``--max_norm_multiple 0`` keeps them, which is the
    setting of the authors' ``exp58c`` except that position 0 stays excluded. The activations are cached by
    :class:`~saelab.evals.base.LMActivationStore` *before* the outlier filter (with each row's batch median
    norm), so every filter setting, every suite and every SAE of the same model/hook reuse one LM pass.

Pure tensor function (unit-tested on constructed data): :func:`padded_code`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ..data.split import DataConfig, iter_contexts, select_rows, split_documents
from ..models.hooks import capture, resolve_hook
from ..models.lm import LoadedLM
from ..codes import Code
from ..sae.model import SAE
from .base import EvalConfig, EvalResult, LMActivationStore

PAPER = "Naihin & Stambler 2026, arXiv 2606.15054"


@dataclass
class DiagnosticsConfig(EvalConfig):
    """Settings shared by the cosine-paper diagnostics (held-out eval tokens at the SAE's hook)."""

    n_tokens: int = 32_768
    """Held-out eval tokens to collect (after dropping position 0 and special tokens, before the outlier filter)."""
    context_size: int = 128
    """Tokens per eval context, including the prefix token at position 0 (as the core eval)."""
    batch_size: int = 8
    """LM sequences per forward pass, as in every suite; here each sequence is one eval context (the outlier
    filter uses each batch's median norm)."""
    max_norm_multiple: float = 10.0
    """Drop eval tokens whose norm exceeds this multiple of their batch's median, as in training (0 keeps them,
    as the authors' ``exp58c``; position 0 is always dropped)."""
    seed: int = 1
    """Seed of the held-out document order (the core eval's default)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text and split; must match the harvest's so the held-out documents were never trained on."""


@dataclass
class EvalTokens:
    """Held-out eval token activations at one hook.

    Attributes:
        x: ``(N, d_in)`` float32 activations (raw scale).
        token_ids: ``(N,)`` token ids.
        context: ``(N,)`` index of the context in the held-out stream.
        position: ``(N,)`` position in the context (>= 1).
        batch_median_norm: ``(N,)`` median norm of the kept tokens of the row's forward batch (outlier filter).
    """

    x: Tensor
    token_ids: Tensor
    context: Tensor
    position: Tensor
    batch_median_norm: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def keep_mask(self, max_norm_multiple: float | None) -> Tensor:
        """``(N,)`` bool: rows passing :func:`select_rows`' outlier filter (all rows if the multiple is 0/None)."""
        if not max_norm_multiple:
            return torch.ones(len(self), dtype=torch.bool, device=self.x.device)
        return self.x.norm(dim=-1) <= max_norm_multiple * self.batch_median_norm

    def select(self, mask: Tensor) -> EvalTokens:
        """The rows where ``mask`` is true."""
        return EvalTokens(self.x[mask], self.token_ids[mask], self.context[mask], self.position[mask],
                          self.batch_median_norm[mask])


def eval_token_activations(lm: LoadedLM, hook_name: str, store: LMActivationStore, *, n_tokens: int = 32_768,
                           context_size: int = 128, batch_size: int = 8, seed: int = 1,
                           data: DataConfig | None = None, progress: bool = False) -> EvalTokens:
    """Held-out token activations at ``hook_name``, computed once and cached in ``store``.

    The text is the core eval's: held-out documents of ``data`` shuffled by ``seed``, packed by
    :func:`iter_contexts`. Position 0 and special tokens are dropped (:func:`select_rows` without its norm
    filter); the norm filter is applied by the caller through :meth:`EvalTokens.keep_mask`, from the stored
    per-row batch median, which reproduces ``select_rows(..., max_norm_multiple)`` exactly.

    Cost: one early-stopped forward per ``batch_size`` contexts (the dominant cost on CPU);
    ``n_tokens * d_in * 4`` bytes on disk (75 MB at the defaults).

    Args:
        lm: the model; hook_name: the hook (any name :func:`resolve_hook` accepts).
        store: the activation cache (keyed by model and hook).
        n_tokens: rows to collect (fewer if the held-out text runs out).
        context_size, batch_size, seed, data: see :class:`DiagnosticsConfig`.
        progress: show a progress bar on a cache miss.

    Returns:
        :class:`EvalTokens`.

    Raises:
        ValueError: no held-out documents, or they yield no token.
    """
    data = data or DataConfig()
    hook = resolve_hook(lm.model, hook_name)
    special = lm.special_ids
    spec = {"v": 1, "n_tokens": n_tokens, "context_size": context_size, "batch_size": batch_size, "seed": seed,
            "data": asdict(data), "prefix_id": lm.prefix_id, "special_ids": sorted(special),
            "module_path": hook.module_path, "dtype": str(next(lm.model.parameters()).dtype)}

    @torch.no_grad()
    def compute() -> dict[str, Tensor]:
        _, held_out = split_documents(data)
        if len(held_out) == 0:
            raise ValueError("no held-out documents: raise data.eval_fraction")
        contexts = iter_contexts(lm, held_out.shuffle(seed), context_size)
        rows: dict[str, list[Tensor]] = {k: [] for k in ("x", "token_ids", "context", "position", "batch_median_norm")}
        n, ctx0 = 0, 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc=f"eval tokens {hook.hook_name}",
                       dynamic_ncols=True)
        while n < n_tokens:
            chunk = [c for _, c in zip(range(batch_size), contexts)]
            if not chunk:
                break
            ids = torch.stack([c[0] for c in chunk]).to(lm.model.device)
            h = capture(lm.model, hook, ids)
            keep = select_rows(h, ids, special, None)
            if not keep.any():
                ctx0 += len(chunk)
                continue
            norms = h.norm(dim=-1)
            med = norms[keep].median()
            b, t = keep.nonzero(as_tuple=True)
            rows["x"].append(h[keep].float().cpu())
            rows["token_ids"].append(ids[keep].cpu())
            rows["context"].append((b + ctx0).cpu())
            rows["position"].append(t.cpu())
            rows["batch_median_norm"].append(med.float().expand(len(b)).cpu())
            n += len(b)
            ctx0 += len(chunk)
            if bar is not None:
                bar.update(len(b))
        if bar is not None:
            bar.close()
        if n == 0:
            raise ValueError("the held-out documents produced no eval token")
        if n < n_tokens:
            warnings.warn(f"the held-out documents gave only {n} eval tokens (< n_tokens={n_tokens})", stacklevel=2)
        return {k: torch.cat(v)[:n_tokens] for k, v in rows.items()}

    t = store.get("diagnostics_tokens", spec, compute)
    return EvalTokens(t["x"], t["token_ids"], t["context"], t["position"], t["batch_median_norm"])


def eval_tokens(sae: SAE, lm: LoadedLM, cfg, store: LMActivationStore | None,
                result: EvalResult) -> tuple[EvalTokens, LMActivationStore]:
    """All cached held-out eval tokens at the SAE's hook, unfiltered (stage ``lm_activations``); ``cfg`` is any
    config with the eval-token fields of :class:`DiagnosticsConfig`.

    Raises:
        ValueError: the hook's width is not the SAE's ``d_in``.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store = store or LMActivationStore(lm.name, sae.cfg.hook_name)
    with result.timed("lm_activations"):
        tokens = eval_token_activations(lm, sae.cfg.hook_name, store, n_tokens=cfg.n_tokens,
                                        context_size=cfg.context_size, batch_size=cfg.batch_size, seed=cfg.seed,
                                        data=cfg.data, progress=cfg.progress)
        if tokens.x.shape[1] != sae.cfg.d_in:
            raise ValueError(f"SAE d_in={sae.cfg.d_in} but hook {sae.cfg.hook_name} has width {tokens.x.shape[1]}")
    return tokens, store


def load_tokens(sae: SAE, lm: LoadedLM, cfg: DiagnosticsConfig, store: LMActivationStore | None,
                result: EvalResult) -> tuple[EvalTokens, int, LMActivationStore]:
    """Eval tokens at the SAE's hook, outlier-filtered per ``cfg`` (stage ``lm_activations``)."""
    tokens, store = eval_tokens(sae, lm, cfg, store, result)
    with result.timed("lm_activations"):
        keep = tokens.keep_mask(cfg.max_norm_multiple)
        n_out = int((~keep).sum())
        tokens = tokens.select(keep) if n_out else tokens
    return tokens, n_out, store


@torch.no_grad()
def encode_chunks(sae: SAE, x: Tensor, batch: int,
                  decode: bool = True) -> Iterator[tuple[int, Tensor, Code, Tensor | None]]:
    """Yield ``(start, x_chunk, code, x_hat_chunk or None)`` over ``x (N, d_in)`` (:meth:`SAE.encode_code`)."""
    sae.eval()
    for s in range(0, x.shape[0], batch):
        xb = x[s : s + batch].to(sae.device, sae.dtype)
        code, _ = sae.encode_code(xb)
        yield s, xb, code, sae.decode_code(code) if decode else None


def padded_code(code: Tensor | Code) -> tuple[Tensor, Tensor]:
    """Every non-zero code of each token as ``(indices (n, k) int64, values (n, k) float32)``, on the code's device.

    ``k`` is the largest number of non-zero codes of any token; tokens with fewer are padded with zero values
    (at arbitrary indices, harmless in sums). A sparse :class:`Code` (TopK: ``indices`` set) is returned as is.
    A dense code costs one read of ``k`` to the host (the shape of the result depends on it).

    Args:
        code: a dense ``(n, d_sae)`` tensor, or a :class:`Code` (dense or sparse).
    """
    if isinstance(code, Code) and code.indices is not None:
        return code.indices.long(), code.values.float()
    f = (code.values if isinstance(code, Code) else code).float()
    k = int((f != 0).sum(1).max()) if f.numel() else 0
    idx = f.abs().topk(k, dim=1).indices
    return idx, f.gather(1, idx)


__all__ = [
    "DiagnosticsConfig", "EvalTokens", "encode_chunks", "eval_token_activations", "eval_tokens", "load_tokens",
    "padded_code",
]
