"""saelab: train and evaluate sparse autoencoders on transformer LM activations.

Public API (see the README for the command line)::

    from saelab import SAE, SAEConfig, load_sae, save_sae          # the SAE module and SAELens-layout files
    from saelab import load_lm, harvest, HarvestConfig             # models and activation caches
    from saelab import train_sae, TrainConfig                      # training (saelab.train is the module)
    from saelab import run_suite                                   # evaluation suites

The names are imported on first use (PEP 562 module ``__getattr__``), so ``import saelab`` and the command line's
start-up (``saelab --help``) do not pay for torch, transformers or scikit-learn until something needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, tuple[str, str]] = {
    "SAE": (".sae.model", "SAE"),
    "SAEConfig": (".sae.config", "SAEConfig"),
    "load_sae": (".sae.saving", "load_sae"),
    "save_sae": (".sae.saving", "save_sae"),
    "load_lm": (".models.lm", "load_lm"),
    "harvest": (".activations.harvest", "harvest"),
    "HarvestConfig": (".activations.harvest", "HarvestConfig"),
    "train_sae": (".train", "train"),
    "TrainConfig": (".train", "TrainConfig"),
}
"""Public name -> (module relative to this package, attribute)."""


def __getattr__(name: str) -> Any:
    """Import a public name of :data:`_LAZY` on first access and cache it in the module.

    Raises:
        AttributeError: ``name`` is not a public name (``from saelab import losses`` then imports the submodule).
    """
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def run_suite(*args, **kwargs):
    """Run an evaluation suite by name; see :func:`saelab.evals.run_suite`."""
    from .evals import run_suite as _run

    return _run(*args, **kwargs)


__all__ = ["SAE", "SAEConfig", "load_sae", "save_sae", "load_lm", "harvest", "HarvestConfig", "train_sae", "TrainConfig", "run_suite"]
