import json

import pytest

from chatrl.data import (
    load_conversations,
    load_prompts,
    load_rankings,
    load_tasks,
    load_text,
    write_jsonl,
)
from chatrl.errors import UserError


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def conv(*pairs):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]})


def test_loads_conversations(tmp_path):
    path = write(tmp_path / "sft.jsonl", [conv(("user", "hi"), ("assistant", "hello")), ""])
    assert load_conversations(path) == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "file is empty"),
        (
            [conv(("user", "a"), ("assistant", "b")), '{"messages": [{"role"'],
            ":2: invalid JSON (truncated last line?)",
        ),
        (
            [conv(("user", "a"), ("robot", "b"))],
            ":1: messages[1].role must be one of system, user, assistant",
        ),
        ([conv(("user", "a"))], ":1: messages has no assistant turn"),
        (
            ['{"messages": [{"role": "user", "content": 3}]}'],
            "messages[0].content must be a string",
        ),
        (["[1, 2]"], "expected a JSON object"),
        (['{"text": "x"}'], "messages must be a non-empty list"),
    ],
)
def test_bad_conversations_name_file_line_and_field(tmp_path, lines, message):
    path = write(tmp_path / "sft.jsonl", lines)
    with pytest.raises(UserError, match=r".*") as err:
        load_conversations(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_wrong_encoding_is_a_clear_error(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes('{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_conversations(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_conversations(tmp_path / "nope.jsonl")


def test_prompts_must_end_with_user_turn(tmp_path):
    good = write(
        tmp_path / "p.jsonl",
        ['{"messages": [{"role": "user", "content": "q"}], "meta": {"family": "x"}}'],
    )
    prompts = load_prompts(good)
    assert prompts[0].messages[-1]["content"] == "q" and prompts[0].meta == {"family": "x"}
    bad = write(tmp_path / "b.jsonl", [conv(("user", "q"), ("assistant", "a"))])
    with pytest.raises(UserError, match="b.jsonl:1: messages must end with a user turn"):
        load_prompts(bad)


def test_text_from_txt_and_jsonl(tmp_path):
    assert load_text(write(tmp_path / "t.txt", ["one", "", "two"])) == ["one", "two"]
    assert load_text(write(tmp_path / "t.jsonl", ['{"text": "a"}'])) == ["a"]
    with pytest.raises(UserError, match="t2.jsonl:1: text must be"):
        load_text(write(tmp_path / "t2.jsonl", ['{"text": ""}']))


PROMPT = [{"role": "user", "content": "q"}]


def test_rankings_and_pairs(tmp_path):
    record = {
        "prompt": PROMPT,
        "responses": ["a", "b", "c"],
        "ranking": [2, 0, 1],
        "annotator": "ann",
    }
    ranking = load_rankings(write(tmp_path / "r.jsonl", [json.dumps(record)]))[0]
    assert ranking.pairs() == [(2, 0), (2, 1), (0, 1)]
    assert ranking.annotator == "ann"


@pytest.mark.parametrize(
    "ranking, responses",
    [
        ([0, 0, 1], ["a", "b", "c"]),
        ([0, 1], ["a", "b", "c"]),
        ([0, 1, 3], ["a", "b", "c"]),
        ([0, 1], ["a", "a"]),
    ],
)
def test_bad_rankings(tmp_path, ranking, responses):
    record = {"prompt": PROMPT, "responses": responses, "ranking": ranking}
    path = write(tmp_path / "r.jsonl", [json.dumps(record)])
    with pytest.raises(
        UserError, match="r.jsonl:1: (ranking must be a permutation|responses must be distinct)"
    ):
        load_rankings(path)


def test_trl_standard_explicit_prompt(tmp_path):
    record = {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green."}
    r = load_rankings(write(tmp_path / "p.jsonl", [json.dumps(record)]))[0]
    assert r.prompt == [{"role": "user", "content": "Sky colour?"}]
    assert r.responses == ["Blue.", "Green."] and r.ranking == [0, 1]


def test_trl_conversational_implicit_prompt(tmp_path):
    record = {
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "rejected": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "go away"},
        ],
    }
    r = load_rankings(write(tmp_path / "p.jsonl", [json.dumps(record)]))[0]
    assert r.prompt == [{"role": "user", "content": "hi"}]
    assert r.responses == ["hello", "go away"]


def test_trl_conversational_explicit_prompt(tmp_path):
    record = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    r = load_rankings(write(tmp_path / "p.jsonl", [json.dumps(record)]))[0]
    assert r.prompt == [{"role": "user", "content": "hi"}] and r.responses == ["hello", "go away"]


def test_hh_rlhf_transcripts(tmp_path):
    record = {
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 7.",
    }
    r = load_rankings(write(tmp_path / "hh.jsonl", [json.dumps(record)]))[0]
    assert [m["role"] for m in r.prompt] == ["user", "assistant", "user"]
    assert r.prompt[2]["content"] == "And 3+3?"
    assert r.responses == ["6.", "7."]


def test_pair_with_equal_sides_is_rejected(tmp_path):
    record = {"prompt": "q", "chosen": "same", "rejected": "same"}
    with pytest.raises(UserError, match="p.jsonl:1: chosen and rejected are the same"):
        load_rankings(write(tmp_path / "p.jsonl", [json.dumps(record)]))


def test_tasks(tmp_path):
    record = {"prompt": PROMPT, "responses": ["a", "b"], "id": 7, "meta": {"family": "x"}}
    task = load_tasks(write(tmp_path / "t.jsonl", [json.dumps(record)]))[0]
    assert task.id == "7" and task.meta == {"family": "x"}


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])

    def exploding():
        yield {"a": 2}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(path, exploding())
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
