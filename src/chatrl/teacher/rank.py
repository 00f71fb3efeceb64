"""``chatrl teacher rank``: a teacher model ranks the K responses of each task, as people do
in the labeling app, and its rankings are reward-model data.

Every call shows the responses in a fresh random order (seeded by the run's seed, the task
and the attempt), so a judge that favours the first or last position favours no response in
particular. The reply must end with a line ``Ranking: B > A > C`` that names every response
exactly once; any other reply is asked again (a new order each time) up to ``attempts`` times,
then the task is reported, never guessed. Optionally a share of the tasks also goes to the
labeling database, with the teacher's ranking stored there as one annotator's, so that
``chatrl label stats`` shows how often people agree with the teacher.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from chatrl.data import TEACHER_PREFIX, Message, Ranking, Task, load_tasks, read_jsonl
from chatrl.errors import UserError
from chatrl.label.store import LabelStore
from chatrl.teacher.batch import BatchReport, record_key, run_batch
from chatrl.teacher.client import ChatClient, ClientSettings, RequestFailed

LABELS = string.ascii_uppercase  # responses are shown as A, B, C…: never confused with text
PLACEHOLDERS = ("{conversation}", "{responses}", "{k}", "{labels}", "{example}")
DEFAULT_TEMPLATE = """\
You are an expert judge of AI assistants. Below is a conversation between a user and an \
assistant, then {k} candidate replies to the user's last message, labelled {labels}.

Rank the replies from best to worst. The best reply does what the user asked, is correct and \
honest, says it clearly without padding, and declines only requests that would cause harm. \
Judge the content, not the length or the position of a reply.

<conversation>
{conversation}
</conversation>

{responses}

Explain your judgement in a few sentences, then end with one line that names every reply \
exactly once, best first, in this form:
Ranking: {example}
"""
RANKING_LINE = re.compile(r"Ranking:\s*(?P<order>[A-Z](?:\s*>\s*[A-Z])*)\s*\.?")


class InvalidRanking(ValueError):
    """A judge's reply that is not a complete ranking of the responses shown."""


def render_conversation(messages: list[Message]) -> str:
    """The conversation as plain text: ``User: …`` / ``Assistant: …`` blocks."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def render_judge_prompt(template: str, prompt: list[Message], shown: list[str]) -> str:
    """The judging prompt for ``shown`` (the responses in the order shown, labelled A, B…)."""
    labels = LABELS[: len(shown)]
    values = {
        "{conversation}": render_conversation(prompt),
        "{responses}": "\n\n".join(
            f'<reply id="{label}">\n{text}\n</reply>'
            for label, text in zip(labels, shown, strict=True)
        ),
        "{k}": str(len(shown)),
        "{labels}": ", ".join(labels),
        "{example}": " > ".join(labels),
    }
    # One pass, so a placeholder inside a response or the conversation stays as it is.
    pattern = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))
    return pattern.sub(lambda match: values[match.group()], template)


def parse_ranking(text: str, k: int) -> list[int]:
    """The shown positions (0 = A) best first, from the reply's last non-empty line, which
    must be ``Ranking: X > Y > …`` naming each of the ``k`` labels once (markdown ``*`` and
    backticks aside). Raises InvalidRanking otherwise; nothing is guessed."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise InvalidRanking("the reply is empty")
    last = lines[-1].replace("*", "").replace("`", "").strip()
    match = RANKING_LINE.fullmatch(last)
    if match is None:
        raise InvalidRanking(f"the last line is not 'Ranking: X > Y > ...': {last[:80]!r}")
    named = [label.strip() for label in match["order"].split(">")]
    labels = LABELS[:k]
    if unknown := [label for label in named if label not in labels]:
        raise InvalidRanking(f"names {', '.join(unknown)}, not among the replies {labels}")
    if len(set(named)) < len(named):
        raise InvalidRanking(f"names a reply twice: {' > '.join(named)}")
    if missing := [label for label in labels if label not in named]:
        raise InvalidRanking(f"leaves out {', '.join(missing)}")
    return [labels.index(label) for label in named]


def shown_order(seed: int, key: str, attempt: int, k: int) -> list[int]:
    """The response indices in the order one call shows them (shuffled per call)."""
    order = list(range(k))
    random.Random(f"{seed}:{key}:{attempt}").shuffle(order)
    return order


def load_template(path: str | Path | None) -> str:
    """The judging prompt from ``path``, or DEFAULT_TEMPLATE; it must hold the placeholders
    {conversation} and {responses}."""
    if path is None:
        return DEFAULT_TEMPLATE
    try:
        template = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--template {path}: cannot read it: {e}") from None
    for needed in ("{conversation}", "{responses}"):
        if needed not in template:
            raise UserError(f"--template {path}: the template has no {needed} placeholder")
    return template


def check_task(task: Task, where: str) -> None:
    """The rules load_rankings applies to what the teacher will write, plus room for labels."""
    if task.prompt[-1]["role"] != "user":
        raise UserError(f"{where}: prompt must end with a user turn")
    if len(set(task.responses)) < len(task.responses):
        raise UserError(f"{where}: responses must be distinct (two are equal)")
    if len(task.responses) > len(LABELS):
        raise UserError(f"{where}: {len(task.responses)} responses; at most {len(LABELS)}")


@dataclass
class HumanCheck:
    """The share of tasks sent to the labeling database, and the teacher's rankings of them."""

    db: str  # the database's URL, password hidden
    keys: set[str] = field(repr=False)  # Task.key() of each task sent
    added: int = 0  # new to the database (the others were there already)
    teacher_rankings: int = 0
    conflicts: int = 0  # an earlier, different teacher ranking is already stored


@dataclass
class RankReport(BatchReport):
    """What a run did: BatchReport's counts, the replies that were no ranking, the tasks left
    without one (a line each) and the human check."""

    invalid_replies: int = 0
    unranked: list[str] = field(default_factory=list)
    human: HumanCheck | None = None


@dataclass
class _Job:
    task: Task
    number: int  # the task's position in the file, from 1, for messages
    key: str


def rank_tasks(
    settings: ClientSettings,
    tasks: str | Path,
    out: str | Path,
    template: str = DEFAULT_TEMPLATE,
    attempts: int = 3,
    seed: int = 0,
    human_fraction: float = 0.0,
    db: str | None = None,
    human_overlap: int = 1,
    console: Console | None = None,
) -> RankReport:
    """Let the teacher rank every task in ``tasks`` and append its rankings to ``out``
    (data.Ranking records, annotator ``teacher:MODEL``), skipping tasks already there.

    With ``human_fraction`` > 0, that share of the tasks (at least one, chosen with ``seed``)
    also goes into the labeling database ``db`` for ``human_overlap`` people each, and the
    teacher's rankings of them are submitted there as annotator ``teacher:MODEL``.
    """
    if attempts < 1:
        raise UserError(f"--attempts must be at least 1, got {attempts}")
    if not 0 <= human_fraction <= 1:
        raise UserError(f"--human-fraction must be between 0 and 1, got {human_fraction}")
    if human_fraction > 0 and db is None:
        raise UserError("--human-fraction needs --db, the labeling database to send tasks to")
    if human_overlap < 1:
        raise UserError(f"--human-overlap must be at least 1, got {human_overlap}")
    settings.check()
    jobs = []
    for number, task in enumerate(load_tasks(tasks), start=1):
        check_task(task, f"{tasks}: task {number}")
        jobs.append(_Job(task, number, task.key()))
    human = None
    if human_fraction > 0:
        human = _queue_for_people(jobs, human_fraction, db, human_overlap, seed)
    report = asyncio.run(_run(settings, jobs, out, template, attempts, seed, console))
    if human is not None:
        report.human = human
        _submit_teacher_rankings(human, db, out, TEACHER_PREFIX + settings.model)
    return report


def _human_sample(keys: list[str], fraction: float, seed: int) -> set[str]:
    distinct = sorted(set(keys))
    return set(random.Random(seed).sample(distinct, math.ceil(fraction * len(distinct))))


def _queue_for_people(
    jobs: list[_Job], fraction: float, db: str, overlap: int, seed: int
) -> HumanCheck:
    sample = _human_sample([job.key for job in jobs], fraction, seed)
    chosen = list({job.key: job.task for job in jobs if job.key in sample}.values())
    store = LabelStore(db)
    try:
        result = store.import_tasks(chosen, overlap=overlap)
    finally:
        store.close()
    return HumanCheck(store.url, sample, result.added)


def _submit_teacher_rankings(human: HumanCheck, db: str, out: str | Path, annotator: str) -> None:
    """Store the teacher's rankings of the sampled tasks in the labeling database as annotator
    ``annotator`` (``LabelStore.add_rankings``). Safe to repeat."""
    if not Path(out).exists():
        return
    rankings = {}
    for _, record in read_jsonl(out):
        key = record_key(record)
        if key in human.keys:
            rankings[key] = record["ranking"]
    store = LabelStore(db)
    try:
        human.teacher_rankings, human.conflicts = store.add_rankings(annotator, rankings)
    finally:
        store.close()


def _record(job: _Job, verdict: _Verdict, model: str) -> dict[str, Any]:
    task = job.task
    meta: dict[str, Any] = dict(task.meta)
    if task.id is not None:
        meta["task_id"] = task.id
    meta["teacher"] = {
        "model": model,
        "key": job.key,
        "shown": verdict.order,
        "attempts": verdict.attempts,
    }
    ranking = Ranking(task.prompt, task.responses, verdict.ranking, TEACHER_PREFIX + model, meta)
    return ranking.to_json()


@dataclass
class _Verdict:
    ranking: list[int] | None = None  # response indices best first
    order: list[int] = field(default_factory=list)  # as shown in the call that ranked
    attempts: int = 0
    invalid: int = 0  # replies that were not a ranking
    failed: bool = False  # a request failed for good
    problem: str = ""  # why there is no ranking


async def _judge(
    client: ChatClient, task: Task, key: str, template: str, attempts: int, seed: int
) -> _Verdict:
    """Ask for a ranking of ``task`` until a reply parses, at most ``attempts`` times."""
    k = len(task.responses)
    verdict = _Verdict()
    for attempt in range(attempts):
        verdict.attempts = attempt + 1
        order = shown_order(seed, key, attempt, k)
        shown = [task.responses[i] for i in order]
        prompt = render_judge_prompt(template, task.prompt, shown)
        try:
            reply = await client.complete([{"role": "user", "content": prompt}])
        except RequestFailed as e:
            verdict.failed, verdict.problem = True, str(e)
            return verdict
        try:
            positions = parse_ranking(reply.text, k)
        except InvalidRanking as e:
            verdict.invalid += 1
            cut = " (cut off at max_tokens)" if reply.finish_reason == "length" else ""
            verdict.problem = f"no valid ranking in {attempts} replies; last: {e}{cut}"
            continue
        verdict.ranking, verdict.order = [order[p] for p in positions], order
        return verdict
    return verdict


async def _run(
    settings: ClientSettings,
    jobs: list[_Job],
    out: str | Path,
    template: str,
    attempts: int,
    seed: int,
    console: Console | None,
) -> RankReport:
    report = RankReport()

    async def rank(client: ChatClient, job: _Job) -> dict[str, Any] | None:
        verdict = await _judge(client, job.task, job.key, template, attempts, seed)
        report.invalid_replies += verdict.invalid
        if verdict.ranking is not None:
            return _record(job, verdict, settings.model)
        left_out = report.failures if verdict.failed else report.unranked
        left_out.append(f"task {job.number}: {verdict.problem}")
        return None

    await run_batch(settings, jobs, out, "rank", rank, report, console)
    return report
