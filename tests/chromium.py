"""Headless Chromium for the tests that render saelab's HTML pages (feature browser, compare report)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")


def run_chromium(tmp_path: Path, url: str, *extra: str, budget_ms: int = 5000) -> subprocess.CompletedProcess:
    """Load ``url`` in headless Chromium (``extra`` flags such as ``--dump-dom`` or ``--screenshot=PATH``).

    Skips the test when ``/usr/bin/chromium`` is missing; fails on a non-zero exit (with Chromium's stderr).
    Returns the finished process (stdout holds a dumped DOM; stderr the console log lines).
    """
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing: run scripts/install_chromium.sh (Debian package 'chromium')")
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}", *extra, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res
