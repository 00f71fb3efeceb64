"""A chat completions client for batch work against any OpenAI-compatible API: retries with
exponential back-off on 429, 5xx, timeouts and dropped connections, honouring ``Retry-After``,
and counters of requests, retries and the token usage the API reports.

It speaks HTTP with httpx rather than through the ``openai`` package so that every retry
decision is made in one loop here (the ``openai`` client retries on its own, by its own rules).
The limit on requests in flight is the number of workers ``batch.run_workers`` starts: each
worker has at most one request out at a time, back-off waits included.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass
from typing import Any

import httpx

from chatrl.data import Message
from chatrl.errors import UserError

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
# Every request would fail the same way: stop the run instead of failing them one by one.
FATAL_STATUSES = {
    401: "the API key was refused",
    403: "access denied",
    404: "no such endpoint or model",
}
MAX_WAIT_S = 60.0  # the longest back-off, whatever Retry-After says


def _is_transient(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


@dataclass
class ClientSettings:
    """Where the teacher lives and how to talk to it (``None`` leaves a setting to the API)."""

    api_base: str
    model: str
    api_key: str | None = None
    concurrency: int = 8
    timeout: float = 120.0  # seconds for one request, reply included
    retries: int = 6  # further attempts after a transient failure
    backoff: float = 1.0  # seconds before the first retry; doubles with each one
    max_tokens: int | None = None
    temperature: float | None = None

    def check(self) -> None:
        """Raise UserError on settings that cannot work."""
        if not self.api_base.startswith(("http://", "https://")):
            raise UserError(f"--api-base must be an http(s) URL, got {self.api_base!r}")
        if not self.model:
            raise UserError("--model must name the teacher model")
        if self.concurrency < 1:
            raise UserError("--concurrency must be at least 1")
        if self.timeout <= 0 or self.backoff < 0 or self.retries < 0:
            raise UserError("--timeout must be positive, --retries and --backoff not negative")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError("--max-tokens must be at least 1")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise UserError("--temperature must be between 0 and 2")


def api_key_from_env(name: str | None) -> str | None:
    """The API key from the environment variable ``name`` (default OPENAI_API_KEY, which may be
    unset: local servers need no key). A variable named explicitly must be set."""
    if name is None:
        return os.environ.get(DEFAULT_KEY_ENV) or None
    key = os.environ.get(name)
    if not key:
        raise UserError(f"--api-key-env {name}: the environment variable {name} is not set")
    return key


@dataclass
class Reply:
    """The first choice of a chat completion."""

    text: str
    finish_reason: str | None
    refusal: str | None = None  # OpenAI's structured refusal, when the API sends one


@dataclass
class Counters:
    """What the run cost so far: HTTP requests (retries included) and the API's token usage."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RequestFailed(Exception):
    """A request that failed for good: a 4xx the request itself caused, or retries used up."""


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return (
        f"HTTP {response.status_code}: {message or response.text[:200] or response.reason_phrase}"
    )


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asks us to wait (OpenAI's retry-after-ms, or Retry-After)."""
    for header, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return max(0.0, float(response.headers[header]) * scale)
        except (KeyError, ValueError):
            continue
    return None


def _reply(body: Any) -> Reply:
    """The first choice of a chat completion body; ValueError when it is not one."""
    try:
        choice = body["choices"][0]
        message = choice["message"]
        text = message.get("content") or ""
    except (TypeError, KeyError, IndexError, AttributeError):
        raise ValueError("the response is not a chat completion") from None
    if not isinstance(text, str):
        raise ValueError("the response's content is not text")
    return Reply(text, choice.get("finish_reason"), message.get("refusal") or None)


class ChatClient:
    """Chat completions from ``settings.model`` at ``settings.api_base``; use as an async
    context manager (it holds the connection pool)."""

    def __init__(self, settings: ClientSettings) -> None:
        settings.check()
        self.settings = settings
        self.url = settings.api_base.rstrip("/") + "/chat/completions"
        self.counters = Counters()
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self.http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(settings.timeout),
            limits=httpx.Limits(max_connections=settings.concurrency),
        )

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.http.aclose()

    def _body(self, messages: list[Message]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.settings.model, "messages": messages}
        if self.settings.max_tokens is not None:
            body["max_tokens"] = self.settings.max_tokens
        if self.settings.temperature is not None:
            body["temperature"] = self.settings.temperature
        return body

    async def complete(self, messages: list[Message]) -> Reply:
        """The teacher's reply to ``messages``. Transient failures are retried with back-off;
        raises RequestFailed when a request fails for good and UserError (stop the run) on
        401/403/404, which every other request would get too."""
        body = self._body(messages)
        attempt = 0
        while True:
            self.counters.requests += 1
            wait = None
            try:
                async with asyncio.timeout(self.settings.timeout):
                    response = await self.http.post(self.url, json=body)
            except (TimeoutError, httpx.TimeoutException):
                problem = f"no reply within {self.settings.timeout:g} s"
            except httpx.TransportError as e:
                problem = f"connection failed: {e or type(e).__name__}"
            else:
                if response.status_code == 200:
                    try:
                        return self._count(response.json())
                    except ValueError as e:
                        problem = f"malformed response: {e}"
                elif response.status_code in FATAL_STATUSES:
                    hint = "; --api-base usually ends in /v1" if response.status_code == 404 else ""
                    raise UserError(
                        f"{self.url} with model {self.settings.model!r}: "
                        f"{FATAL_STATUSES[response.status_code]} ({_error_message(response)})"
                        + hint
                    )
                elif _is_transient(response.status_code):
                    problem, wait = _error_message(response), _retry_after(response)
                else:
                    raise RequestFailed(_error_message(response))
            if attempt == self.settings.retries:
                raise RequestFailed(f"{problem} (gave up after {attempt + 1} attempts)")
            self.counters.retries += 1
            backoff = self.settings.backoff * 2**attempt * random.uniform(0.5, 1.0)
            await asyncio.sleep(min(MAX_WAIT_S, max(backoff, wait or 0.0)))
            attempt += 1

    def _count(self, body: Any) -> Reply:
        reply = _reply(body)
        usage = body.get("usage") or {}
        self.counters.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.counters.completion_tokens += int(usage.get("completion_tokens") or 0)
        return reply
