"""LLM judges for auto-interp: the bundled model run locally, or any OpenAI-compatible chat-completions server.

A judge turns a batch of chat conversations (``[{"role": "system" | "user" | "assistant", "content": str}, ...]``)
into one reply string each, greedily / at temperature 0, and counts what it cost (:class:`JudgeUsage`). Judges are
chosen by name from :data:`JUDGES` (``saelab eval --suite autointerp --judge local|openai``):

``local`` (:class:`LocalJudge`)
    A causal LM loaded with :func:`saelab.models.lm.load_lm` (default: the bundled SmolLM2-135M-Instruct), prompted
    through its tokenizer's chat template and decoded greedily with ``transformers`` ``generate`` (``do_sample=False``),
    several conversations per forward (left padding). Deterministic for a given model, batch size and thread count.
    A 135M-parameter model is a weak judge: its scores show that the pipeline runs offline end to end, not how
    interpretable the latents are; the result names the judge so the numbers are never mistaken for a GPT judge's.

``openai`` (:class:`OpenAIJudge`)
    ``POST {base_url}/chat/completions`` of any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, ``transformers
    serve`` ...), with the API key read from the environment variable named by ``api_key_env``; retries with
    exponential backoff on connection errors, timeouts, HTTP 429 and 5xx (honouring ``Retry-After``); a minimum
    interval between requests (``requests_per_minute``); an on-disk response cache keyed by the SHA-256 of
    ``(model, messages, generation parameters)``, one JSON file per reply written atomically, so a re-run (or a run
    resumed after a failure) sends no request it has already paid for; and prompt/completion token and cost
    counters taken from each response's ``usage`` (cost from the optional per-1,000-token prices).

Protocol reference: SAEBench ``evals/autointerp/main.py`` (Karvonen et al. 2025; gpt-4o-mini judge).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import torch

from ..io import atomic_write
from ..paths import cache_dir
from ..registry import Registry

Messages = list[dict[str, str]]
"""One chat conversation: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``."""

__all__ = ["JUDGES", "JudgeConfig", "JudgeError", "JudgeUsage", "Judge", "LocalJudge", "OpenAIJudge", "RateLimiter",
           "cache_key", "make_judge", "Messages"]


class JudgeError(RuntimeError):
    """A judge could not produce a reply (server unreachable after the retries, HTTP 4xx, missing API key ...)."""


@dataclass
class JudgeConfig:
    """How to reach the auto-interp judge (flags of ``saelab eval --suite autointerp``)."""

    judge: str = "local"
    """Judge: 'local' (the bundled SmolLM2-135M-Instruct through transformers, offline; weak) or 'openai' (any
    OpenAI-compatible /v1/chat/completions server: --base_url, --judge_model, key in $OPENAI_API_KEY)."""
    judge_model: str | None = None
    """local: model alias / .gguf / HF directory (default: the bundled smollm2-135m); openai: the server's model
    name (required, e.g. gpt-4o-mini)."""
    base_url: str = "https://api.openai.com/v1"
    """openai: base URL of the server, up to and including /v1 (the judge POSTs to <base_url>/chat/completions)."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: name of the environment variable holding the API key (may be unset for a server on localhost)."""
    temperature: float | None = 0.0
    """openai: sampling temperature sent to the server (None: leave it out, for models that reject it)."""
    max_tokens_field: str = "max_tokens"
    """openai: request field for the reply length ('max_completion_tokens' for OpenAI reasoning models)."""
    request_timeout_s: float = 120.0
    """openai: seconds before a request times out (then it is retried)."""
    max_retries: int = 5
    """openai: retries after a connection error, timeout, HTTP 429 or 5xx (then the run stops; re-running it
    reuses every cached reply)."""
    backoff_s: float = 1.0
    """openai: first retry delay; doubles each retry (capped at 60 s); a Retry-After header takes precedence."""
    requests_per_minute: float | None = None
    """openai: at most this many requests per minute (None: no limit)."""
    judge_cache: str | None = None
    """openai: response cache directory (default: ~/.cache/saelab/judge_cache; '' disables the cache)."""
    price_prompt_per_1k: float | None = None
    """openai: price of 1,000 prompt tokens (any currency) for the cost counter (None: cost not reported)."""
    price_completion_per_1k: float | None = None
    """openai: price of 1,000 completion tokens for the cost counter."""
    judge_batch_size: int = 8
    """local: conversations decoded together (left-padded greedy batches)."""


@dataclass
class JudgeUsage:
    """What a judge did and cost.

    Attributes:
        n_calls: replies asked for (cache hits included).
        n_requests: model invocations actually made (HTTP requests including retries, or local generations).
        n_cache_hits: replies served from the on-disk cache.
        n_retries: retried HTTP requests.
        n_bad_responses: HTTP 200 responses without a usable ``choices[0].message.content`` (treated as "").
        n_missing_usage: responses without a ``usage`` block (their tokens are not counted).
        prompt_tokens, completion_tokens: tokens of the replies generated in this run (cache hits excluded).
        cached_prompt_tokens, cached_completion_tokens: tokens of the replies served from the cache (recorded when
            they were first generated).
        cost: ``prompt_tokens / 1000 * price_prompt_per_1k + completion_tokens / 1000 * price_completion_per_1k``
            (None when no price is configured).
        seconds: wall-clock seconds spent inside the judge.
    """

    n_calls: int = 0
    n_requests: int = 0
    n_cache_hits: int = 0
    n_retries: int = 0
    n_bad_responses: int = 0
    n_missing_usage: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    cost: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Judge(Protocol):
    """What the auto-interp eval needs from a judge."""

    description: str
    """Human-readable identity of the judge (kind, model, endpoint), recorded in every result."""
    usage: JudgeUsage

    def complete(self, conversations: Sequence[Messages], max_tokens: int) -> list[str]:
        """One reply per conversation (greedy / temperature 0), at most ``max_tokens`` tokens each."""
        ...


def _check_messages(conversations: Sequence[Messages]) -> None:
    for conv in conversations:
        if not conv:
            raise ValueError("a judge conversation is empty; give at least one message")
        for m in conv:
            if set(m) != {"role", "content"} or m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"bad chat message {m!r}: need exactly 'role' (system|user|assistant) and 'content'")


# ------------------------------------------------------------------------------------------------------ local


class LocalJudge:
    """Greedy chat completions from a local ``transformers`` causal LM.

    Args:
        lm: a :class:`~saelab.models.lm.LoadedLM` (its model and tokenizer; the tokenizer needs a chat template).
        batch_size: conversations per ``generate`` call (left-padded).

    Raises:
        ValueError: the tokenizer has no chat template, or ``batch_size < 1``.
    """

    def __init__(self, lm, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"judge_batch_size must be >= 1, got {batch_size}")
        tok = lm.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"judge model {lm.name!r} has no chat template; use an instruction-tuned model "
                             "(e.g. the bundled smollm2-135m) or --judge openai")
        self.lm, self.batch_size = lm, batch_size
        import transformers

        self.description = f"local: {lm.name} (transformers {transformers.__version__}, greedy, chat template)"
        self.usage = JudgeUsage()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)

    def _prompt_ids(self, conv: Messages) -> list[int]:
        out = self.lm.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(i) for i in ids]

    @torch.inference_mode()
    def complete(self, conversations: Sequence[Messages], max_tokens: int) -> list[str]:
        """Greedy replies; see :class:`Judge`. Decoding stops at the tokenizer's EOS (``<|im_end|>`` in SmolLM2)."""
        from transformers import GenerationConfig

        _check_messages(conversations)
        t0 = time.perf_counter()
        model, tok = self.lm.model, self.lm.tokenizer
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=int(max_tokens), pad_token_id=self.pad_id,
                                   eos_token_id=tok.eos_token_id, bos_token_id=None)
        replies: list[str] = []
        for s in range(0, len(conversations), self.batch_size):
            prompts = [self._prompt_ids(c) for c in conversations[s : s + self.batch_size]]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            new = out[:, width:].tolist()
            for p, row in zip(prompts, new):
                if tok.eos_token_id is not None and tok.eos_token_id in row:
                    row = row[: row.index(tok.eos_token_id) + 1]  # count the EOS, as servers do
                while row and row[-1] == self.pad_id and self.pad_id != tok.eos_token_id:
                    row = row[:-1]
                self.usage.prompt_tokens += len(p)
                self.usage.completion_tokens += len(row)
                replies.append(tok.decode(row, skip_special_tokens=True).strip())
            self.usage.n_requests += len(prompts)
        self.usage.n_calls += len(conversations)
        self.usage.seconds += time.perf_counter() - t0
        return replies


# ----------------------------------------------------------------------------------------------------- openai


class RateLimiter:
    """At most ``per_minute`` events per minute, by spacing them at least ``60 / per_minute`` seconds apart.

    Args:
        per_minute: events per minute (``None`` or <= 0: no limit).
        clock, sleep: injectable time functions (tests); default ``time.monotonic`` / ``time.sleep``.
    """

    def __init__(self, per_minute: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 60.0 / per_minute if per_minute and per_minute > 0 else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = -float("inf")
        self._lock = threading.Lock()

    def wait(self) -> float:
        """Block until the next event may happen; returns the seconds slept."""
        with self._lock:
            now = self.clock()
            delay = max(0.0, self._next - now)
            if delay > 0:
                self.sleep(delay)
            self._next = max(now, self._next) + self.interval
            return delay


def cache_key(model: str, messages: Messages, params: dict[str, Any]) -> str:
    """SHA-256 hex digest of ``(model, messages, params)`` as canonical JSON (sorted keys, no whitespace).

    The endpoint URL is deliberately not part of the key: the same model behind another address (a new port, a
    proxy) reuses the cached replies.
    """
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class OpenAIJudge:
    """Chat completions from an OpenAI-compatible server (see the module docstring for retries, cache, counters).

    Args:
        cfg: a :class:`JudgeConfig` (or any object with its fields); ``cfg.judge_model`` is the server's model name.
        session: an optional ``requests.Session`` (default: a new one).
        sleep: injectable sleep for the retry backoff (tests).

    Raises:
        ValueError: no model name, a malformed ``base_url``, or the API-key variable unset for a non-local server.
    """

    def __init__(self, cfg, session=None, sleep: Callable[[float], None] = time.sleep) -> None:
        import requests

        if not cfg.judge_model:
            raise ValueError("--judge openai needs --judge_model (the server's model name, e.g. gpt-4o-mini)")
        url = urlparse(cfg.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"--base_url {cfg.base_url!r} is not an http(s) URL such as https://api.openai.com/v1")
        self.cfg = cfg
        self.model = str(cfg.judge_model)
        self.endpoint = cfg.base_url.rstrip("/") + "/chat/completions"
        self.api_key = os.environ.get(cfg.api_key_env) or None
        local = url.hostname in ("localhost", "127.0.0.1", "::1")
        if self.api_key is None and not local:
            raise ValueError(f"the API key variable ${cfg.api_key_env} is not set: export it, or name another "
                             "variable with --api_key_env")
        self.session = session or requests.Session()
        self.sleep = sleep
        self.limiter = RateLimiter(cfg.requests_per_minute)
        self.cache: Path | None = None
        if cfg.judge_cache != "":
            self.cache = Path(cfg.judge_cache) if cfg.judge_cache else cache_dir("judge_cache")
        priced = cfg.price_prompt_per_1k is not None or cfg.price_completion_per_1k is not None
        self.usage = JudgeUsage(cost=0.0 if priced else None)
        self.description = f"openai: {self.model} at {cfg.base_url.rstrip('/')}"

    # -- cache
    def _params(self, max_tokens: int) -> dict[str, Any]:
        p: dict[str, Any] = {self.cfg.max_tokens_field: int(max_tokens)}
        if self.cfg.temperature is not None:
            p["temperature"] = float(self.cfg.temperature)
        return p

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache is None else self.cache / key[:2] / f"{key}.json"

    def _read_cache(self, key: str) -> dict[str, Any] | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as e:  # truncated/corrupt entry (UnicodeDecodeError is a ValueError)
            problem = f"is unreadable or not valid JSON ({e})"
        else:
            if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                return entry
            problem = "is not a cached reply (no 'content' string)"
        # a damaged entry costs one request, not the run: ask the judge again; _write_cache then replaces it
        warnings.warn(f"judge cache entry {path} {problem}; asking the judge again and overwriting it", stacklevel=2)
        return None

    def _write_cache(self, key: str, entry: dict[str, Any]) -> None:
        path = self._cache_path(key)
        if path is not None:
            text = json.dumps(entry, ensure_ascii=False, indent=1)
            atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))

    # -- HTTP
    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        import requests

        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.usage.n_retries += 1
            self.limiter.wait()
            self.usage.n_requests += 1
            retry_after = None
            try:
                r = self.session.post(self.endpoint, json=payload, headers=headers, timeout=self.cfg.request_timeout_s)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError:
                        last = f"HTTP 200 with a body that is not JSON: {r.text[:200]!r}"
                elif r.status_code in _RETRY_STATUS:
                    last = f"HTTP {r.status_code}: {r.text[:300]}"
                    retry_after = _retry_after_seconds(r.headers.get("Retry-After"))
                else:
                    raise JudgeError(f"{self.endpoint} answered HTTP {r.status_code}: {r.text[:500]} (check "
                                     f"--base_url, --judge_model and ${self.cfg.api_key_env})")
            if attempt < self.cfg.max_retries:
                self.sleep(retry_after if retry_after is not None else min(60.0, self.cfg.backoff_s * 2**attempt))
        raise JudgeError(f"{self.endpoint} failed {self.cfg.max_retries + 1} times (last: {last}); re-run the same "
                         "command later: replies received so far are cached")

    def complete(self, conversations: Sequence[Messages], max_tokens: int) -> list[str]:
        """Replies in order; see :class:`Judge`. Cached replies are returned without a request.

        Raises:
            JudgeError: HTTP 4xx other than 408/409/425/429, or still failing after ``max_retries`` retries.
        """
        _check_messages(conversations)
        t0 = time.perf_counter()
        params = self._params(max_tokens)
        out = []
        try:
            for conv in conversations:
                self.usage.n_calls += 1
                key = cache_key(self.model, conv, params)
                hit = self._read_cache(key)
                if hit is not None:
                    self.usage.n_cache_hits += 1
                    self.usage.cached_prompt_tokens += int(hit.get("prompt_tokens") or 0)
                    self.usage.cached_completion_tokens += int(hit.get("completion_tokens") or 0)
                    out.append(hit["content"])
                    continue
                body = self._post({"model": self.model, "messages": conv, **params})
                content = _reply_content(body)
                if content is None:
                    self.usage.n_bad_responses += 1
                    content = ""
                usage = body.get("usage") if isinstance(body, dict) else None
                pt = ct = None
                if isinstance(usage, dict):
                    pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
                    self.usage.prompt_tokens += pt
                    self.usage.completion_tokens += ct
                    if self.usage.cost is not None:
                        self.usage.cost += (pt * (self.cfg.price_prompt_per_1k or 0.0)
                                            + ct * (self.cfg.price_completion_per_1k or 0.0)) / 1000.0
                else:
                    self.usage.n_missing_usage += 1
                self._write_cache(key, {"model": self.model, "params": params, "messages": conv, "content": content,
                                        "prompt_tokens": pt, "completion_tokens": ct,
                                        "response_model": body.get("model") if isinstance(body, dict) else None})
                out.append(content)
        finally:
            self.usage.seconds += time.perf_counter() - t0
        return out


def _reply_content(body: Any) -> str | None:
    """``choices[0].message.content`` of a chat-completions response, or None when absent / not a string."""
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header given in seconds (HTTP dates and junk are ignored), capped at 60."""
    if not value:
        return None
    try:
        return min(60.0, max(0.0, float(value)))
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------- registry

JudgeFactory = Callable[..., Judge]
JUDGES: Registry[JudgeFactory] = Registry("judge")
"""Judge name -> ``factory(cfg: JudgeConfig, lm: LoadedLM | None) -> Judge``."""


@JUDGES.register("local")
def _local_factory(cfg, lm=None) -> LocalJudge:
    # a judge model other than the SAE's loads on the eval's device (``EvalConfig.device``)
    from ..devices import resolve_device
    from ..models.lm import DEFAULT_MODEL, load_lm, resolve_model_path

    want = cfg.judge_model or DEFAULT_MODEL
    if lm is None or not _same_model(want, lm.name, resolve_model_path):
        lm = load_lm(want, device=str(resolve_device(getattr(cfg, "device", "cpu"))))
    return LocalJudge(lm, batch_size=cfg.judge_batch_size)


def _same_model(a: str, b: str, resolve) -> bool:
    try:
        return a == b or resolve(a).resolve() == resolve(b).resolve()
    except FileNotFoundError:
        return False


@JUDGES.register("openai")
def _openai_factory(cfg, lm=None) -> OpenAIJudge:
    return OpenAIJudge(cfg)


def make_judge(cfg, lm=None) -> Judge:
    """The judge named by ``cfg.judge`` (:data:`JUDGES`), built from ``cfg`` (a :class:`JudgeConfig`-like object).

    Args:
        cfg: judge settings.
        lm: the already-loaded SAE model; the ``local`` judge reuses it when it is the judge model.

    Raises:
        KeyError: unknown judge (lists the valid ones). ValueError: see :class:`OpenAIJudge` / :class:`LocalJudge`.
    """
    return JUDGES.get(cfg.judge)(cfg, lm)
