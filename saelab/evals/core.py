"""Core SAE evaluation on held-out text: reconstruction, sparsity, and downstream CE/KL with the SAE spliced in.

Definitions follow SAEBench ``evals/core/main.py`` (shared/reference/methods.md §4.3) except FVE, which is
pooled over all eval tokens, ``FVE = 1 - sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2`` (SAELens
PR #665 / SAEBench PR #61), not SAEBench's buggy ``explained_variance``.

* ``mse``: mean over tokens of ``||x - x_hat||^2`` (summed over d_in; independent of batch size).
* ``cossim``: mean ``cos(x, x_hat)``; ``l2_ratio``: mean ``||x_hat|| / ||x||``;
  ``relative_reconstruction_bias``: ``E||x_hat||^2 / E[x . x_hat]`` (1 = unbiased, < 1 = shrinkage).
* ``l0``: mean number of non-zero latents per token; ``l1``: mean sum of latent activations.
* ``dead_frac``: latents that never fire on the eval tokens; ``dense_frac_1pct`` / ``dense_frac_10pct``:
  latents firing on more than 1 % / 10 % of them.
* ``ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)`` and
  ``kl_score = (KL_zero - KL_sae) / KL_zero`` where ``_sae`` splices the reconstruction in at the hook and
  ``_zero`` zero-ablates it; KL is ``KL(p_clean || p_x)`` of the next-token distribution.

The SAE (and the ablation) replaces the hook output only at evaluated positions: position 0 (the attention
sink), special tokens and norm outliers keep their clean activations, and CE/KL are averaged over the next-
token predictions made at evaluated positions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..activations.harvest import DataConfig, iter_contexts, select_rows, split_documents
from ..io import write_json
from .base import EVAL_SUITES, EvalConfig, EvalResult, Suite
from ..models.hooks import resolve_hook, splice
from ..models.lm import LoadedLM, load_lm
from ..sae.model import SAE
from ..sae.saving import load_sae


@dataclass
class CoreEvalConfig(EvalConfig):
    """Core evaluation of one saved SAE."""

    n_tokens: int = 16_384
    """Evaluated (kept) tokens of held-out text."""
    context_size: int = 128
    """Tokens per eval context (SAEBench core uses 128)."""
    batch_size: int = 8
    """Contexts per forward pass."""
    max_norm_multiple: float = 10.0
    """Exclude tokens whose norm exceeds this multiple of the batch median, as in training (0 disables)."""
    ce_kl: bool = True
    """Compute the CE-loss and KL scores (3 full forward passes per batch)."""
    seed: int = 1
    """Seed of the held-out document order."""
    progress: bool = True
    """Show a progress bar."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text and split; must match the harvest's so the held-out documents were never trained on."""


@dataclass
class CoreMetrics(EvalResult):
    """Results of :func:`evaluate_core` (all means are over evaluated tokens)."""

    n_tokens: int
    fve: float
    mse: float
    cossim: float
    l2_ratio: float
    relative_reconstruction_bias: float
    l0: float
    l1: float
    dead_frac: float
    dense_frac_1pct: float
    dense_frac_10pct: float
    average_max_decoder_cosine_sim: float
    ce_clean: float | None = None
    ce_sae: float | None = None
    ce_zero: float | None = None
    ce_loss_score: float | None = None
    kl_sae: float | None = None
    kl_zero: float | None = None
    kl_score: float | None = None
    seconds: float = 0.0


class _Acc:
    """Float64 running sums for pooled metrics."""

    def __init__(self, d_in: int, d_sae: int) -> None:
        self.n = 0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_x2 = 0.0
        self.sum_err2 = 0.0
        self.sum_cos = self.sum_ratio = self.sum_xhat2 = self.sum_dot = 0.0
        self.sum_l0 = self.sum_l1 = 0.0
        self.fires = torch.zeros(d_sae, dtype=torch.float64)
        self.ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
        self.kl = {"sae": 0.0, "zero": 0.0}
        self.n_pred = 0

    def add_recon(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_x2 += float(x.pow(2).sum())
        self.sum_err2 += float((x - x_hat).pow(2).sum())
        xn, hn = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.sum_cos += float(F.cosine_similarity(x, x_hat, dim=-1).sum())
        self.sum_ratio += float((hn / xn.clamp_min(1e-12)).sum())
        self.sum_xhat2 += float(hn.pow(2).sum())
        self.sum_dot += float((x * x_hat).sum())
        active = f > 0
        self.sum_l0 += float(active.sum())
        self.sum_l1 += float(f.double().sum())
        self.fires += active.sum(0).double()


@torch.no_grad()
def average_max_decoder_cosine_sim(W_dec: torch.Tensor, chunk: int = 2048) -> float:
    """Mean over latents of the maximum cosine between its decoder row and any other row.

    Args:
        W_dec: ``(d_sae, d_in)``.

    Returns:
        A float in [-1, 1] (SAEBench core ``calculate_max_cosine_sim``).
    """
    W = F.normalize(W_dec.float(), dim=-1)
    maxes = []
    for s in range(0, W.shape[0], chunk):
        sims = W[s : s + chunk] @ W.T
        idx = torch.arange(s, min(s + chunk, W.shape[0]))
        sims[idx - s, idx] = -2.0
        maxes.append(sims.max(dim=-1).values)
    return float(torch.cat(maxes).mean())


def _ce_and_kl(logits: torch.Tensor, clean_logp: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    logp = logits.float().log_softmax(-1)
    ce = -logp.gather(-1, targets[..., None])[..., 0]
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
    return float(ce[mask].sum()), float(kl[mask].sum())


@torch.no_grad()
def evaluate_core(sae: SAE, lm: LoadedLM, cfg: CoreEvalConfig) -> CoreMetrics:
    """Evaluate ``sae`` at its hook on held-out documents.

    Args:
        sae: the SAE (raw activation scale).
        lm: the model it was trained on.
        cfg: evaluation settings; ``cfg.data`` selects the held-out split.

    Returns:
        :class:`CoreMetrics`.

    Raises:
        ValueError: the SAE's ``d_in`` differs from the hook's width, or there is no held-out text.
    """
    t0 = time.perf_counter()
    hook = resolve_hook(lm.model, sae.cfg.hook_name)
    _, held_out = split_documents(cfg.data)
    if len(held_out) == 0:
        raise ValueError("no held-out documents: raise data.eval_fraction")
    held_out = held_out.shuffle(cfg.seed)
    acc = _Acc(sae.cfg.d_in, sae.cfg.d_sae)
    contexts = iter_contexts(lm, held_out, cfg.context_size)
    special = lm.special_ids
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.n_tokens, unit="tok", unit_scale=True, desc="eval core", dynamic_ncols=True)
    sae.eval()
    while acc.n < cfg.n_tokens:
        chunk = [c for _, c in zip(range(cfg.batch_size), contexts)]
        if not chunk:
            break
        ids = torch.stack([c[0] for c in chunk]).to(lm.model.device)
        captured: dict[str, torch.Tensor] = {}

        def grab(h: torch.Tensor) -> torch.Tensor:
            captured["h"] = h
            return h

        with splice(hook, grab):
            clean_logits = lm.model(input_ids=ids, use_cache=False).logits if cfg.ce_kl else None
        if not cfg.ce_kl:
            from ..models.hooks import capture

            captured["h"] = capture(lm.model, hook, ids)
        h = captured["h"]
        if h.shape[-1] != sae.cfg.d_in:
            raise ValueError(f"SAE d_in={sae.cfg.d_in} but hook {hook.hook_name} has width {h.shape[-1]}")
        keep = select_rows(h, ids, special, cfg.max_norm_multiple)
        x = h[keep].float()
        f = sae.encode(x)
        x_hat = sae.decode(f, x_norm=sae.centered_norm(x))
        acc.add_recon(x, x_hat, f)
        if cfg.ce_kl:
            def put(values: torch.Tensor):
                def fn(hh: torch.Tensor) -> torch.Tensor:
                    hh = hh.clone()
                    hh[keep] = values.to(hh.dtype)
                    return hh
                return fn

            pred = keep[:, :-1]
            targets = ids[:, 1:]
            clean_logp = clean_logits[:, :-1].float().log_softmax(-1)
            ce_clean = -clean_logp.gather(-1, targets[..., None])[..., 0]
            acc.ce["clean"] += float(ce_clean[pred].sum())
            for name, values in (("sae", x_hat), ("zero", torch.zeros_like(x_hat))):
                with splice(hook, put(values)):
                    logits = lm.model(input_ids=ids, use_cache=False).logits[:, :-1]
                ce, kl = _ce_and_kl(logits, clean_logp, targets, pred)
                acc.ce[name] += ce
                acc.kl[name] += kl
            acc.n_pred += int(pred.sum())
        if bar is not None:
            bar.update(int(keep.sum()))
    if bar is not None:
        bar.close()
    if acc.n == 0:
        raise ValueError("no eval tokens were produced from the held-out documents")
    n = acc.n
    mean_x = acc.sum_x / n
    total_var = acc.sum_x2 - n * float(mean_x.pow(2).sum())
    density = acc.fires / n
    m = CoreMetrics(
        n_tokens=n,
        fve=1.0 - acc.sum_err2 / total_var,
        mse=acc.sum_err2 / n,
        cossim=acc.sum_cos / n,
        l2_ratio=acc.sum_ratio / n,
        relative_reconstruction_bias=acc.sum_xhat2 / acc.sum_dot,
        l0=acc.sum_l0 / n,
        l1=acc.sum_l1 / n,
        dead_frac=float((density == 0).double().mean()),
        dense_frac_1pct=float((density > 0.01).double().mean()),
        dense_frac_10pct=float((density > 0.10).double().mean()),
        average_max_decoder_cosine_sim=average_max_decoder_cosine_sim(sae.W_dec),
    )
    if cfg.ce_kl and acc.n_pred:
        p = acc.n_pred
        m.ce_clean, m.ce_sae, m.ce_zero = acc.ce["clean"] / p, acc.ce["sae"] / p, acc.ce["zero"] / p
        m.ce_loss_score = (m.ce_zero - m.ce_sae) / (m.ce_zero - m.ce_clean)
        m.kl_sae, m.kl_zero = acc.kl["sae"] / p, acc.kl["zero"] / p
        m.kl_score = (m.kl_zero - m.kl_sae) / m.kl_zero
    m.seconds = time.perf_counter() - t0
    m.suite, m.timings_s = "core", {"total": m.seconds}
    return m


def _run_core_suite(sae: SAE, lm: LoadedLM, cfg: CoreEvalConfig, store=None) -> CoreMetrics:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    m = evaluate_core(sae, lm, cfg)
    m.sae = str(cfg.sae)
    return m


EVAL_SUITES.register("core")(Suite(CoreEvalConfig, _run_core_suite, help="reconstruction, sparsity, CE/KL scores"))


def run_core_eval(cfg: CoreEvalConfig, lm: LoadedLM | None = None) -> CoreMetrics:
    """Load the SAE (and model) named by ``cfg``, evaluate, and write ``eval_core.json``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sae = load_sae(cfg.sae)
    lm = lm or load_lm(cfg.model or sae.cfg.model_name)
    metrics = evaluate_core(sae, lm, cfg)
    out = Path(cfg.out) if cfg.out else Path(cfg.sae) / "eval_core.json"
    write_json(out, {"sae": str(cfg.sae), "hook_name": sae.cfg.hook_name, "model": lm.name, "metrics": metrics.to_dict(), "config": asdict(cfg)})
    return metrics
