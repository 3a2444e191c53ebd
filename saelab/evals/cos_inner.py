"""The cos > inner win rate of the cosine-scored-SAE paper: decoder-direction ablations, KL vs cos and inner.

Source: Naihin & Stambler 2026, "Size Doesn't Matter: Cosine-Scored Sparse Autoencoders", arXiv 2606.15054
(code github ``SilenNaihin/cosine-scored-saes``).
Registered in :data:`saelab.evals.base.EVAL_SUITES`; the eval tokens come from :mod:`saelab.evals.eval_tokens`.

``cos_inner`` (paper Fig. 14/15; the authors' ``exp40`` ``evaluate_ablation``, also ``exp5`` and ``exp25``)
    For the N alive latents with the highest mean non-zero activation, and for each of M eval texts: a clean
    forward and a forward in which the hook output ``h`` is replaced by ``h - (h.d) d`` (``d`` the unit decoder
    row) at every position; ``KL(p_clean || p_ablated)`` of the next-token distribution at the text's last
    position; Pearson correlations across texts of KL with ``cos(x_last, d)`` and with ``<x_last, d>``. The latent
    is a "cos win" if ``corr(cos, KL) > corr(inner, KL)``. The authors' code compares the *signed* correlations;
    the Fig. 14 caption says "higher absolute correlation": both are reported. The paper: Qwen3-8B L9 ~44 %,
    L18 ~65 %, L27 ~78 %.

Pure tensor functions (unit-tested on constructed data): :func:`project_out`, :func:`pearson_rows`,
:func:`cos_inner_wins`, :func:`kl_divergence`, :func:`top_latents_by_mean_activation`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.split import DataConfig, iter_contexts, split_documents
from ..devices import deterministic_algorithms
from ..models.hooks import is_block_hook, replay, resolve_hook, splice
from ..models.lm import LoadedLM
from ..sae.model import SAE
from .base import EVAL_SUITES, EvalResult, LMActivationStore, Suite
from .eval_tokens import DiagnosticsConfig, encode_chunks, load_tokens, padded_code


@dataclass
class CosInnerConfig(DiagnosticsConfig):
    """cos > inner win rate of decoder-direction ablations (cosine paper Fig. 14/15)."""

    n_latents: int = 32
    """Latents evaluated: the alive ones with the highest mean non-zero activation on the eval tokens (paper: 100)."""
    n_texts: int = 16
    """Eval texts per latent (held-out contexts whose last token is not special; paper: 200)."""
    text_size: int = 128
    """Tokens per eval text, including the prefix token (paper: <= 2048)."""
    ablation_batch: int = 16
    """(latent, text) rows per ablated forward pass."""
    ablate_position0: bool = True
    """Project the direction out at position 0 (the attention sink) too, as the paper (all positions)."""
    fast_path: bool = True
    """Replay the cached clean hook output instead of recomputing the blocks before the hook (checked against
    the full forward on the first batch; falls back to it on any mismatch)."""
    keep_samples: bool = True
    """Include the per-(latent, text) KL / cos / inner / activation arrays in the result."""


@dataclass
class CosInnerResult(EvalResult):
    """Result of the ``cos_inner`` suite.

    Attributes:
        n_latents: latents evaluated; n_texts: texts per latent; text_size: tokens per text.
        win_rate_signed: fraction of latents with ``corr(cos, KL) > corr(inner, KL)`` (the authors' code).
        win_rate_abs: fraction with ``|corr(cos, KL)| > |corr(inner, KL)|`` (the Fig. 14 caption).
        n_undefined: latents where a correlation is undefined (constant KL, cos or inner): counted as losses,
            as the paper's ``wins / N`` does.
        latents: one row per latent: ``latent, mean_act`` (mean non-zero activation on the eval tokens, the
            selection score), ``corr_cos, corr_inner, win_signed, win_abs, mean_kl, max_kl, frac_active_last``
            (fraction of texts where the latent fires at the last position), ``sink_inner, sink_cos``
            (``<h_0, d>`` and ``cos(h_0, d)`` at position 0, the attention sink, which the ablation also edits
            when ``ablate_position0``).
        samples: ``{"kl", "cos", "inner", "act"}`` -> ``(n_latents, n_texts)`` lists, plus ``"x_norm"`` ->
            ``(n_texts,)`` ``||x_last||`` (empty if ``keep_samples`` is off).
        ablate_position0: whether position 0 was ablated too.
        sink_norm: ``||h_0||`` (the same for every text: position 0 sees only the prefix token).
        median_abs_sink_inner: median over the latents of ``|<h_0, d>|``, the size of the edit the ablation makes
            at position 0; compare with ``median_x_norm``, the median ``||x_last||``. When it is comparable or
            larger, the KL is driven by the sink edit rather than by the last token: rerun with
            ``--noablate_position0``.
        fast_path: whether the cached clean hook output was replayed (blocks before the hook skipped).
        fast_path_check: max |logit difference| between the replayed and full clean forward (None if not run).
        n_eval_tokens: eval tokens used to select the latents; n_alive: latents firing on them.
    """

    n_latents: int = 0
    n_texts: int = 0
    text_size: int = 0
    win_rate_signed: float = math.nan
    win_rate_abs: float = math.nan
    n_undefined: int = 0
    latents: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, list] = field(default_factory=dict)
    ablate_position0: bool = True
    sink_norm: float = math.nan
    median_abs_sink_inner: float = math.nan
    median_x_norm: float = math.nan
    fast_path: bool = False
    fast_path_check: float | None = None
    n_eval_tokens: int = 0
    n_alive: int = 0
    max_norm_multiple: float = 0.0


def project_out(h: Tensor, d: Tensor, start: int = 0) -> Tensor:
    """Remove the component along ``d`` from ``h``: ``h - (h . d_hat) d_hat``, ``d_hat = d / ||d||``.

    Args:
        h: ``(B, T, D)`` hook output (or ``(N, D)``).
        d: ``(D,)`` one direction, or ``(B, D)`` one per batch row (for ``(B, T, D)`` inputs).
        start: leave positions ``< start`` unchanged (1 = spare position 0; ``(B, T, D)`` inputs only).

    Returns:
        A new tensor of ``h``'s shape and dtype.
    """
    dh = F.normalize(d.to(h.dtype), dim=-1)
    if h.dim() == 3 and dh.dim() == 2:
        dh = dh[:, None, :]
    out = h - (h * dh).sum(-1, keepdim=True) * dh
    if start:
        out[:, :start] = h[:, :start]
    return out


def pearson_rows(a: Tensor, b: Tensor, rel_eps: float = 1e-9) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (along the last dim), float64.

    Rows where either side is constant (std <= ``rel_eps`` x its max |value|) give NaN.

    Args:
        a, b: ``(..., M)``.

    Returns:
        ``(...)`` correlations in [-1, 1] or NaN.
    """
    a, b = a.double(), b.double()
    da, db = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    sa, sb = da.pow(2).sum(-1).sqrt(), db.pow(2).sum(-1).sqrt()
    ok = (sa > rel_eps * a.abs().amax(-1).clamp_min(1e-300)) & (sb > rel_eps * b.abs().amax(-1).clamp_min(1e-300))
    r = (da * db).sum(-1) / (sa * sb).clamp_min(1e-300)
    return torch.where(ok, r.clamp(-1, 1), torch.full_like(r, math.nan))


def cos_inner_wins(cos: Tensor, inner: Tensor, kl: Tensor) -> dict[str, Any]:
    """The win rule of the authors' ``exp40`` ``evaluate_ablation`` on per-(latent, text) samples.

    Args:
        cos: ``(N, M)`` ``cos(x_last, d)``; inner: ``(N, M)`` ``<x_last, d>``; kl: ``(N, M)`` ablation KL.

    Returns:
        ``{"corr_cos": (N,), "corr_inner": (N,), "win_signed": (N,) bool, "win_abs": (N,) bool,
        "win_rate_signed": float, "win_rate_abs": float, "n_undefined": int}``. ``win_signed`` is
        ``corr(cos, KL) > corr(inner, KL)`` (the authors' code); ``win_abs`` compares absolute values (the
        Fig. 14 caption). A NaN correlation is never a win; rates are ``wins / N`` (the paper's).
    """
    cc, ci = pearson_rows(cos, kl), pearson_rows(inner, kl)
    win_s, win_a = cc > ci, cc.abs() > ci.abs()  # NaN compares False
    n = max(cos.shape[0], 1)
    return {"corr_cos": cc, "corr_inner": ci, "win_signed": win_s, "win_abs": win_a,
            "win_rate_signed": float(win_s.sum()) / n, "win_rate_abs": float(win_a.sum()) / n,
            "n_undefined": int((cc.isnan() | ci.isnan()).sum())}


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(p || q)`` per row of next-token logits ``(..., V)``, computed in float64 (nats)."""
    lp, lq = logits_p.double().log_softmax(-1), logits_q.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def top_latents_by_mean_activation(sum_act: Tensor, n_fire: Tensor, n: int, min_firings: int = 1) -> Tensor:
    """The ``n`` alive latents with the highest mean non-zero activation (the authors' ``exp40`` selection), best first.

    Args:
        sum_act: ``(d_sae,)`` sum of each latent's activations; n_fire: ``(d_sae,)`` tokens where it is > 0.
        n: how many (fewer if fewer are alive); min_firings: "alive" threshold.

    Returns:
        ``(<= n,)`` int64 latent ids.
    """
    alive = n_fire >= min_firings
    mean = sum_act.double() / n_fire.double().clamp_min(1)
    score = torch.where(alive, mean, torch.full_like(mean, -math.inf))
    k = min(n, int(alive.sum()))
    return score.topk(k).indices if k else torch.empty(0, dtype=torch.long, device=score.device)


def _last_logits(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token logits at the last position, ``(B, V)`` (``logits_to_keep=1`` where the model supports it)."""
    try:
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except TypeError:
        out = model(input_ids=ids, use_cache=False)
    return out.logits[:, -1]


def clean_texts(lm: LoadedLM, hook_name: str, store: LMActivationStore, *, n_texts: int, text_size: int,
                seed: int, data: DataConfig, batch_size: int = 16) -> dict[str, Tensor]:
    """The cos>inner eval texts and their clean forward, cached in ``store`` (SAE-independent).

    Texts are the first ``n_texts`` held-out contexts (core-eval packing, order ``seed``) whose last token is not
    special, so the predicted position is a real token. Cached size: ``n_texts * text_size * d_model * 4`` bytes
    for ``h`` (4.7 MB at 16 x 128 x 576) plus ``n_texts * vocab * 4`` for the logits.

    Returns:
        ``{"ids": (M, T) int64, "h": (M, T, D) float32 hook output, "logits_last": (M, V) float32,
        "as_tuple": () int64 (1 if the hooked block returns a tuple)}``.

    Raises:
        ValueError: fewer than 2 usable held-out texts.
    """
    hook = resolve_hook(lm.model, hook_name)
    spec = {"v": 1, "n_texts": n_texts, "text_size": text_size, "seed": seed, "data": asdict(data),
            "prefix_id": lm.prefix_id, "special_ids": sorted(lm.special_ids), "module_path": hook.module_path,
            "dtype": str(next(lm.model.parameters()).dtype)}

    @torch.no_grad()
    def compute() -> dict[str, Tensor]:
        _, held_out = split_documents(data)
        special = torch.tensor(sorted(lm.special_ids), dtype=torch.long, device="cpu")  # the contexts' device
        texts = []
        for ids, _ in iter_contexts(lm, held_out.shuffle(seed), text_size):
            if not bool(torch.isin(ids[-1:], special)):
                texts.append(ids)
            if len(texts) == n_texts:
                break
        if len(texts) < 2:
            raise ValueError(f"only {len(texts)} usable held-out texts of {text_size} tokens; need >= 2")
        ids = torch.stack(texts)
        hs, logits, kinds = [], [], []
        for s in range(0, len(ids), batch_size):
            b = ids[s : s + batch_size].to(lm.model.device)
            grabbed: dict[str, Tensor] = {}

            def grab(_m, _i, out):
                kinds.append(isinstance(out, tuple))
                grabbed["h"] = out[0] if isinstance(out, tuple) else out

            handle = hook.module.register_forward_hook(grab)
            try:
                logits.append(_last_logits(lm.model, b).float().cpu())
            finally:
                handle.remove()
            hs.append(grabbed["h"].float().cpu())
        return {"ids": ids, "h": torch.cat(hs), "logits_last": torch.cat(logits),
                "as_tuple": torch.tensor(int(any(kinds)), device="cpu")}

    return store.get("cos_inner_texts", spec, compute)


@torch.no_grad()
def run_cos_inner(sae: SAE, lm: LoadedLM, cfg: CosInnerConfig,
                  store: LMActivationStore | None = None) -> CosInnerResult:
    """The ``cos_inner`` suite (the authors' ``exp40`` ``evaluate_ablation``; see the module docstring).

    Cost: ``n_latents * n_texts`` ablated text forwards, batched ``ablation_batch`` rows per pass, plus one clean
    forward of the texts (cached). With ``fast_path`` and a block hook, the blocks up to the hook are skipped
    (the ablation only changes what comes after), roughly halving the cost at a middle layer.

    Stages: ``lm_activations`` (cached), ``select_latents`` (SAE encode of the eval tokens), ``clean_forward``
    (cached), ``ablated_forwards``, ``stats``.

    Raises:
        ValueError: width mismatch, no alive latent, or too few texts.
    """
    res = CosInnerResult(suite="cos_inner", sae=str(cfg.sae), n_texts=cfg.n_texts, text_size=cfg.text_size,
                         ablate_position0=cfg.ablate_position0, max_norm_multiple=float(cfg.max_norm_multiple or 0))
    tokens, _, store = load_tokens(sae, lm, cfg, store, res)
    res.n_eval_tokens = len(tokens)
    with res.timed("select_latents"):  # per-latent sums on the SAE's device, read once at the end
        sum_act = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=sae.device)
        n_fire = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=sae.device)
        for _s, _xb, code, _ in encode_chunks(sae, tokens.x, cfg.encode_batch_size, decode=False):
            idx, val = padded_code(code)
            # deterministic kernels on CUDA: float64 atomics would make the latent ranking's ties run-dependent
            with deterministic_algorithms(sae.device.type == "cuda"):
                sum_act.index_add_(0, idx.flatten(), val.double().flatten())
                n_fire.index_add_(0, idx.flatten(), (val > 0).double().flatten())
        res.n_alive = int((n_fire > 0).sum())
        latents = top_latents_by_mean_activation(sum_act, n_fire, cfg.n_latents)
        if len(latents) == 0:
            raise ValueError("no latent fires on the eval tokens")
    hook = resolve_hook(lm.model, sae.cfg.hook_name)
    with res.timed("clean_forward"):
        ct = clean_texts(lm, sae.cfg.hook_name, store, n_texts=cfg.n_texts, text_size=cfg.text_size, seed=cfg.seed,
                         data=cfg.data, batch_size=cfg.ablation_batch)
    ids, h_clean, logits_clean, as_tuple = ct["ids"], ct["h"], ct["logits_last"], bool(ct["as_tuple"])
    M, N = ids.shape[0], len(latents)
    res.n_latents, res.n_texts = N, M
    dev = lm.model.device
    latents = latents.cpu()
    dirs = F.normalize(sae.W_dec.detach()[latents.to(sae.device)].double().cpu(), dim=-1)  # (N, D) unit decoder rows
    x_last = h_clean[:, -1].double()  # (M, D)
    x_norm = x_last.norm(dim=-1)
    inner = dirs @ x_last.T  # (N, M)
    cos = inner / x_norm.clamp_min(1e-12)[None, :]
    acts = sae.encode(x_last.to(sae.device, sae.dtype))[:, latents.to(sae.device)].T.double().cpu()  # (N, M)
    h0 = h_clean[0, 0].double()
    res.sink_norm = float(h0.norm())
    sink_inner = dirs @ h0
    res.median_abs_sink_inner, res.median_x_norm = float(sink_inner.abs().median()), float(x_norm.median())
    start = 0 if cfg.ablate_position0 else 1
    model_dtype = next(lm.model.parameters()).dtype

    fast = cfg.fast_path and is_block_hook(lm.model, hook)
    with res.timed("ablated_forwards"):
        if fast:  # check the replay reproduces the clean forward on a first batch
            b = list(range(min(M, cfg.ablation_batch)))
            hb = h_clean[b].to(dev, model_dtype)
            with replay(lm.model, hook, hb, as_tuple):
                replayed = _last_logits(lm.model, ids[b].to(dev)).float().cpu()
            res.fast_path_check = float((replayed - logits_clean[b]).abs().max())
            scale = float(logits_clean[b].abs().max())
            fast = res.fast_path_check <= 1e-4 * max(scale, 1.0)
        res.fast_path = fast
        pairs = [(i, m) for i in range(N) for m in range(M)]
        kl = torch.zeros(N, M, dtype=torch.float64, device="cpu")
        clean_dev = logits_clean.to(dev)  # (M, V): the KL of each ablated batch is taken on the LM's device
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pairs), unit="fwd", desc="cos_inner ablations", dynamic_ncols=True)
        for s in range(0, len(pairs), cfg.ablation_batch):
            chunk = pairs[s : s + cfg.ablation_batch]
            li = torch.tensor([p[0] for p in chunk], device="cpu")  # indices into the CPU-side cached tensors
            ti = torch.tensor([p[1] for p in chunk], device="cpu")
            d_rows = dirs[li].to(dev, model_dtype)

            def ablate(hh: Tensor, d_rows: Tensor = d_rows) -> Tensor:
                return project_out(hh, d_rows, start)

            if fast:
                h_rows = h_clean[ti].to(dev, model_dtype)
                with replay(lm.model, hook, h_rows, as_tuple) as stub, splice(stub, ablate):
                    logits = _last_logits(lm.model, ids[ti].to(dev))
            else:
                with splice(hook, ablate):
                    logits = _last_logits(lm.model, ids[ti].to(dev))
            kl[li, ti] = kl_divergence(clean_dev[ti.to(dev)], logits.float()).cpu()
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    with res.timed("stats"):
        w = cos_inner_wins(cos, inner, kl)
        res.win_rate_signed, res.win_rate_abs = w["win_rate_signed"], w["win_rate_abs"]
        res.n_undefined = w["n_undefined"]
        mean_act = (sum_act[latents.to(sae.device)] / n_fire[latents.to(sae.device)]).cpu()
        for r in range(N):
            res.latents.append({
                "latent": int(latents[r]), "mean_act": float(mean_act[r]),
                "corr_cos": _f(w["corr_cos"][r]), "corr_inner": _f(w["corr_inner"][r]),
                "win_signed": bool(w["win_signed"][r]), "win_abs": bool(w["win_abs"][r]),
                "mean_kl": float(kl[r].mean()), "max_kl": float(kl[r].max()),
                "frac_active_last": float((acts[r] > 0).double().mean()),
                "sink_inner": float(sink_inner[r]), "sink_cos": float(sink_inner[r] / max(res.sink_norm, 1e-12)),
            })
        if cfg.keep_samples:
            res.samples = {"kl": kl.tolist(), "cos": cos.tolist(), "inner": inner.tolist(), "act": acts.tolist(),
                           "x_norm": x_norm.tolist()}
    return res


def _f(v: Tensor) -> float | None:
    """A float, or None for NaN (JSON has no NaN)."""
    v = float(v)
    return None if math.isnan(v) else v


EVAL_SUITES.register("cos_inner")(Suite(
    CosInnerConfig, run_cos_inner,
    help="cos > inner win rate of decoder-direction ablations (cosine paper, Fig. 14/15)"))


__all__ = [
    "CosInnerConfig", "CosInnerResult", "clean_texts", "cos_inner_wins", "kl_divergence", "pearson_rows",
    "project_out", "run_cos_inner", "top_latents_by_mean_activation",
]
