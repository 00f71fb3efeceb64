"""The OpenAI-compatible server: ``POST /v1/chat/completions`` (streaming too), ``GET /v1/models``,
``GET /health``, and the web chat page at ``/``.

Requests are checked and tokenised here, then handed to the ``GenerationWorker`` thread, which
owns the model and batches every request continuously; the event loop only waits for its
results, and cancels a request whose client has gone. Every error has the OpenAI shape
``{"error": {"message", "type", "param", "code"}}``; a server at its limits answers 429. With
an API key set, every ``/v1`` request must carry ``Authorization: Bearer KEY``; the page and
``/health`` hold no data and stay open (a browser cannot send the key when it opens the page;
the page asks for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from chatrl.batching import ContinuousBatcher
from chatrl.chat_format import encode_prompt
from chatrl.data import Message
from chatrl.engine import Completion, Engine, SamplingParams
from chatrl.errors import UserError
from chatrl.serve.worker import Busy, GenerationWorker, Job

STATIC = Path(__file__).parent / "static"
# A reply's length when the request does not say (and the context leaves room for it).
DEFAULT_MAX_TOKENS = 256
# How often a waiting request looks whether its client or the generation thread has gone.
POLL_S = 0.25
# No inline scripts or styles on the page: even text that slipped through unescaped cannot run.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
RETRY_AFTER = {"Retry-After": "1"}  # seconds; OpenAI clients wait as long before they retry


@dataclass
class ServeSettings:
    """What the server answers to and its limits: per request, then for the server."""

    model_name: str
    api_key: str | None = None
    max_request_bytes: int = 1_000_000
    max_n: int = 8
    max_tokens_limit: int = 1024
    max_queue: int = 256  # generations (a request asks for n) queued or running, else 429
    max_queue_tokens: int = 262_144  # their prompt plus max_tokens, summed, else 429
    max_batch_size: int = 64  # generations decoded together; more wait
    max_batch_tokens: int = 65_536  # cache slots of those: rows times the longest row
    prefill_chunk: int = 512  # prompt tokens run between two decode steps
    stream_interval: int = 2  # tokens a stream's write carries (the first and last go at once)


class APIError(Exception):
    """An error to answer with, in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ChatMessage(BaseModel):
    """One message. ``developer`` is OpenAI's newer name for ``system``; content may be a string
    or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def join_text_parts(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in value):
                raise ValueError("only text content parts are supported")
            return "".join(str(part.get("text", "")) for part in value)
        return value

    def as_message(self) -> Message:
        return {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.content,
        }


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that chatrl honours; others are ignored.

    ``None`` means the default, as it does for OpenAI.
    """

    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = APIError(413, f"the request body is larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_request(body: bytes) -> ChatRequest:
    """The request, or an APIError (400) that names the first bad field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        param = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {message}", param=param or None) from None


def sampling_params(
    request: ChatRequest, prompt_tokens: int, context: int | None, settings: ServeSettings
) -> SamplingParams:
    """The request's sampling settings, checked against the server's limits and the context."""
    n = 1 if request.n is None else request.n
    if n > settings.max_n:
        raise APIError(400, f"n must be at most {settings.max_n} on this server", param="n")
    room = settings.max_tokens_limit if context is None else context - prompt_tokens
    if room < 1:
        raise APIError(
            400,
            f"the messages are {prompt_tokens} tokens, which fills the model's context of "
            f"{context} tokens; shorten the conversation",
            param="messages",
            code="context_length_exceeded",
        )
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, settings.max_tokens_limit, room)
    elif max_tokens > settings.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens must be at most {settings.max_tokens_limit} on this server",
            param="max_tokens",
        )
    elif max_tokens > room:
        raise APIError(
            400,
            f"the model's context is {context} tokens: the messages take {prompt_tokens}, "
            f"which leaves room for max_tokens={room}, not {max_tokens}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        n=n,
        stop=request.stop,
        seed=request.seed,
    )


class _Mailbox:
    """Hands the worker thread's items to the event loop's request queues. Every decode step
    sends one item per open stream; they go over in one wake-up of the loop (a
    ``call_soon_threadsafe`` each would wake it once per token of every stream)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, object]] = []

    def sender(self, queue: asyncio.Queue) -> Callable[[object], None]:
        """A function the worker thread can call to put an item on ``queue``."""

        def send(item: object) -> None:
            with self.lock:
                self.items.append((queue, item))
                if len(self.items) > 1:  # a delivery is already on its way
                    return
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server stops
                self.loop.call_soon_threadsafe(self._deliver)

        return send

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _disconnect(request: Request) -> None:
    """Return when the client of ``request`` (whose body has been read) disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next(queue: asyncio.Queue, worker: GenerationWorker, gone: asyncio.Future | None = None):
    """The worker's next item for a job, or an error should its thread stop; raise
    ``_ClientGone`` if ``gone`` (``_disconnect``) completes first."""
    if not queue.empty():
        return queue.get_nowait()
    while True:
        if gone is None:  # a stream, once a token: no task to make (Starlette sees hang-ups)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    return await queue.get()
        else:
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, gone}, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
            if not getter.cancel():  # it had its item (a cancelled get leaves it in the queue)
                return getter.result()
            if gone.done():
                raise _ClientGone
        if not worker.alive:
            return RuntimeError("the generation thread has stopped")


def _failure(error: BaseException) -> APIError:
    if isinstance(error, UserError):
        return APIError(400, str(error))
    return APIError(500, "generation failed; the server log has the details", "server_error")


def _usage(prompt_tokens: int, completions: list[Completion]) -> dict[str, int]:
    completion_tokens = sum(len(c.token_ids) for c in completions)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class _Guard:
    """The API key on every ``/v1`` request, the security headers on every response.

    A plain ASGI middleware: Starlette's ``@app.middleware("http")`` would pass every streamed
    chunk through a task and a memory stream, a large share of the event loop's work when many
    streams run.
    """

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"].startswith("/v1"):
            given = Headers(scope=scope).get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                message = "missing API key" if not given else "incorrect API key"
                error = APIError(
                    401, f"{message}: send Authorization: Bearer KEY", code="invalid_api_key"
                )
                return await error.response()(scope, receive, send)

        async def send_with_headers(message: ASGIMessage) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(SECURITY_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The server's FastAPI app around ``engine``; its worker thread runs while the app does."""
    batcher = ContinuousBatcher(
        engine, settings.max_batch_size, settings.max_batch_tokens, settings.prefill_chunk
    )
    worker = GenerationWorker(batcher, settings.max_queue, settings.max_queue_tokens)
    context = engine.context_length
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.mailbox = _Mailbox()  # on the serving loop
        worker.start()
        yield
        worker.stop()

    app = FastAPI(
        title="chatrl", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail), param=None).response()

    app.add_middleware(_Guard, api_key=settings.api_key)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    def health() -> JSONResponse:
        status = "ok" if worker.alive else "the generation thread has stopped"
        figures = {
            "status": status,
            "model": settings.model_name,
            "queued_or_running": worker.generations,
            "running": len(batcher.rows),
            "waiting": len(batcher.waiting),
            "decode_steps": batcher.steps,
            "generated_tokens": worker.generated,
            "completed": worker.completed,
        }
        return JSONResponse(figures, status_code=200 if worker.alive else 503)

    def model_card() -> dict[str, Any]:
        return {
            "id": settings.model_name,
            "object": "model",
            "created": started,
            "owned_by": "chatrl",
        }

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    def model(name: str) -> dict[str, Any]:
        if name != settings.model_name:
            raise APIError(
                404,
                f"no model {name!r} here; this server has {settings.model_name!r}",
                code="model_not_found",
            )
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        chat = parse_request(await _read_body(request, settings.max_request_bytes))
        messages = [m.as_message() for m in chat.messages]
        try:
            prompt = await asyncio.to_thread(encode_prompt, engine.tokenizer, messages)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        params = sampling_params(chat, len(prompt), context, settings)
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": reply_id, "created": created, "model": settings.model_name}
        queue: asyncio.Queue = asyncio.Queue()
        send = request.app.state.mailbox.sender(queue)
        job = Job(prompt, params, stream=bool(chat.stream), send=send)
        _submit(worker, job)
        if chat.stream:
            include_usage = chat.stream_options is not None and chat.stream_options.include_usage
            return StreamingResponse(
                _events(
                    queue, job, worker, head, len(prompt), include_usage, settings.stream_interval
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        gone = asyncio.ensure_future(_disconnect(request))
        try:
            result = await _next(queue, worker, gone)
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        finally:
            gone.cancel()
            job.cancelled = True  # answered already, or the client has gone
        if isinstance(result, BaseException):
            raise _failure(result)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(result)
        ]
        return {
            **head,
            "object": "chat.completion",
            "choices": choices,
            "usage": _usage(len(prompt), result),
        }

    return app


def _submit(worker: GenerationWorker, job: Job) -> None:
    """Queue ``job``: 400 if it can never run, 429 (as OpenAI's rate limits) if the server is
    full."""
    try:
        worker.submit(job)
    except UserError as e:
        raise APIError(400, str(e)) from None
    except Busy as e:
        raise APIError(
            429, f"{e}; retry shortly", e.kind, code="rate_limit_exceeded", headers=RETRY_AFTER
        ) from None


async def _events(
    queue: asyncio.Queue,
    job: Job,
    worker: GenerationWorker,
    head: dict[str, Any],
    prompt_tokens: int,
    include_usage: bool,
    interval: int,
) -> AsyncIterator[str]:
    """Server-sent events of the samples of ``job``, as OpenAI sends them; a client that goes
    away cancels the job. A write goes out once ``interval`` tokens have come (vLLM's
    ``--stream-interval``), at the first token and when a sample finishes; each sample's text
    since the last write in one chunk. A write per token per stream costs the event loop, and
    so the decode thread that shares the GIL with it, a fifth of its throughput at 32 streams
    (bench/serve.py); two tokens a write halve that, and cost a reader nothing it can see."""
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict[str, str], finish_reason: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**head, "choices": [choice]})

    def text_chunks() -> list[str]:
        events = [chunk(i, {"content": text}) for i, text in texts.items()]
        texts.clear()
        return events

    try:
        for i in range(job.params.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        completions: list[Completion] = []
        texts: dict[int, str] = {}  # sample index -> its text not yet written
        waiting = interval - 1  # tokens since the last write: the first one is due at once
        while len(completions) < job.params.n:
            items = [await _next(queue, worker)]
            while not queue.empty():
                items.append(queue.get_nowait())
            events = []
            for item in items:
                if isinstance(item, BaseException):
                    yield "".join(events + text_chunks()) + _sse(_failure(item).body())
                    return
                index, value = item
                if isinstance(value, str):
                    texts[index] = texts.get(index, "") + value
                    waiting += 1
                    continue
                if index in texts:
                    events.append(chunk(index, {"content": texts.pop(index)}))
                completions.append(value)
                events.append(chunk(index, {}, value.finish_reason))
            if events or waiting >= interval:
                waiting = 0
                yield "".join(events + text_chunks())
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completions)})
        yield _sse("[DONE]")
    finally:
        job.cancelled = True


def serve(engine: Engine, settings: ServeSettings, host: str, port: int) -> None:
    """Serve ``engine`` over HTTP on ``host:port`` until interrupted."""
    import uvicorn

    # Open streams would hold a graceful shutdown forever: give them a few seconds.
    uvicorn.run(
        create_app(engine, settings),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=3,
    )
