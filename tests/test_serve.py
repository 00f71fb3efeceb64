"""``chatrl serve`` as a real process on a loopback port, exercised over HTTP: the official
``openai`` client, raw requests, bad requests, concurrent clients and the API key.

The micro model's replies are gibberish, so the tests check structure: streamed text equals
non-streamed text for the same seed, and both equal what the engine generates in-process for
the same conversation, however many requests run together; counts, finish reasons, errors,
limits and cancellation.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch
from servers import SERVE_KEY, SERVE_LIMITS

from chatrl.batching import ContinuousBatcher
from chatrl.chat_format import encode_prompt
from chatrl.engine import Completion, SamplingParams
from chatrl.errors import UserError
from chatrl.serve.app import _events, _Mailbox
from chatrl.serve.worker import Busy, GenerationWorker, Job

pytestmark = pytest.mark.slow

KEY = SERVE_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_QUEUE, MAX_N = SERVE_LIMITS["max_queue"], SERVE_LIMITS["max_n"]
MAX_TOKENS, MAX_BYTES = SERVE_LIMITS["max_tokens_limit"], SERVE_LIMITS["max_request_bytes"]
CONTEXT = 512  # the micro model's max_position_embeddings
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def url(serve_url):
    return serve_url


@pytest.fixture(scope="module")
def engine(micro_engine):
    return micro_engine


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def expected(engine, messages, max_tokens, seed, temperature=1.0):
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
    return engine.generate_chat([messages], params)[0]


def test_page_health_and_models(url, client):
    page = httpx.get(url)
    assert page.status_code == 200 and "<title>chatrl chat</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(f"{url}/static/app.js").status_code == 200
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == "micro"
    assert [m.id for m in client.models.list()] == ["micro"]
    assert client.models.retrieve("micro").id == "micro"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_api_key_is_required_on_every_v1_request(url):
    body = {"messages": HELLO, "max_tokens": 4}
    for headers in [{}, {"Authorization": "Bearer wrong"}]:
        for response in [
            httpx.get(f"{url}/v1/models", headers=headers),
            httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers),
        ]:
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="micro", messages=HELLO, max_tokens=4)


def test_openai_client_streams_the_same_reply(client, engine, micro_model):
    reply = client.chat.completions.create(model="micro", messages=HELLO, max_tokens=24, seed=7)
    choice = reply.choices[0]
    want = expected(engine, HELLO, 24, seed=7)
    assert (choice.message.role, choice.message.content) == ("assistant", want.text)
    assert choice.finish_reason == want.finish_reason
    prompt_tokens = len(encode_prompt(engine.tokenizer, HELLO))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == len(want.token_ids)
    assert reply.usage.total_tokens == prompt_tokens + len(want.token_ids)
    assert reply.model == "micro" and reply.object == "chat.completion"

    stream = client.chat.completions.create(
        model="anything",  # one model is served, whatever the client names
        messages=HELLO,
        max_tokens=24,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # it came in pieces
    assert "".join(deltas) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage
    assert {c.id for c in chunks} == {chunks[0].id} != {reply.id}


def test_multi_turn_conversation_is_what_the_model_sees(client, engine):
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 plus 3?"},
    ]
    reply = client.chat.completions.create(
        model="micro", messages=conversation, max_tokens=16, seed=3
    )
    assert reply.choices[0].message.content == expected(engine, conversation, 16, seed=3).text
    assert reply.usage.prompt_tokens == len(encode_prompt(engine.tokenizer, conversation))
    # OpenAI's newer "developer" role is the system role; text parts join into one string.
    as_parts = [
        {"role": "developer", "content": "You are terse."},
        *conversation[1:3],
        {
            "role": "user",
            "content": [{"type": "text", "text": "And 3 "}, {"type": "text", "text": "plus 3?"}],
        },
    ]
    again = client.chat.completions.create(model="micro", messages=as_parts, max_tokens=16, seed=3)
    assert again.choices[0].message.content == reply.choices[0].message.content


def test_n_samples_stop_strings_and_default_length(client, engine):
    reply = client.chat.completions.create(model="micro", messages=HELLO, max_tokens=8, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens <= 3 * 8

    greedy = {"model": "micro", "messages": HELLO, "max_tokens": 32, "temperature": 0}
    text = client.chat.completions.create(**greedy).choices[0].message.content
    windows = [
        i
        for i in range(1, len(text) - 1)
        if text[i : i + 2].isascii() and text[i : i + 2].isalpha()
    ]
    assert windows, f"no two ASCII letters in a row in {text!r}"
    stop = text[windows[0] : windows[0] + 2]
    for stream in [False, True]:
        answer = client.chat.completions.create(**greedy, stop=stop, stream=stream)
        if stream:
            chunks = [c for c in answer if c.choices]
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            content, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert (content, finish) == (text[: text.index(stop)], "stop")

    # Without max_tokens, a long conversation gets the room its context leaves.
    long = [{"role": "user", "content": "hello " * 70}]
    prompt_tokens = len(encode_prompt(engine.tokenizer, long))
    assert CONTEXT - prompt_tokens < 256
    reply = client.chat.completions.create(model="micro", messages=long, seed=1, temperature=0)
    want = expected(engine, long, CONTEXT - prompt_tokens, seed=1, temperature=0)
    assert reply.choices[0].message.content == want.text
    assert reply.usage.completion_tokens == len(want.token_ids)


def _post(url: str, body: dict | bytes, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    return httpx.post(f"{url}/v1/chat/completions", content=content, headers=headers, **kwargs)


BAD_REQUESTS = [
    (b'{"messages": [', 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"model": "micro"}, 400, "messages: Field required"),
    ({"messages": []}, 400, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text content"),
    ({"messages": [{"role": "user"}]}, 400, "messages.0.content: Field required"),
    ({"messages": HELLO, "max_tokens": 0}, 400, "max_tokens: Input should be greater"),
    ({"messages": HELLO, "max_tokens": MAX_TOKENS + 1}, 400, f"at most {MAX_TOKENS}"),
    ({"messages": HELLO, "max_tokens": "many"}, 400, "max_tokens"),
    ({"messages": HELLO, "n": MAX_N + 1}, 400, f"n must be at most {MAX_N}"),
    ({"messages": HELLO, "temperature": 2.5}, 400, "temperature"),
    ({"messages": HELLO, "top_p": 0}, 400, "top_p"),
    ({"messages": HELLO, "stream": "yes"}, 400, "stream"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop strings"),
    ({"messages": HELLO, "stop": [""]}, 400, "must not be empty"),
    ({"messages": HELLO, "seed": -1}, 400, "seed"),
    (
        {"messages": [{"role": "user", "content": "hello " * 1000}]},
        400,
        "fills the model's context",
    ),
    (b'{"messages": [], "pad": "' + b"x" * MAX_BYTES + b'"}', 413, f"larger than {MAX_BYTES}"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(url, body, status, message):
    response = _post(url, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_errors_reach_clients_and_the_server_survives(url, client, engine):
    long = [{"role": "user", "content": "hello " * 30}]
    room = CONTEXT - len(encode_prompt(engine.tokenizer, long))
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="micro", messages=long, max_tokens=room + 1)
    assert error.value.status_code == 400 and error.value.code == "context_length_exceeded"
    assert f"room for max_tokens={room}" in error.value.message
    with pytest.raises(openai.BadRequestError, match="messages.0.role"):
        client.chat.completions.create(model="micro", messages=[{"role": "tool", "content": "x"}])

    for method, path, status in [("GET", "/v1/chat/completions", 405), ("GET", "/v1/nope", 404)]:
        response = httpx.request(method, f"{url}{path}", headers=AUTH)
        assert response.status_code == status and "message" in response.json()["error"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert _post(url, {"messages": HELLO, "max_tokens": 2}).status_code == 200


async def _stream(client: httpx.AsyncClient, seed: int) -> tuple[str, str]:
    body = {"messages": HELLO, "max_tokens": 16, "seed": seed, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    return text, chunks[-1]["choices"][0]["finish_reason"]


async def _complete(client: httpx.AsyncClient, seed: int | None) -> tuple[str, str]:
    body = {"messages": HELLO, "max_tokens": 16, "seed": seed}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    choice = response.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


def _client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120)


def test_32_concurrent_streaming_clients_get_what_each_gets_alone(url, engine):
    seeds = range(32)

    async def run():
        async with _client(url) as client:
            jobs = [_stream(client, s) for s in seeds] + [_complete(client, s) for s in seeds]
            return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    streamed, completed = results[:32], results[32:]
    assert streamed == completed
    alone = [expected(engine, HELLO, 16, seed=s) for s in seeds]
    assert streamed == [(c.text, c.finish_reason) for c in alone]
    assert len({text for text, _ in streamed}) > 1  # different seeds, different replies


def test_requests_that_arrive_together_share_decode_steps(url):
    before = httpx.get(f"{url}/health").json()

    async def run():
        async with _client(url) as client:
            return await asyncio.gather(*(_complete(client, None) for _ in range(16)))

    assert len(asyncio.run(run())) == 16
    after = httpx.get(f"{url}/health").json()
    assert after["completed"] - before["completed"] == 16
    tokens = after["generated_tokens"] - before["generated_tokens"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert tokens > 3 * steps  # many rows a step


def test_n_samples_are_the_same_streamed_or_not(client):
    request = {"model": "micro", "messages": HELLO, "max_tokens": 12, "n": 3, "seed": 4}
    reply = client.chat.completions.create(**request)
    texts = ["", "", ""]
    finishes = [None] * 3
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in reply.choices]
    assert finishes == [c.finish_reason for c in reply.choices]
    assert len(set(texts)) > 1  # sample i is seeded seed + i


def _wait_for_health(url: str, key: str, value: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (health := httpx.get(f"{url}/health").json())[key] != value:
        assert time.monotonic() < deadline, f"{key} stayed {health[key]}, not {value}"
        time.sleep(0.05)


def test_a_full_queue_answers_429_and_closed_streams_free_it(url, engine):
    long = expected(engine, HELLO, MAX_TOKENS, seed=None, temperature=0)
    assert long.finish_reason == "length"  # greedy replies to HELLO outlast the test
    body = {"messages": HELLO, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}

    async def run():
        async with _client(url) as client:
            requests = [
                client.build_request("POST", "/v1/chat/completions", json=body)
                for _ in range(MAX_QUEUE)
            ]
            streams = await asyncio.gather(*(client.send(r, stream=True) for r in requests))
            assert [s.status_code for s in streams] == [200] * MAX_QUEUE
            assert (await client.get("/health")).json()["queued_or_running"] == MAX_QUEUE
            refused = await client.post("/v1/chat/completions", json={"messages": HELLO})
            for stream in streams:
                await stream.aclose()
            return refused

    refused = asyncio.run(run())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert f"at most {MAX_QUEUE}" in error["message"]
    # Clients that hang up cancel their streams: the worker is free again.
    _wait_for_health(url, "queued_or_running", 0)
    assert _post(url, {"messages": HELLO, "max_tokens": 2}).status_code == 200


def test_a_client_that_hangs_up_before_its_answer_frees_its_rows(url, engine):
    body = {"messages": HELLO, "max_tokens": MAX_TOKENS, "temperature": 0, "n": MAX_N}
    before = httpx.get(f"{url}/health").json()

    async def run():
        async with _client(url) as client:
            answer = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            deadline = time.monotonic() + 30
            while (await client.get("/health")).json()["running"] < MAX_N:
                assert time.monotonic() < deadline and not answer.done()
                await asyncio.sleep(0.02)
            answer.cancel()  # closes its connection

    asyncio.run(run())
    _wait_for_health(url, "queued_or_running", 0)
    after = httpx.get(f"{url}/health").json()
    assert after["running"] == 0
    # It was cut short: its tokens were never all written.
    assert after["generated_tokens"] == before["generated_tokens"]


def test_the_worker_refuses_what_exceeds_its_limits(engine):
    worker = GenerationWorker(
        ContinuousBatcher(engine, max_batch_size=4), max_jobs=3, max_tokens=100
    )
    prompt = encode_prompt(engine.tokenizer, HELLO)

    def job(max_tokens: int, n: int = 1) -> Job:
        params = SamplingParams(max_new_tokens=max_tokens, n=n)
        return Job(prompt, params, stream=False, send=lambda _: None)

    worker.submit(job(10, n=2))
    with pytest.raises(Busy, match=r"holds 2 generations \(at most 3\)") as busy:
        worker.submit(job(10, n=2))
    assert busy.value.kind == "requests"
    with pytest.raises(Busy, match=r"at most 100\), this request would add") as busy:
        worker.submit(job(100 - len(prompt)))
    assert busy.value.kind == "tokens"
    with pytest.raises(UserError, match="exceed the batch size 4"):
        worker.submit(job(1, n=5))
    worker.submit(job(1))
    assert worker.generations == 3


def stream_writes(engine, items: list[object]) -> list[list]:
    """The writes ``_events`` makes of a 2-sample job once the worker thread has sent its
    ``items``: each write as its (sample, content, finish) chunks."""

    async def writes() -> list[str]:
        queue = asyncio.Queue()
        send = _Mailbox().sender(queue)
        job = Job([1], SamplingParams(max_new_tokens=8, n=2), stream=True, send=send)
        worker = GenerationWorker(ContinuousBatcher(engine, max_batch_size=4), 4, 1000)

        await asyncio.to_thread(lambda: [send(item) for item in items])
        await asyncio.sleep(0)  # the deliveries scheduled before the thread's end have run
        return [w async for w in _events(queue, job, worker, {"id": "1"}, 1, False, 1)]

    return [write_chunks(w) for w in asyncio.run(writes())]


def write_chunks(write: str) -> list[tuple]:
    """The (sample, content, finish reason) of each chunk of one write of a stream."""
    events = [json.loads(e) for e in write.split("data: ")[1:] if e.strip() != "[DONE]"]
    choices = [c for e in events for c in e["choices"]]
    return [(c["index"], c["delta"].get("content"), c["finish_reason"]) for c in choices]


def completion(text: str, finish_reason: str) -> Completion:
    none = torch.zeros(1)
    return Completion(0, [5], text, none, none, finish_reason)


def test_a_stream_that_falls_behind_gets_each_samples_new_text_in_one_chunk(engine):
    """Tokens that arrived while the loop was busy go out in one write, one chunk per sample,
    each finish after its sample's text; items sent from another thread all arrive."""
    done = [completion("a b c", "stop"), completion("x", "length")]
    items = [(0, "a"), (1, "x"), (0, " b"), (0, " c"), (0, done[0]), (1, done[1])]
    writes = stream_writes(engine, items)
    assert writes[2:] == [
        [(0, "a b c", None), (0, None, "stop"), (1, "x", None), (1, None, "length")],
        [],  # [DONE]
    ]
    assert writes[:2] == [[(0, "", None)], [(1, "", None)]]  # the role chunks come first


def test_a_stream_writes_every_stream_interval_tokens_and_at_once_at_first_and_last(engine):
    async def writes() -> list[str]:
        queue = asyncio.Queue()
        job = Job([1], SamplingParams(max_new_tokens=8), stream=True, send=queue.put_nowait)
        worker = GenerationWorker(ContinuousBatcher(engine, max_batch_size=4), 4, 1000)
        events = _events(queue, job, worker, {"id": "1"}, 1, False, interval=3)
        written = [await anext(events)]  # the role chunk

        async def after(*items) -> str:
            pending = asyncio.ensure_future(anext(events))
            for item in items:
                await asyncio.sleep(0.05)
                assert not pending.done()  # nothing is due yet
                queue.put_nowait(item)
            return await asyncio.wait_for(pending, 10)

        written.append(await after((0, "a")))  # the first token: at once
        written.append(await after((0, " b"), (0, " c"), (0, " d")))  # three more
        written.append(await after((0, " e"), (0, completion("a b c d e", "stop"))))  # the end
        return written + [e async for e in events]

    assert [write_chunks(w) for w in asyncio.run(writes())] == [
        [(0, "", None)],
        [(0, "a", None)],
        [(0, " b c d", None)],
        [(0, " e", None), (0, None, "stop")],
        [],  # [DONE]
    ]
