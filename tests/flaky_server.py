"""A misbehaving OpenAI-compatible chat completions server, for the teacher tests.

``python tests/flaky_server.py PORT`` serves on 127.0.0.1:PORT (never another address).
``POST /control`` with a JSON plan resets the counters and sets how the next requests
misbehave; ``GET /stats`` returns what the server saw. The plan (every key optional):

- ``fail``: HTTP statuses for the first requests, in order (a 429 carries ``retry_after``)
- ``retry_after``: the Retry-After header of those 429s, in seconds
- ``slow``: how many requests after those wait ``slow_s`` seconds before answering
- ``delay``: seconds every request takes (to count the requests in flight)
- ``bad_rankings``: how many judging requests first get a reply that is not a ranking
- ``key``: the API key every request must carry (401 without it)

The answer depends only on the request, never on the order requests arrive in. A judging
prompt (it holds ``<reply id="A">`` blocks) is ranked by the number after "quality" in each
reply, highest first, unless it holds "[never]" (then no reply is ever a ranking). Otherwise
the last message decides: "[empty]", "[truncate]", "[refuse]" and "[invalid]" give an empty
answer, one cut off at the length limit, a refusal and a 400; anything else gets
"Answer to: MESSAGE" (with " (system: SYSTEM)" when a system message came first).
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPLY_BLOCK = re.compile(r'<reply id="([A-Z])">\n(.*?)\n</reply>', re.DOTALL)
NOT_RANKINGS = [
    "These replies are all fine; I cannot choose.",
    "Ranking: A > A",
    "Ranking: A > Z > B",
    "Ranking: {valid}\nI hope this helps!",
]


class State:
    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.lock = threading.Lock()
        self.requests = self.in_flight = self.max_in_flight = self.judged = 0
        self.statuses: Counter[int] = Counter()
        self.prompt_tokens = self.completion_tokens = 0
        self.keys: set[str] = set()
        self.shown: list[list[int]] = []  # qualities in the order each judging prompt showed

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "max_in_flight": self.max_in_flight,
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "keys": sorted(self.keys),
            "judged": self.judged,
            "shown": self.shown,
        }


current = State({})  # replaced by each POST /control; a request keeps the one it began with


def judge(state: State, prompt: str) -> str:
    """Rank the replies in a judging prompt by their quality number, highest first."""
    blocks = REPLY_BLOCK.findall(prompt)
    qualities = {label: int(re.search(r"quality (\d+)", text)[1]) for label, text in blocks}
    with state.lock:
        state.shown.append(list(qualities.values()))
        number = state.judged
        state.judged += 1
    valid = " > ".join(sorted(qualities, key=qualities.get, reverse=True))
    if "[never]" in prompt or number < state.plan.get("bad_rankings", 0):
        return NOT_RANKINGS[number % len(NOT_RANKINGS)].format(valid=valid)
    return f"Reply {valid[0]} has the highest quality.\n**Ranking:** {valid}"


def answer(state: State, messages: list[dict[str, str]]) -> tuple[int, str, str]:
    """(status, text, finish_reason) for a chat."""
    last = messages[-1]["content"]
    if "<reply id=" in last:
        return 200, judge(state, last), "stop"
    if "[invalid]" in last:
        return 400, "this prompt is refused as invalid", ""
    if "[empty]" in last:
        return 200, "", "stop"
    if "[truncate]" in last:
        return 200, "An answer that goes on and", "length"
    if "[refuse]" in last:
        return 200, "I'm sorry, but I can't help with that.", "stop"
    system = f" (system: {messages[0]['content']})" if messages[0]["role"] == "system" else ""
    return 200, f"Answer to: {last}{system}", "stop"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *_: Any) -> None:
        pass

    def send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
            pass

    def error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.send(status, {"error": {"message": message, "type": "test", "code": None}}, headers)

    def do_GET(self) -> None:
        if self.path == "/stats":
            with current.lock:
                self.send(200, current.stats())
        else:
            self.error(404, "not found")

    def do_POST(self) -> None:
        global current
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state = current
        if self.path == "/control":
            current = State(body)
            self.send(200, {"ok": True})
        elif self.path == "/v1/chat/completions":
            with state.lock:
                index = state.requests
                state.requests += 1
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
                state.keys.add(self.headers.get("Authorization", ""))
            try:
                self.complete(state, index, body)
            finally:
                with state.lock:
                    state.in_flight -= 1
        else:
            self.error(404, "not found")

    def complete(self, state: State, index: int, body: dict[str, Any]) -> None:
        plan = state.plan
        time.sleep(plan.get("delay", 0))
        fail = plan.get("fail", [])
        if plan.get("key") and self.headers.get("Authorization") != f"Bearer {plan['key']}":
            status, text, finish = 401, "incorrect API key", ""
        elif index < len(fail):
            status, text, finish = fail[index], "injected failure", ""
        else:
            if index < len(fail) + plan.get("slow", 0):
                time.sleep(plan.get("slow_s", 1.0))
            status, text, finish = answer(state, body["messages"])
        with state.lock:
            state.statuses[status] += 1
        if status != 200:
            retry = {"Retry-After": str(plan["retry_after"])} if "retry_after" in plan else {}
            self.error(status, text, retry if status == 429 else None)
            return
        prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        completion_tokens = len(text.split())
        with state.lock:
            state.prompt_tokens += prompt_tokens
            state.completion_tokens += completion_tokens
        message = {"role": "assistant", "content": text}
        self.send(
            200,
            {
                "id": f"chatcmpl-{index}",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.serve_forever()
