"""``chatrl sample``: K distinct responses per prompt, written as ranking tasks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chatrl.data import load_prompts, load_tasks
from chatrl.engine import SamplingParams
from chatrl.errors import UserError
from chatrl.sample import MAX_REDRAWS, distinct_tasks, sample_tasks

PROMPTS = [
    {"messages": [{"role": "user", "content": "What is 2 plus 3?"}], "meta": {"family": "sum"}},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    {"messages": [{"role": "user", "content": "The cat sat on the"}], "meta": {"id": 7}},
]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def chatrl(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatrl", *map(str, args)], capture_output=True, text=True
    )


def test_sample_writes_k_distinct_responses_per_prompt(micro_model, prompts_file, tmp_path):
    out = tmp_path / "tasks.jsonl"
    args = ["sample", "--model", micro_model, "--prompts", prompts_file, "--k", 3, "--out", out]
    args += ["--max-new-tokens", 8, "--seed", 0, "--batch-size", 4]
    done = chatrl(*args)
    assert done.returncode == 0, done.stderr
    tasks = load_tasks(out)
    written = sum(len(t.responses) for t in tasks)  # what was written, repeats left out
    assert f"3 tasks, {written} responses -> {out}" in done.stdout
    assert [t.prompt for t in tasks] == [p["messages"] for p in PROMPTS]
    assert [t.meta for t in tasks] == [p.get("meta", {}) for p in PROMPTS]
    for task in tasks:
        assert len(task.responses) == len(set(task.responses)) == 3
    again = tmp_path / "again.jsonl"
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, seed=0)  # the CLI's
    sample_tasks(micro_model, prompts_file, again, 3, params, batch_size=4)
    assert again.read_text() == out.read_text()  # same seed and defaults, same tasks
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_repeats_are_redrawn_then_left_out(prompts_file):
    prompts = load_prompts(prompts_file)
    script = [
        [["a", "a", "b", "a"], ["x", "x", "x", "x"], ["p", "q", "r", "s"]],
        [["a", "c", "c"], ["x", "x", "x"]],  # prompt 0 gains "c"; prompt 1 stays at one response
        *[[["b", "b", "b"], ["x", "x", "x"]]] * MAX_REDRAWS,
    ]
    calls = []

    def draw(batch, n):
        calls.append((len(batch), n))
        return script[len(calls) - 1]

    tasks = distinct_tasks(draw, prompts, 4)
    assert calls == [(3, 4)] + [(2, 3)] * MAX_REDRAWS
    assert [t.responses for t in tasks] == [["a", "b", "c"], ["p", "q", "r", "s"]]
    assert [t.prompt for t in tasks] == [prompts[0].messages, prompts[2].messages]
    assert [t.meta for t in tasks] == [{"family": "sum", "repeats": 1}, {"id": 7}]


def test_bad_input_is_one_line_and_exit_status_2(micro_model, prompts_file, tmp_path):
    done = chatrl(
        "sample",
        "--model",
        micro_model,
        "--prompts",
        prompts_file,
        "--k",
        1,
        "--out",
        tmp_path / "t.jsonl",
    )
    assert done.returncode == 2
    assert "--k must be at least 2" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(UserError, match="greedy"):
        sample_tasks(
            micro_model, prompts_file, tmp_path / "t.jsonl", 2, SamplingParams(temperature=0)
        )
    with pytest.raises(UserError, match="file not found"):
        sample_tasks(
            micro_model, tmp_path / "missing.jsonl", tmp_path / "t.jsonl", 2, SamplingParams()
        )
    with pytest.raises(UserError, match="model directory not found"):
        sample_tasks(tmp_path / "nope", prompts_file, tmp_path / "t.jsonl", 2, SamplingParams())
    assert not (tmp_path / "t.jsonl").exists()
