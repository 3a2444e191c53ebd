"""Synthetic activations with a known sparse dictionary (test oracle data)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_dictionary_data(n: int, d_in: int = 32, n_features: int = 64, k: int = 4, noise: float = 0.0, seed: int = 0, scale: float = 1.0):
    """``x = c @ D * scale + noise`` with ``k`` active unit-norm features per row.

    Returns:
        (x ``(n, d_in)``, D ``(n_features, d_in)``, codes ``(n, n_features)``).
    """
    g = torch.Generator().manual_seed(seed)
    D = F.normalize(torch.randn(n_features, d_in, generator=g), dim=-1)
    idx = torch.rand(n, n_features, generator=g).argsort(-1)[:, :k]
    vals = torch.rand(n, k, generator=g) * 2 + 0.5
    codes = torch.zeros(n, n_features).scatter_(1, idx, vals)
    x = (codes @ D) * scale + noise * torch.randn(n, d_in, generator=g)
    return x, D, codes


def write_cache(path, x: torch.Tensor, *, model: str = "synthetic", hook_name: str = "blocks.0.hook_resid_post", shard_rows: int = 4096):
    """Write ``x (n, d_in)`` as a finished activation cache and return the reader."""
    from saelab.activations.cache import ActivationCacheWriter

    n = x.shape[0]
    w = ActivationCacheWriter(path, model=model, hook_name=hook_name, d_in=x.shape[1], meta={"context_size": 128}, shard_rows=shard_rows)
    w.add(x, token_ids=torch.zeros(n, dtype=torch.int32), doc_ids=torch.arange(n), positions=torch.ones(n, dtype=torch.int32))
    return w.finalize({"done": True})
