"""An installed saelab (not the source tree) finds its bundled experiment files and prints their plans."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Runs ``python -m saelab <args>`` (as ``runpy`` does for ``-m``) after printing where saelab was imported from.
_MAIN = ("import runpy, sys, saelab; print('SAELAB_FILE=' + saelab.__file__, flush=True); "
         "sys.argv = ['saelab', *sys.argv[1:]]; runpy.run_module('saelab', run_name='__main__', alter_sys=True)")


@pytest.mark.slow
def test_installed_package_plans_the_bundled_experiments(tmp_path):
    # the build runs on a copy: an in-tree build would write build/ and *.egg-info into the working tree
    src = tmp_path / "src"
    shutil.copytree(ROOT / "saelab", src / "saelab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                          "--target", str(site), str(src)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert sorted(p.name for p in (site / "saelab" / "experiments").glob("*.yaml")) == [
        "default.yaml", "paper.yaml", "paper_gpu.yaml"]
    assert sorted(p.name for p in (site / "saelab" / "reports" / "assets").iterdir()) == [
        "browser.css", "browser.html", "browser.js"]  # the feature browser's page (package data)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    for experiment, saes in (("default", "SAEs (14 = 7 configurations x 2 seeds"),
                             ("paper", "SAEs (81 = 27 configurations x 3 seeds")):
        res = subprocess.run([sys.executable, "-c", _MAIN, "compare", "--experiment", experiment, "--plan"],
                             cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        first, _, plan = res.stdout.partition("\n")
        assert Path(first.removeprefix("SAELAB_FILE=")).resolve().is_relative_to(site.resolve()), first
        assert plan.startswith(f"experiment: {experiment} (") and saes in plan
        assert "caches (" in plan and "training passes (" in plan and "claims (" in plan
