"""Simulated annotators: Plackett–Luce over gold scores, calibrated agreement, biases."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from chatrl.cli import app
from chatrl.data import Prompt, Task, load_rankings
from chatrl.errors import UserError
from chatrl.world.annotators import (
    SimulatedAnnotator,
    agreement_report,
    default_annotators,
    gold_agreement,
    label_tasks,
    pairwise_agreement,
    sft_like_sets,
)
from chatrl.world.judge import gold_score

ADD = Prompt(
    [{"role": "user", "content": "What is 7 + 5?"}],
    {"family": "arithmetic", "task": "add", "operands": [7, 5], "answer": 12},
)
RESPONSES = [
    "7 + 5 = 13.",
    "Sure! Let me work that out. 7 + 5 = 12. Hope this helps!",
    "7 + 5 = 12.",
    "I'm sorry, but I can't help with that.",
]


def test_pairwise_agreement_counts_pairs():
    assert pairwise_agreement([[0, 1, 2]], [[0, 1, 2]]) == (1.0, 3)
    assert pairwise_agreement([[0, 1, 2]], [[2, 1, 0]]) == (0.0, 3)
    assert pairwise_agreement([[0, 1, 2]], [[1, 0, 2]]) == (2 / 3, 3)
    # Pairs with equal gold scores do not count against the gold ordering.
    assert gold_agreement([[1, 0, 2]], [[1.0, 1.0, -1.0]]) == 1.0


def test_rank_is_a_permutation_that_mostly_follows_the_gold_score():
    annotator = SimulatedAnnotator("test", seed=0)
    firsts = Counter()
    for _ in range(400):
        ranking = annotator.rank(ADD, RESPONSES)
        assert sorted(ranking) == [0, 1, 2, 3]
        firsts[ranking[0]] += 1
    gold = [gold_score(ADD, r) for r in RESPONSES]
    assert firsts.most_common(1)[0][0] == gold.index(max(gold))
    assert len(firsts) > 1  # noisy: not always the same


def test_noise_free_annotator_ranks_exactly_by_gold():
    annotator = SimulatedAnnotator("exact", noise=1e-3)
    gold = [gold_score(ADD, r) for r in RESPONSES]
    assert annotator.rank(ADD, RESPONSES) == sorted(range(4), key=lambda i: -gold[i])


def test_the_length_loving_annotator_prefers_longer_answers_more_often():
    long_first = {}
    for name, bias in (("neutral", 0.0), ("likes-long", 0.1)):
        annotator = SimulatedAnnotator(name, length_bias=bias, seed=1)
        rankings = [annotator.rank(ADD, RESPONSES[1:3]) for _ in range(2000)]
        long_first[name] = sum(r[0] == 0 for r in rankings) / len(rankings)
    assert long_first["likes-long"] > long_first["neutral"] + 0.1


def test_default_annotators_agree_like_instructgpt_labelers():
    """The calibration target: 73% inter-annotator agreement (InstructGPT: 72.6 ± 1.5%)."""
    report = agreement_report(default_annotators(0), sft_like_sets(2000, 0))
    print(
        f"inter-annotator agreement {report['inter_annotator']:.1%} on {report['pairs']} pairs; "
        + ", ".join(f"{k} vs gold {v:.1%}" for k, v in report["with_gold"].items())
    )
    assert report["pairs"] >= 2000
    assert 0.70 <= report["inter_annotator"] <= 0.76
    for value in report["with_gold"].values():
        assert report["inter_annotator"] < value < 1.0  # each agrees more with gold than peers


def test_one_annotator_has_no_inter_annotator_agreement():
    report = agreement_report(default_annotators(0)[:1], sft_like_sets(50, 0))
    assert report["inter_annotator"] is None and len(report["with_gold"]) == 1


def test_sft_like_sets_hold_distinct_responses():
    sets = sft_like_sets(300, 1)
    assert sum(len(r) * (len(r) - 1) // 2 for _, r in sets) >= 300
    for _, responses in sets:
        assert 2 <= len(responses) <= 4 and len(set(responses)) == len(responses)


def test_world_rank_writes_loadable_rankings_taking_turns(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    records = [Task(ADD.messages, RESPONSES, f"t{i}", ADD.meta).to_json() for i in range(6)]
    tasks.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "rankings.jsonl"
    result = CliRunner().invoke(
        app, ["world", "rank", "--data", str(tasks), "--out", str(out), "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    rankings = load_rankings(out)
    assert len(rankings) == 6
    assert [r.annotator for r in rankings[:3]] == [a.name for a in default_annotators()]
    assert all(r.meta == ADD.meta for r in rankings)


def test_label_tasks_without_meta_is_a_user_error():
    with pytest.raises(UserError, match="task 1 has no meta"):
        label_tasks([Task(ADD.messages, RESPONSES)], default_annotators())


def test_agreement_command_prints_the_figures():
    result = CliRunner().invoke(app, ["world", "agreement", "--pairs", "300"])
    assert result.exit_code == 0, result.output
    assert "inter-annotator agreement" in result.output
    assert result.output.count("agreement with the gold ordering") == 3
