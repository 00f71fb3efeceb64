"""``chatrl serve`` under load: one streaming client, 32 concurrent streaming clients, and 32
concurrent non-streaming clients, on the bench model (10.49 M parameters, randomly
initialised) or ``--model PATH`` (a model directory or a .gguf file, e.g. SmolLM2), served as a
real process on a loopback port.

Each client asks for up to 64 tokens at temperature 1 (a random model rarely stops early;
tokens are counted from ``usage``). Reports generated tokens/s over the wall time of each
phase, the median (p50) and 95th percentile (p95) time to first token of the 32 clients
(streamed: the first content chunk; not streamed: the whole answer), and the worst
``GET /health`` latency while 32 streams run (the event loop must stay responsive), and the
ratio of streamed to non-streamed tokens/s, and the CPU seconds the server process and this
client spent on each phase (both run on this machine: on a small one the client's share is
taken from the server). ``--repeat N`` runs the two 32-client phases N
times, one after the other, and reports the medians. The machine may be shared: compare phases,
not runs. The server's weights are bf16 where the hardware runs bf16 natively, fp32 elsewhere
(--precision forces one).

    python bench/serve.py [--threads N] [--repeat N] [--model PATH] [--stream-interval N]
                          [--precision auto|fp32|bf16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import common  # noqa: E402
from servers import free_port, wait_until_up  # noqa: E402

from chatrl.models import save_model  # noqa: E402

CLIENTS, MAX_TOKENS = 32, 64
BODY = {"messages": [{"role": "user", "content": "Tell me about the river."}], "max_tokens": 64}


async def stream_one(client: httpx.AsyncClient) -> tuple[float, int]:
    """Seconds to the first content chunk, and completion tokens."""
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return first or 0.0, tokens


async def complete_one(client: httpx.AsyncClient) -> tuple[float, int]:
    """Seconds to the answer, and completion tokens."""
    start = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=BODY)
    return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]


def percentiles(name: str, seconds: list[float]) -> dict[str, float]:
    """p50 and p95 of ``seconds``, as ``name_p50_s`` and ``name_p95_s``."""
    cuts = statistics.quantiles(seconds, n=20, method="inclusive")
    return {f"{name}_p50_s": statistics.median(seconds), f"{name}_p95_s": cuts[18]}


async def health_latency(client: httpx.AsyncClient, stop: asyncio.Event) -> float:
    worst = 0.0
    while not stop.is_set():
        start = time.perf_counter()
        await client.get("/health")
        worst = max(worst, time.perf_counter() - start)
        await asyncio.sleep(0.05)
    return worst


class CPUClock:
    """CPU seconds of the server process and of this one (the client) since it was made."""

    def __init__(self, server: psutil.Process):
        self.server = server
        self.start = self.now()

    def now(self) -> tuple[float, float]:
        times = self.server.cpu_times()
        return times.user + times.system, time.process_time()

    def spent(self, phase: str) -> dict[str, float]:
        (server, client), (server0, client0) = self.now(), self.start
        server_s, client_s = server - server0, client - client0
        return {f"{phase}_server_cpu_s": server_s, f"{phase}_client_cpu_s": client_s}


async def streams(client: httpx.AsyncClient, server: psutil.Process) -> dict[str, float]:
    """32 concurrent streams, with ``GET /health`` probed meanwhile."""
    stop = asyncio.Event()
    probe = asyncio.create_task(health_latency(client, stop))
    start, cpu = time.perf_counter(), CPUClock(server)
    results = await asyncio.gather(*(stream_one(client) for _ in range(CLIENTS)))
    wall = time.perf_counter() - start
    stop.set()
    return {
        "streams_32_tokens_per_s": sum(t for _, t in results) / wall,
        "streams_32_wall_s": wall,
        **cpu.spent("streams_32"),
        **percentiles("streams_32_first_token", [f for f, _ in results]),
        "health_worst_latency_s": await probe,
    }


async def batched(client: httpx.AsyncClient, server: psutil.Process) -> dict[str, float]:
    """32 concurrent requests that are not streamed."""
    start, cpu = time.perf_counter(), CPUClock(server)
    results = await asyncio.gather(*(complete_one(client) for _ in range(CLIENTS)))
    wall = time.perf_counter() - start
    return {
        "batched_32_tokens_per_s": sum(t for _, t in results) / wall,
        "batched_32_wall_s": wall,
        **cpu.spent("batched_32"),
        **percentiles("batched_32_answer", [s for s, _ in results]),
    }


async def measure(url: str, repeat: int, server: psutil.Process) -> dict[str, float]:
    """Every figure is the median over ``repeat`` rounds of the two 32-client phases, run one
    after the other, so that a burst of other work on the machine hits both alike."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await stream_one(client)  # warm-up
        start = time.perf_counter()
        first, tokens = await stream_one(client)
        one = {"one_stream_tokens_per_s": tokens / (time.perf_counter() - start)}
        one["one_stream_first_token_s"] = first
        rounds = [
            {**await streams(client, server), **await batched(client, server)}
            for _ in range(repeat)
        ]
    for r in rounds:
        r["streams_over_batched"] = r["streams_32_tokens_per_s"] / r["batched_32_tokens_per_s"]
    return {**one, **{name: statistics.median(r[name] for r in rounds) for name in rounds[0]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server")
    parser.add_argument(
        "--model",
        default=None,
        help="a model directory or .gguf file to serve instead of the bench model",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of the two 32-client phases; figures are their medians",
    )
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=None,
        help="the server's --stream-interval (tokens per write; default: the server's)",
    )
    common.add_precision(parser)
    args = parser.parse_args()
    precision = common.resolve_precision(args.precision, "bench/serve.py")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            tokenizer = common.bench_tokenizer()
            model = Path(tmp) / "model"
            save_model(common.bench_model(tokenizer), tokenizer, model)
        port = free_port()
        command = [sys.executable, "-m", "chatrl", "serve", str(model)]
        command += ["--port", str(port), "--bf16", str(precision == "bf16").lower()]
        if args.threads:
            command += ["--threads", str(args.threads)]
        if args.stream_interval:
            command += ["--stream-interval", str(args.stream_interval)]
        log = Path(tmp) / "serve.log"
        with log.open("w") as out:
            server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_up(url, server, log, timeout=600)  # a .gguf file converts first
            figures = asyncio.run(measure(url, args.repeat, psutil.Process(server.pid)))
        finally:
            server.terminate()
            server.wait()
    for name, value in figures.items():
        print(f"{name:36s} {value:10.3f}")
    result = {"bench": "serve", "model": args.model or "bench", "threads": args.threads}
    result |= {"repeat": args.repeat, "stream_interval": args.stream_interval}
    common.print_result({**result, **figures}, precision)


if __name__ == "__main__":
    main()
