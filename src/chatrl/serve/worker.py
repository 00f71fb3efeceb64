"""The generation worker: one thread owns the model and answers every request in one
continuously batched decode loop (``chatrl.batching.ContinuousBatcher``).

The event loop never runs the model. Requests arrive as ``Job``s in a queue; between two
decode steps the worker moves what has arrived into the batcher, where it joins the running
batch, streaming or not, and drops the jobs whose clients have gone. So every open request
advances by one token per step, together.

Results go back through each job's ``send``, which the worker calls from its own thread (the
server passes one that hands the item to the event loop): a streamed job sends
``(index, text)`` as sample ``index`` writes and ``(index, Completion)`` when it finishes; a
job that is not streamed sends its list of ``n`` completions; a failure sends the exception.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from chatrl.batching import ContinuousBatcher, Output, Request
from chatrl.engine import Completion, SamplingParams

log = logging.getLogger("chatrl.serve")


class Busy(Exception):
    """Taking the job would exceed a limit: ``kind`` is "requests" or "tokens"."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass(eq=False)
class Job:
    """One request to answer. ``cancelled`` (set from any thread) drops it at the next step."""

    prompt: list[int]
    params: SamplingParams
    stream: bool
    send: Callable[[object], None]
    cancelled: bool = False

    @property
    def tokens(self) -> int:
        """The cache slots its samples may fill: prompt plus response, ``n`` times."""
        return self.params.n * (len(self.prompt) + self.params.max_new_tokens)


class GenerationWorker:
    """A thread that answers jobs with ``batcher``; at most ``max_jobs`` generations (a job has
    ``n``) and ``max_tokens`` tokens (``Job.tokens``) queued or running."""

    def __init__(self, batcher: ContinuousBatcher, max_jobs: int, max_tokens: int):
        self.batcher, self.max_jobs, self.max_tokens = batcher, max_jobs, max_tokens
        self.completed = 0  # jobs finished (answered, failed or cancelled)
        self.generated = 0  # tokens of the generations finished (not those cancelled)
        self._generations = self._tokens = 0
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._jobs: dict[Request, Job] = {}
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        """Stop after the current step; open jobs get an error, queued ones are dropped."""
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def generations(self) -> int:
        """Generations queued or running."""
        return self._generations

    def submit(self, job: Job) -> None:
        """Queue ``job``: raise UserError if it can never run, ``Busy`` if taking it now would
        exceed ``max_jobs`` or ``max_tokens``."""
        self.batcher.check(job.prompt, job.params)
        n, tokens = job.params.n, job.tokens
        with self._lock:
            if self._generations + n > self.max_jobs:
                message = (
                    f"the server holds {self._generations} generations (at most {self.max_jobs})"
                )
                raise Busy(message, "requests")
            if self._tokens + tokens > self.max_tokens:
                message = (
                    f"the server holds {self._tokens} tokens of prompts and replies "
                    f"(at most {self.max_tokens}), this request would add {tokens}"
                )
                raise Busy(message, "tokens")
            self._generations += n
            self._tokens += tokens
        self._inbox.put(job)

    def _run(self) -> None:
        while self._take():
            for request, job in list(self._jobs.items()):
                if job.cancelled:
                    request.cancelled = True
                    self._finish(request, None)
            if self.batcher.idle:
                continue
            try:
                outputs = self.batcher.step()
            except Exception as error:  # a bug: fail what runs, keep serving
                log.error("generation failed", exc_info=error)
                self._fail_all(error)
                continue
            for output in outputs:
                self._send(output)
            for request in dict.fromkeys(o.request for o in outputs if o.request.finished):
                job = self._jobs[request]
                self._finish(request, None if job.stream else request.completions())
        self._fail_all(RuntimeError("the server is shutting down"))

    def _take(self) -> bool:
        """Move the jobs that have arrived into the batcher (waiting for one while it is idle);
        False once asked to stop."""
        wait = self.batcher.idle
        while True:
            try:
                job = self._inbox.get() if wait else self._inbox.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            wait = False
            try:
                request = self.batcher.add(job.prompt, job.params, job.stream)
            except Exception as error:
                job.send(error)
                self._release(job)
                continue
            self._jobs[request] = job

    def _send(self, output: Output) -> None:
        job = self._jobs[output.request]
        if output.completion is not None:
            self.generated += len(output.completion.token_ids)
        if job.stream:
            if output.text:
                job.send((output.index, output.text))
            if output.completion is not None:
                job.send((output.index, output.completion))

    def _fail_all(self, error: Exception) -> None:
        self.batcher.reset()
        for request in list(self._jobs):
            self._finish(request, error)

    def _finish(self, request: Request, result: list[Completion] | Exception | None) -> None:
        job = self._jobs.pop(request)
        if result is not None:
            job.send(result)
        self._release(job)

    def _release(self, job: Job) -> None:
        with self._lock:
            self._generations -= job.params.n
            self._tokens -= job.tokens
        self.completed += 1
