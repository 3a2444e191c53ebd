"""SAELens itself loads our saved SAEs and computes the same codes and reconstructions.

SAELens is not a saelab dependency (it pins its own stack), so this test runs only when
``SAELAB_SAELENS_PYTHON`` names a Python interpreter that has ``sae-lens`` installed, e.g.::

    python3 -m venv /tmp/slv && /tmp/slv/bin/pip install torch==2.13.0 sae-lens==6.54.0
    SAELAB_SAELENS_PYTHON=/tmp/slv/bin/python .venv/bin/python -m pytest tests/test_saelens_compat.py
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from saelab.sae.activations import ACTIVATIONS
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE
from saelab.sae.saving import save_sae

PY = os.environ.get("SAELAB_SAELENS_PYTHON")

_CHECK = """
import sys, torch
from sae_lens import SAE
sae = SAE.load_from_disk(sys.argv[1], device="cpu")
r = torch.load(sys.argv[1] + "/ref.pt")
f = sae.encode(r["x"]); xh = sae.decode(f)
print(type(sae).__name__, float((f - r["f"]).abs().max()), float((xh - r["xh"]).abs().max()))
"""


@pytest.mark.skipif(not PY, reason="set SAELAB_SAELENS_PYTHON to a python with sae-lens installed")
@pytest.mark.parametrize("activation", ACTIVATIONS.names())
def test_saelens_loads_our_sae(tmp_path, activation):
    sae = SAE(SAEConfig(d_in=32, d_sae=128, activation=activation, k=8, hook_name="blocks.3.hook_resid_post", model_name="m")).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        if activation in ("batchtopk", "matryoshka_batchtopk"):
            sae.activation.threshold.fill_(0.3)
    save_sae(sae, tmp_path)
    x = torch.randn(64, 32)
    torch.save({"x": x, "f": sae.encode(x).detach(), "xh": sae(x).detach()}, tmp_path / "ref.pt")
    out = subprocess.run([PY, "-c", _CHECK, str(tmp_path)], capture_output=True, text=True, check=True).stdout.split()
    cls, df, dxh = out[-3], float(out[-2]), float(out[-1])
    assert cls == {"relu": "StandardSAE", "topk": "TopKSAE"}.get(activation, "JumpReLUSAE")
    assert df < 1e-5 and dxh < 1e-4
