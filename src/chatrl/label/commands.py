"""``chatrl label …``: run the labeling server and manage its database from the shell.

``chatrl.cli`` mounts ``label_app`` and adds ``label simulate``, defined with the world's
commands (``chatrl.world.commands``): it needs the bundled world, which the labeling app never
imports.
"""

import json
from pathlib import Path
from typing import Annotated

import typer

from chatrl.label import ExportFormat

label_app = typer.Typer(
    help=(
        "Collect rankings from people: import sampled tasks, add annotators, serve the ranking "
        "page, export rankings for the reward model. See docs/labeling.md."
    ),
    no_args_is_help=True,
)

DEFAULT_DB = "sqlite:///labels.db"
DbOpt = Annotated[
    str,
    typer.Option(
        "--db",
        help="SQLAlchemy URL of the labeling database: sqlite:///FILE.db (one machine) or "
        "postgresql+psycopg://USER:PASSWORD@HOST/DBNAME (a team).",
    ),
]


def open_store(db: str):
    """The labeling store at ``db``, migrated to the current schema."""
    from chatrl.label.store import LabelStore

    return LabelStore(db)


@label_app.command("serve")
def serve_cmd(
    db: DbOpt = DEFAULT_DB,
    host: Annotated[
        str, typer.Option(help="Address to bind (keep 127.0.0.1 unless behind a proxy).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8200,
) -> None:
    """Serve the ranking page and its API. Annotators log in with the token from add-annotator."""
    import uvicorn

    from chatrl.label.app import create_app

    store = open_store(db)
    typer.echo(f"labeling page on http://{host}:{port}/  (database {store.url})", err=True)
    uvicorn.run(create_app(store), host=host, port=port, log_level="warning")


@label_app.command("import")
def import_cmd(
    tasks: Annotated[Path, typer.Argument(help="Tasks JSONL, as written by `chatrl sample`.")],
    db: DbOpt = DEFAULT_DB,
    overlap: Annotated[
        int, typer.Option(help="Annotators who rank each task of the sample below.")
    ] = 1,
    overlap_fraction: Annotated[
        float,
        typer.Option(
            help="Share of the new tasks ranked by --overlap annotators (the rest by one)."
        ),
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for choosing the overlap sample.")] = 0,
) -> None:
    """Add tasks to the queue. Importing the same tasks again adds nothing."""
    from chatrl.data import load_tasks
    from chatrl.errors import UserError

    loaded = load_tasks(tasks)
    store = open_store(db)
    try:
        result = store.import_tasks(loaded, overlap, overlap_fraction, seed)
    except UserError as e:
        raise UserError(f"{tasks}: {e}") from None
    typer.echo(f"{result.added} tasks added, {result.skipped} already there")


@label_app.command("add-annotator")
def add_annotator_cmd(
    name: Annotated[
        str, typer.Argument(help="The annotator's name, as shown in stats and exports.")
    ],
    db: DbOpt = DEFAULT_DB,
    admin: Annotated[bool, typer.Option(help="May also read stats and export over HTTP.")] = False,
) -> None:
    """Create an annotator and print their login token. It is shown only this once."""
    token = open_store(db).add_annotator(name, admin=admin)
    typer.echo(f"login token for {name} (shown once; only its hash is stored):", err=True)
    typer.echo(token)


@label_app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Option(help="JSONL file to write.")],
    db: DbOpt = DEFAULT_DB,
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="rankings: {prompt, responses, ranking, annotator, meta} for `chatrl rm`; "
            "pairs: TRL prompt/chosen/rejected; sft: {messages} from rewritten replies.",
        ),
    ] = ExportFormat.rankings,
) -> None:
    """Write the submitted rankings (or the rewritten replies) as JSONL."""
    from chatrl.data import write_jsonl
    from chatrl.errors import UserError
    from chatrl.label.store import export_records

    records = export_records(open_store(db), fmt)
    if not records:
        what = "rewritten replies" if fmt == ExportFormat.sft else "rankings"
        raise UserError(f"no {what} submitted yet; nothing written")
    count = write_jsonl(out, records)
    typer.echo(f"{count} records ({fmt.value}) -> {out}")


@label_app.command("stats")
def stats_cmd(
    db: DbOpt = DEFAULT_DB,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Progress, rankings per annotator, agreement on tasks ranked by several people, and
    each teacher model's agreement with people (`chatrl teacher rank --human-fraction`)."""
    stats = open_store(db).stats()
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    typer.echo(
        f"tasks: {stats['tasks_done']} of {stats['tasks']} fully ranked; "
        f"rankings: {stats['rankings_done']} of {stats['rankings_wanted']}"
    )
    for person in stats["annotators"]:
        typer.echo(f"  {person['name']}: {person['done']} done, {person['open']} open")
    agreement = stats["agreement"]
    if agreement["rate"] is None:
        typer.echo("agreement: no task ranked by two annotators yet")
    else:
        typer.echo(
            f"agreement: {agreement['rate']:.1%} of {agreement['comparisons']} pairwise "
            f"comparisons on {agreement['tasks']} tasks ranked by several annotators"
        )
    for teacher in stats["teachers"]:
        if teacher["rate"] is None:
            typer.echo(f"{teacher['name']}: no task ranked by people too yet")
        else:
            typer.echo(
                f"{teacher['name']} agrees with people on {teacher['rate']:.1%} of "
                f"{teacher['comparisons']} pairwise comparisons ({teacher['tasks']} tasks)"
            )
