#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for tests/test_browser.py (the feature-browser render check).
# Idempotent: does nothing when /usr/bin/chromium already exists. Needs root (or sudo) and network access
# to the Debian mirrors; CI calls it from .ci/run before the test suite.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_chromium.sh: need root (or sudo) to apt-get install chromium" >&2; exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
/usr/bin/chromium --version
