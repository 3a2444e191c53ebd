"""saelab.runtime: the process-wide allocator settings, each checked in a fresh interpreter."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _run(code: str, **env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "SAELAB_TUNE_MEMORY")}
    out = subprocess.run([sys.executable, "-c", code], env={**full, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = """
import json, os, sys
from saelab.runtime import tune_cpu_memory
first = tune_cpu_memory()
print(json.dumps({**first, "again": tune_cpu_memory() == first, "env": os.environ.get("THP_MEM_ALLOC_ENABLE")}))
"""


def test_applies_both_settings_before_torch_loads():
    got = _run(PROBE)
    assert got == {"mallopt": GLIBC, "thp": True, "again": True, "env": "1"}


def test_opt_out_and_explicit_values_are_respected():
    assert _run(PROBE, SAELAB_TUNE_MEMORY="0") == {"mallopt": False, "thp": False, "again": True, "env": None}
    got = _run(PROBE, THP_MEM_ALLOC_ENABLE="0")
    assert got["thp"] is False and got["env"] == "0"


def test_torch_already_loaded_gets_no_thp_claim():
    got = _run("import torch\n" + PROBE)
    assert got["thp"] is False and got["env"] is None and got["mallopt"] == GLIBC


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_the_command_line_tunes_before_importing_torch():
    code = """
import json, os, sys
from saelab import cli
try:
    cli.main(["--help"])
except SystemExit:
    pass
from saelab import runtime
print(json.dumps({"applied": runtime._applied, "torch": "torch" in sys.modules, "env": os.environ.get("THP_MEM_ALLOC_ENABLE")}))
"""
    got = _run(code)
    assert got == {"applied": {"mallopt": True, "thp": True}, "torch": False, "env": "1"}
