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


def hierarchical_data(n: int, d_in: int = 48, n_parents: int = 6, children_per_parent: int = 4, n_free: int = 12,
                      groups_active: int = 2, free_active: int = 2, seed: int = 0):
    """The absorption toy setup: every active child feature co-occurs with its parent feature.

    Each row activates ``groups_active`` parents, each with exactly one of its children, plus ``free_active``
    independent features. Directions are random unit vectors (nearly orthogonal in ``d_in``).

    Returns:
        (x ``(n, d_in)``, parents ``(n_parents, d_in)``, children ``(n_parents * children_per_parent, d_in)``).
    """
    g = torch.Generator().manual_seed(seed)
    n_child = n_parents * children_per_parent
    dirs = F.normalize(torch.randn(n_parents + n_child + n_free, d_in, generator=g), dim=-1)
    parents, children, free = dirs[:n_parents], dirs[n_parents:n_parents + n_child], dirs[n_parents + n_child:]
    x = torch.zeros(n, d_in)
    grp = torch.rand(n, n_parents, generator=g).argsort(-1)[:, :groups_active]
    child = torch.randint(0, children_per_parent, (n, groups_active), generator=g)
    amp = lambda *s: torch.rand(*s, generator=g) + 0.5  # noqa: E731
    for j in range(groups_active):
        x += amp(n, 1) * parents[grp[:, j]] + amp(n, 1) * children[grp[:, j] * children_per_parent + child[:, j]]
    fi = torch.rand(n, n_free, generator=g).argsort(-1)[:, :free_active]
    for j in range(free_active):
        x += amp(n, 1) * free[fi[:, j]]
    return x, parents, children


def crash_on_call(monkeypatch, module, name: str, n: int) -> None:
    """Make ``module.name`` raise KeyboardInterrupt on its ``n``-th call (a run killed mid-way).

    The real function is restored by ``monkeypatch.undo()`` or at the end of the test.
    """
    real = getattr(module, name)
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, dying)


def train_interrupted(cfg, n_batches: int) -> None:
    """Run ``saelab.train.train(cfg)`` killed (KeyboardInterrupt) when it asks for batch ``n_batches`` of a stream.

    Every ``ActivationCache.iter_batches`` stream opened during the run yields its first ``n_batches`` batches,
    then raises; the real method is restored afterwards. With ``checkpoint_every`` dividing ``n_batches``, the run
    stops right after writing the checkpoint of step ``n_batches``.

    Raises:
        AssertionError: the run was not interrupted, or left no ``<cfg.out>/checkpoint/state.json``.
    """
    from pathlib import Path

    import pytest

    import saelab.train as tr

    real = tr.ActivationCache.iter_batches

    def limited(self, *a, **k):
        for i, b in enumerate(real(self, *a, **k)):
            if i >= n_batches:
                raise KeyboardInterrupt
            yield b

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tr.ActivationCache, "iter_batches", limited)
        with pytest.raises(KeyboardInterrupt):
            tr.train(cfg)
    ckpt = Path(cfg.out) / "checkpoint" / "state.json"
    assert ckpt.is_file(), f"no checkpoint in {cfg.out} after {n_batches} batches"
