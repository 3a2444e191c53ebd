"""Core SAE evaluation on held-out text: reconstruction, sparsity, and downstream CE/KL with the SAE spliced in.

Definitions follow SAEBench ``evals/core/main.py`` except FVE, which is pooled over all eval tokens,
``FVE = 1 - sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2`` (SAELens PR #665 / SAEBench PR #61), not
SAEBench's ``explained_variance``.

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

**Shared LM work.** Only the spliced forward depends on the SAE, and only after the hook. :func:`core_lm_stage`
runs the clean and the zero-ablated forwards once per (model, hook, token set) and caches in
:class:`~saelab.evals.base.LMActivationStore`: the contexts, the hook output ``h`` at every position, the kept-token
mask, and per evaluated prediction ``CE_clean``, ``CE_zero``, ``KL_zero`` and the two clean-distribution statistics
that make ``KL_sae`` exact without the clean log-probs (``V`` floats per position): with a linear head
``z = W_U h + b`` and ``p = softmax(z_clean)``,

    ``KL(p || softmax(z)) = sum_v p_v log p_v - (h . (W_U^T p) + p . b) + logsumexp(z)``,

so the cache holds ``sum_v p_v log p_v``, ``u = W_U^T p`` (``d_model`` floats) and ``p . b``. Per SAE,
:func:`evaluate_core` then encodes the cached ``x``, replays ``h`` with ``x_hat`` at the kept positions through the
blocks after the hook only (:func:`saelab.models.hooks.replay`), and applies the head to the evaluated rows. Both
shortcuts are checked against the full forward on the first batch when the cache is built; a hook inside a block
runs the full spliced forward instead of the replay, and a head that is not ``W_U h + b`` (e.g. logit soft-capping)
falls back to the three-forward computation (``reuse_lm=False``), which is also the reference in the tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.split import DataConfig, iter_contexts, select_rows, split_documents
from ..devices import resolve_device
from ..io import write_json
from .base import EVAL_SUITES, EvalConfig, EvalResult, LMActivationStore, Suite
from ..models.hooks import HookPoint, base_model, capture, is_block_hook, replay, resolve_hook, splice, splice_transcoder
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
    """LM sequences per forward pass, as in every suite; here each sequence is one eval context."""
    max_norm_multiple: float = 10.0
    """Exclude tokens whose norm exceeds this multiple of the batch median, as in training (0 disables)."""
    ce_kl: bool = True
    """Compute the CE-loss and KL scores."""
    reuse_lm: bool = True
    """Cache the SAE-independent LM work (clean and zero-ablated forwards) and run only the blocks after the hook
    per SAE; False runs the three full forwards per batch for every SAE (the reference computation)."""
    seed: int = 1
    """Seed of the held-out document order."""
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


_SCALARS = ("sum_x2", "sum_err2", "sum_cos", "sum_ratio", "sum_xhat2", "sum_dot", "sum_l0", "sum_l1",
            "ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero")
"""The scalar running sums of :class:`_Acc` (one float64 slot each)."""


class _Acc:
    """Float64 running sums for pooled metrics, kept on ``device`` (the SAE's): adding a batch reads no value back
    to the host, and :meth:`totals` reads them all once at the end.

    Each slot is a float64 sum updated by ``+=`` of a float64 batch sum, so the result is the same as summing
    Python floats batch by batch.

    Args:
        d_in: width of ``x``; d_sae: number of latents; device: where the batches' tensors live.
    """

    def __init__(self, d_in: int, d_sae: int, device: torch.device | str = "cpu") -> None:
        self.n = 0
        self.n_pred = 0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.fires = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.sums = torch.zeros(len(_SCALARS), dtype=torch.float64, device=device)
        self.slot = {k: i for i, k in enumerate(_SCALARS)}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        """``sums[name] += value`` (a 0-d tensor on any device, or a float)."""
        i = self.slot[name]
        self.sums[i] += value.to(self.sums.device, torch.float64) if isinstance(value, torch.Tensor) else value

    def add_recon(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        """Add a batch: ``x``, ``x_hat`` ``(n, d_in)`` and the codes ``f`` ``(n, d_sae)``, on the sums' device."""
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        xn, hn = x.norm(dim=-1), x_hat.norm(dim=-1)
        active = f > 0
        batch = (x.pow(2).sum(), (x - x_hat).pow(2).sum(), F.cosine_similarity(x, x_hat, dim=-1).sum(),
                 (hn / xn.clamp_min(1e-12)).sum(), hn.pow(2).sum(), (x * x_hat).sum(), active.sum(), f.double().sum())
        self.sums[: len(batch)] += torch.stack([v.to(self.sums.device, torch.float64) for v in batch])
        self.fires += active.sum(0).double()

    def totals(self) -> dict[str, float]:
        """Every scalar sum as a Python float (one device-to-host copy)."""
        return dict(zip(_SCALARS, self.sums.tolist()))


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
        idx = torch.arange(s, min(s + chunk, W.shape[0]), device=W.device)
        sims[idx - s, idx] = -2.0
        maxes.append(sims.max(dim=-1).values)
    return float(torch.cat(maxes).mean())


def _ce_and_kl(logits: torch.Tensor, clean_logp: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    logp = logits.float().log_softmax(-1)
    ce = -logp.gather(-1, targets[..., None])[..., 0]
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
    return float(ce[mask].sum()), float(kl[mask].sum())


def clean_distribution_stats(logits_clean: Tensor, W_U: Tensor, b: Tensor | None = None,
                             targets: Tensor | None = None, chunk: int = 256) -> dict[str, Tensor]:
    """What ``CE`` and ``KL(p_clean || .)`` need of the clean next-token distribution when the head is linear.

    ``p = softmax(logits_clean)`` is formed in float64 (``chunk`` rows at a time): the float32 log-softmax's
    rounding, amplified by the cancellation in :func:`ce_kl_from_clean_stats`, would otherwise bias ``KL`` by
    ~1e-5 relative; ``u`` is then a float32 product of the rounded ``p`` (its error stays below 1e-7 relative).

    Args:
        logits_clean: ``(P, V)`` clean logits.
        W_U: ``(V, d_model)`` head weight; b: optional ``(V,)`` head bias.
        targets: optional ``(P,)`` next-token ids.
        chunk: rows per float64 block.

    Returns:
        ``{"neg_entropy": (P,) float64 sum_v p_v log p_v, "u": (P, d_model) W_U^T p in W_U's dtype,
        "p_dot_b": (P,) float64 p . b (0 without b)}``, plus ``"ce": (P,) float64 -log p_target`` with ``targets``;
        see :func:`ce_kl_from_clean_stats` for the identity that uses them.
    """
    parts: dict[str, list[Tensor]] = {}
    for s in range(0, logits_clean.shape[0], chunk):
        lp = logits_clean[s : s + chunk].double().log_softmax(-1)
        p = lp.exp()
        row = {"neg_entropy": (p * lp).sum(-1), "u": p.to(W_U.dtype) @ W_U,
               "p_dot_b": p @ b.double() if b is not None else torch.zeros(len(p), dtype=p.dtype, device=p.device)}
        if targets is not None:
            row["ce"] = -lp.gather(-1, targets[s : s + chunk, None])[:, 0]
        for k, v in row.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        d = W_U.shape[1]
        empty = torch.zeros(0, dtype=torch.float64, device=logits_clean.device)
        parts = {"neg_entropy": [empty], "u": [torch.zeros(0, d, dtype=W_U.dtype, device=W_U.device)],
                 "p_dot_b": [empty], **({"ce": [empty]} if targets is not None else {})}
    return {k: torch.cat(v) for k, v in parts.items()}


def ce_kl_from_clean_stats(hidden: Tensor, W_U: Tensor, b: Tensor | None, targets: Tensor,
                           stats: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy and ``KL(p_clean || q)`` of ``q = softmax(W_U hidden + b)`` without the clean logits.

    With ``z = W_U h + b`` and the clean distribution ``p``,
    ``KL(p || softmax(z)) = sum_v p_v log p_v - sum_v p_v z_v + logsumexp(z)`` and, the head being linear,
    ``sum_v p_v z_v = h . (W_U^T p) + p . b``: the clean side is summarised by
    :func:`clean_distribution_stats` exactly (up to float rounding), in ``d_model + 2`` numbers instead of ``V``.
    ``CE = logsumexp(z) - z_target``.

    Args:
        hidden: ``(P, d_model)`` final hidden states (after the final norm) of the edited forward.
        W_U: ``(V, d_model)``; b: ``(V,)`` or None.
        targets: ``(P,)`` next-token ids.
        stats: :func:`clean_distribution_stats` of the same rows.

    Returns:
        ``(ce, kl)``, each ``(P,)`` float64 nats.
    """
    z = F.linear(hidden.float(), W_U.float(), None if b is None else b.float())
    lse = z.logsumexp(-1).double()
    ce = lse - z.gather(-1, targets[:, None])[:, 0].double()
    dot = (hidden.double() * stats["u"].to(hidden.device).double()).sum(-1)
    kl = stats["neg_entropy"].to(hidden.device).double() - dot - stats["p_dot_b"].to(hidden.device).double() + lse
    return ce, kl


CORE_LM_VERSION = 1
"""Version of :func:`core_lm_stage`'s cached layout and rules; part of its cache key."""


def _eval_batches(lm: LoadedLM, cfg: CoreEvalConfig) -> Iterator[Tensor]:
    """``(B, T)`` id batches of the held-out contexts (order ``cfg.seed``), ``cfg.batch_size`` contexts each."""
    _, held_out = split_documents(cfg.data)
    if len(held_out) == 0:
        raise ValueError("no held-out documents: raise data.eval_fraction")
    contexts = iter_contexts(lm, held_out.shuffle(cfg.seed), cfg.context_size)
    while True:
        chunk = [c for _, c in zip(range(cfg.batch_size), contexts)]
        if not chunk:
            return
        yield torch.stack([c[0] for c in chunk])


def _linear_head(lm: LoadedLM) -> nn.Linear | None:
    head = lm.model.get_output_embeddings() if hasattr(lm.model, "get_output_embeddings") else None
    return head if isinstance(head, nn.Linear) else None


def _final_hidden(lm: LoadedLM, hook: HookPoint, ids: Tensor, h_new: Tensor, fast: bool, as_tuple: bool) -> Tensor:
    """``(B, T, d_model)`` final hidden state (after the final norm) with the hook output replaced by ``h_new``.

    ``fast``: replay ``h_new`` through the blocks after the hook only (:func:`replay`); else a full forward with
    :func:`splice`.
    """
    body = base_model(lm.model)
    if fast:
        with replay(lm.model, hook, h_new, as_tuple):
            return body(input_ids=ids, use_cache=False).last_hidden_state
    with splice(hook, lambda _h: h_new):
        return body(input_ids=ids, use_cache=False).last_hidden_state


def _close(a: Tensor, b: Tensor, rel: float = 1e-4) -> bool:
    return float((a.float() - b.float()).abs().max()) <= rel * max(float(b.float().abs().max()), 1.0)


@torch.no_grad()
def core_lm_stage(lm: LoadedLM, hook: HookPoint, cfg: CoreEvalConfig, store: LMActivationStore) -> dict[str, Tensor]:
    """The SAE-independent part of the core eval, computed once and cached in ``store`` (see the module doc).

    Runs the held-out batches exactly as the reference computation does (``cfg.batch_size`` contexts per forward
    until ``cfg.n_tokens`` kept tokens), with the clean forward and, with ``cfg.ce_kl``, the zero-ablated one.

    Args:
        lm: the model; hook: the SAE's hook point; cfg: the token set (n_tokens, context_size, batch_size, seed,
            data, max_norm_multiple) and ``ce_kl``; store: the cache (keyed by model and hook).

    Returns:
        ``{"ids": (C, T) int64 contexts, "h": (C, T, d_model) float32 hook output, "keep": (C, T) bool kept tokens,
        "batch_ends": (n_batches,) int64 cumulative contexts per forward batch}`` and with ``ce_kl``, per evaluated
        prediction (``keep[:, :-1]`` in row-major order, P rows): ``"ce_clean"``, ``"ce_zero"``, ``"kl_zero"``,
        ``"neg_entropy"`` (``sum_v p_v log p_v``), ``"p_dot_b"`` (``p . b``), all ``(P,)`` float64 nats,
        ``"u"`` ``(P, d_model)`` float32 (``W_U^T p``), and ``"flags"`` ``(3,)`` int64: the replay reproduces the
        clean forward, the head is ``W_U h + b``, the blocks return tuples. When the head check fails on the first
        batch only ``"flags"`` is returned (the per-SAE shortcut does not apply).

    Raises:
        ValueError: no held-out documents, or they give no eval token.
    """
    special = lm.special_ids
    spec = {"v": CORE_LM_VERSION, "n_tokens": cfg.n_tokens, "context_size": cfg.context_size,
            "batch_size": cfg.batch_size, "max_norm_multiple": cfg.max_norm_multiple, "seed": cfg.seed,
            "data": asdict(cfg.data), "ce_kl": cfg.ce_kl, "prefix_id": lm.prefix_id, "special_ids": sorted(special),
            "module_path": hook.module_path, "dtype": str(next(lm.model.parameters()).dtype)}

    def compute() -> dict[str, Tensor]:
        model = lm.model
        head = _linear_head(lm)
        block = is_block_hook(model, hook)
        out: dict[str, list[Tensor]] = {}
        flags = {"replay_ok": False, "linear_head": False, "as_tuple": False}
        n = 0
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.n_tokens, unit="tok", unit_scale=True, desc="eval core (LM)", dynamic_ncols=True)
        batches = _eval_batches(lm, cfg)
        while n < cfg.n_tokens:
            ids = next(batches, None)
            if ids is None:
                break
            ids = ids.to(model.device)
            if not cfg.ce_kl:
                h = capture(model, hook, ids)
            else:
                grabbed: dict[str, Tensor] = {}

                def grab_h(_m, _i, o):
                    flags["as_tuple"] = isinstance(o, tuple)
                    grabbed["h"] = o[0] if isinstance(o, tuple) else o

                def grab_final(_m, _i, o):
                    grabbed["final"] = o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0]

                handles = [hook.module.register_forward_hook(grab_h),
                           base_model(model).register_forward_hook(grab_final)]
                try:
                    logits = model(input_ids=ids, use_cache=False).logits
                finally:
                    for hd in handles:
                        hd.remove()
                h = grabbed["h"]
            keep = select_rows(h, ids, special, cfg.max_norm_multiple)
            n_ctx = torch.tensor([len(ids)], device="cpu")
            for k, v in (("ids", ids), ("h", h.float()), ("keep", keep), ("batch_ends", n_ctx)):
                out.setdefault(k, []).append(v.cpu())
            n += int(keep.sum())
            if cfg.ce_kl:
                pred = keep[:, :-1]
                targets = ids[:, 1:][pred]
                if "flags_checked" not in out:  # first batch: check both shortcuts against this clean forward
                    out["flags_checked"] = []
                    flags["linear_head"] = head is not None and _close(head(grabbed["final"][:, :-1][pred]),
                                                                       logits[:, :-1][pred])
                    if not flags["linear_head"]:  # evaluate_core falls back to the reference computation
                        if bar is not None:
                            bar.close()
                        return {"flags": torch.tensor([0, 0, int(flags["as_tuple"])], device="cpu")}
                    if block:
                        final = _final_hidden(lm, hook, ids, h, True, flags["as_tuple"])
                        flags["replay_ok"] = _close(final, grabbed["final"])
                rows = clean_distribution_stats(logits[:, :-1][pred], head.weight.float(),
                                                None if head.bias is None else head.bias.float(), targets)
                rows["ce_clean"] = rows.pop("ce")
                h_zero = h.clone()
                h_zero[keep] = 0
                final_z = _final_hidden(lm, hook, ids, h_zero, flags["replay_ok"], flags["as_tuple"])
                rows["ce_zero"], rows["kl_zero"] = ce_kl_from_clean_stats(final_z[:, :-1][pred], head.weight,
                                                                          head.bias, targets, rows)
                for k, v in rows.items():
                    out.setdefault(k, []).append((v.float() if k == "u" else v.double()).cpu())
            if bar is not None:
                bar.update(int(keep.sum()))
        if bar is not None:
            bar.close()
        if n == 0:
            raise ValueError("no eval tokens were produced from the held-out documents")
        out.pop("flags_checked", None)
        t = {k: torch.cat(v) for k, v in out.items()}
        t["batch_ends"] = t["batch_ends"].cumsum(0)
        if cfg.ce_kl:
            t["flags"] = torch.tensor([int(flags["replay_ok"]), int(flags["linear_head"]), int(flags["as_tuple"])],
                                      device="cpu")
        return t

    return store.get("core_lm", spec, compute)


@torch.no_grad()
def evaluate_core(sae: SAE, lm: LoadedLM, cfg: CoreEvalConfig, store: LMActivationStore | None = None) -> CoreMetrics:
    """Evaluate ``sae`` at its hook on held-out documents.

    With ``cfg.reuse_lm`` the clean and zero-ablated forwards come from :func:`core_lm_stage` (cached in ``store``)
    and the SAE costs its encode/decode plus one forward through the blocks after the hook; otherwise (or when the
    model's head is not a plain linear map) three full forwards per batch run (:func:`evaluate_core_reference`).
    Both give the same metrics up to float rounding. Stages in ``timings_s``: ``lm_stage`` (cache read or
    computation), ``sae`` (encode, decode, reconstruction sums), ``spliced_forward``, ``total``.

    Args:
        sae: the SAE (raw activation scale).
        lm: the model it was trained on.
        cfg: evaluation settings; ``cfg.data`` selects the held-out split.
        store: LM-work cache for this model and hook (default: one in ``saelab.paths.cache_dir``).

    Returns:
        :class:`CoreMetrics`.

    Raises:
        ValueError: the SAE's ``d_in`` differs from the hook's width, the store is for another hook, or there is
            no held-out text.
    """
    if sae.cfg.transcoder:  # input and target at two hooks: the per-batch definition, no cached LM stage
        return evaluate_core_transcoder(sae, lm, cfg)
    if not cfg.reuse_lm:
        return evaluate_core_reference(sae, lm, cfg)
    t0 = time.perf_counter()
    hook = resolve_hook(lm.model, sae.cfg.hook_name)
    if store is None:
        store = LMActivationStore(lm.name, hook.hook_name)
    elif store.hook_name not in (hook.hook_name, sae.cfg.hook_name):
        raise ValueError(f"activation store is for hook {store.hook_name!r} but the SAE reads {hook.hook_name!r}")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    lmc = core_lm_stage(lm, hook, cfg, store)
    timings["lm_stage"] = time.perf_counter() - t
    replay_ok, linear_head, as_tuple = (bool(v) for v in lmc["flags"]) if cfg.ce_kl else (False, True, False)
    if not linear_head:
        return evaluate_core_reference(sae, lm, cfg)
    if lmc["h"].shape[-1] != sae.cfg.d_in:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} but hook {hook.hook_name} has width {lmc['h'].shape[-1]}")
    model, head = lm.model, _linear_head(lm)
    dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    acc = _Acc(sae.cfg.d_in, sae.cfg.d_sae, sae.device)
    timings["sae"] = timings["spliced_forward"] = 0.0
    sae.eval()
    c0, r0 = 0, 0
    # the cache is on the CPU: each batch's rows are found there (no device round trip for the masks' counts) and
    # copied to the SAE's and the LM's device once
    for c1 in lmc["batch_ends"].tolist():
        t = time.perf_counter()
        ids, h, keep = lmc["ids"][c0:c1], lmc["h"][c0:c1], lmc["keep"][c0:c1]
        rows = keep.flatten().nonzero().squeeze(1)  # (n,) flat positions of the kept tokens
        x = h[keep].to(sae.device)
        x_in = x.to(sae.dtype)
        f = sae.encode(x_in)
        x_hat = sae.decode(f, x_norm=sae.centered_norm(x_in)).float()
        acc.add_recon(x, x_hat, f)
        timings["sae"] += time.perf_counter() - t
        if cfg.ce_kl:
            t = time.perf_counter()
            pred = keep[:, :-1]
            r1 = r0 + int(pred.sum())
            h_new = h.to(dev, copy=True)  # float32, as cached; a copy even on the CPU (the cache stays intact)
            h_new.view(-1, h_new.shape[-1]).index_copy_(0, rows.to(dev, non_blocking=True), x_hat.to(dev))
            final = _final_hidden(lm, hook, ids.to(dev), h_new.to(dtype), replay_ok, as_tuple)
            # (P, d_model): the evaluated predictions only, picked by indices found on the CPU (a boolean mask on
            # the device would make the host wait for the result's size)
            p_rows = pred.flatten().nonzero().squeeze(1).to(dev)
            hr = final[:, :-1].reshape(-1, final.shape[-1]).index_select(0, p_rows)
            stats = {k: lmc[k][r0:r1] for k in ("neg_entropy", "u", "p_dot_b")}
            ce, kl = ce_kl_from_clean_stats(hr, head.weight, head.bias, ids[:, 1:][pred].to(dev), stats)
            acc.add("ce_sae", ce.sum())
            acc.add("kl_sae", kl.sum())
            r0 = r1
            timings["spliced_forward"] += time.perf_counter() - t
        c0 = c1
    if cfg.ce_kl:
        acc.n_pred = r0
        for name in ("clean", "zero"):
            acc.add(f"ce_{name}", float(lmc[f"ce_{name}"].sum()))
        acc.add("kl_zero", float(lmc["kl_zero"].sum()))
    m = _metrics(acc, sae, cfg)
    m.seconds = time.perf_counter() - t0
    m.suite, m.timings_s = "core", {**timings, "total": m.seconds}
    return m


def _metrics(acc: _Acc, sae: SAE, cfg: CoreEvalConfig) -> CoreMetrics:
    """:class:`CoreMetrics` from the pooled sums (the formulas of the module doc)."""
    if acc.n == 0:
        raise ValueError("no eval tokens were produced from the held-out documents")
    n = acc.n
    s = acc.totals()
    mean_x = acc.sum_x / n
    total_var = s["sum_x2"] - n * float(mean_x.pow(2).sum())
    density = acc.fires / n
    m = CoreMetrics(
        n_tokens=n,
        fve=1.0 - s["sum_err2"] / total_var,
        mse=s["sum_err2"] / n,
        cossim=s["sum_cos"] / n,
        l2_ratio=s["sum_ratio"] / n,
        relative_reconstruction_bias=s["sum_xhat2"] / s["sum_dot"],
        l0=s["sum_l0"] / n,
        l1=s["sum_l1"] / n,
        dead_frac=float((density == 0).double().mean()),
        dense_frac_1pct=float((density > 0.01).double().mean()),
        dense_frac_10pct=float((density > 0.10).double().mean()),
        average_max_decoder_cosine_sim=average_max_decoder_cosine_sim(sae.W_dec),
    )
    if cfg.ce_kl and acc.n_pred:
        p = acc.n_pred
        m.ce_clean, m.ce_sae, m.ce_zero = s["ce_clean"] / p, s["ce_sae"] / p, s["ce_zero"] / p
        m.ce_loss_score = (m.ce_zero - m.ce_sae) / (m.ce_zero - m.ce_clean)
        m.kl_sae, m.kl_zero = s["kl_sae"] / p, s["kl_zero"] / p
        m.kl_score = (m.kl_zero - m.kl_sae) / m.kl_zero
    return m


@torch.no_grad()
def evaluate_core_reference(sae: SAE, lm: LoadedLM, cfg: CoreEvalConfig) -> CoreMetrics:
    """The core eval by its definition: per batch a clean, an SAE-spliced and a zero-ablated full forward.

    Nothing is cached; :func:`evaluate_core` uses it when the head is not a plain linear map or the SAE is a
    transcoder, and the tests use it as the reference of the cached path. An SAE reads and reconstructs its hook; a
    transcoder (``sae.cfg.transcoder``) reads ``hook_name`` and predicts ``hook_name_out``, so its metrics are those of
    the target, and the spliced forwards replace the target hook's output (:func:`evaluate_core_transcoder`). The
    kept tokens are those of the input hook. Same arguments, result and errors as :func:`evaluate_core`.
    """
    t0 = time.perf_counter()
    hook = resolve_hook(lm.model, sae.cfg.hook_name)
    hook_out = resolve_hook(lm.model, sae.cfg.hook_name_out) if sae.cfg.transcoder else hook
    acc = _Acc(sae.cfg.out_dim, sae.cfg.d_sae, sae.device)
    special = lm.special_ids
    sae.eval()
    for ids in _eval_batches(lm, cfg):
        if acc.n >= cfg.n_tokens:
            break
        ids = ids.to(lm.model.device)
        captured: dict[str, torch.Tensor] = {}

        def grab(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            captured["x"], captured["y"] = x, y
            return y

        with splice_transcoder(hook, hook_out, grab):  # an SAE: one hook, read as input and as target
            if cfg.ce_kl:
                clean_logits = lm.model(input_ids=ids, use_cache=False).logits
            else:
                capture(lm.model, hook_out, ids)
        h, y_all = captured["x"], captured["y"]
        if h.shape[-1] != sae.cfg.d_in or y_all.shape[-1] != sae.cfg.out_dim:
            raise ValueError(f"SAE d_in={sae.cfg.d_in}, output width {sae.cfg.out_dim} but hooks {hook.hook_name} / "
                             f"{hook_out.hook_name} have width {h.shape[-1]} / {y_all.shape[-1]}")
        keep = select_rows(h, ids, special, cfg.max_norm_multiple)
        x = h[keep].float().to(sae.device)
        f = sae.encode(x.to(sae.dtype))
        x_hat = sae.decode(f, x_norm=sae.centered_norm(x.to(sae.dtype)), x=x.to(sae.dtype))
        acc.add_recon(y_all[keep].float().to(sae.device), x_hat, f)
        if cfg.ce_kl:
            def put(values: torch.Tensor):
                def fn(hh: torch.Tensor) -> torch.Tensor:
                    hh = hh.clone()
                    hh[keep] = values.to(hh.device, hh.dtype)
                    return hh
                return fn

            pred = keep[:, :-1]
            targets = ids[:, 1:]
            clean_logp = clean_logits[:, :-1].float().log_softmax(-1)
            ce_clean = -clean_logp.gather(-1, targets[..., None])[..., 0]
            acc.add("ce_clean", float(ce_clean[pred].sum()))
            # the spliced forwards leave everything upstream of hook_out as in the clean one: the prediction from
            # the clean input is the one the transcoder would make inside them
            for name, values in (("sae", x_hat), ("zero", torch.zeros_like(x_hat))):
                with splice(hook_out, put(values)):
                    logits = lm.model(input_ids=ids, use_cache=False).logits[:, :-1]
                ce, kl = _ce_and_kl(logits, clean_logp, targets, pred)
                acc.add(f"ce_{name}", ce)
                acc.add(f"kl_{name}", kl)
            acc.n_pred += int(pred.sum())
    m = _metrics(acc, sae, cfg)
    m.seconds = time.perf_counter() - t0
    m.suite, m.timings_s = "core", {"total": m.seconds}
    return m


def evaluate_core_transcoder(sae: SAE, lm: LoadedLM, cfg: CoreEvalConfig) -> CoreMetrics:
    """The core eval of a transcoder (``sae.cfg.transcoder``): reconstruction metrics of its target and CE/KL with
    the transcoder standing in for the target hook (:func:`evaluate_core_reference` with two hooks).

    Per batch of held-out contexts, one clean forward captures the input hook ``x`` (``sae.cfg.hook_name``) and the
    target hook ``y`` (``sae.cfg.hook_name_out``; :func:`saelab.models.hooks.splice_transcoder`); the kept tokens are
    those of ``x`` (position 0, special tokens and norm outliers left out, as for an SAE). FVE, MSE, cosine, L0, dead
    latents... are those of ``y_hat`` against ``y`` (Dunefsky et al. 2024, Sec. 4: the transcoder's fidelity is judged
    on the MLP output it replaces). CE/KL: the target hook's output is replaced at the kept tokens by the transcoder's
    prediction, and by zeros for the zero-ablated reference, as for an SAE at its hook. Nothing is cached.

    Raises:
        ValueError: the SAE is not a transcoder, has no ``hook_name_out``, or its widths differ from the hooks'.
    """
    if not sae.cfg.transcoder or not sae.cfg.hook_name_out:
        raise ValueError("evaluate_core_transcoder needs a transcoder with hook_name_out set (trained with --transcoder "
                         "true and a --target_cache of the output hook)")
    return evaluate_core_reference(sae, lm, cfg)


def _run_core_suite(sae: SAE, lm: LoadedLM, cfg: CoreEvalConfig, store=None) -> CoreMetrics:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    m = evaluate_core(sae, lm, cfg, store)
    m.sae = str(cfg.sae)
    return m


EVAL_SUITES.register("core")(Suite(CoreEvalConfig, _run_core_suite, help="reconstruction, sparsity, CE/KL scores"))


def run_core_eval(cfg: CoreEvalConfig, lm: LoadedLM | None = None) -> CoreMetrics:
    """Load the SAE (and, unless given, the model) named by ``cfg`` on ``cfg.device``, evaluate, and write
    ``eval_core.json``.

    Raises:
        ValueError: ``cfg.device`` names a device this machine lacks (:func:`saelab.devices.resolve_device`), and
            everything :func:`evaluate_core` raises.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = str(resolve_device(cfg.device))
    sae = load_sae(cfg.sae, device=device)
    lm = lm or load_lm(cfg.model or sae.cfg.model_name, device=device)
    metrics = evaluate_core(sae, lm, cfg)
    out = Path(cfg.out) if cfg.out else Path(cfg.sae) / "eval_core.json"
    write_json(out, {"sae": str(cfg.sae), "hook_name": sae.cfg.hook_name, "model": lm.name, "metrics": metrics.to_dict(), "config": asdict(cfg)})
    return metrics
