#!/usr/bin/env bash
# Check saelab's GPU path end to end: parity tests on the device, a training matrix against the CPU, resume after
# kill -9, determinism, a one-rank torchrun (NCCL), and the step benchmark next to sparsify's. About 3 minutes on
# one GPU; `--device cpu` is its self-test (tests/test_gpu_check.py runs it). What each step checks, and the flags:
# scripts/gpu_check.py (or `bash scripts/gpu_check.sh --help`).
# Usage: bash scripts/gpu_check.sh [--device cuda|cuda:N|cpu] [--out DIR] [--skip STEP ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu_check: no .venv; run 'bash scripts/setup.sh' first" >&2; exit 1; }
exec "$PY" scripts/gpu_check.py "$@"
