"""Evaluation suites, chosen by name: ``saelab eval --suite NAME`` or :func:`run_suite`.

Suites register themselves in :data:`saelab.evals.base.EVAL_SUITES` when their module is imported; this
package imports them all.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict
from pathlib import Path

from .base import EVAL_SUITES, EvalConfig, EvalResult, LMActivationStore, Suite

_SUITE_MODULES = ("core", "absorption", "probing", "scr_tpp", "norm_quartiles", "feature_matching", "cos_inner",
                  "autointerp")
for _m in _SUITE_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_m}")
    except ModuleNotFoundError as e:  # a suite module not written yet must not break the others
        if e.name != f"{__name__}.{_m}":
            raise


def run_suite(name: str, cfg, *, lm=None, store: LMActivationStore | None = None, write: bool = True) -> EvalResult:
    """Run suite ``name`` with its config ``cfg`` (which names the SAE directory in ``cfg.sae``).

    Loads the SAE on ``cfg.device`` and (unless given) its model there too, runs the suite, and writes
    ``<sae>/eval_<name>.json`` (or ``cfg.out`` when the config has one set). A given ``lm`` stays where it is; the
    suites copy each batch to the device of the model or the SAE that reads it.

    Raises:
        KeyError: unknown suite (lists the valid ones).
        FileNotFoundError: missing SAE directory.
        ValueError: ``cfg.device`` is not a device name or names one this machine lacks
            (:func:`saelab.devices.resolve_device`).
    """
    from ..devices import resolve_device
    from ..models.lm import load_lm
    from ..sae.saving import load_sae

    suite = EVAL_SUITES.get(name)
    device = str(resolve_device(getattr(cfg, "device", "cpu")))
    sae = load_sae(cfg.sae, device=device)
    lm = lm or load_lm(getattr(cfg, "model", None) or sae.cfg.model_name, device=device)
    # a suite's activation_cache (probing, SCR, TPP) names the store's root when the caller passes none
    store = store or LMActivationStore(lm.name, sae.cfg.hook_name, root=getattr(cfg, "activation_cache", None))
    result = suite.run(sae, lm, cfg, store)
    result.suite, result.sae = name, str(cfg.sae)
    if write:
        out = getattr(cfg, "out", None) or Path(cfg.sae) / f"eval_{name}.json"
        from ..io import write_json

        write_json(out, {**result.to_dict(), "config": asdict(cfg)})
    return result


__all__ = ["EVAL_SUITES", "EvalConfig", "EvalResult", "LMActivationStore", "Suite", "run_suite"]
