"""The generation worker: one thread owns the model and serves every queued request.

The event loop never runs the model. Requests arrive as ``Job``s in a queue; each round the
worker takes what has arrived (after the first job of an idle spell it waits ``batch_window``
seconds for others), generates the non-streaming jobs with one ``Engine.generate`` call per
group of identical sampling settings, then advances every open stream by one text delta. So
requests that arrive together share a batch, and streams and batches take turns on the model.

Results go back through each job's ``send``, which the worker calls from its own thread (the
server passes one that hands the item to the event loop): a stream sends ``str`` deltas then
its ``Completion``; a batched job sends its list of ``n`` completions; a failure sends the
exception instead.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

from chatrl.engine import Completion, Engine, SamplingParams
from chatrl.errors import UserError

log = logging.getLogger("chatrl.serve")


class Busy(Exception):
    """The worker already holds as many jobs as it may."""


@dataclass(eq=False)
class Job:
    """One prompt to answer. ``cancelled`` (set from any thread) stops a stream early."""

    prompt: list[int]
    params: SamplingParams
    stream: bool
    send: Callable[[object], None]
    cancelled: bool = False


class GenerationWorker:
    """A thread that runs ``engine`` on queued jobs; at most ``max_jobs`` queued or running."""

    def __init__(self, engine: Engine, max_jobs: int, batch_window: float = 0.005):
        self.engine, self.max_jobs, self.batch_window = engine, max_jobs, batch_window
        self.batches = 0  # Engine.generate calls that succeeded
        self.completed = 0  # jobs finished (answered, failed or cancelled)
        self.open_streams = 0
        self._jobs = 0
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        """Stop after the current round; open streams are closed, queued jobs dropped."""
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def jobs(self) -> int:
        """Jobs queued or running."""
        return self._jobs

    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` (all or none); raise ``Busy`` if that would exceed ``max_jobs``."""
        with self._lock:
            if self._jobs + len(jobs) > self.max_jobs:
                raise Busy(f"the server holds {self._jobs} generations (at most {self.max_jobs})")
            self._jobs += len(jobs)
        for job in jobs:
            self._inbox.put(job)

    def _run(self) -> None:
        streams: list[tuple[Job, Generator[str, None, Completion]]] = []
        while True:
            new = self._take(wait=not streams)
            if None in new:
                break
            for job in new:
                if job.stream:
                    streams.append((job, self.engine.stream(job.prompt, job.params)))
            self._generate([job for job in new if not job.stream])
            streams = [(job, stream) for job, stream in streams if self._advance(job, stream)]
            self.open_streams = len(streams)
        for job, stream in streams:
            stream.close()
            self._finish(job, RuntimeError("the server is shutting down"))

    def _take(self, wait: bool) -> list[Job | None]:
        """What has arrived; if ``wait``, block for a first job and a batch window after it."""
        jobs: list[Job | None] = []
        if wait:
            jobs.append(self._inbox.get())
            deadline = time.monotonic() + self.batch_window
            while (left := deadline - time.monotonic()) > 0:
                try:
                    jobs.append(self._inbox.get(timeout=left))
                except queue.Empty:
                    break
        while True:
            try:
                jobs.append(self._inbox.get_nowait())
            except queue.Empty:
                return jobs

    def _generate(self, jobs: list[Job]) -> None:
        groups: dict[object, list[Job]] = {}
        for job in jobs:
            groups.setdefault(_batch_key(job), []).append(job)
        for group in groups.values():
            self._generate_batch(group)

    def _generate_batch(self, group: list[Job]) -> None:
        params = group[0].params
        try:
            completions = self.engine.generate([job.prompt for job in group], params)
        except Exception as error:
            if len(group) > 1:  # one bad prompt must not fail its batch-mates
                for job in group:
                    self._generate_batch([job])
                return
            self._finish(group[0], error)
            return
        self.batches += 1
        n = params.n
        for i, job in enumerate(group):
            self._finish(job, completions[i * n : (i + 1) * n])

    def _advance(self, job: Job, stream: Generator[str, None, Completion]) -> bool:
        """Send the stream's next delta; False once it has finished, failed or been cancelled."""
        if job.cancelled:
            stream.close()
            self._finish(job, None)
            return False
        try:
            job.send(next(stream))
            return True
        except StopIteration as end:
            self._finish(job, end.value)
        except Exception as error:
            self._finish(job, error)
        return False

    def _finish(self, job: Job, result: object) -> None:
        if isinstance(result, Exception) and not isinstance(result, UserError):
            log.error("generation failed", exc_info=result)
        if result is not None:
            job.send(result)
        with self._lock:
            self._jobs -= 1
        self.completed += 1


def _batch_key(job: Job) -> object:
    """Jobs with equal keys can share one ``Engine.generate`` call."""
    p = job.params
    if p.seed is not None:  # alone: in a batch, its draws would depend on its batch-mates
        return job
    return (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.n, tuple(p.stop))
