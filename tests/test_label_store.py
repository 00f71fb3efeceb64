"""The labeling store on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from chatrl.data import Task, load_conversations, load_rankings, load_tasks, write_jsonl
from chatrl.errors import UserError
from chatrl.label import ExportFormat
from chatrl.label.store import (
    AlreadySubmitted,
    AssignmentNotFound,
    Base,
    InvalidSubmission,
    LabelStore,
    Submission,
    agreement,
    export_records,
    simulate,
)


def make_tasks(n: int, k: int = 3, start: int = 0) -> list[Task]:
    return [
        Task(
            prompt=[{"role": "user", "content": f"question {i}"}],
            responses=[f"answer {i}.{j}" for j in range(k)],
            meta={"gold": list(range(k)), "n": i},
        )
        for i in range(start, start + n)
    ]


def best_first(prompt, responses):
    return list(range(len(responses)))


def worst_first(prompt, responses):
    return list(reversed(range(len(responses))))


@pytest.fixture
def store(db_url):
    store = LabelStore(db_url)
    yield store
    store.close()


def person(store: LabelStore, name: str) -> int:
    store.add_annotator(name)
    return store.annotator_id(name)


def test_migrated_schema_matches_the_models(store):
    with store.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_import_is_idempotent_and_keeps_meta(store, tmp_path):
    path = tmp_path / "tasks.jsonl"
    tasks = make_tasks(4)
    write_jsonl(path, [t.to_json() for t in tasks])
    assert store.import_tasks(load_tasks(path)).added == 4
    again = store.import_tasks(load_tasks(path))
    assert (again.added, again.skipped) == (0, 4)
    # A task with an id is the same task even if its text changes.
    with_id = Task(tasks[0].prompt, ["x", "y"], id="t-1")
    assert store.import_tasks([with_id]).added == 1
    assert store.import_tasks([Task(tasks[0].prompt, ["x", "z"], id="t-1")]).added == 0
    me = person(store, "ann")
    metas = []
    while (assignment := store.next_assignment(me)) is not None:
        metas.append(assignment.meta)
        store.submit(me, assignment.id, Submission(best_first(None, assignment.responses)))
    assert metas == [t.meta for t in tasks] + [{}]
    assert [r.meta["n"] for r in store.rankings()[:4]] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "task, problem",
    [
        (Task([{"role": "assistant", "content": "hi"}], ["a", "b"]), "end with a user turn"),
        (Task([{"role": "user", "content": "hi"}], ["a", "a"]), "distinct"),
        (Task([{"role": "user", "content": "hi"}], [str(i) for i in range(10)]), "at most 9"),
    ],
)
def test_import_rejects_tasks_that_cannot_be_exported(tmp_path, task, problem):
    store = LabelStore(f"sqlite:///{tmp_path / 'l.db'}")
    with pytest.raises(UserError, match=problem):
        store.import_tasks([*make_tasks(2), task])
    assert store.stats()["tasks"] == 0


def test_overlap_assignment_never_repeats_a_task(store):
    store.import_tasks(make_tasks(10), overlap=3, overlap_fraction=0.3, seed=1)
    people = [person(store, f"p{i}") for i in range(4)]
    seen: dict[int, list[str]] = {}
    for _ in range(20):
        for who in people:
            assignment = store.next_assignment(who)
            if assignment is not None:
                seen.setdefault(who, []).append(assignment.prompt[0]["content"])
                store.submit(who, assignment.id, Submission([0, 1, 2]))
    for prompts in seen.values():
        assert len(prompts) == len(set(prompts))
    stats = store.stats()
    assert stats["rankings_done"] == stats["rankings_wanted"] == 3 * 3 + 7
    assert stats["tasks_done"] == 10
    assert all(store.next_assignment(who) is None for who in people)


def test_open_assignment_is_returned_until_submitted(store):
    store.import_tasks(make_tasks(2))
    me = person(store, "ann")
    first = store.next_assignment(me)
    assert store.next_assignment(me).id == first.id
    assert store.progress(me).remaining == 2
    store.submit(me, first.id, Submission([2, 1, 0]))
    assert store.next_assignment(me).id != first.id
    assert store.progress(me).done == 1


@pytest.mark.parametrize(
    "submission, problem",
    [
        (Submission([0, 1]), "exactly once"),
        (Submission([0, 1, 1]), "exactly once"),
        (Submission([0, 1, 3]), "exactly once"),
        (Submission([0, 1, 2, 3]), "exactly once"),
        (Submission([0, 1, 2], flags={"rude": [0]}), "unknown flag"),
        (Submission([0, 1, 2], flags={"harmful": [5]}), "distinct indices"),
        (Submission([0, 1, 2], rewrite="x" * 20_001), "over"),
    ],
)
def test_invalid_submissions_store_nothing(tmp_path, submission, problem):
    store = LabelStore(f"sqlite:///{tmp_path / 'l.db'}")
    store.import_tasks(make_tasks(1))
    me = person(store, "ann")
    assignment = store.next_assignment(me)
    with pytest.raises(InvalidSubmission, match=problem):
        store.submit(me, assignment.id, submission)
    assert store.rankings() == []
    assert not store.get_assignment(me, assignment.id).submitted


def test_double_submission_stores_one_ranking(store):
    store.import_tasks(make_tasks(1))
    me = person(store, "ann")
    assignment = store.next_assignment(me)
    submission = Submission([1, 0, 2], {"harmful": [2]}, "A better answer.")
    assert store.submit(me, assignment.id, submission) is True
    assert store.submit(me, assignment.id, submission) is False
    with pytest.raises(AlreadySubmitted):
        store.submit(me, assignment.id, Submission([0, 1, 2]))
    assert [r.ranking for r in store.rankings()] == [[1, 0, 2]]


def test_annotators_cannot_touch_each_others_assignments(store):
    store.import_tasks(make_tasks(2))
    ann, bob = person(store, "ann"), person(store, "bob")
    assignment = store.next_assignment(ann)
    with pytest.raises(AssignmentNotFound):
        store.get_assignment(bob, assignment.id)
    with pytest.raises(AssignmentNotFound):
        store.submit(bob, assignment.id, Submission([0, 1, 2]))
    assert store.next_assignment(bob).id != assignment.id
    assert store.rankings() == []


def test_only_the_token_hash_is_stored(store):
    token = store.add_annotator("ann", admin=True)
    assert store.authenticate(token).name == "ann"
    assert store.authenticate(token + "x") is None
    with store.engine.connect() as connection:
        rows = connection.execute(text("SELECT name, token_hash FROM annotators")).all()
    assert rows == [("ann", hashlib.sha256(token.encode()).hexdigest())]
    with pytest.raises(UserError, match="already exists"):
        store.add_annotator("ann")


def test_exports_load_back(store, tmp_path):
    store.import_tasks(make_tasks(3))
    me = person(store, "ann")
    assignment = store.next_assignment(me)
    store.submit(me, assignment.id, Submission([2, 0, 1], {"untruthful": [1]}, "Better."))
    assert simulate(store, {"sim": worst_first}) == {"sim": 2}

    rankings_path, pairs_path, sft_path = (tmp_path / f"{f}.jsonl" for f in ExportFormat)
    write_jsonl(rankings_path, export_records(store, ExportFormat.rankings))
    write_jsonl(pairs_path, export_records(store, ExportFormat.pairs))
    write_jsonl(sft_path, export_records(store, ExportFormat.sft))

    rankings = load_rankings(rankings_path)
    assert [(r.annotator, r.ranking) for r in rankings] == [
        ("ann", [2, 0, 1]),
        ("sim", [2, 1, 0]),
        ("sim", [2, 1, 0]),
    ]
    assert rankings[0].meta["flags"] == {"harmful": [], "untruthful": [1]}
    assert rankings[0].meta["gold"] == [0, 1, 2]
    pairs = load_rankings(pairs_path)
    assert len(pairs) == 3 * 3
    assert (pairs[0].responses, pairs[0].prompt) == (
        ["answer 0.2", "answer 0.0"],
        make_tasks(1)[0].prompt,
    )
    assert load_conversations(sft_path) == [
        [*make_tasks(1)[0].prompt, {"role": "assistant", "content": "Better."}]
    ]


def test_stats_report_agreement_on_shared_tasks(store):
    store.import_tasks(make_tasks(4), overlap=2, overlap_fraction=0.5, seed=0)
    simulate(store, {"a": best_first, "b": best_first})
    simulate(store, {"c": worst_first})  # nothing left for c
    stats = store.stats()
    assert stats["agreement"] == {"tasks": 2, "comparisons": 6, "rate": 1.0}
    assert [(p["name"], p["done"]) for p in stats["annotators"]] == [("a", 3), ("b", 3), ("c", 0)]


def test_agreement_counts_pairwise_comparisons():
    assert agreement([(1, [0, 1, 2]), (1, [0, 2, 1]), (2, [1, 0])]) == {
        "tasks": 1,
        "comparisons": 3,
        "rate": pytest.approx(2 / 3),
    }
    assert agreement([(1, [0, 1]), (1, [1, 0]), (1, [1, 0])])["rate"] == pytest.approx(1 / 3)


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path):
    store = LabelStore(f"sqlite:///{tmp_path / 'l.db'}")
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000


def test_bad_database_urls_are_user_errors(tmp_path: Path):
    with pytest.raises(UserError, match="not a database URL"):
        LabelStore("labels.db")
    with pytest.raises(UserError, match="cannot open database"):
        LabelStore(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'l.db'}")
