"""The labeling database: tasks, annotators, their assignments and submitted rankings.

Any SQLAlchemy URL works; SQLite (one file, WAL mode) for one machine, PostgreSQL for a team.
The schema is created and upgraded by the Alembic migrations in ``migrations/`` whenever a
store is opened, never by ``create_all``.

Concurrency: every public method is one short transaction.
- SQLite: every transaction starts with ``BEGIN IMMEDIATE`` (it takes the write lock up front
  and waits up to ``BUSY_TIMEOUT_MS`` for it), so writers queue instead of failing with
  "database is locked" when a read transaction later tries to write.
- PostgreSQL: handing out a task locks its row with ``FOR UPDATE SKIP LOCKED`` and bumps the
  task's ``assigned`` counter in the same transaction, so two annotators racing for the last
  slot of a task can never both get it.

One module for the schema and every query on it (import, assignment, submission, export,
statistics), so each transaction's locking can be read next to the tables it locks; hence its
length.
"""

from __future__ import annotations

import hashlib
import random
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from chatrl.data import TEACHER_PREFIX, Message, Prompt, Ranking, Task
from chatrl.errors import UserError
from chatrl.label import ExportFormat

BUSY_TIMEOUT_MS = 30_000
MAX_RESPONSES = 9  # the page ranks with the number keys 1-9
FLAG_KINDS = ("harmful", "untruthful")
MAX_REWRITE_CHARS = 20_000
MIGRATIONS = Path(__file__).parent / "migrations"


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    # Named constraints, so later migrations can alter them (batch mode on SQLite).
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class AnnotatorRow(Base):
    __tablename__ = "annotators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class TaskRow(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the id or the content
    external_id: Mapped[str | None] = mapped_column(Text)
    prompt: Mapped[list[Message]] = mapped_column(JSON)
    responses: Mapped[list[str]] = mapped_column(JSON)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    overlap: Mapped[int] = mapped_column(Integer)  # how many annotators should rank it
    assigned: Mapped[int] = mapped_column(Integer, default=0)  # how many have been handed it
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class AssignmentRow(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("task_id", "annotator_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))  # indexed by the unique pair
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ranking: Mapped[list[int] | None] = mapped_column(JSON)
    flags: Mapped[dict[str, list[int]] | None] = mapped_column(JSON)
    rewrite: Mapped[str | None] = mapped_column(Text)


@dataclass
class Annotator:
    """Who a token belongs to."""

    id: int
    name: str
    is_admin: bool


@dataclass
class Assignment:
    """One task handed to one annotator. ``meta`` is for simulated annotators only: the page
    never shows it (the bundled world keeps its judge's answers there)."""

    id: int
    prompt: list[Message]
    responses: list[str]
    meta: dict[str, Any]
    submitted: bool


@dataclass
class Progress:
    """An annotator's rankings so far and the tasks still waiting for them."""

    done: int
    remaining: int


@dataclass
class ImportResult:
    added: int
    skipped: int  # already in the database (or repeated in the file)


class InvalidSubmission(UserError):
    """A ranking, flag set or rewrite that does not fit the task shown."""


class AssignmentNotFound(LookupError):
    """No such assignment for this annotator (it may belong to someone else)."""


class AlreadySubmitted(Exception):
    """The assignment already holds a different submission."""


@dataclass
class Submission:
    """What an annotator sends back: ``ranking`` lists response indices best first."""

    ranking: list[int]
    flags: dict[str, list[int]] = field(default_factory=dict)
    rewrite: str | None = None


# ---------------------------------------------------------------- engine and schema


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Autocommit at the driver level: _sqlite_begin emits BEGIN IMMEDIATE itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and write-locking transactions."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(
            f"--db {url!r} is not a database URL; use e.g. sqlite:///labels.db "
            "or postgresql+psycopg://user:password@host/dbname"
        ) from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise UserError(f"--db {url!r}: SQLite needs a file, e.g. sqlite:///labels.db")
        engine = create_engine(parsed)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    try:
        return create_engine(parsed, pool_pre_ping=True)
    except ModuleNotFoundError as e:
        raise UserError(f"--db {url!r}: database driver not installed ({e.name})") from None


def migrate(engine: Engine) -> None:
    """Bring the schema up to the newest Alembic revision (a no-op when it is current)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_task(task: Task, where: str) -> None:
    # The same rules load_rankings applies, so every export loads back.
    if task.prompt[-1]["role"] != "user":
        raise UserError(f"{where}: prompt must end with a user turn")
    if len(task.responses) > MAX_RESPONSES:
        raise UserError(f"{where}: {len(task.responses)} responses; at most {MAX_RESPONSES}")
    if len(set(task.responses)) < len(task.responses):
        raise UserError(f"{where}: responses must be distinct (two are equal)")


def _check_submission(submission: Submission, k: int) -> Submission:
    ranking = submission.ranking
    if sorted(ranking) != list(range(k)):
        raise InvalidSubmission(
            f"ranking must list each of the {k} shown responses exactly once "
            f"(indices 0..{k - 1}, best first); got {ranking}"
        )
    flags = {}
    for kind, indices in submission.flags.items():
        if kind not in FLAG_KINDS:
            raise InvalidSubmission(f"unknown flag {kind!r}; flags are {', '.join(FLAG_KINDS)}")
        if any(i not in range(k) for i in indices) or len(set(indices)) < len(indices):
            raise InvalidSubmission(f"flag {kind!r} must list distinct indices in 0..{k - 1}")
        if indices:
            flags[kind] = sorted(indices)
    rewrite = (submission.rewrite or "").strip() or None
    if rewrite is not None and len(rewrite) > MAX_REWRITE_CHARS:
        raise InvalidSubmission(f"the rewritten reply is over {MAX_REWRITE_CHARS} characters")
    return Submission(list(ranking), flags, rewrite)


def _assignment(row: AssignmentRow, task: TaskRow) -> Assignment:
    return Assignment(row.id, task.prompt, task.responses, task.meta, row.submitted_at is not None)


def _all_flags(flags: dict[str, list[int]] | None) -> dict[str, list[int]]:
    return {kind: (flags or {}).get(kind, []) for kind in FLAG_KINDS}


# ---------------------------------------------------------------- the store


class LabelStore:
    """The labeling database at ``url``, migrated to the current schema on opening."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.url = self.engine.url.render_as_string(hide_password=True)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        try:
            migrate(self.engine)
        except OperationalError as e:
            raise UserError(f"cannot open database {self.url}: {e.orig}") from None

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------ admin

    def import_tasks(
        self, tasks: list[Task], overlap: int = 1, overlap_fraction: float = 1.0, seed: int = 0
    ) -> ImportResult:
        """Add the tasks not already present; ``overlap`` annotators rank a random
        ``overlap_fraction`` of the new ones, one annotator the rest."""
        if overlap < 1:
            raise UserError("--overlap must be at least 1")
        if not 0 <= overlap_fraction <= 1:
            raise UserError("--overlap-fraction must be between 0 and 1")
        for number, task in enumerate(tasks, start=1):
            _check_task(task, f"task {number}")
        with self._session.begin() as session:
            known = set(session.scalars(select(TaskRow.key)))
            new: dict[str, Task] = {}
            for task in tasks:
                key = task.key()
                if key not in known:
                    new.setdefault(key, task)
            shared = set(
                random.Random(seed).sample(sorted(new), round(overlap_fraction * len(new)))
            )
            for key, task in new.items():
                session.add(
                    TaskRow(
                        key=key,
                        external_id=task.id,
                        prompt=task.prompt,
                        responses=task.responses,
                        meta=task.meta,
                        overlap=overlap if key in shared else 1,
                        assigned=0,
                    )
                )
        return ImportResult(added=len(new), skipped=len(tasks) - len(new))

    def add_annotator(self, name: str, admin: bool = False) -> str:
        """Create an annotator and return their login token (only its hash is stored)."""
        name = name.strip()
        if not name or len(name) > 100:
            raise UserError("annotator name must be 1 to 100 characters")
        token = secrets.token_urlsafe(24)
        with self._session.begin() as session:
            if session.scalar(select(AnnotatorRow.id).where(AnnotatorRow.name == name)):
                raise UserError(f"annotator {name!r} already exists")
            session.add(AnnotatorRow(name=name, token_hash=hash_token(token), is_admin=admin))
        return token

    def authenticate(self, token: str) -> Annotator | None:
        """The annotator a token belongs to, or None."""
        with self._session.begin() as session:
            row = session.scalar(
                select(AnnotatorRow).where(AnnotatorRow.token_hash == hash_token(token))
            )
            return None if row is None else Annotator(row.id, row.name, row.is_admin)

    def annotator_id(self, name: str) -> int | None:
        with self._session.begin() as session:
            return session.scalar(select(AnnotatorRow.id).where(AnnotatorRow.name == name))

    # ------------------------------------------------------------ annotators' work

    def next_assignment(self, annotator_id: int) -> Assignment | None:
        """The annotator's open assignment, else a fresh one, else None (nothing left)."""
        with self._session.begin() as session:
            # Lock the annotator so their own parallel requests cannot open two tasks.
            session.scalar(
                select(AnnotatorRow.id).where(AnnotatorRow.id == annotator_id).with_for_update()
            )
            open_row = session.scalars(
                select(AssignmentRow)
                .where(
                    AssignmentRow.annotator_id == annotator_id,
                    AssignmentRow.submitted_at.is_(None),
                )
                .order_by(AssignmentRow.id)
                .limit(1)
            ).first()
            if open_row is not None:
                return _assignment(open_row, session.get(TaskRow, open_row.task_id))
            seen = select(AssignmentRow.task_id).where(AssignmentRow.annotator_id == annotator_id)
            task = session.scalars(
                select(TaskRow)
                .where(TaskRow.assigned < TaskRow.overlap, TaskRow.id.not_in(seen))
                .order_by(TaskRow.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if task is None:
                return None
            task.assigned += 1
            row = AssignmentRow(task_id=task.id, annotator_id=annotator_id)
            session.add(row)
            session.flush()
            return _assignment(row, task)

    def assign_extra(self, annotator_id: int, key: str) -> Assignment:
        """Hand the task with this ``Task.key()`` to the annotator on top of the ``overlap``
        annotators it waits for (a teacher model beside people): its overlap grows by one.
        Returns the annotator's assignment of it when they already have one."""
        with self._session.begin() as session:
            task = session.scalars(
                select(TaskRow).where(TaskRow.key == key).with_for_update()
            ).first()
            if task is None:
                raise UserError(f"no task with key {key} in the labeling database")
            row = session.scalars(
                select(AssignmentRow).where(
                    AssignmentRow.task_id == task.id, AssignmentRow.annotator_id == annotator_id
                )
            ).first()
            if row is None:
                task.overlap += 1
                task.assigned += 1
                row = AssignmentRow(task_id=task.id, annotator_id=annotator_id)
                session.add(row)
                session.flush()
            return _assignment(row, task)

    def add_rankings(self, annotator: str, rankings: dict[str, list[int]]) -> tuple[int, int]:
        """Store rankings made outside the app (a teacher model's), keyed by ``Task.key()``,
        as annotator ``annotator`` beside people's, through the same calls people's
        submissions go through; the annotator is added if new (nobody logs in as it).

        Safe to repeat. Returns how many are stored there (now or by an earlier call) and how
        many conflict with a different ranking stored earlier (those are kept as they were).
        """
        if self.annotator_id(annotator) is None:
            self.add_annotator(annotator)
        annotator_id = self.annotator_id(annotator)
        stored = conflicts = 0
        for key, ranking in rankings.items():
            assignment = self.assign_extra(annotator_id, key)
            try:
                self.submit(annotator_id, assignment.id, Submission(ranking))
                stored += 1
            except AlreadySubmitted:
                conflicts += 1
        return stored, conflicts

    def _own_assignment(self, session: Any, annotator_id: int, assignment_id: int):
        row = session.scalars(
            select(AssignmentRow).where(AssignmentRow.id == assignment_id).with_for_update()
        ).first()
        if row is None or row.annotator_id != annotator_id:
            raise AssignmentNotFound(f"no assignment {assignment_id} for this annotator")
        return row, session.get(TaskRow, row.task_id)

    def get_assignment(self, annotator_id: int, assignment_id: int) -> Assignment:
        """One of the annotator's own assignments; anyone else's raises AssignmentNotFound."""
        with self._session.begin() as session:
            return _assignment(*self._own_assignment(session, annotator_id, assignment_id))

    def submit(self, annotator_id: int, assignment_id: int, submission: Submission) -> bool:
        """Store a submission. Returns False (and stores nothing) when this exact submission
        is already stored, so retries and double clicks are harmless."""
        with self._session.begin() as session:
            row, task = self._own_assignment(session, annotator_id, assignment_id)
            clean = _check_submission(submission, len(task.responses))
            if row.submitted_at is not None:
                stored = Submission(row.ranking, row.flags or {}, row.rewrite)
                if stored == clean:
                    return False
                raise AlreadySubmitted(f"assignment {assignment_id} was already submitted")
            row.ranking, row.flags, row.rewrite = clean.ranking, clean.flags, clean.rewrite
            row.submitted_at = _now()
            return True

    def progress(self, annotator_id: int) -> Progress:
        """Rankings done by the annotator and tasks still waiting for them."""
        with self._session.begin() as session:
            done, assigned = session.execute(
                select(func.count(AssignmentRow.submitted_at), func.count(AssignmentRow.id)).where(
                    AssignmentRow.annotator_id == annotator_id
                )
            ).one()
            seen = select(AssignmentRow.task_id).where(AssignmentRow.annotator_id == annotator_id)
            waiting = session.scalar(
                select(func.count())
                .select_from(TaskRow)
                .where(TaskRow.assigned < TaskRow.overlap, TaskRow.id.not_in(seen))
            )
            return Progress(done=done, remaining=assigned - done + waiting)

    # ------------------------------------------------------------ results

    def _submitted(self) -> list[tuple[AssignmentRow, TaskRow, str]]:
        with self._session.begin() as session:
            rows = session.execute(
                select(AssignmentRow, TaskRow, AnnotatorRow.name)
                .join(TaskRow, AssignmentRow.task_id == TaskRow.id)
                .join(AnnotatorRow, AssignmentRow.annotator_id == AnnotatorRow.id)
                .where(AssignmentRow.submitted_at.is_not(None))
                .order_by(TaskRow.id, AssignmentRow.id)
            )
            return [tuple(row) for row in rows]

    def rankings(self) -> list[Ranking]:
        """Every submitted ranking; meta is the task's meta plus ``flags`` and ``task_id``."""
        return [
            Ranking(
                prompt=task.prompt,
                responses=task.responses,
                ranking=row.ranking,
                annotator=name,
                meta={
                    **task.meta,
                    "task_id": task.external_id or task.key,
                    "flags": _all_flags(row.flags),
                },
            )
            for row, task, name in self._submitted()
        ]

    def demonstrations(self) -> list[list[Message]]:
        """Conversations ending in an annotator's rewritten reply (new SFT data)."""
        return [
            [*task.prompt, {"role": "assistant", "content": row.rewrite}]
            for row, task, _ in self._submitted()
            if row.rewrite
        ]

    def stats(self) -> dict[str, Any]:
        """Progress, per-annotator counts, agreement between people on shared tasks and each
        teacher model's agreement with people."""
        with self._session.begin() as session:
            overlaps = dict(session.execute(select(TaskRow.id, TaskRow.overlap)).all())
            rankings = session.execute(
                select(AssignmentRow.task_id, AnnotatorRow.name, AssignmentRow.ranking)
                .join(AnnotatorRow, AssignmentRow.annotator_id == AnnotatorRow.id)
                .where(AssignmentRow.submitted_at.is_not(None))
            ).all()
            per_annotator = session.execute(
                select(
                    AnnotatorRow.name,
                    func.count(AssignmentRow.submitted_at),
                    func.count(AssignmentRow.id),
                )
                .outerjoin(AssignmentRow, AssignmentRow.annotator_id == AnnotatorRow.id)
                .group_by(AnnotatorRow.id, AnnotatorRow.name)
                .order_by(AnnotatorRow.name)
            ).all()
        done_per_task = Counter(task_id for task_id, _, _ in rankings)
        teachers = sorted({name for _, name, _ in rankings if name.startswith(TEACHER_PREFIX)})
        return {
            "tasks": len(overlaps),
            "tasks_done": sum(done_per_task[t] >= overlap for t, overlap in overlaps.items()),
            "rankings_done": len(rankings),
            "rankings_wanted": sum(overlaps.values()),
            "annotators": [
                {"name": name, "done": done, "open": total - done}
                for name, done, total in per_annotator
            ],
            "agreement": agreement(
                [(task_id, ranking) for task_id, name, ranking in rankings if name not in teachers]
            ),
            "teachers": [teacher_agreement(rankings, name) for name in teachers],
        }


def agreement(rankings: list[tuple[int, list[int]]]) -> dict[str, Any]:
    """How often two annotators of the same task order a pair of responses the same way.

    ``rankings`` holds (task id, ranking) pairs; tasks ranked once are left out. ``rate``
    is agreed comparisons / all comparisons (InstructGPT reports about 73% between labelers).
    """
    by_task: dict[int, list[list[int]]] = {}
    for task_id, ranking in rankings:
        by_task.setdefault(task_id, []).append(ranking)
    shared = {task_id: rs for task_id, rs in by_task.items() if len(rs) > 1}
    counts = [_agreed_pairs(a, b) for rs in shared.values() for a, b in combinations(rs, 2)]
    return _agreement_figures(len(shared), counts)


def teacher_agreement(rankings: list[tuple[int, str, list[int]]], teacher: str) -> dict[str, Any]:
    """How often people order a pair of responses as the teacher model ``teacher`` does, on
    the tasks both ranked. ``rankings`` holds (task id, annotator name, ranking) triples;
    other teachers' rankings are left out."""
    own = {task_id: ranking for task_id, name, ranking in rankings if name == teacher}
    people = [
        (task_id, ranking)
        for task_id, name, ranking in rankings
        if task_id in own and not name.startswith(TEACHER_PREFIX)
    ]
    counts = [_agreed_pairs(own[task_id], ranking) for task_id, ranking in people]
    return {"name": teacher, **_agreement_figures(len({t for t, _ in people}), counts)}


def _agreed_pairs(a: list[int], b: list[int]) -> tuple[int, int]:
    """(pairs ordered alike, pairs compared) between two rankings of the same responses."""
    place_a = {response: place for place, response in enumerate(a)}
    place_b = {response: place for place, response in enumerate(b)}
    pairs = list(combinations(range(len(a)), 2))
    return sum((place_a[i] < place_a[j]) == (place_b[i] < place_b[j]) for i, j in pairs), len(pairs)


def _agreement_figures(tasks: int, counts: list[tuple[int, int]]) -> dict[str, Any]:
    agreed, compared = sum(a for a, _ in counts), sum(c for _, c in counts)
    return {
        "tasks": tasks,
        "comparisons": compared,
        "rate": agreed / compared if compared else None,
    }


def export_records(store: LabelStore, fmt: ExportFormat) -> list[dict[str, Any]]:
    """The store's results as JSON records: rankings, TRL preference pairs or SFT chats."""
    if fmt == ExportFormat.sft:
        return [{"messages": messages} for messages in store.demonstrations()]
    rankings = store.rankings()
    if fmt == ExportFormat.rankings:
        return [ranking.to_json() for ranking in rankings]
    return [
        {
            "prompt": r.prompt,
            "chosen": [{"role": "assistant", "content": r.responses[better]}],
            "rejected": [{"role": "assistant", "content": r.responses[worse]}],
        }
        for r in rankings
        for better, worse in r.pairs()
    ]


RankFn = Callable[[Prompt, list[str]], list[int]]


def simulate(store: LabelStore, rank_fns: dict[str, RankFn]) -> dict[str, int]:
    """Let simulated annotators (name -> ranking function) work through the queue, taking
    turns, through the same store calls as the HTTP API. Returns rankings per annotator."""
    ids = {}
    for name in rank_fns:
        if store.annotator_id(name) is None:
            store.add_annotator(name)  # nobody logs in as a simulated annotator
        ids[name] = store.annotator_id(name)
    done = dict.fromkeys(rank_fns, 0)
    active = list(rank_fns)
    while active:
        for name in list(active):
            assignment = store.next_assignment(ids[name])
            if assignment is None:
                active.remove(name)
                continue
            prompt = Prompt(assignment.prompt, assignment.meta)
            ranking = [int(i) for i in rank_fns[name](prompt, assignment.responses)]
            store.submit(ids[name], assignment.id, Submission(ranking))
            done[name] += 1
    return done
