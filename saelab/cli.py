"""Command line: ``saelab harvest | train | eval | run | compare | demo``.

Each sub-command is a dataclass config; every field is a ``--flag`` whose help text is the field's
docstring (simple_parsing), and ``--config FILE`` (YAML/TOML/JSON) sets defaults that flags override.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from simple_parsing import ArgumentParser

from .config_files import from_dict, read_config_file
from .runtime import tune_cpu_memory


def _load(target: str):
    """The object named ``"module:attr"`` (module relative to the saelab package), imported now."""
    module, attr = target.split(":")
    return getattr(importlib.import_module(module, __package__), attr)


@dataclass(frozen=True)
class _Command:
    """One sub-command. Its config class and ``run`` are named, not imported, so that ``saelab --help`` and
    ``saelab train --help`` import only what the chosen sub-command needs (no torch for the first, no evals or
    scikit-learn for the second)."""

    help: str
    config: str
    """``"module:ConfigClass"`` of the sub-command's dataclass config."""
    run: str
    """``"module:function"`` called with the parsed config."""

    def config_cls(self) -> type:
        """Import and return the config dataclass."""
        return _load(self.config)

    def runner(self) -> Callable[[object], None]:
        """Import and return ``run(cfg)``."""
        return _load(self.run)


def _commands() -> dict[str, _Command]:
    return {
        "harvest": _Command("harvest LM activations into an on-disk cache", ".activations.harvest:HarvestConfig",
                            ".cli:_run_harvest"),
        "train": _Command("train an SAE on a harvested cache", ".train:TrainConfig", ".cli:_run_train"),
        "eval": _Command("evaluate a saved SAE: --suite core|absorption|sparse_probing|ood_probing|norm_quartiles|"
                         "feature_matching|cos_inner|autointerp|all (default core; all skips autointerp, which needs an LLM "
                         "judge: --judge local|openai)", ".evals.core:CoreEvalConfig", ".cli:_run_eval"),
        "run": _Command("harvest -> train -> evaluate one SAE, any activation/encoder/regularizers/masking",
                        ".demo:DemoConfig", ".demo:run_demo"),
        "compare": _Command("run an experiment file: one harvest per mask setting, many SAEs, every eval, one report",
                            ".compare:CompareConfig", ".compare:run_compare"),
        "demo": _Command("the README demo: `run` with its defaults (TopK SAE on the bundled model and text)",
                         ".demo:DemoConfig", ".demo:run_demo"),
    }


def _run_harvest(cfg) -> None:
    from .activations.harvest import harvest

    caches = harvest(cfg)
    for cache in caches.values() if isinstance(caches, dict) else [caches]:  # several hooks: one cache each
        print(f"cache: {cache.path} ({cache.n_tokens:,} tokens x d_in={cache.d_in})")


def _run_train(cfg) -> None:
    from .train import hook_configs, train_many

    results = train_many(hook_configs(cfg))  # a multi-hook harvest's folder: one SAE per hook, one pass
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 speaks for the job
        return
    for res in results:
        print(f"SAE written to {res.sae_dir} ({res.steps} steps, {res.tokens:,} tokens, {res.seconds:.0f}s)")


@dataclass
class EvalAllConfig:
    """Run every evaluation suite with its defaults on one SAE."""

    sae: str = "runs/demo/sae"
    """SAE directory."""
    sae_b: str | None = None
    """Second SAE for the feature_matching suite (skipped when not given)."""
    device: str = "cpu"
    """Device of the SAE and the LM in every suite: cpu, cuda or cuda:N."""


def _eval_config_cls(suite: str) -> type:
    from .evals import EVAL_SUITES

    return EvalAllConfig if suite == "all" else EVAL_SUITES.get(suite).config_cls


def _run_eval(cfg, suite: str = "core") -> None:
    import dataclasses

    from .evals import EVAL_SUITES, run_suite
    from .reports.metrics import metrics_table

    if suite != "all":
        result = run_suite(suite, cfg)
        print(metrics_table({suite: result.to_dict()}))
        if getattr(result, "judge", None):
            print(f"judge: {result.judge}")
        print(f"timings (s): {', '.join(f'{k} {v:.1f}' for k, v in result.timings_s.items())}")
        print(f"written to {getattr(cfg, 'out', None) or f'{cfg.sae}/eval_{suite}.json'}")
        return
    for name in EVAL_SUITES.names():
        if not getattr(EVAL_SUITES.get(name).config_cls, "include_in_all", True):
            print(f"[{name}] skipped: run it with --suite {name}")
            continue
        fields = {f.name for f in dataclasses.fields(EVAL_SUITES.get(name).config_cls)}
        if "sae_b" in fields and not cfg.sae_b:
            print(f"[{name}] skipped: needs --sae_b")
            continue
        sub = EVAL_SUITES.get(name).config_cls(sae=cfg.sae, device=cfg.device,
                                               **({"sae_b": cfg.sae_b} if "sae_b" in fields else {}))
        print(f"[{name}]")
        _run_eval(sub, name)


def build_parser(argv: Sequence[str]) -> ArgumentParser:
    """The CLI parser. ``argv`` is pre-scanned for ``--config FILE`` so the file can set defaults.

    Only the sub-command named by ``argv[0]`` gets its config's flags (and imports its config class); the others
    are listed with their help line only, which is all ``saelab --help`` shows.
    """
    parser = ArgumentParser(prog="saelab", description="Sparse autoencoders on LM activations.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_file, suite = _prescan(argv)
    chosen = argv[0] if argv else None
    for name, cmd in _commands().items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name != chosen:
            continue
        if name == "eval":  # the suite picks the config dataclass
            config_cls = _eval_config_cls(suite)
            p.add_argument("--suite", default="core", help="evaluation suite (or all)")
        else:
            config_cls = cmd.config_cls()
        default = None
        if config_file:
            default = from_dict(config_cls, read_config_file(config_file))
        p.add_argument("--config", metavar="FILE", default=None, help="YAML/TOML/JSON file of config values (flags override it)")
        p.add_arguments(config_cls, dest="cfg", default=default)
    return parser


def _prescan(argv: Sequence[str]) -> tuple[str | None, str]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--suite", default="core")
    known, _ = pre.parse_known_args(list(argv))
    return known.config, known.suite


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``saelab`` console script. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tune_cpu_memory()  # before torch is imported: also enables its huge-page CPU allocations
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if args.command == "eval":
            _run_eval(args.cfg, args.suite)
        else:
            _commands()[args.command].runner()(args.cfg)
    except KeyboardInterrupt:
        print("saelab: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"saelab: error: {msg}", file=sys.stderr)
        return 2
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that ``main`` reports as one ``saelab: error:`` line (exit code 2) instead of a traceback.

    The cache errors are imported here, when an error is being handled, so that start-up does not import torch.
    """
    from .activations.cache import CorruptCacheError, IncompleteCacheError

    return (FileNotFoundError, ValueError, KeyError, CorruptCacheError, IncompleteCacheError)


if __name__ == "__main__":
    raise SystemExit(main())
