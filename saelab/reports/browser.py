"""A static HTML feature browser for one SAE: top contexts, histograms, logit lens and decoder neighbours.

:func:`build_feature_browser` scans ``max_rows`` rows of an activation cache (of the SAE's model and hook) with
the SAE and writes a folder that any browser opens from disk (``file://``, no server, no external resources)::

    <out>/index.html               # the whole app: HTML + CSS + plain JS, inlined from assets/browser.{html,css,js}
    <out>/data/meta.js             # window.SAELAB_META: SAE summary + one [id, count, max, top token] per latent
    <out>/data/vocab.js            # window.SAELAB_VOCAB: {token id: decoded string} for every id shown
    <out>/data/search.js           # window.SAELAB_SEARCH, loaded on the first token search
    <out>/data/latents_0000.js     # SAELAB_SHARDS[k]: full records of latents k*shard_size .. (k+1)*shard_size-1,
    ...                            # loaded on demand (<script src>: fetch() of local files is blocked on file://)
    <out>/build.json               # build seconds per stage and bytes per file (not used by the page)

Open ``index.html#latent=123`` to land on a latent and ``index.html#search=word`` to land on a token search.

Per latent (only latents that fire at least once in the scanned rows):

* **density**: fraction of scanned tokens where the code is > 0;
* **histogram** of its non-zero activations over ``n_bins`` equal bins of ``(0, max]`` (bin ``b`` holds
  ``b*max/n_bins <= a < (b+1)*max/n_bins``, the last bin also ``a = max``);
* **top contexts**: the ``n_contexts`` rows with the largest activation, each with up to ``window`` tokens either
  side taken from adjacent cache rows of the same context (contiguous positions, same document), every token
  shaded by its activation on the latent;
* **logit lens**: the top and bottom entries of ``(g ⊙ d_j) @ W_U^T`` where ``d_j`` is the decoder row, ``g`` the
  final norm's weight (``1 + weight`` for Gemma-style norms; omitted when the model has no final norm weight) and
  ``W_U`` the output embedding ``(vocab, d_model)``: the direct effect on the logits of adding ``d_j`` to the final
  residual stream, ignoring the norm's input-dependent scale (and a LayerNorm's centring and bias);
* **decoder neighbours**: the ``n_neighbours`` other latents with the largest cosine between decoder rows;
* **explanation**: ``BrowserConfig.explanations[j]`` when given, else the auto-interp explanation of ``j`` with its
  detection score and the judge that produced it (``BrowserConfig.autointerp``, default
  ``<sae>/eval_autointerp.json``; see :mod:`saelab.evals.autointerp`).

Memory stays bounded: codes are computed ``batch_size`` rows at a time and only their non-zero entries are used
(pass 1: counts, maxima and a running top-k merge per latent). Histograms (whose bins need the maxima) and the
context-window activations (which need the top rows) are then computed from the non-zero codes of pass 1 kept in
memory, or, when there are more than ``max_stored_codes`` of them (dense ReLU codes), from a second encoding pass.
Nothing of size ``(max_rows, d_sae)`` is ever held.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BrowserConfig", "LatentStats", "build_feature_browser", "scan_latents", "context_bounds",
           "unembedding", "logit_lens", "decoder_neighbours", "read_js_data", "page_html"]


@dataclass
class BrowserConfig:
    """What :func:`build_feature_browser` reads and writes."""

    sae: str
    """SAE directory (``load_sae``)."""
    cache: str
    """Activation cache of the same model and hook (the clean harvest or a held-out cache)."""
    out: str
    """Output folder (created; files inside it are overwritten)."""
    max_rows: int = 100_000
    """Cache rows (tokens) scanned, from the start of the cache."""
    n_contexts: int = 8
    """Top-activating contexts kept per latent."""
    window: int = 10
    """Context tokens shown on each side of the activating token."""
    n_logit_tokens: int = 10
    """Logit-lens tokens shown per direction (promoted and suppressed)."""
    n_neighbours: int = 5
    """Nearest decoder rows (by cosine) shown per latent."""
    max_latents: int | None = None
    """None: every latent that fires at least once; else only the ``max_latents`` densest ones."""
    device: str = "cpu"
    """Device of the SAE that scans the cache (and of the model when it is loaded here): cpu, cuda or cuda:N."""
    explanations: dict[int, str] | None = None
    """Optional latent id -> text (e.g. from auto-interp), shown in the latent's pane and searchable."""
    autointerp: str | None = None
    """Auto-interp result (``eval_autointerp.json``) whose explanations and detection scores are shown (with the
    judge's name); default: ``<sae>/eval_autointerp.json`` when it exists; '' for none. ``explanations`` win."""
    n_bins: int = 20
    """Histogram bins over (0, max activation]."""
    shard_size: int = 500
    """Latent ids per data shard (one ``<script>`` loaded when the user opens a latent in it)."""
    batch_size: int = 2048
    """Cache rows encoded at once (memory ~ batch_size x d_sae x 4 bytes, a few times)."""
    max_stored_codes: int = 20_000_000
    """Non-zero codes kept from the first pass (12 bytes each) to avoid a second encoding pass; 0 = never keep."""
    title: str | None = None
    """Page title (default: ``SAE <parent>/<dir>`` of the SAE directory)."""


@dataclass
class LatentStats:
    """Result of :func:`scan_latents` (numpy arrays; ``L`` = ``len(latents)``, ``w`` = window)."""

    n_scanned: int
    counts: np.ndarray  # (d_sae,) int64: scanned tokens where the latent is > 0
    max_act: np.ndarray  # (d_sae,) float32: max activation over the scanned tokens (0 if dead)
    hist: np.ndarray  # (d_sae, n_bins) int64: non-zero activations per bin of (0, max_act]
    top_rows: np.ndarray  # (d_sae, n) int64: cache rows of the top activations, descending; -1 = none
    top_vals: np.ndarray  # (d_sae, n) float32: their activations (0 where top_rows is -1)
    latents: np.ndarray  # (L,) int64: latents selected for display, densest first (ties: lower id first)
    ctx_rows: np.ndarray  # (L, n, 2w+1) int64: cache rows of each top context, centre at w; -1 = no token
    ctx_acts: np.ndarray  # (L, n, 2w+1) float32: the latent's activation on those rows (0 where -1)
    extra: dict[str, Any] = field(default_factory=dict)  # passes (1 or 2), stored_codes

    @property
    def density(self) -> np.ndarray:
        return self.counts / max(self.n_scanned, 1)


def context_bounds(positions: np.ndarray, doc_ids: np.ndarray, rows: np.ndarray, window: int,
                   n_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """First and last row (inclusive) of the context window around each of ``rows``.

    The window extends at most ``window`` rows either way and never crosses a break in the cache: a row whose
    position is not its predecessor's + 1, or whose document differs (a new context, a new document, or a token
    the harvest filtered out), starts a new run. ``n_rows`` caps the rows available (default: all).
    """
    n = len(positions) if n_rows is None else min(n_rows, len(positions))
    pos, doc = positions[:n].astype(np.int64), doc_ids[:n]
    brk = np.ones(n, dtype=bool)  # brk[i]: row i does not continue row i-1
    brk[1:] = (pos[1:] != pos[:-1] + 1) | (doc[1:] != doc[:-1])
    idx = np.arange(n)
    run_start = np.maximum.accumulate(np.where(brk, idx, 0))
    nxt = np.append(brk[1:], True)  # row i is the last of its run
    run_end = np.minimum.accumulate(np.where(nxt, idx, n - 1)[::-1])[::-1]
    rows = np.asarray(rows, dtype=np.int64)
    return np.maximum(rows - window, run_start[rows]), np.minimum(rows + window, run_end[rows])


def _nonzero_codes(sae, cache, start: int, stop: int, bs: int):
    """Yield ``(rows, latents, values)`` (int64, int64, float32 numpy) of the non-zero codes of cache rows
    ``[start, stop)``, ``bs`` rows at a time; rows are global. Top-k style codes stay sparse (never densified)."""
    for s in range(start, stop, bs):
        code, _ = sae.encode_code(cache.read_rows(np.arange(s, min(s + bs, stop))).to(sae.device, sae.dtype))
        v = code.values.float()
        if code.indices is None:
            r, c = (v > 0).nonzero(as_tuple=True)
            v = v[r, c]
        else:
            m = v > 0
            r, c, v = m.nonzero(as_tuple=True)[0], code.indices[m], v[m]
        yield (r + s).cpu().numpy(), c.long().cpu().numpy(), v.cpu().numpy()


def _order_key(lat: np.ndarray, val: np.ndarray) -> np.ndarray:
    """int64 keys sorting by latent, then by value descending (the bits of a float32 >= 0 order like its value)."""
    return (lat.astype(np.int64) << 32) | (0x7FFFFFFF - val.astype(np.float32).view(np.int32)).astype(np.int64)


def _merge_top(top_v: np.ndarray, top_r: np.ndarray, r: np.ndarray, c: np.ndarray, v: np.ndarray) -> None:
    """Update the per-latent top tables ``(d_sae, n)`` in place with candidate codes; ties keep the earlier row."""
    n = top_v.shape[1]
    keep = v > top_v[c, -1]  # only candidates that beat their latent's current n-th best
    if not keep.any():
        return
    r, c, v = r[keep], c[keep], v[keep]
    lats = np.unique(c)
    lat = np.concatenate([np.repeat(lats, n), c])
    val, row = np.concatenate([top_v[lats].ravel(), v]), np.concatenate([top_r[lats].ravel(), r])
    o = np.argsort(_order_key(lat, val), kind="stable")  # old table entries (earlier rows) first among equals
    lat, val, row = lat[o], val[o], row[o]
    start = np.searchsorted(lat, lats)
    rank = np.arange(len(lat)) - np.repeat(start, np.diff(np.append(start, len(lat))))
    k = rank < n  # each latent here has >= n entries (its old table), so all its slots are rewritten
    top_v[lat[k], rank[k]] = val[k]
    top_r[lat[k], rank[k]] = row[k]


@torch.inference_mode()
def scan_latents(sae, cache, *, max_rows: int = 100_000, n_contexts: int = 8, window: int = 10, n_bins: int = 20,
                 max_latents: int | None = None, batch_size: int = 2048,
                 max_stored_codes: int = 20_000_000) -> LatentStats:
    """Encode the first ``max_rows`` cache rows and collect the per-latent statistics the browser shows.

    Pass 1 (``batch_size`` rows at a time, only the non-zero codes): firing counts, maxima and a running
    top-``n_contexts`` merge per latent. Histogram bins need the maxima and the context windows need the top rows,
    so they come after: from the non-zero codes of pass 1 kept in memory (12 bytes each) while there are at most
    ``max_stored_codes`` of them, else from a second encoding pass. Rows up to ``window`` past ``max_rows`` are
    encoded for the windows only, never counted.
    """
    n_scan, d, n = min(int(max_rows), cache.n_tokens), sae.cfg.d_sae, int(n_contexts)
    if n_scan <= 0:
        raise ValueError(f"nothing to scan: cache {cache.path} has {cache.n_tokens} rows, max_rows={max_rows}")
    counts, mx = np.zeros(d, dtype=np.int64), np.zeros(d, dtype=np.float32)
    top_v, top_r = np.zeros((d, n), dtype=np.float32), np.full((d, n), -1, dtype=np.int64)
    stored: list[tuple[np.ndarray, ...]] | None = [] if max_stored_codes > 0 else None
    n_stored = 0
    for r, c, v in _nonzero_codes(sae, cache, 0, min(cache.n_tokens, n_scan + window), batch_size):
        if stored is not None:
            n_stored += len(v)
            if n_stored <= max_stored_codes:
                stored.append((r.astype(np.int32), c.astype(np.int32), v))
            else:  # too many to keep: histograms and windows will take a second pass
                stored = None
        m = r < n_scan
        r, c, v = r[m], c[m], v[m]
        counts += np.bincount(c, minlength=d)
        np.maximum.at(mx, c, v)
        _merge_top(top_v, top_r, r, c, v)
    alive = np.flatnonzero(counts > 0)
    latents = alive[np.lexsort((alive, -counts[alive]))][:max_latents]

    # context windows of the selected latents: (L, n, 2w+1) rows, then the (row, latent) keys whose codes fill them
    width = 2 * window + 1
    ctx_rows = np.full((len(latents), n, width), -1, dtype=np.int64)
    centre = top_r[latents]  # (L, n)
    has = centre >= 0
    lo, hi = context_bounds(cache.meta_column("positions"), cache.meta_column("doc_ids"), centre[has], window)
    win = centre[has][:, None] + np.arange(-window, window + 1)
    ctx_rows[has] = np.where((win >= lo[:, None]) & (win <= hi[:, None]), win, -1)
    slots = np.flatnonzero(ctx_rows.reshape(-1) >= 0)
    need = ctx_rows.reshape(-1)[slots] * d + latents[slots // (n * width)]
    o = np.argsort(need, kind="stable")
    need, slots = need[o], slots[o]
    acts = np.zeros(ctx_rows.size, dtype=np.float32)

    hist = np.zeros(d * n_bins, dtype=np.int64)
    scale = n_bins / np.maximum(mx, 1e-30)
    stop = max(n_scan, int(need[-1]) // d + 1 if len(need) else 0)
    for r, c, v in stored if stored is not None else _nonzero_codes(sae, cache, 0, stop, batch_size):
        r, c = r.astype(np.int64), c.astype(np.int64)
        m = r < n_scan
        b = np.clip(np.floor(v[m] * scale[c[m]]).astype(np.int64), 0, n_bins - 1)  # bin b: [b, b+1) * max / n_bins
        hist += np.bincount(c[m] * n_bins + b, minlength=d * n_bins)
        if len(v) and len(need):
            key = r * d + c
            ko = np.argsort(key)
            key = key[ko]
            a, z = np.searchsorted(need, key[0]), np.searchsorted(need, key[-1], side="right")
            pos = np.minimum(np.searchsorted(key, need[a:z]), len(key) - 1)
            hit = key[pos] == need[a:z]
            acts[slots[a:z][hit]] = v[ko[pos[hit]]]
    return LatentStats(n_scan, counts, mx, hist.reshape(d, n_bins), top_r, top_v, latents, ctx_rows,
                       acts.reshape(ctx_rows.shape),
                       {"passes": 2, "stored_codes": 0} if stored is None else {"passes": 1, "stored_codes": n_stored})


def _final_norm(model: nn.Module) -> nn.Module | None:
    from ..models.hooks import base_model

    body = base_model(model)
    for name in ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm"):
        m = getattr(body, name, None)
        if isinstance(m, nn.Module):
            return m
    return None


def unembedding(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W_U (vocab, d_model), g (d_model) or None)``: the output embedding and the final norm's gain."""
    W_U = model.get_output_embeddings().weight.detach().float()
    norm = _final_norm(model)
    g = getattr(norm, "weight", None) if norm is not None else None
    if not isinstance(g, torch.Tensor) or g.shape != W_U.shape[1:]:
        return W_U, None
    g = g.detach().float()
    return W_U, (1.0 + g if "gemma" in type(norm).__name__.lower() else g)


@torch.inference_mode()
def logit_lens(W_dec: torch.Tensor, W_U: torch.Tensor, g: torch.Tensor | None, k: int, *, chunk: int = 256):
    """Top and bottom ``k`` entries of ``(g ⊙ W_dec[j]) @ W_U^T`` for every row ``j`` of ``W_dec``.

    Returns:
        ``(top_ids, top_vals, bottom_ids, bottom_vals)``, each ``(rows, k)``; top descending, bottom ascending.
    """
    n = W_dec.shape[0]
    ti, bi = np.zeros((n, k), dtype=np.int64), np.zeros((n, k), dtype=np.int64)
    tv, bv = np.zeros((n, k), dtype=np.float32), np.zeros((n, k), dtype=np.float32)
    for s in range(0, n, chunk):
        d = W_dec[s:s + chunk].float()
        logits = (d * g if g is not None else d) @ W_U.T
        top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        tv[s:s + chunk], ti[s:s + chunk] = top.values.numpy(), top.indices.numpy()
        bv[s:s + chunk], bi[s:s + chunk] = bottom.values.numpy(), bottom.indices.numpy()
    return ti, tv, bi, bv


@torch.inference_mode()
def decoder_neighbours(W_dec: torch.Tensor, k: int, rows: np.ndarray | None = None, *, chunk: int = 1024):
    """For each of ``rows`` (default all), the ``k`` other decoder rows with the largest cosine: ``(ids, cos)``."""
    Wn = F.normalize(W_dec.detach().float(), dim=-1)
    rows = np.arange(Wn.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    k = min(k, Wn.shape[0] - 1)
    ids, cos = np.zeros((len(rows), k), dtype=np.int64), np.zeros((len(rows), k), dtype=np.float32)
    for s in range(0, len(rows), chunk):
        r = torch.from_numpy(rows[s:s + chunk])
        sims = Wn[r] @ Wn.T
        sims[torch.arange(len(r)), r] = -float("inf")
        top = sims.topk(k, dim=1)
        ids[s:s + chunk], cos[s:s + chunk] = top.indices.numpy(), top.values.numpy()
    return ids, cos


def _token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token decoded on its own (byte-level pieces of a multi-byte character decode to U+FFFD)."""
    return tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _js(path: Path, assign: str, obj: Any) -> int:
    """Write ``<assign> =`` and, on a second line, ``<JSON>;`` as a UTF-8 script. ``<`` and U+2028/9 are
    \\u-escaped, so the data can never close a ``<script>`` element or break a JS string. Returns the bytes written."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    data = f"{assign} =\n{text};\n".encode("utf-8", "backslashreplace")
    path.write_bytes(data)
    return len(data)


def read_js_data(path: str | Path) -> Any:
    """Parse a data file written by :func:`build_feature_browser` back into Python objects (for tests/tools)."""
    text = Path(path).read_text("utf-8")
    return json.loads(text.split("\n", 1)[1].rstrip().rstrip(";"))


def _r(x: Any, digits: int = 4) -> list:
    """``x`` (array-like) rounded to ``digits`` significant digits, as a list of short JSON numbers (0 for zero).

    ``k / 10**m`` and ``k * 10**m`` (exact powers of ten, integer ``k``) are correctly rounded, so each result is the
    double nearest the short decimal and ``repr``/JSON print it as such (``0.0123``, not ``0.012299999...``).
    """
    x = np.asarray(x, dtype=np.float64)
    e = np.floor(np.log10(np.abs(np.where(x == 0, 1.0, x)))).astype(np.int64) - (digits - 1)
    p = 10.0 ** np.abs(e)
    y = np.where(e < 0, np.round(x * p) / p, np.round(x / p) * p)
    return [v if v else 0 for v in np.atleast_1d(y).tolist()]


def _rows(a: np.ndarray, digits: int = 3) -> list[list]:
    """A 2-D array as a list of rows of :func:`_r`-rounded numbers (one vectorised rounding for the whole array)."""
    flat, k = _r(a.reshape(-1), digits), a.shape[1]
    return [flat[i * k:(i + 1) * k] for i in range(a.shape[0])]


_INLINE = re.compile(r"^/\* @inline ([\w.-]+) \*/\n", re.MULTILINE)
"""A whole line ``/* @inline NAME */`` of ``assets/browser.html``: replaced by the text of ``assets/NAME``."""


def _asset(name: str) -> str:
    """Text of the package data file ``saelab/reports/assets/<name>`` (UTF-8).

    Raises:
        FileNotFoundError: the file is not installed (an install without the package data of ``pyproject.toml``).
    """
    res = files("saelab.reports") / "assets" / name
    if not res.is_file():
        raise FileNotFoundError(f"feature browser asset {name!r} is missing from saelab/reports/assets; reinstall "
                                "saelab (pip install .) so that its package data is shipped")
    return res.read_text(encoding="utf-8")


def page_html() -> str:
    """The browser's ``index.html``: ``assets/browser.html`` with its ``/* @inline browser.css */`` and
    ``/* @inline browser.js */`` lines replaced by those files, so that one self-contained page opens from ``file://``
    (a page loaded from disk may not ``fetch()`` its neighbours, and inline code needs no extra requests).

    The page holds no data: it reads ``data/meta.js`` and ``data/vocab.js`` by ``<script src>`` and loads the other
    data files on demand (see the module docstring).

    Raises:
        FileNotFoundError: an asset is missing (see :func:`_asset`).
    """
    return _INLINE.sub(lambda m: _asset(m.group(1)), _asset("browser.html"))


def build_feature_browser(cfg: BrowserConfig, lm=None) -> Path:
    """Scan the cache with the SAE and write the static browser folder ``cfg.out``; returns ``index.html``.

    Args:
        cfg: see :class:`BrowserConfig`.
        lm: a :class:`~saelab.models.lm.LoadedLM` (tokenizer for the token strings, unembedding for the logit lens);
            default: ``load_lm`` of the SAE's ``model_name`` (else the cache's ``model``).
    """
    from ..activations.cache import ActivationCache
    from ..devices import resolve_device
    from ..sae.saving import load_sae

    t0 = time.perf_counter()
    device = str(resolve_device(cfg.device))
    sae = load_sae(cfg.sae, device=device)
    cache = ActivationCache.open(cfg.cache)
    if cache.d_in != sae.cfg.d_in:
        raise ValueError(f"cache {cfg.cache} has d_in={cache.d_in}, the SAE {cfg.sae} expects d_in={sae.cfg.d_in}")
    for key, mine in (("model", sae.cfg.model_name), ("hook_name", sae.cfg.hook_name)):
        if mine and cache.manifest.get(key) and cache.manifest[key] != mine:
            warnings.warn(f"the SAE was trained on {key}={mine!r} but cache {cfg.cache} holds {cache.manifest[key]!r}; "
                          "the browser shows what this SAE does on that cache", stacklevel=2)
    if lm is None:
        from ..models.lm import load_lm

        lm = load_lm(sae.cfg.model_name or cache.manifest["model"], device=device)
    times = {"load": time.perf_counter() - t0}
    st = scan_latents(sae, cache, max_rows=cfg.max_rows, n_contexts=cfg.n_contexts, window=cfg.window,
                      n_bins=cfg.n_bins, max_latents=cfg.max_latents, batch_size=cfg.batch_size,
                      max_stored_codes=cfg.max_stored_codes)
    times["scan"] = time.perf_counter() - t0 - sum(times.values())
    W_dec = sae.W_dec.detach().float().cpu()
    W_U, g = unembedding(lm.model)
    lens = W_U.shape[1] == W_dec.shape[1]  # a hook of another width has no logit lens
    n_lens = min(cfg.n_logit_tokens, W_U.shape[0])
    tl = logit_lens(W_dec[torch.from_numpy(st.latents)], W_U.cpu(), None if g is None else g.cpu(), n_lens) if lens \
        else None
    times["logit_lens"] = time.perf_counter() - t0 - sum(times.values())
    nb_ids, nb_cos = decoder_neighbours(W_dec, cfg.n_neighbours, st.latents)
    times["neighbours"] = time.perf_counter() - t0 - sum(times.values())

    tokens = cache.meta_column("token_ids")
    docs: list[Any] = []
    if (cache.path / "documents.json").is_file():
        docs = json.loads((cache.path / "documents.json").read_text("utf-8"))
    ai_expl, ai_score, ai_judge = _autointerp_explanations(cfg)
    expl = {**ai_expl, **{int(j): str(t) for j, t in (cfg.explanations or {}).items()}}
    out, data = Path(cfg.out), Path(cfg.out) / "data"
    data.mkdir(parents=True, exist_ok=True)
    for old in data.glob("latents_*.js"):
        old.unlink()

    # everything below is plain-Python list work: round and convert whole arrays once, not per latent/context
    n_ctx, w = cfg.n_contexts, cfg.window
    width = 2 * w + 1
    rows_l = st.ctx_rows.tolist()
    toks_l = tokens[np.maximum(st.ctx_rows, 0)].tolist()
    acts_l = _rows(st.ctx_acts.reshape(-1, width))
    centre = np.maximum(st.ctx_rows[:, :, w], 0)
    doc_l, pos_l = cache.meta_column("doc_ids")[centre].tolist(), cache.meta_column("positions")[centre].tolist()
    pairs = lambda ids, vals: [list(map(list, zip(a, b))) for a, b in zip(ids.tolist(), _rows(vals))]  # noqa: E731
    nb_l = pairs(nb_ids, nb_cos)
    if tl is not None:
        lp_l, ln_l = pairs(tl[0], tl[1]), pairs(tl[2], tl[3])
    max_l = _r(st.max_act)

    used: set[int] = set()
    shards: dict[int, dict[str, Any]] = {}
    search, listing = [], []
    for li, j in enumerate(st.latents.tolist()):
        ctxs = []
        for c in range(n_ctx):
            rows = rows_l[li][c]
            if rows[w] < 0:
                continue
            ks = [i for i, r in enumerate(rows) if r >= 0]
            ids = [toks_l[li][c][i] for i in ks]
            used.update(ids)
            d = doc_l[li][c]
            ctxs.append({"t": ids, "a": [acts_l[li * n_ctx + c][i] for i in ks], "c": ks.index(w), "row": rows[w],
                         "doc": d, "pos": pos_l[li][c],
                         "src": docs[d].get("doc_id") if 0 <= d < len(docs) and isinstance(docs[d], dict) else None})
        rec: dict[str, Any] = {"id": j, "n": int(st.counts[j]), "max": max_l[j], "hist": st.hist[j].tolist(),
                               "ctx": ctxs, "nb": nb_l[li]}
        if tl is not None:
            rec["lp"], rec["ln"] = lp_l[li], ln_l[li]
            used.update(t for t, _ in lp_l[li] + ln_l[li])
        if j in expl:
            rec["expl"] = expl[j]
            if j in ai_score and expl[j] == ai_expl.get(j):
                rec["expl_score"] = ai_score[j]
        shards.setdefault(j // cfg.shard_size, {})[str(j)] = rec
        act_toks = sorted({c["t"][c["c"]] for c in ctxs})
        search.append([j, act_toks, [t for t, _ in rec.get("lp", [])], expl.get(j, "")])
        listing.append([j, rec["n"], rec["max"], ctxs[0]["t"][ctxs[0]["c"]] if ctxs else -1])

    times["assemble"] = time.perf_counter() - t0 - sum(times.values())
    sizes: dict[str, int] = {}
    for s, recs in sorted(shards.items()):
        name = f"latents_{s:04d}.js"
        sizes[name] = _js(data / name, f"(window.SAELAB_SHARDS = window.SAELAB_SHARDS || {{}})[{s}]", recs)
    id_list = sorted(used)
    sizes["vocab.js"] = _js(data / "vocab.js", "window.SAELAB_VOCAB",
                            dict(zip(map(str, id_list), _token_strings(lm.tokenizer, id_list))))
    sizes["search.js"] = _js(data / "search.js", "window.SAELAB_SEARCH", search)
    sc = sae.cfg
    summary = {
        "title": cfg.title or "SAE " + "/".join(Path(cfg.sae).resolve().parts[-2:]),
        "sae": str(cfg.sae), "cache": str(cfg.cache),
        "model": sc.model_name or cache.manifest.get("model"), "hook": sc.hook_name or cache.manifest.get("hook_name"),
        "d_in": sc.d_in, "d_sae": sc.d_sae, "activation": sc.activation, "k": sc.k, "encoder": sc.encoder,
        "n_scanned": st.n_scanned, "n_alive": int((st.counts > 0).sum()), "n_shown": len(st.latents),
        "n_contexts": cfg.n_contexts, "window": cfg.window, "n_bins": cfg.n_bins, "shard_size": cfg.shard_size,
        "logit_lens": None if not lens else ("(g ⊙ d_j) @ W_U^T, g = final norm weight" if g is not None
                                             else "d_j @ W_U^T (no final norm weight)"),
        "built": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "autointerp_judge": ai_judge,
    }
    sizes["meta.js"] = _js(data / "meta.js", "window.SAELAB_META", {"summary": summary, "latents": listing})
    (out / "index.html").write_text(page_html(), encoding="utf-8")
    sizes["index.html"] = (out / "index.html").stat().st_size
    times["write"] = time.perf_counter() - t0 - sum(times.values())
    build = {"seconds": round(time.perf_counter() - t0, 2), "stage_seconds": {n: round(t, 2) for n, t in times.items()},
             "scan": st.extra, "bytes": sizes, "total_bytes": sum(sizes.values())}
    (out / "build.json").write_text(json.dumps(build, indent=1) + "\n", encoding="utf-8")
    return out / "index.html"


def _autointerp_explanations(cfg: BrowserConfig) -> tuple[dict[int, str], dict[int, float | None], str | None]:
    """``(explanations, scores, judge)`` of the auto-interp result named by ``cfg.autointerp`` (see its doc)."""
    path = cfg.autointerp
    if path == "":
        return {}, {}, None
    if path is None:
        path = str(Path(cfg.sae) / "eval_autointerp.json")
        if not Path(path).is_file():
            return {}, {}, None
    from ..evals.autointerp import load_explanations

    expl, score, judge = load_explanations(path)
    return expl, score, judge or None

