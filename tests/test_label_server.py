"""The labeling server as a real subprocess, over HTTP, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from servers import free_port, label_server

from chatrl.data import Task
from chatrl.label.store import LabelStore


def make_tasks(n: int, k: int = 3) -> list[Task]:
    return [
        Task(
            [{"role": "user", "content": f"question {i}"}],
            [f"answer {i}.{j}" for j in range(k)],
            meta={"judge": f"secret {i}"},
        )
        for i in range(n)
    ]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def served(request, tmp_path_factory):
    """One server per backend for the API tests; each test brings its own annotators."""
    tmp_path = tmp_path_factory.mktemp("served")
    if request.param == "sqlite":
        db_url = f"sqlite:///{tmp_path / 'labels.db'}"
    else:
        db_url = request.getfixturevalue("postgres_server")()
    store = LabelStore(db_url)
    store.import_tasks(make_tasks(6))
    with label_server(db_url, tmp_path) as (url, _), httpx.Client(base_url=url) as client:
        yield client, store
    store.close()


def test_tokens_and_ownership_are_enforced(served):
    client, store = served
    tokens = {name: store.add_annotator(name) for name in ("ann", "bob")}
    tokens["admin"] = store.add_annotator("admin", admin=True)
    page = client.get("/")
    assert page.status_code == 200 and "<title>chatrl labeling</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    for method, path in [
        ("GET", "/api/me"),
        ("GET", "/api/next"),
        ("GET", "/api/assignments/1"),
        ("POST", "/api/assignments/1"),
        ("GET", "/api/admin/stats"),
        ("GET", "/api/admin/export"),
    ]:
        assert client.request(method, path).status_code == 401
        assert client.request(method, path, headers=auth(tokens["ann"] + "x")).status_code == 401
    assert client.get("/openapi.json").status_code == 404

    ann, bob = auth(tokens["ann"]), auth(tokens["bob"])
    assert client.get("/api/me", headers=ann).json() == {"name": "ann", "admin": False}
    task = client.get("/api/next", headers=ann).json()["assignment"]
    assert set(task) == {"id", "prompt", "responses", "submitted"}  # never the judge's meta
    assert client.get(f"/api/assignments/{task['id']}", headers=bob).status_code == 404
    stolen = client.post(f"/api/assignments/{task['id']}", json={"ranking": [0, 1, 2]}, headers=bob)
    assert stolen.status_code == 404
    assert client.get("/api/next", headers=bob).json()["assignment"]["id"] != task["id"]
    for path in ("/api/admin/stats", "/api/admin/export"):
        assert client.get(path, headers=ann).status_code == 403
    assert client.get("/api/admin/stats", headers=auth(tokens["admin"])).json()["tasks"] == 6
    assert [r for r in store.rankings() if r.annotator in ("ann", "bob")] == []


BAD_SUBMISSIONS = [
    ({"ranking": [0, 1]}, "exactly once"),
    ({"ranking": [0, 0, 1]}, "exactly once"),
    ({"ranking": [0, 1, 7]}, "exactly once"),
    ({"ranking": "0,1,2"}, "valid list"),
    ({}, "Field required"),
    ({"ranking": [0, 1, 2], "flags": {"harmful": [9]}}, "distinct indices"),
    ({"ranking": [0, 1, 2], "extra": 1}, "Extra inputs"),
]


def test_submissions_are_validated_and_stored_once(served):
    client, store = served
    ann = auth(store.add_annotator("carl"))
    task = client.get("/api/next", headers=ann).json()["assignment"]
    path = f"/api/assignments/{task['id']}"
    for body, message in BAD_SUBMISSIONS:
        answer = client.post(path, json=body, headers=ann)
        assert answer.status_code == 422, body
        assert message in str(answer.json()["detail"]), body
    assert [r for r in store.rankings() if r.annotator == "carl"] == []

    # A double click: the same submission twice at once, then a retry.
    body = {"ranking": [2, 0, 1], "flags": {"untruthful": [0]}, "rewrite": "Better."}
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: client.post(path, json=body, headers=ann), range(2)))
    answers.append(client.post(path, json=body, headers=ann))
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert sorted(a.json()["status"] for a in answers) == ["already stored"] * 2 + ["stored"]
    assert client.post(path, json={"ranking": [0, 1, 2]}, headers=ann).status_code == 409
    [ranking] = [r for r in store.rankings() if r.annotator == "carl"]
    assert (ranking.ranking, ranking.meta["flags"]["untruthful"]) == ([2, 0, 1], [0])
    export = client.get("/api/admin/export", headers=auth(store.add_annotator("boss", admin=True)))
    assert [json.loads(line)["annotator"] for line in export.text.splitlines()] == ["carl"]


def test_acknowledged_submission_survives_sigkill(db_url, tmp_path):
    store = LabelStore(db_url)
    store.import_tasks(make_tasks(2))
    token = store.add_annotator("ann")
    port = free_port()
    with label_server(db_url, tmp_path, port) as (url, process):
        task = httpx.get(f"{url}/api/next", headers=auth(token)).json()["assignment"]
        body = {"ranking": [1, 2, 0], "rewrite": "Kept."}
        answer = httpx.post(f"{url}/api/assignments/{task['id']}", json=body, headers=auth(token))
        assert answer.status_code == 200
        process.send_signal(signal.SIGKILL)
        process.wait()
    with label_server(db_url, tmp_path, port) as (url, _):
        after = httpx.get(f"{url}/api/next", headers=auth(token)).json()
    assert after["progress"] == {"done": 1, "remaining": 1}
    assert after["assignment"]["id"] != task["id"]
    [ranking] = store.rankings()
    assert ranking.ranking == [1, 2, 0]
    assert store.demonstrations()[0][-1]["content"] == "Kept."


@pytest.mark.slow
def test_twenty_annotators_at_once_lose_nothing(db_url, tmp_path):
    store = LabelStore(db_url)
    store.import_tasks(make_tasks(30), overlap=3, overlap_fraction=1 / 3)
    tokens = [store.add_annotator(f"a{i}") for i in range(20)]
    start = threading.Barrier(len(tokens))

    def annotate(url: str, token: str) -> tuple[list[str], list[str]]:
        ranked, errors = [], []
        with httpx.Client(base_url=url, headers=auth(token), timeout=60) as client:
            start.wait()
            while True:
                answer = client.get("/api/next")
                if answer.status_code != 200:
                    errors.append(answer.text)
                    break
                task = answer.json()["assignment"]
                if task is None:
                    break
                ranking = list(reversed(range(len(task["responses"]))))
                answer = client.post(f"/api/assignments/{task['id']}", json={"ranking": ranking})
                if answer.status_code != 200:
                    errors.append(answer.text)
                    break
                ranked.append(task["prompt"][0]["content"])
        return ranked, errors

    with label_server(db_url, tmp_path) as (url, _), ThreadPoolExecutor(len(tokens)) as pool:
        results = list(pool.map(lambda token: annotate(url, token), tokens))
    assert [errors for _, errors in results if errors] == []
    for ranked, _ in results:
        assert len(ranked) == len(set(ranked))  # nobody saw a task twice
    stats = store.stats()
    acknowledged = sum(len(ranked) for ranked, _ in results)
    assert stats["rankings_done"] == acknowledged == stats["rankings_wanted"] == 10 * 3 + 20
    assert stats["tasks_done"] == 30
