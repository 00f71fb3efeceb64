"""Run chatrl's servers as real subprocesses in tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Poll ``url`` until it answers; fail with the server's log if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"server not up after {timeout} s:\n{log.read_text()}")


@contextmanager
def chatrl_server(
    args: list[str], port: int, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """``python -m chatrl ARGS`` serving on 127.0.0.1:PORT, stopped on exit."""
    with log.open("a") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "chatrl", *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", process, log)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def label_server(
    db_url: str, tmp_path: Path, port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``chatrl label serve`` on ``db_url``; yields its base URL and process."""
    port = port or free_port()
    args = ["label", "serve", "--db", db_url, "--port", str(port)]
    with chatrl_server(args, port, tmp_path / "server.log") as process:
        yield f"http://127.0.0.1:{port}", process


# The served micro model's API key and limits in the tests (small, so that tests reach them).
SERVE_KEY = "sk-test-key"
SERVE_LIMITS = {"max_queue": 64, "max_n": 4, "max_tokens_limit": 400, "max_request_bytes": 20_000}


@contextmanager
def chat_server(model: Path, tmp_path: Path) -> Iterator[str]:
    """``chatrl serve MODEL`` with SERVE_LIMITS, and SERVE_KEY in CHATRL_API_KEY (the way a
    deployment passes secrets); yields its base URL.

    One torch thread: on a shared machine it is faster than contending for every core, and it
    leaves a core to the clients.
    """
    port = free_port()
    limits = [f"--{name.replace('_', '-')}={value}" for name, value in SERVE_LIMITS.items()]
    # fp32, as the tests' in-process micro_engine: replies are compared token for token.
    args = ["serve", str(model), "--port", str(port), "--threads", "1", "--bf16", "false"]
    args += limits
    env = {**os.environ, "CHATRL_API_KEY": SERVE_KEY}
    with chatrl_server(args, port, tmp_path / "serve.log", env):
        yield f"http://127.0.0.1:{port}"
