"""What both teacher commands share: the resumable output file, the workers that bound the
requests in flight, and the progress bar."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from chatrl.errors import UserError
from chatrl.teacher.client import ChatClient, ClientSettings, Counters


def content_key(*parts: Any) -> str:
    """A stable identity for a piece of work: the SHA-256 of its JSON."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def record_key(record: dict[str, Any]) -> str | None:
    """The work identity a teacher command stored in a record (``meta.teacher.key``)."""
    teacher = (record.get("meta") or {}).get("teacher")
    key = teacher.get("key") if isinstance(teacher, dict) else None
    return key if isinstance(key, str) else None


class ResumableJsonl:
    """A JSONL output file that a rerun continues. ``done`` holds the keys of the records
    already in it. Each record is appended as one complete line with a single write, then
    fsynced, so a killed run leaves at most a torn last line; opening the file again cuts that
    line off (``cut_partial_line`` says so) and the work it held is done again."""

    def __init__(self, path: str | Path, command: str) -> None:
        self.path = Path(path)
        self.done: set[str] = set()
        self.cut_partial_line = False
        if self.path.is_dir():
            raise UserError(f"--out {self.path} is a directory, expected a JSONL file")
        if self.path.exists():
            self._load(command)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _load(self, command: str) -> None:
        data = self.path.read_bytes()
        *lines, tail = data.split(b"\n")
        if tail.strip():  # no newline after the last record: it may have been cut short
            try:
                json.loads(tail)
            except ValueError:
                os.truncate(self.path, len(data) - len(tail))
                self.cut_partial_line = True
            else:
                lines.append(tail)
                with self.path.open("ab") as f:
                    f.write(b"\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"{where}: invalid JSON; fix or remove the line") from None
            key = record_key(record) if isinstance(record, dict) else None
            if key is None:
                raise UserError(
                    f"{where}: no meta.teacher.key, so not written by `chatrl teacher "
                    f"{command}`; choose another --out"
                )
            self.done.add(key)

    async def append(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line and sync it to disk."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        while data:  # one write for a regular file; the loop only guards a short write
            data = data[os.write(self.fd, data) :]
        # In a thread: the event loop keeps serving the other requests meanwhile, and one
        # fsync covers every line written before it, so concurrent appends share the wait.
        await asyncio.to_thread(os.fsync, self.fd)
        key = record_key(record)
        if key is not None:
            self.done.add(key)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> ResumableJsonl:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


Item = TypeVar("Item")


async def run_workers(
    items: Iterable[Item], handle: Callable[[Item], Awaitable[None]], concurrency: int
) -> None:
    """``handle`` every item with ``concurrency`` workers, one item each at a time. The first
    exception stops them all and is raised as itself (not as an ExceptionGroup)."""
    pending = iter(items)

    async def worker() -> None:
        for item in pending:  # one shared iterator: each item goes to one worker
            await handle(item)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker())
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None


def usage_line(counters: Counters, seconds: float) -> str:
    """Requests, their rate, retries and tokens so far, as one line."""
    tokens = counters.prompt_tokens + counters.completion_tokens
    return (
        f"{counters.requests} requests ({counters.requests / max(seconds, 1e-9):.1f}/s), "
        f"{counters.retries} retries, {tokens:,} tokens "
        f"({counters.prompt_tokens:,} prompt, {counters.completion_tokens:,} completion)"
    )


@contextmanager
def progress_bar(
    description: str, total: int, counters: Counters, console: Console | None
) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr with the request rate and token usage; yields ``advance()``."""
    start = time.monotonic()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[usage]}"),
    )
    with Progress(*columns, console=console or Console(stderr=True)) as progress:
        bar = progress.add_task(description, total=total, usage="")

        def advance() -> None:
            rate = counters.requests / max(time.monotonic() - start, 1e-9)
            tokens = counters.prompt_tokens + counters.completion_tokens
            usage = f"{rate:.1f} req/s, {tokens:,} tokens, {counters.retries} retries"
            progress.update(bar, advance=1, usage=usage)

        yield advance


@dataclass
class BatchReport:
    """What every teacher run reports. ``failures`` holds a line per request failed for good."""

    written: int = 0
    already_done: int = 0  # in the output file before the run
    failures: list[str] = field(default_factory=list)
    cut_partial_line: bool = False
    counters: Counters = field(default_factory=Counters)
    seconds: float = 0.0


class Job(Protocol):
    key: str  # what the output file remembers it by


AnyJob = TypeVar("AnyJob", bound=Job)


async def run_batch(
    settings: ClientSettings,
    jobs: list[AnyJob],
    out: str | Path,
    command: str,
    handle: Callable[[ChatClient, AnyJob], Awaitable[dict[str, Any] | None]],
    report: BatchReport,
    console: Console | None,
) -> None:
    """Run ``handle`` on every job whose key is not in ``out`` yet, ``settings.concurrency``
    at a time, appending each record it returns to ``out``; fills in ``report``'s counts."""
    start = time.monotonic()
    with ResumableJsonl(out, command) as log:
        report.cut_partial_line = log.cut_partial_line
        todo = list({job.key: job for job in jobs if job.key not in log.done}.values())
        report.already_done = len({job.key for job in jobs}) - len(todo)
        async with ChatClient(settings) as client:
            report.counters = client.counters
            with progress_bar(f"teacher {command}", len(todo), client.counters, console) as advance:

                async def one(job: AnyJob) -> None:
                    record = await handle(client, job)
                    if record is not None:
                        await log.append(record)
                        report.written += 1
                    advance()

                await run_workers(todo, one, settings.concurrency)
    report.seconds = time.monotonic() - start
