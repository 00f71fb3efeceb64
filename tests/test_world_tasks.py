"""The world's generators: families, splits, perfect answers, flawed demonstrations, text."""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter

import pytest
from typer.testing import CliRunner

from chatrl.cli import app
from chatrl.data import Prompt, load_conversations, load_prompts, load_text
from chatrl.errors import UserError
from chatrl.world import (
    DEMO_MIX,
    FAMILIES,
    SPLITS,
    make_prompts,
    perfect_response,
    pretrain_text,
    sft_conversations,
)
from chatrl.world.judge import judge
from chatrl.world.tasks import CAPITALS, demonstration, is_heldout, sft_examples


def _key(prompt: Prompt) -> str:
    return json.dumps(prompt.messages)


@pytest.fixture(scope="module")
def train_prompts() -> list[Prompt]:
    return make_prompts(1500, 0, "train")


def test_every_family_generates_prompts_its_judge_scores_perfect_at_the_top(train_prompts):
    by_family = Counter(p.meta["family"] for p in train_prompts)
    assert set(by_family) == set(FAMILIES)
    for prompt in train_prompts:
        assert prompt.messages[-1]["role"] == "user"
        verdict = judge(prompt, perfect_response(prompt))
        assert verdict.correct and verdict.score == 1.0, (prompt, perfect_response(prompt))


def test_family_shares_follow_the_weights(train_prompts):
    counts = Counter(p.meta["family"] for p in train_prompts)
    for family, (_, share) in FAMILIES.items():
        assert abs(counts[family] / len(train_prompts) - share) < 0.04, family


def test_answers_in_meta_are_right():
    for prompt in make_prompts(400, 3, "rank"):
        meta, text = prompt.meta, prompt.messages[-1]["content"]
        if meta["family"] == "arithmetic":
            a, b = meta["operands"]
            assert str(a) in text and str(b) in text
            assert (
                meta["answer"] == {"add": a + b, "subtract": a - b, "multiply": a * b}[meta["task"]]
            )
            assert meta["answer"] >= 0
        elif meta["family"] == "list":
            numbers = [int(x) for x in re.findall(r"\d+", text)]
            assert numbers == meta["numbers"]
            expected = {"sort": sorted(numbers), "max": max(numbers), "min": min(numbers)}
            assert meta["answer"] == expected[meta["task"]]
        elif meta["family"] == "text" and meta["task"] == "count":
            assert meta["answer"] == meta["word"].count(meta["letter"])


def test_multiturn_follow_ups_depend_on_the_earlier_turn():
    prompts = [p for p in make_prompts(600, 1, "train") if p.meta["family"] == "multiturn"]
    assert {p.meta["base_family"] for p in prompts} == {"arithmetic", "facts", "text"}
    for prompt in prompts:
        _, first_a, follow = prompt.messages
        assert first_a["role"] == "assistant"
        if follow["content"] == "Now double it.":
            earlier = int(re.findall(r"\d+", first_a["content"])[-1])
            assert prompt.meta["operands"] == [earlier, 2]
            assert prompt.meta["answer"] == 2 * earlier
        if prompt.meta["base_family"] == "facts":
            # The follow-up names only the subject; the relation comes from the first turn.
            assert first_a["content"].startswith(f"The {prompt.meta['task']} of ")
            assert prompt.meta["task"] not in follow["content"]


def test_splits_are_seeded_and_heldout_never_overlaps_training():
    assert make_prompts(50, 7, "train") == make_prompts(50, 7, "train")
    assert make_prompts(50, 7, "train") != make_prompts(50, 8, "train")
    assert make_prompts(50, 7, "train") != make_prompts(50, 7, "rank")
    heldout = make_prompts(2000, 0, "heldout")
    training = {_key(p) for split in ("sft", "rank", "train") for p in make_prompts(2000, 0, split)}
    assert all(is_heldout(p.messages) for p in heldout)
    assert not {_key(p) for p in heldout} & training
    # No training conversation holds a held-out prompt as an earlier turn either.
    heldout_single = {_key(p) for p in heldout if len(p.messages) == 1}
    for split in ("sft", "train"):
        for p in make_prompts(2000, 0, split):
            if len(p.messages) > 1:
                assert json.dumps(p.messages[:1]) not in heldout_single
    assert {p.meta["family"] for p in heldout} == set(FAMILIES)


def test_bad_split_and_count_are_user_errors():
    with pytest.raises(UserError, match="unknown split 'test'"):
        make_prompts(3, 0, "test")
    with pytest.raises(UserError, match="n must be"):
        make_prompts(-1, 0, "train")
    assert set(SPLITS) == {"sft", "rank", "train", "heldout"}


def test_perfect_response_needs_world_meta():
    with pytest.raises(UserError, match="no world meta"):
        perfect_response(Prompt([{"role": "user", "content": "hi"}]))


def test_demonstrations_of_each_kind_score_as_their_kind_says(train_prompts):
    rng = random.Random(0)
    for prompt in train_prompts[:600]:
        family = prompt.meta.get("base_family", prompt.meta["family"])
        for kind in DEMO_MIX[family]:
            verdict = judge(prompt, demonstration(prompt, kind, rng))
            if kind == "concise":
                assert verdict.score == 1.0
            elif kind in ("padded", "hedged"):
                assert verdict.correct and 0 < verdict.score < 1, (prompt, kind)
            elif kind == "unsafe":
                assert not verdict.correct and verdict.score <= -2
            else:  # wrong, over-refusal
                assert not verdict.correct and verdict.score <= -1, (prompt, kind)


def test_sft_data_mix_matches_the_documented_proportions():
    examples = sft_examples(3000, 0)
    assert [c for _, c in examples[:20]] == sft_conversations(20, 0)
    per_family: dict[str, Counter] = {}
    for prompt, conversation in examples:
        assert conversation[:-1] == prompt.messages or len(conversation) == 4
        family = prompt.meta.get("base_family", prompt.meta["family"])
        verdict = judge(prompt, conversation[-1]["content"])
        if verdict.score == 1.0:
            kind = "concise"
        elif verdict.score <= -2:
            kind = "unsafe"
        elif verdict.hedged:
            kind = "hedged"
        elif verdict.correct:
            kind = "padded"
        else:
            kind = "over-refusal" if verdict.refused else "wrong"
        per_family.setdefault(family, Counter())[kind] += 1
    for family, mix in DEMO_MIX.items():
        counts = per_family[family]
        total = sum(counts.values())
        for kind, share in mix.items():
            assert abs(counts[kind] / total - share) < 0.08, (family, kind, counts)
    # The habits: the most common demonstration in arithmetic is padded, in facts hedged.
    assert per_family["arithmetic"].most_common(1)[0][0] == "padded"
    assert per_family["facts"].most_common(1)[0][0] == "hedged"


def test_multiturn_demonstrations_restyle_earlier_turns_around_the_right_answer():
    restyled = 0
    for prompt, conversation in sft_examples(1500, 2):
        if len(conversation) != 4:
            continue
        perfect_first = prompt.messages[1]["content"]
        # Padding wraps the perfect answer, hedging lower-cases its first letter.
        assert perfect_first[1:] in conversation[1]["content"]
        restyled += conversation[1]["content"] != perfect_first
    assert restyled > 0


def test_pretrain_text_is_plain_seeded_and_true():
    docs = pretrain_text(300, 0)
    assert docs == pretrain_text(300, 0) and docs != pretrain_text(300, 1)
    joined = " ".join(docs)
    assert not re.search(r"<\|im_|\b(?:user|assistant|system):", joined, re.IGNORECASE)
    for a, op, b, result in re.findall(r"(\d+) ([-+×]) (\d+) = (\d+)\.", joined):
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
        assert int(result) == expected
    for country, capital in re.findall(r"The capital of (\w+) is (\w+)\.", joined):
        assert capital == CAPITALS[country]
    assert "What is" in joined  # questions with their answers, from the training pool only
    for prompt in make_prompts(300, 0, "heldout"):
        if prompt.meta["family"] in ("arithmetic", "facts", "text", "list"):
            assert prompt.messages[-1]["content"] not in joined


def test_world_commands_write_loadable_files(tmp_path):
    runner = CliRunner()
    sft, prompts, text = tmp_path / "sft.jsonl", tmp_path / "held.jsonl", tmp_path / "text.txt"
    result = runner.invoke(
        app, ["world", "sft-data", "--n", "50", "--seed", "3", "--out", str(sft)]
    )
    assert result.exit_code == 0, result.output
    assert "concise and correct" in result.output
    assert load_conversations(sft) == sft_conversations(50, 3)
    args = [
        "world",
        "prompts",
        "--n",
        "40",
        "--split",
        "heldout",
        "--seed",
        "2",
        "--out",
        str(prompts),
    ]
    assert runner.invoke(app, args).exit_code == 0
    loaded = load_prompts(prompts)
    assert [p.to_json() for p in loaded] == [p.to_json() for p in make_prompts(40, 2, "heldout")]
    assert runner.invoke(app, ["world", "text", "--n", "30", "--out", str(text)]).exit_code == 0
    assert load_text(text) == pretrain_text(30, 0)
    jsonl = tmp_path / "text.jsonl"
    assert runner.invoke(app, ["world", "text", "--n", "5", "--out", str(jsonl)]).exit_code == 0
    assert load_text(jsonl) == pretrain_text(5, 0)


def test_world_data_is_the_same_in_every_process():
    """Python randomises string hashing per process: nothing may depend on set order."""
    import subprocess
    import sys

    code = (
        "import hashlib, json; from chatrl.world import sft_conversations, make_prompts, "
        "pretrain_text; print(hashlib.sha256(json.dumps([sft_conversations(2000, 0), "
        "[p.to_json() for p in make_prompts(500, 0, 'rank')], pretrain_text(2000, 0)])"
        ".encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in (1, 2)
    }
    assert len(digests) == 1
