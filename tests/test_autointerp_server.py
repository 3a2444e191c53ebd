"""The ``openai`` auto-interp judge against a real OpenAI-compatible server on loopback: ``transformers serve``
serving the tiny random Llama of conftest.py, behind a small fault-injecting HTTP proxy (stdlib ``http.server``) that
answers the first requests with HTTP 429 / 500 and counts what reaches it. Checks retries, the on-disk cache (a
second run sends nothing), the token and cost counters (against the server's own ``usage`` and the tokenizer), errors
that must not be retried, and a whole ``autointerp`` run through the server.

Needs the serving extras pinned in pyproject's ``dev`` extra (fastapi, uvicorn, openai); skipped without them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests

from saelab.data.split import DataConfig
from saelab.evals import run_suite
from saelab.evals.autointerp import AutoInterpConfig
from saelab.evals.base import LMActivationStore
from saelab.evals.judges import JudgeError, LocalJudge, OpenAIJudge
from saelab.models.lm import load_lm

pytestmark = pytest.mark.slow
for _mod in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(_mod, reason="transformers serve needs the dev extras: pip install -e '.[dev]'")

HOOK = "blocks.1.hook_resid_post"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    """``transformers serve <tiny model>`` on 127.0.0.1, offline; yields its base URL (``.../v1``)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(log.parent / "hf")}
    cli = Path(sys.executable).parent / "transformers"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(cli), "serve", str(tiny_llama_dir), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--dtype", "float32"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not come up in 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


class FlakyProxy:
    """Loopback HTTP proxy in front of the server: answers the statuses queued in ``fail`` first, then forwards.

    Attributes:
        posts: POSTs received; forwarded: bodies of the server's answers (parsed JSON), in order.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rsplit("/v1", 1)[0]
        self.fail: list[int] = []
        self.posts = 0
        self.forwarded: list[dict] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.posts += 1
                if proxy.fail:
                    status = proxy.fail.pop(0)
                    data = json.dumps({"error": {"message": f"injected {status}"}}).encode()
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                else:
                    r = requests.post(proxy.upstream + self.path, data=body,
                                      headers={"Content-Type": "application/json"}, timeout=120)
                    data, status = r.content, r.status_code
                    if status == 200:
                        proxy.forwarded.append(r.json())
                    self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxy(server):
    p = FlakyProxy(server)
    yield p
    p.close()


def _cfg(proxy, model_dir, cache, **kw):
    return AutoInterpConfig(**{"judge": "openai", "base_url": proxy.url, "judge_model": str(model_dir),
                               "judge_cache": str(cache), "max_retries": 3, "backoff_s": 0.01,
                               "requests_per_minute": 6000, "price_prompt_per_1k": 0.5,
                               "price_completion_per_1k": 2.0, **kw})


CONVS = [[{"role": "system", "content": "Reply with numbers."},
          {"role": "user", "content": "Which of 1, 2, 3 is odd?"}],
         [{"role": "user", "content": "Explain: the cat sat on the mat."}]]


def test_retries_cache_and_token_counter_against_transformers_serve(proxy, tiny_llama_dir, tmp_path):
    tok = load_lm(str(tiny_llama_dir)).tokenizer
    cache = tmp_path / "cache"
    judge = OpenAIJudge(_cfg(proxy, tiny_llama_dir, cache))
    proxy.fail = [429, 500]  # the first request is refused twice, then goes through
    replies = judge.complete(CONVS, max_tokens=6)
    u = judge.usage
    assert proxy.posts == 4 and len(proxy.forwarded) == 2
    assert (u.n_calls, u.n_requests, u.n_retries, u.n_cache_hits, u.n_bad_responses) == (2, 4, 2, 0, 0)
    assert replies == [f["choices"][0]["message"]["content"] for f in proxy.forwarded]
    # token counters: the server's usage blocks, which count the chat-templated prompt the tokenizer builds
    assert u.prompt_tokens == sum(f["usage"]["prompt_tokens"] for f in proxy.forwarded)
    templated = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"] for c in CONVS]
    assert u.prompt_tokens == sum(len(t) for t in templated)
    assert u.completion_tokens == sum(f["usage"]["completion_tokens"] for f in proxy.forwarded)
    assert 0 < u.completion_tokens <= 2 * 6
    assert u.cost == pytest.approx((u.prompt_tokens * 0.5 + u.completion_tokens * 2.0) / 1000)
    files = sorted(cache.rglob("*.json"))
    assert len(files) == 2 and all(json.loads(f.read_text())["content"] in replies for f in files)
    assert not list(cache.rglob("*.tmp"))  # atomic writes leave no temporary file

    # a second judge on the same cache sends nothing and returns the same replies
    again = OpenAIJudge(_cfg(proxy, tiny_llama_dir, cache))
    assert again.complete(CONVS, max_tokens=6) == replies
    assert proxy.posts == 4
    a = again.usage
    assert (a.n_cache_hits, a.n_requests, a.prompt_tokens, a.cost) == (2, 0, 0, 0.0)
    assert (a.cached_prompt_tokens, a.cached_completion_tokens) == (u.prompt_tokens, u.completion_tokens)
    # other generation parameters are another cache entry
    again.complete(CONVS[:1], max_tokens=5)
    assert proxy.posts == 5

    # the server's greedy decoding is the local judge's
    assert LocalJudge(load_lm(str(tiny_llama_dir)), batch_size=1).complete(CONVS, max_tokens=6) == replies


def test_errors_that_must_not_be_retried_and_exhausted_retries(proxy, tiny_llama_dir, tmp_path):
    judge = OpenAIJudge(_cfg(proxy, tiny_llama_dir, tmp_path / "c", max_retries=2))
    proxy.fail = [401]
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge.complete(CONVS[:1], max_tokens=4)
    assert proxy.posts == 1 and judge.usage.n_retries == 0
    proxy.fail = [500, 503, 502]
    with pytest.raises(JudgeError, match="failed 3 times"):
        judge.complete(CONVS[:1], max_tokens=4)
    assert proxy.posts == 4 and judge.usage.n_retries == 2
    assert not list((tmp_path / "c").rglob("*.json"))  # nothing cached from failures


def test_autointerp_suite_through_the_server_then_from_the_cache(proxy, tiny_llama_dir, tmp_path):
    from saelab.sae.config import SAEConfig
    from saelab.sae.model import SAE
    from saelab.sae.saving import save_sae

    import torch

    texts = tmp_path / "texts"
    texts.mkdir()
    words = "the cat sat on a mat while seven quiet dogs watched the river bend".split()
    rng = np.random.default_rng(0)
    for i in range(30):
        (texts / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, size=120)))
    torch.manual_seed(0)
    sae_dir = save_sae(SAE(SAEConfig(d_in=32, d_sae=48, activation="topk", k=4, model_name=str(tiny_llama_dir),
                                     hook_name=HOOK)), tmp_path / "sae")
    lm = load_lm(str(tiny_llama_dir))
    store = LMActivationStore(lm.name, HOOK, root=tmp_path / "store")
    cfg = _cfg(proxy, tiny_llama_dir, tmp_path / "cache", sae=str(sae_dir), n_tokens=1500, context_size=48, buffer=5,
               n_latents=2, progress=False, explanation_max_tokens=6, prediction_max_tokens=6,
               data=DataConfig(corpora=[], text_files=[str(texts)], eval_fraction=0.5))
    proxy.fail = [503]
    r1 = run_suite("autointerp", cfg, lm=lm, store=store)
    assert r1.judge == f"openai: {tiny_llama_dir} at {proxy.url}" and r1.judge_kind == "openai"
    assert r1.usage["n_requests"] == 5 and r1.usage["n_retries"] == 1 and proxy.posts == 5
    assert len(r1.latents) == 2
    p = r1.parse
    assert sum(p[k] for k in p if k.startswith("prediction_") and "indices" not in k) == 2  # every verdict classified
    assert r1.n_scored + r1.n_unscored == 2
    saved = json.loads((sae_dir / "eval_autointerp.json").read_text())
    assert saved["judge"] == r1.judge and saved["usage"]["prompt_tokens"] == r1.usage["prompt_tokens"] > 0
    r2 = run_suite("autointerp", cfg, lm=lm, store=store)
    assert proxy.posts == 5 and r2.usage["n_cache_hits"] == 4 and r2.usage["n_requests"] == 0
    assert [x["explanation_raw"] for x in r2.latents] == [x["explanation_raw"] for x in r1.latents]
    assert [x["prediction_raw"] for x in r2.latents] == [x["prediction_raw"] for x in r1.latents]
