"""Harvest and train in one call, the two stages overlapped when streaming (the library primitive behind
``saelab run``): the harvest writes its cache (:mod:`saelab.activations.harvest`) while :func:`saelab.train.train_many`
follows it (:mod:`saelab.activations.stream`), or the two run one after the other."""

from __future__ import annotations

import time
from pathlib import Path

from .activations.cache import ActivationCache
from .activations.harvest import HarvestConfig, harvest
from .activations.stream import BackgroundHarvest
from .models.lm import LoadedLM
from .train import TrainConfig, TrainResult, train_many


def harvest_and_train(harvest_cfg: HarvestConfig, train_cfgs: list[TrainConfig], *, lm: LoadedLM | None = None,
                      stream: bool = True) -> tuple[ActivationCache, list[TrainResult], dict[str, float]]:
    """Harvest ``harvest_cfg.out`` and train every SAE of ``train_cfgs`` on it in one pass (:func:`train_many`).

    With ``stream`` the harvest runs on a background thread (:class:`BackgroundHarvest`) while the SAEs train on
    each window of shards as soon as it is committed (:mod:`saelab.activations.stream`); otherwise one after the
    other. Either way the cache is the one :func:`harvest` writes, and an interrupted call resumes both stages
    from their checkpoints when repeated. If training stops early (an error, Ctrl-C), the harvest is stopped too,
    keeping its committed checkpoints.

    Args:
        harvest_cfg: the harvest.
        train_cfgs: SAEs to train on ``harvest_cfg.out`` (their ``cache``); with ``stream`` they must have
            ``stream=True``.
        lm: the loaded model (loaded from ``harvest_cfg.model`` otherwise).
        stream: overlap the two stages.

    Returns:
        ``(cache, results, timings)``: the finished cache, one :class:`TrainResult` per config, and wall seconds
        ``harvest`` (from the call to the end of the harvest) and ``train`` (from the end of the harvest, or from
        the call when streamed, to the end of training), ``harvest_train`` (the whole call).

    Raises:
        ValueError: a config's ``cache`` is not ``harvest_cfg.out``, or ``stream`` without ``stream=True`` configs.
        HarvestFailedError: (``stream``) the harvest failed; its exception is the ``__cause__``.
        Everything :func:`harvest` and :func:`train_many` raise.
    """
    bad = [c.out for c in train_cfgs if Path(c.cache).resolve() != Path(harvest_cfg.out).resolve()]
    if bad:
        raise ValueError(f"harvest_and_train: the SAEs {bad} do not train on the harvested cache {harvest_cfg.out}")
    if stream and not all(c.stream for c in train_cfgs):
        raise ValueError("harvest_and_train(stream=True) needs TrainConfig(stream=True) for every SAE (stream order)")
    t0 = time.perf_counter()
    if not stream:
        cache = harvest(harvest_cfg, lm=lm)
        t1 = time.perf_counter()
        results = train_many(train_cfgs)
        t2 = time.perf_counter()
        return cache, results, {"harvest": t1 - t0, "train": t2 - t1, "harvest_train": t2 - t0}
    bg = BackgroundHarvest(harvest_cfg, lm).start()
    try:
        bg.wait_ready()  # the cache is open with these settings: never follow a stale cache at the same path
        results = train_many(train_cfgs, harvest_alive=bg.alive)
        t_train = time.perf_counter()
        cache = bg.join()
    except BaseException:
        bg.stop()  # keeps the harvest's committed checkpoints; re-running resumes
        raise
    t2 = time.perf_counter()
    t_harvest = bg.finished_at - t0 if bg.finished_at else t2 - t0
    return cache, results, {"harvest": t_harvest, "train": t_train - t0, "harvest_train": t2 - t0}


__all__ = ["harvest_and_train"]
