"""`chatrl label …` from the command line, the bundled world's annotators included."""

from __future__ import annotations

import json
import sys

import pytest

from chatrl.cli import main
from chatrl.data import Task, load_rankings, write_jsonl
from chatrl.label.store import LabelStore
from chatrl.world.annotators import default_annotators
from chatrl.world.tasks import make_prompts, perfect_response


@pytest.fixture
def chatrl(monkeypatch, capsys):
    """Run the CLI in-process; returns (exit status, stdout, stderr)."""

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["chatrl", *map(str, args)])
        try:
            main()
            status = 0
        except SystemExit as e:
            status = e.code
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture
def tasks_file(tmp_path):
    """World prompts with three distinct responses each: the perfect one and two bad ones."""
    tasks = [
        Task(p.messages, [perfect_response(p), "I have no idea.", "Bananas!"], meta=p.meta)
        for p in make_prompts(6, seed=0)
    ]
    path = tmp_path / "tasks.jsonl"
    write_jsonl(path, [t.to_json() for t in tasks])
    return path


def test_import_annotate_export_from_the_command_line(chatrl, tasks_file, tmp_path):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    assert chatrl(
        "label", "import", tasks_file, "--db", db, "--overlap", 2, "--overlap-fraction", 0.5
    ) == (0, "6 tasks added, 0 already there\n", "")
    assert (
        chatrl("label", "import", tasks_file, "--db", db)[1] == "0 tasks added, 6 already there\n"
    )

    status, token, err = chatrl("label", "add-annotator", "alice", "--db", db)
    assert status == 0 and "shown once" in err
    assert LabelStore(db).authenticate(token.strip()).name == "alice"

    status, out, _ = chatrl("label", "simulate", "--db", db, "--annotators", 2)
    names = [a.name for a in default_annotators(0)[:2]]
    done = {name: int(count.split()[0]) for name, count in (p.split(": ") for p in out.split(", "))}
    assert status == 0 and list(done) == names and sum(done.values()) == 6 + 3

    status, out, _ = chatrl("label", "stats", "--db", db, "--json")
    stats = json.loads(out)
    assert (stats["rankings_done"], stats["tasks_done"], stats["agreement"]["tasks"]) == (9, 6, 3)
    status, out, _ = chatrl("label", "stats", "--db", db)
    assert "6 of 6 fully ranked" in out and "alice: 0 done" in out and "agreement: " in out

    out_path = tmp_path / "rankings.jsonl"
    assert chatrl("label", "export", "--db", db, "--out", out_path)[0] == 0
    rankings = load_rankings(out_path)
    assert len(rankings) == 9 and {r.annotator for r in rankings} == set(names)
    assert all("family" in r.meta and "flags" in r.meta for r in rankings)
    chatrl("label", "export", "--db", db, "--out", tmp_path / "pairs.jsonl", "--format", "pairs")
    assert len(load_rankings(tmp_path / "pairs.jsonl")) == 9 * 3

    status, _, err = chatrl(
        "label", "export", "--db", db, "--out", tmp_path / "s.jsonl", "--format", "sft"
    )
    assert status == 2 and "no rewritten replies" in err
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["label", "stats", "--db", "labels.db"], "not a database URL"),
        (["label", "import", "missing.jsonl", "--db", "sqlite:///{tmp}/l.db"], "file not found"),
        (
            ["label", "import", "{tasks}", "--db", "sqlite:///{tmp}/l.db", "--overlap", "0"],
            "--overlap must be at least 1",
        ),
        (
            ["label", "simulate", "--db", "sqlite:///{tmp}/l.db", "--annotators", "99"],
            "--annotators must be between 1 and",
        ),
    ],
)
def test_mistakes_are_one_line_errors(chatrl, tasks_file, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, tasks=tasks_file) for a in args]
    status, _, err = chatrl(*args)
    assert status == 2
    assert message in err and "Traceback" not in err
