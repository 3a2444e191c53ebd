"""Shared fixtures: synthetic data with a known dictionary, small caches, the real bundled model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def _sdists_available() -> None:
    """Point saelab at the sdists if setup.sh put them in the venv (the default); nothing to do otherwise."""
    from saelab.paths import sdist_dir

    if not (sdist_dir() / "vaderSentiment-3.3.2.tar.gz").is_file() and Path("/tmp/sd").is_dir():
        os.environ.setdefault("SAELAB_SDISTS", "/tmp/sd")


_sdists_available()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm():
    """The real bundled SmolLM2-135M (dense copy cached after the first load)."""
    from saelab.models.lm import load_lm

    return load_lm()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer random Llama with the bundled tokenizer, saved as a local HF directory (a 'user model')."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from saelab.models.lm import _dense_copy_of_gguf, resolve_model_path

    tok = AutoTokenizer.from_pretrained(str(_dense_copy_of_gguf(resolve_model_path("smollm2-135m"))))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    """40 small .txt documents of random common words (user text for harvests on the tiny model; read-only)."""
    import numpy as np

    d = tmp_path_factory.mktemp("texts")
    words = "the cat sat on a mat while seven quiet dogs watched the river bend".split()
    rng = np.random.default_rng(0)
    for i in range(40):
        (d / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, size=60)))
    return d


# -- the device the parity tests run on -------------------------------------------------------------------------
# ``pytest --device cuda`` (or SAELAB_TEST_DEVICE=cuda) runs the numerical parity tests of the kernels, losses,
# encoders, regularizers, Matryoshka and the SAE on that device: every test that takes the ``device`` fixture.
# ``pytest -m device --device cuda`` runs exactly that subset (the ``device`` marker is added to each of them at
# collection). Inputs are drawn on the CPU (seeded) and moved with ``.to(device)``, so a CPU run and a CUDA run
# see the same numbers; tolerances are the CPU ones, except where a test documents a CUDA one.
def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("SAELAB_TEST_DEVICE", "cpu"),
                     help="device of the tests that take the `device` fixture: cpu, cuda or cuda:N "
                          "(default: $SAELAB_TEST_DEVICE, else cpu); `-m device` selects exactly those tests")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: a parity test that runs on --device (it takes the `device` fixture)")
    if str(config.getoption("--device")).startswith("cuda"):
        # cuBLAS reads its workspace setting when its first handle is made: set before any test runs a CUDA GEMM,
        # so tests under torch.use_deterministic_algorithms(True) get reproducible GEMMs (PyTorch "Reproducibility")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark every test that takes the ``device`` fixture with ``device``, and refuse a ``device`` mark on a test
    that does not take it (``-m device --device cuda`` would run it on the CPU while claiming CUDA)."""
    for item in items:
        takes = "device" in getattr(item, "fixturenames", ())
        if takes:
            item.add_marker(pytest.mark.device)
        elif item.get_closest_marker("device") is not None:
            raise pytest.UsageError(f"{item.nodeid} is marked `device` but does not take the `device` fixture; "
                                    "add a `device` argument and move its tensors with .to(device), or drop the mark")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The ``torch.device`` of ``--device`` (``cpu`` by default). A CUDA device that this machine lacks skips the
    test, naming what is missing.

    Raises:
        pytest.UsageError: ``--device`` is not a device name.
    """
    name = request.config.getoption("--device")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise pytest.UsageError(f"--device {name!r} is not a device name ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(f"--device {name}: torch.cuda.is_available() is False (torch {torch.__version__}, "
                        f"built with CUDA {torch.version.cuda})")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            pytest.skip(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
        dev = torch.device("cuda", index)
    elif dev.type != "cpu":
        raise pytest.UsageError(f"--device {name!r}: the parity tests run on cpu or cuda[:N]")
    return dev
