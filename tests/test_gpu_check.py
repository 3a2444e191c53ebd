"""``scripts/gpu_check.sh --device cpu``: the GPU check's self-test runs every step to the end on a CPU.

On a CPU every "device" run is a CPU run, so the training matrix must agree bit for bit, the killed run must resume
to the uninterrupted weights, and a one-rank torchrun (gloo) must equal the single process.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_self_test_passes_on_cpu(tmp_path):
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {name: s["status"] for name, s in report["steps"].items()}
    assert status.pop("bench_peers (sparsify)", "SKIP") in ("PASS", "SKIP")  # sparsify is optional
    assert set(status.values()) == {"PASS"}, status
    assert set(status) == {"device", "parity tests", "training matrix", "resume after kill -9", "determinism",
                           "torchrun one rank", "bench_step"}
    matrix = report["steps"]["training matrix"]["rows"]
    assert len(matrix) == 20 and all(r["bitwise"] for r in matrix)
    assert report["steps"]["resume after kill -9"]["resumed_from_step"] == 20
