"""Plain-text and Markdown rendering of metric tables."""

from __future__ import annotations

from collections.abc import Mapping

_ORDER = (
    "fve", "mse", "cossim", "l2_ratio", "relative_reconstruction_bias", "l0", "l1", "dead_frac",
    "dense_frac_1pct", "dense_frac_10pct", "average_max_decoder_cosine_sim", "ce_clean", "ce_sae", "ce_zero",
    "ce_loss_score", "kl_sae", "kl_zero", "kl_score", "n_tokens", "seconds",
)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def metrics_table(results: Mapping[str, Mapping[str, object]], *, markdown: bool = False) -> str:
    """Render ``{column name: {metric: value}}`` as an aligned table with one row per metric.

    Known metrics come first in a fixed order; others follow alphabetically. ``markdown=True`` gives a
    GitHub-flavoured Markdown table.
    """
    cols = list(results)
    results = {c: {k: v for k, v in r.items() if v is None or isinstance(v, (int, float))} for c, r in results.items()}
    names = [k for k in _ORDER if any(k in r for r in results.values())]
    names += sorted({k for r in results.values() for k in r} - set(names))
    rows = [["metric", *cols]] + [[k, *(_fmt(results[c].get(k)) for c in cols)] for k in names]
    if markdown:
        head = "| " + " | ".join(rows[0]) + " |"
        sep = "|" + "|".join("---" for _ in rows[0]) + "|"
        return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
