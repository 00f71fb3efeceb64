"""``chatrl teacher …``: SFT demonstrations and rankings from a model behind any
OpenAI-compatible API. ``chatrl.cli`` mounts ``teacher_app``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from chatrl.teacher.demos import Problem

if TYPE_CHECKING:
    from chatrl.teacher.batch import BatchReport
    from chatrl.teacher.client import ClientSettings

teacher_app = typer.Typer(
    help=(
        "A strong model behind an OpenAI-compatible API (a hosted service, vLLM, "
        "`chatrl serve`) writes SFT demonstrations and ranks sampled responses, in the same "
        "formats as the human path. The API key comes from OPENAI_API_KEY or --api-key-env. "
        "See docs/teacher.md."
    ),
    no_args_is_help=True,
)

ApiBaseOpt = Annotated[
    str,
    typer.Option(
        "--api-base",
        help="Base URL of the API, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1.",
        show_default=False,
    ),
]
TeacherOpt = Annotated[
    str,
    typer.Option("--model", help="The teacher: a model name the API knows.", show_default=False),
]
KeyEnvOpt = Annotated[
    str | None,
    typer.Option(
        help="Environment variable that holds the API key (default: OPENAI_API_KEY, if set; "
        "a local server needs none). The key itself is never an option.",
        show_default=False,
    ),
]
ConcurrencyOpt = Annotated[int, typer.Option(help="Requests in flight at once.")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for one reply.")]
RetriesOpt = Annotated[
    int, typer.Option(help="Retries of a request after a 429, a 5xx, a timeout or a lost link.")
]
BackoffOpt = Annotated[
    float,
    typer.Option(
        help="Seconds before the first retry; doubles each time, or a longer Retry-After."
    ),
]
MaxTokensOpt = Annotated[
    int | None,
    typer.Option(help="Longest reply, in tokens (sent as max_tokens; default: the API's)."),
]
TemperatureOpt = Annotated[
    float | None, typer.Option(help="Sampling temperature (default: the API's).")
]


def _settings(
    api_base: str,
    model: str,
    api_key_env: str | None,
    concurrency: int,
    timeout: float,
    retries: int,
    backoff: float,
    max_tokens: int | None,
    temperature: float | None,
) -> ClientSettings:
    from chatrl.teacher.client import ClientSettings, api_key_from_env

    return ClientSettings(
        api_base=api_base,
        model=model,
        api_key=api_key_from_env(api_key_env),
        concurrency=concurrency,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        max_tokens=max_tokens,
        temperature=temperature,
    )


def _list(title: str, lines: list[str], shown: int = 5) -> None:
    typer.echo(title)
    for line in lines[:shown]:
        typer.echo(f"  {line}")
    if len(lines) > shown:
        typer.echo(f"  … and {len(lines) - shown} more")


def _counts(counter: Counter) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in sorted(counter.items()))


def _footer(report: BatchReport, out: Path) -> None:
    from chatrl.teacher.batch import usage_line

    if report.cut_partial_line:
        typer.echo(f"cut off a torn last line in {out} (a killed run); its work was done again")
    typer.echo(f"{usage_line(report.counters, report.seconds)} in {report.seconds:.0f} s")


@teacher_app.command("demos")
def demos_cmd(
    api_base: ApiBaseOpt,
    model: TeacherOpt,
    prompts: Annotated[
        Path, typer.Option(help='Prompts JSONL: {"messages": [...]} ending in a user turn.')
    ],
    out: Annotated[Path, typer.Option(help="SFT JSONL to append to (a rerun resumes it).")],
    n: Annotated[int, typer.Option(help="Answers per prompt (one request each).")] = 1,
    system: Annotated[
        str | None, typer.Option(help="System message for prompts that have none.")
    ] = None,
    system_in_data: Annotated[
        bool,
        typer.Option(help="Write --system into the conversations (off: context distillation)."),
    ] = True,
    keep: Annotated[
        list[Problem] | None,
        typer.Option(
            help="Keep bad answers of this kind (repeatable); by default all are dropped."
        ),
    ] = None,
    api_key_env: KeyEnvOpt = None,
    concurrency: ConcurrencyOpt = 8,
    timeout: TimeoutOpt = 120.0,
    retries: RetriesOpt = 6,
    backoff: BackoffOpt = 1.0,
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = None,
) -> None:
    """The teacher answers every prompt; its answers are SFT conversations for `chatrl sft`.

    Multi-turn prompts are answered as they stand. A rerun with the same --out skips answers
    already there (written one whole line at a time, so a kill loses only the requests in
    flight). Empty answers, answers cut off by the length limit and refusals are counted,
    listed and dropped unless --keep names their kind.
    """
    from chatrl.teacher.demos import write_demos

    settings = _settings(
        api_base,
        model,
        api_key_env,
        concurrency,
        timeout,
        retries,
        backoff,
        max_tokens,
        temperature,
    )
    report = write_demos(settings, prompts, out, n, system, system_in_data, frozenset(keep or ()))
    typer.echo(f"answers written: {report.written} -> {out} ({report.already_done} there already)")
    if report.kept:
        typer.echo(f"kept bad answers: {_counts(report.kept)} (meta.teacher.problem)")
    if report.dropped:
        _list(
            f"dropped bad answers: {_counts(report.dropped)} (--keep KIND keeps them; "
            "a rerun asks again)",
            report.dropped_examples,
        )
    if report.failures:
        _list(f"failed requests: {len(report.failures)} (a rerun retries them)", report.failures)
    _footer(report, out)


@teacher_app.command("rank")
def rank_cmd(
    api_base: ApiBaseOpt,
    model: TeacherOpt,
    tasks: Annotated[Path, typer.Option(help="Tasks JSONL, as written by `chatrl sample`.")],
    out: Annotated[Path, typer.Option(help="Rankings JSONL to append to (a rerun resumes it).")],
    template: Annotated[
        Path | None,
        typer.Option(help="Judging prompt file (default: `chatrl teacher template` prints it)."),
    ] = None,
    attempts: Annotated[
        int, typer.Option(help="Calls per task before giving up on replies that are no ranking.")
    ] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the shuffles and the human sample.")] = 0,
    human_fraction: Annotated[
        float,
        typer.Option(help="Share of tasks also sent to people in the labeling database (--db)."),
    ] = 0.0,
    db: Annotated[
        str | None, typer.Option(help="Labeling database URL, e.g. sqlite:///labels.db.")
    ] = None,
    human_overlap: Annotated[
        int, typer.Option(help="People who rank each task of the human sample.")
    ] = 1,
    api_key_env: KeyEnvOpt = None,
    concurrency: ConcurrencyOpt = 8,
    timeout: TimeoutOpt = 120.0,
    retries: RetriesOpt = 6,
    backoff: BackoffOpt = 1.0,
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = None,
) -> None:
    """The teacher ranks the K responses of every task; the rankings are `chatrl rm` data.

    Each call shows the responses in a new random order (position bias cancels out) and the
    reply must end with `Ranking: B > A > C`, naming each response once; other replies are
    asked again, up to --attempts calls, then the task is reported, never guessed. With
    --human-fraction, that share of tasks also goes to the labeling app, with the teacher's
    ranking stored beside people's: `chatrl label stats` then shows their agreement.
    """
    from chatrl.teacher.rank import load_template, rank_tasks

    settings = _settings(
        api_base,
        model,
        api_key_env,
        concurrency,
        timeout,
        retries,
        backoff,
        max_tokens,
        temperature,
    )
    report = rank_tasks(
        settings,
        tasks,
        out,
        load_template(template),
        attempts,
        seed,
        human_fraction,
        db,
        human_overlap,
    )
    typer.echo(f"rankings written: {report.written} -> {out} ({report.already_done} there already)")
    if report.invalid_replies:
        typer.echo(f"replies that were no valid ranking: {report.invalid_replies} (asked again)")
    if report.unranked:
        _list(
            f"tasks left without a ranking: {len(report.unranked)} (a rerun tries again)",
            report.unranked,
        )
    if report.failures:
        _list(f"failed requests: {len(report.failures)} (a rerun retries them)", report.failures)
    if report.human is not None:
        human = report.human
        typer.echo(
            f"human check: {len(human.keys)} tasks in {human.db} ({human.added} new), "
            f"{human.teacher_rankings} teacher rankings stored there"
            + (f", {human.conflicts} differ from one stored earlier" if human.conflicts else "")
            + "; people rank them in `chatrl label serve` with the same --db, then "
            "`chatrl label stats` shows the agreement"
        )
    _footer(report, out)


@teacher_app.command("template")
def template_cmd() -> None:
    """Print the default judging prompt of `chatrl teacher rank`, to edit for --template.

    Placeholders: {conversation}, {responses} (both required), {k}, {labels}, {example}.
    """
    from chatrl.teacher.rank import DEFAULT_TEMPLATE

    typer.echo(DEFAULT_TEMPLATE, nl=False)
