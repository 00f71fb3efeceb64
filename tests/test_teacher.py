"""``chatrl teacher demos`` and ``rank`` against real servers on loopback: a misbehaving one
written for these tests (tests/flaky_server.py: 429s, 5xx, slow replies, bad answers, replies
that are no ranking, a request counter) and ``chatrl serve`` on a micro model."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from servers import SERVE_KEY, free_port, wait_until_up
from typer.testing import CliRunner

from chatrl.cli import app
from chatrl.config import LMConfig, RMConfig
from chatrl.data import Task, load_conversations, load_rankings, write_jsonl
from chatrl.errors import UserError
from chatrl.label.store import LabelStore, simulate
from chatrl.teacher.client import ClientSettings, api_key_from_env
from chatrl.teacher.demos import Problem, write_demos
from chatrl.teacher.rank import (
    DEFAULT_TEMPLATE,
    InvalidRanking,
    parse_ranking,
    rank_tasks,
    render_judge_prompt,
    shown_order,
)

ROOT = Path(__file__).parent.parent


class Flaky:
    """Handle on the misbehaving server: set its plan, read what it saw."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.api = f"{base}/v1"

    def plan(self, **plan) -> None:
        httpx.post(f"{self.base}/control", json=plan).raise_for_status()

    def stats(self) -> dict:
        return httpx.get(f"{self.base}/stats").json()


@pytest.fixture(scope="module")
def flaky(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("flaky") / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "flaky_server.py"), str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", process, log)
        yield Flaky(f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        process.wait(timeout=10)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def settings(flaky: Flaky, **overrides) -> ClientSettings:
    values = dict(api_base=flaky.api, model="judge", concurrency=4, backoff=0.01, timeout=5.0)
    return ClientSettings(**{**values, **overrides})


def write_prompts(path: Path, contents: list[str]) -> Path:
    records = [
        {"messages": [{"role": "user", "content": c}], "meta": {"n": i}}
        for i, c in enumerate(contents)
    ]
    write_jsonl(path, records)
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- demos


def test_demos_answer_every_prompt_as_sft_data(flaky, micro_model, tmp_path):
    multi_turn = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour"},
    ]
    own_system = [{"role": "system", "content": "Be formal."}, {"role": "user", "content": "Hey"}]
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(
        prompts,
        [
            {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "meta": {"id": 7}},
            {"messages": multi_turn},
            {"prompt": own_system},
        ],
    )
    flaky.plan()
    console = quiet()
    out = tmp_path / "sft.jsonl"
    report = write_demos(settings(flaky), prompts, out, n=2, system="Be brief.", console=console)
    assert (report.written, report.already_done, report.failures) == (6, 0, [])
    assert len(load_conversations(out)) == 6
    # Records arrive in the order replies do: look them up by prompt and answer index.
    records = {
        (r["messages"][-2]["content"], r["meta"]["teacher"]["answer"]): r for r in lines(out)
    }
    assert sorted(records) == [
        (p, i) for p in ("Hey", "Name a colour", "What is 2 + 3?") for i in (0, 1)
    ]
    assert {records[p, 0]["messages"][-1]["content"] for p, _ in records} == {
        "Answer to: What is 2 + 3? (system: Be brief.)",
        "Answer to: Name a colour (system: Be brief.)",
        "Answer to: Hey (system: Be formal.)",  # its own system message wins
    }
    assert records["Name a colour", 1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        *multi_turn,
        {"role": "assistant", "content": "Answer to: Name a colour (system: Be brief.)"},
    ]
    assert records["What is 2 + 3?", 1]["meta"]["id"] == 7  # the prompt's meta is carried along
    assert len({r["meta"]["teacher"]["key"] for r in records.values()}) == 6
    # The token usage shown and counted is what the API reported.
    stats = flaky.stats()
    assert report.counters.requests == stats["requests"] == 6
    assert report.counters.prompt_tokens == stats["prompt_tokens"] > 0
    assert report.counters.completion_tokens == stats["completion_tokens"] > 0
    shown = console.file.getvalue()
    assert (
        "6/6" in shown
        and " req/s, " in shown
        and f"{stats['prompt_tokens'] + stats['completion_tokens']:,} tokens" in shown
    )
    # Without the system message in the data: the student learns to behave as told, untold.
    distilled = tmp_path / "distilled.jsonl"
    write_demos(
        settings(flaky),
        prompts,
        distilled,
        system="Be brief.",
        system_in_data=False,
        console=quiet(),
    )
    first = next(c for c in load_conversations(distilled) if c[0]["content"] == "What is 2 + 3?")
    assert first == [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "Answer to: What is 2 + 3? (system: Be brief.)"},
    ]
    # What chatrl sft trains on, as it is.
    model = LMConfig(
        model=str(micro_model),
        data=str(out),
        out=str(tmp_path / "sft"),
        max_steps=1,
        bf16=False,
        per_device_train_batch_size=2,
    )
    from chatrl.train.lm import train_lm

    assert (train_lm(model, "sft") / "config.json").exists()


def test_bad_answers_are_counted_dropped_or_kept_and_failures_reported(flaky, tmp_path):
    prompts = write_prompts(
        tmp_path / "p.jsonl", ["fine", "[empty]", "[truncate]", "[refuse]", "[invalid]"]
    )
    out = tmp_path / "sft.jsonl"
    flaky.plan()
    report = write_demos(settings(flaky), prompts, out, console=quiet())
    assert report.written == 1
    assert dict(report.dropped) == {"empty": 1, "truncated": 1, "refused": 1}
    assert len(report.failures) == 1 and "prompt 5" in report.failures[0]
    assert "HTTP 400" in report.failures[0] and flaky.stats()["requests"] == 5  # 400: no retry
    # A rerun asks again for everything not in the file; --keep refused keeps the refusal.
    flaky.plan()
    again = write_demos(
        settings(flaky), prompts, out, keep=frozenset({Problem.refused}), console=quiet()
    )
    assert (again.already_done, again.written, dict(again.kept)) == (1, 1, {"refused": 1})
    assert dict(again.dropped) == {"empty": 1, "truncated": 1}
    assert flaky.stats()["requests"] == 4
    kept = lines(out)[-1]
    assert kept["meta"]["teacher"]["problem"] == "refused"
    assert kept["messages"][-1]["content"].startswith("I'm sorry")


def test_429_5xx_and_timeouts_are_retried_with_back_off(flaky, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"question {i}" for i in range(4)])
    # Three failures, then one reply slower than the client waits; the 429 asks for 1 s.
    flaky.plan(fail=[429, 500, 503], retry_after=1, slow=1, slow_s=4.0)
    out = tmp_path / "sft.jsonl"
    report = write_demos(settings(flaky, timeout=1.5), prompts, out, console=quiet())
    stats = flaky.stats()
    assert report.written == 4 and report.failures == []
    assert stats["requests"] == report.counters.requests == 4 + 4
    assert report.counters.retries == 4
    assert report.seconds >= 1.0  # Retry-After was honoured (back-off alone is 10 ms)
    assert sorted(r["messages"][-1]["content"] for r in lines(out)) == [
        f"Answer to: question {i}" for i in range(4)
    ]


def test_retries_are_bounded_and_the_failure_reported(flaky, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["only"])
    flaky.plan(fail=[502] * 10)
    report = write_demos(settings(flaky, retries=2), prompts, tmp_path / "o.jsonl", console=quiet())
    assert report.written == 0
    assert report.failures == [
        "prompt 1, answer 0: HTTP 502: injected failure (gave up after 3 attempts)"
    ]
    assert flaky.stats()["requests"] == 3


def test_requests_in_flight_never_exceed_the_limit(flaky, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"q{i}" for i in range(12)])
    flaky.plan(delay=0.15, fail=[429] * 5)
    report = write_demos(
        settings(flaky, concurrency=3), prompts, tmp_path / "o.jsonl", console=quiet()
    )
    assert report.written == 12
    assert flaky.stats()["max_in_flight"] == 3


def test_the_api_key_comes_from_the_environment(flaky, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "p.jsonl", ["a", "b"])
    flaky.plan(key="sk-secret")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UserError, match="API key was refused"):  # stops at once: no retries
        write_demos(
            settings(flaky, api_key=api_key_from_env(None)),
            prompts,
            tmp_path / "o.jsonl",
            console=quiet(),
        )
    assert flaky.stats()["requests"] <= 2
    monkeypatch.setenv("TEAM_KEY", "sk-secret")
    report = write_demos(
        settings(flaky, api_key=api_key_from_env("TEAM_KEY")),
        prompts,
        tmp_path / "o.jsonl",
        console=quiet(),
    )
    assert report.written == 2
    assert "Bearer sk-secret" in flaky.stats()["keys"]
    with pytest.raises(UserError, match="NOT_SET is not set"):
        api_key_from_env("NOT_SET")


def test_a_killed_run_resumes_where_it_stopped(flaky, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"question {i}" for i in range(16)])
    out = tmp_path / "sft.jsonl"
    command = [
        sys.executable,
        "-m",
        "chatrl",
        "teacher",
        "demos",
        "--api-base",
        flaky.api,
        "--model",
        "judge",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--concurrency",
        "2",
    ]
    env = {**os.environ, "OPENAI_API_KEY": "sk-env"}
    flaky.plan(delay=0.3, key="sk-env")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = out.read_text().splitlines()
    assert 4 <= len(written) < 16
    with out.open("a") as f:  # what a write cut short by a crash would leave
        f.write('{"messages": [{"role": "user", "content": "quest')
    flaky.plan(key="sk-env")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        f"answers written: {16 - len(written)} -> {out} ({len(written)} there already)"
        in done.stdout
    )
    assert "cut off a torn last line" in done.stdout
    assert flaky.stats()["requests"] == 16 - len(written)
    answers = sorted(c[-1]["content"] for c in load_conversations(out))
    assert answers == sorted(f"Answer to: question {i}" for i in range(16))


# ---------------------------------------------------------------- rank


def quality_tasks(n: int, k: int = 3) -> list[Task]:
    """Tasks whose responses carry a quality number, in varied orders."""
    tasks = []
    for i in range(n):
        qualities = [(i + j) % k + 1 for j in range(k)]
        responses = [f"reply {i}.{q}, quality {q}" for q in qualities]
        tasks.append(
            Task(
                [{"role": "user", "content": f"question {i}"}],
                responses,
                id=f"t{i}" if i == 0 else None,
                meta={"n": i},
            )
        )
    return tasks


def best_by_quality(responses: list[str]) -> list[int]:
    return sorted(range(len(responses)), key=lambda i: -int(responses[i].rsplit(" ", 1)[1]))


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Ranking: B > A > C", [1, 0, 2]),
        ("C is clearly best.\n\n**Ranking:** C > B > A.\n", [2, 1, 0]),
        ("Ranking:A>C>B", [0, 2, 1]),
    ],
)
def test_rankings_parse(reply, expected):
    assert parse_ranking(reply, 3) == expected


@pytest.mark.parametrize(
    "reply, problem",
    [
        ("", "empty"),
        ("B > A > C", "not 'Ranking:"),
        ("Ranking: B, A, C", "not 'Ranking:"),
        ("ranking: b > a > c", "not 'Ranking:"),
        ("Ranking: B > A > C\nHope that helps!", "not 'Ranking:"),
        ("Ranking: B > A", "leaves out C"),
        ("Ranking: B > B > A", "twice"),
        ("Ranking: B > A > D", "names D"),
    ],
)
def test_anything_but_a_complete_ranking_is_refused(reply, problem):
    with pytest.raises(InvalidRanking, match=problem):
        parse_ranking(reply, 3)


def test_each_call_shuffles_so_no_response_keeps_a_position():
    firsts = [shown_order(0, "task", attempt, 3)[0] for attempt in range(600)]
    assert all(150 < firsts.count(i) < 250 for i in range(3))
    assert shown_order(0, "task", 5, 3) == shown_order(0, "task", 5, 3)
    prompt = render_judge_prompt(
        DEFAULT_TEMPLATE, [{"role": "user", "content": "{k}?"}], ["x {responses}", "y"]
    )
    assert "User: {k}?" in prompt and '<reply id="A">\nx {responses}\n</reply>' in prompt
    assert "Ranking: A > B" in prompt and "labelled A, B" in prompt
    # The default judging prompt is documented as it is, and printed for editing.
    assert f"```text\n{DEFAULT_TEMPLATE}```" in (ROOT / "docs" / "teacher.md").read_text()
    assert CliRunner().invoke(app, ["teacher", "template"]).output == DEFAULT_TEMPLATE


def test_rank_unshuffles_retries_bad_replies_and_feeds_the_reward_model(
    flaky, micro_model, tmp_path
):
    tasks = quality_tasks(5)
    write_jsonl(tmp_path / "tasks.jsonl", [t.to_json() for t in tasks])
    out = tmp_path / "rankings.jsonl"
    flaky.plan(bad_rankings=4)
    report = rank_tasks(
        settings(flaky, concurrency=2), tmp_path / "tasks.jsonl", out, attempts=5, console=quiet()
    )
    stats = flaky.stats()
    assert (report.written, report.invalid_replies, report.unranked) == (5, 4, [])
    assert stats["judged"] == 9
    rankings = load_rankings(out)
    assert [r.ranking for r in rankings] == [best_by_quality(r.responses) for r in rankings]
    assert {r.annotator for r in rankings} == {"teacher:judge"}
    assert sorted(r.meta["n"] for r in rankings) == list(range(5))
    assert [r.meta.get("task_id") for r in rankings if r.meta["n"] == 0] == ["t0"]
    from chatrl.train.reward import train_reward

    rm = train_reward(
        RMConfig(
            model=str(micro_model), data=str(out), out=str(tmp_path / "rm"), max_steps=1, bf16=False
        )
    )
    assert (rm / "config.json").exists()
    # A rerun ranks nothing twice.
    flaky.plan()
    again = rank_tasks(settings(flaky), tmp_path / "tasks.jsonl", out, console=quiet())
    assert (again.already_done, again.written, flaky.stats()["requests"]) == (5, 0, 0)


def test_a_task_without_a_valid_ranking_is_reported_never_guessed(flaky, tmp_path):
    tasks = quality_tasks(2)
    tasks[1].prompt[0]["content"] += " [never]"
    write_jsonl(tmp_path / "tasks.jsonl", [t.to_json() for t in tasks])
    out = tmp_path / "rankings.jsonl"
    flaky.plan()
    one_at_a_time = settings(flaky, concurrency=1)  # task 1's call, then task 2's three
    report = rank_tasks(one_at_a_time, tmp_path / "tasks.jsonl", out, attempts=3, console=quiet())
    assert report.written == 1 and report.invalid_replies == 3
    assert report.unranked[0].startswith("task 2: no valid ranking in 3 replies; last: ")
    stats = flaky.stats()
    assert stats["requests"] == 1 + 3
    assert len({tuple(order) for order in stats["shown"][1:]}) > 1  # a new order per call
    assert [r.meta["n"] for r in load_rankings(out)] == [0]


def test_a_share_of_tasks_goes_to_people_and_stats_show_teacher_agreement(flaky, db_url, tmp_path):
    write_jsonl(tmp_path / "tasks.jsonl", [t.to_json() for t in quality_tasks(10)])
    db = db_url
    flaky.plan()
    report = rank_tasks(
        settings(flaky),
        tmp_path / "tasks.jsonl",
        tmp_path / "r.jsonl",
        human_fraction=0.25,
        db=db,
        human_overlap=2,
        console=quiet(),
    )
    assert report.written == 10
    assert (len(report.human.keys), report.human.added, report.human.teacher_rankings) == (3, 3, 3)
    store = LabelStore(db)
    # Alice agrees with the teacher on everything, Bob on nothing.
    done = simulate(
        store,
        {
            "alice": lambda prompt, responses: best_by_quality(responses),
            "bob": lambda prompt, responses: best_by_quality(responses)[::-1],
        },
    )
    assert done == {"alice": 3, "bob": 3}
    stats = store.stats()
    assert (stats["tasks"], stats["tasks_done"], stats["rankings_done"]) == (3, 3, 9)
    assert stats["agreement"] == {"tasks": 3, "comparisons": 9, "rate": 0.0}  # people only
    assert stats["teachers"] == [
        {"name": "teacher:judge", "tasks": 3, "comparisons": 18, "rate": 0.5}
    ]
    printed = CliRunner().invoke(app, ["label", "stats", "--db", db]).output
    assert "teacher:judge agrees with people on 50.0% of 18 pairwise comparisons (3 tasks)" in (
        printed
    )
    # Rerunning adds no task and no second teacher ranking.
    rank_tasks(
        settings(flaky),
        tmp_path / "tasks.jsonl",
        tmp_path / "r.jsonl",
        human_fraction=0.25,
        db=db,
        human_overlap=2,
        console=quiet(),
    )
    assert store.stats()["rankings_done"] == 9 and store.stats()["tasks"] == 3


def test_bad_settings_are_user_errors(flaky, tmp_path):
    write_jsonl(tmp_path / "tasks.jsonl", [t.to_json() for t in quality_tasks(1)])
    with pytest.raises(UserError, match="needs --db"):
        rank_tasks(
            settings(flaky), tmp_path / "tasks.jsonl", tmp_path / "r.jsonl", human_fraction=0.1
        )
    with pytest.raises(UserError, match="http"):
        settings(flaky, api_base="127.0.0.1:8000").check()
    foreign = tmp_path / "foreign.jsonl"
    write_jsonl(foreign, [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(UserError, match=r"foreign.jsonl:1: no meta.teacher.key"):
        rank_tasks(settings(flaky), tmp_path / "tasks.jsonl", foreign, console=quiet())
    flaky.plan()
    with pytest.raises(UserError, match=r"no such endpoint or model.*usually ends in /v1"):
        rank_tasks(
            settings(flaky, api_base=flaky.base),
            tmp_path / "tasks.jsonl",
            tmp_path / "r.jsonl",
            console=quiet(),
        )


# ---------------------------------------------------------------- chatrl serve


@pytest.mark.slow
def test_against_chatrl_serve(serve_url, tmp_path):
    """The real server: demos become SFT data; its gibberish rankings are all refused."""
    prompts = write_prompts(tmp_path / "p.jsonl", ["What is 2 plus 3?", "Say hi"])
    tasks = tmp_path / "tasks.jsonl"
    write_jsonl(tasks, [t.to_json() for t in quality_tasks(2, k=2)])
    template = tmp_path / "judge.txt"
    template.write_text("{conversation}\n{responses}\nRanking: {example}\n")
    serve = ClientSettings(
        api_base=f"{serve_url}/v1", model="micro", api_key=SERVE_KEY, max_tokens=8, concurrency=2
    )
    out = tmp_path / "sft.jsonl"
    report = write_demos(serve, prompts, out, n=2, keep=frozenset(Problem), console=quiet())
    assert report.written == 4 and report.failures == []
    assert report.counters.completion_tokens > 0
    assert len(load_conversations(out)) == 4
    command = [
        sys.executable,
        "-m",
        "chatrl",
        "teacher",
        "rank",
        "--api-base",
        f"{serve_url}/v1",
        "--model",
        "micro",
        "--tasks",
        str(tasks),
        "--out",
        str(tmp_path / "r.jsonl"),
        "--template",
        str(template),
        "--attempts",
        "2",
        "--max-tokens",
        "8",
    ]
    env = {**os.environ, "OPENAI_API_KEY": SERVE_KEY}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rankings written: 0 -> " in result.stdout
    assert "replies that were no valid ranking: 4" in result.stdout
    assert "tasks left without a ranking: 2" in result.stdout
    assert (tmp_path / "r.jsonl").read_text() == ""
