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
