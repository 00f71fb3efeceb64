"""``chatrl teacher demos``: a teacher model answers prompts, and its answers are SFT data.

Each answer is one request (``n`` answers per prompt are ``n`` requests), keyed by the prompt's
messages and the answer's index, so a rerun skips the answers already in the output file.
Answers that are empty, cut off by the length limit or refusals are counted and dropped
unless ``keep`` names their kind; a dropped answer is asked for again on the next run.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from rich.console import Console

from chatrl.data import Message, Prompt, load_prompts
from chatrl.errors import UserError
from chatrl.teacher.batch import BatchReport, content_key, run_batch
from chatrl.teacher.client import ChatClient, ClientSettings, Reply, RequestFailed


class Problem(StrEnum):
    """What makes an answer bad as a demonstration."""

    empty = "empty"
    truncated = "truncated"
    refused = "refused"


# How refusals start. A heuristic: it only looks at the first words, so a refusal worded
# otherwise passes as an answer (and "I'm sorry, I can't stress enough…" counts as one).
REFUSAL_OPENING = re.compile(
    r"^(?:(?:i'm|i am)?\s*sorry|i apologi[sz]e)\b[^.!?\n]{0,40}?"
    r"\b(?:can't|cannot|can not|won't|will not|unable|not able)\b"
    r"|^i(?: can't| cannot| can not| won't| will not| am unable to|'m unable to"
    r"| am not able to|'m not able to) (?:help|assist|provide|comply|fulfil|fulfill|do that"
    r"|answer|support)"
    r"|^as an ai\b",
    re.IGNORECASE,
)


def answer_problem(reply: Reply) -> Problem | None:
    """Why ``reply`` is a bad demonstration, or None. Cut off (finish_reason "length") comes
    first; refusals are the API's own (``refusal``, finish_reason "content_filter") or an
    answer that opens like one (REFUSAL_OPENING)."""
    if reply.finish_reason == "length":
        return Problem.truncated
    if reply.refusal or reply.finish_reason == "content_filter":
        return Problem.refused
    text = reply.text.strip().replace("\u2019", "'")
    if not text:
        return Problem.empty
    if REFUSAL_OPENING.match(text):
        return Problem.refused
    return None


@dataclass
class DemoReport(BatchReport):
    """What a run did: BatchReport's counts, and the bad answers kept and dropped."""

    kept: Counter[Problem] = field(default_factory=Counter)
    dropped: Counter[Problem] = field(default_factory=Counter)
    dropped_examples: list[str] = field(default_factory=list)


@dataclass
class _Job:
    prompt: Prompt
    number: int  # the prompt's position in the file, from 1, for messages
    index: int  # which of the n answers
    key: str


def with_system(messages: list[Message], system: str | None) -> list[Message]:
    """``messages`` with ``system`` in front, unless they open with a system message already."""
    if system is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system}, *messages]


def _record(
    job: _Job, messages: list[Message], reply: Reply, model: str, problem: Problem | None
) -> dict[str, Any]:
    teacher: dict[str, Any] = {
        "model": model,
        "key": job.key,
        "answer": job.index,
        "finish_reason": reply.finish_reason,
    }
    if problem is not None:
        teacher["problem"] = problem.value
    return {
        "messages": [*messages, {"role": "assistant", "content": reply.text}],
        "meta": {**job.prompt.meta, "teacher": teacher},
    }


def write_demos(
    settings: ClientSettings,
    prompts: str | Path,
    out: str | Path,
    n: int = 1,
    system: str | None = None,
    system_in_data: bool = True,
    keep: frozenset[Problem] = frozenset(),
    console: Console | None = None,
) -> DemoReport:
    """Ask the teacher for ``n`` answers to every prompt in ``prompts`` and append them to
    ``out`` as SFT conversations, skipping those already there.

    ``system`` goes in front of prompts without a system message; ``system_in_data`` says
    whether the written conversations hold it too (without it, the student learns to behave
    as told without being told: context distillation). Bad answers are written only when
    ``keep`` names their kind, marked ``meta.teacher.problem``.
    """
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    settings.check()
    loaded = load_prompts(prompts)
    jobs = [
        _Job(prompt, number, index, content_key(prompt.messages, index))
        for number, prompt in enumerate(loaded, start=1)
        for index in range(n)
    ]
    return asyncio.run(_run(settings, jobs, out, system, system_in_data, keep, console))


async def _run(
    settings: ClientSettings,
    jobs: list[_Job],
    out: str | Path,
    system: str | None,
    system_in_data: bool,
    keep: frozenset[Problem],
    console: Console | None,
) -> DemoReport:
    report = DemoReport()

    async def answer(client: ChatClient, job: _Job) -> dict[str, Any] | None:
        sent = with_system(job.prompt.messages, system)
        try:
            reply = await client.complete(sent)
        except RequestFailed as e:
            report.failures.append(f"prompt {job.number}, answer {job.index}: {e}")
            return None
        problem = answer_problem(reply)
        if problem is not None and problem not in keep:
            report.dropped[problem] += 1
            report.dropped_examples.append(f"prompt {job.number} ({problem}): {reply.text[:80]!r}")
            return None
        if problem is not None:
            report.kept[problem] += 1
        written = sent if system_in_data else job.prompt.messages
        return _record(job, written, reply, settings.model, problem)

    await run_batch(settings, jobs, out, "demos", answer, report, console)
    return report
