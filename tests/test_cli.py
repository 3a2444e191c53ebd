"""Command-line plumbing: every eval suite's flags, the shared eval-config base, and lazy start-up imports."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from saelab.cli import main
from saelab.evals import EVAL_SUITES
from saelab.evals.base import EvalConfig

SHARED = {"sae": "SAE directory (cfg.json + sae_weights.safetensors).", "threads": "torch CPU threads.",
          "model": "Model; default: the one recorded in the SAE's cfg.json.",
          "out": "Write the result JSON here (default: <sae>/eval_<suite>.json).",
          "device": "Device of the SAE and the LM: cpu, cuda or cuda:N."}


@pytest.mark.parametrize("suite", [*EVAL_SUITES.names(), "all"])
def test_every_suite_help_lists_its_flags_with_their_docs(suite, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--suite", suite, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "--sae" in text and "--suite" in text and "--config FILE" in text
    if suite == "all":
        assert "--sae_b" in text and "--device" in text and "--threads" not in text
        return
    for name, doc in SHARED.items():
        assert f"--{name}" in text and doc in text, name
    for f in dataclasses.fields(EVAL_SUITES.get(suite).config_cls):
        assert f"--{f.name}" in text or f"--{f.name}." in text or dataclasses.is_dataclass(f.type), f.name


@pytest.mark.parametrize("suite", EVAL_SUITES.names())
def test_suite_configs_share_the_base_fields(suite):
    cls = EVAL_SUITES.get(suite).config_cls
    assert issubclass(cls, EvalConfig)
    cfg = cls()
    assert (cfg.sae, cfg.model, cfg.out, cfg.threads) == ("runs/demo/sae", None, None, None)
    names = [f.name for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    assert cls(**{"sae": "x", "threads": 1}).threads == 1


def _imported_after(code: str) -> dict[str, bool]:
    """Which heavy modules a fresh interpreter has imported after running ``code`` (SystemExit ignored)."""
    probe = (f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\nimport json\n"
             "print(json.dumps({m: m in sys.modules for m in ('torch', 'sklearn', 'scipy', 'transformers', "
             "'saelab.evals', 'saelab.train')}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_start_up_imports_only_what_the_command_needs():
    light = _imported_after("import saelab")
    assert not any(light.values()), light
    top = _imported_after("from saelab.cli import main; main(['--help'])")
    assert not any(top.values()), top
    train = _imported_after("from saelab.cli import main; main(['train', '--help'])")
    assert train["saelab.train"] and train["torch"]
    assert not (train["saelab.evals"] or train["sklearn"] or train["transformers"]), train
    ev = _imported_after("from saelab.cli import main; main(['eval', '--suite', 'absorption', '--help'])")
    assert ev["saelab.evals"] and not ev["sklearn"], ev  # scikit-learn waits for the first probe


def test_lazy_public_names_resolve_to_the_real_objects():
    import saelab
    from saelab.sae.model import SAE
    from saelab.train import train

    assert saelab.SAE is SAE and saelab.train_sae is train
    assert set(saelab.__all__) <= set(dir(saelab))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        saelab.nope  # noqa: B018


@pytest.mark.parametrize("command", ["harvest", "train", "run", "compare", "demo"])
def test_every_command_help_renders(command, capsys):
    """argparse %-formats help strings: a field docstring with a bare '%' (e.g. "+6 %,") breaks --help."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "--" in capsys.readouterr().out
