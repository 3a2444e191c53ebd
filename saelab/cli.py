"""Command line: ``saelab harvest | train | eval | run | demo``.

Each sub-command is a dataclass config; every field is a ``--flag`` whose help text is the field's
docstring (simple_parsing), and ``--config FILE`` (YAML/TOML/JSON) sets defaults that flags override.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from simple_parsing import ArgumentParser

from .activations.cache import CorruptCacheError, IncompleteCacheError
from .config_files import from_dict, read_config_file


@dataclass
class _Command:
    help: str
    config_cls: type
    run: Callable[[object], None]


def _commands() -> dict[str, _Command]:
    from .activations.harvest import HarvestConfig
    from .demo import DemoConfig, run_demo
    from .evals.core import CoreEvalConfig
    from .train import TrainConfig

    return {
        "harvest": _Command("harvest LM activations into an on-disk cache", HarvestConfig, _run_harvest),
        "train": _Command("train an SAE on a harvested cache", TrainConfig, _run_train),
        "eval": _Command("evaluate a saved SAE on held-out text (core metrics)", CoreEvalConfig, _run_eval),
        "run": _Command("harvest -> train -> evaluate one SAE, any activation/encoder/regularizers/masking", DemoConfig, run_demo),
        "demo": _Command("the README demo: `run` with its defaults (TopK SAE on the bundled model and text)", DemoConfig, run_demo),
    }


def _run_harvest(cfg) -> None:
    from .activations.harvest import harvest

    cache = harvest(cfg)
    print(f"cache: {cache.path} ({cache.n_tokens:,} tokens x d_in={cache.d_in})")


def _run_train(cfg) -> None:
    from .train import train

    res = train(cfg)
    print(f"SAE written to {res.sae_dir} ({res.steps} steps, {res.tokens:,} tokens, {res.seconds:.0f}s)")


def _run_eval(cfg) -> None:
    from .evals.core import run_core_eval
    from .report import metrics_table

    m = run_core_eval(cfg)
    print(metrics_table({"sae": m.to_dict()}))


def build_parser(argv: Sequence[str]) -> ArgumentParser:
    """The CLI parser. ``argv`` is pre-scanned for ``--config FILE`` so the file can set defaults."""
    parser = ArgumentParser(prog="saelab", description="Sparse autoencoders on LM activations.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_file = _prescan_config(argv)
    for name, cmd in _commands().items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        default = None
        if config_file and argv and argv[0] == name:
            default = from_dict(cmd.config_cls, read_config_file(config_file))
        p.add_argument("--config", metavar="FILE", default=None, help="YAML/TOML/JSON file of config values (flags override it)")
        p.add_arguments(cmd.config_cls, dest="cfg", default=default)
    return parser


def _prescan_config(argv: Sequence[str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(list(argv))
    return known.config


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``saelab`` console script. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        _commands()[args.command].run(args.cfg)
    except (FileNotFoundError, ValueError, KeyError, CorruptCacheError, IncompleteCacheError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"saelab: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saelab: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
