"""Programmatic rewards (chatrl/reward_fn.py): loading ``module:function``, calling it, its
errors (one line, exit status 2 from the CLI), and the world's gold labeler as one."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_prompts

from chatrl.data import Prompt
from chatrl.errors import UserError
from chatrl.reward_fn import Reward, call_reward_fn, load_reward_fn

TESTS = Path(__file__).parent
PROMPTS = [Prompt([{"role": "user", "content": "Hi"}], {"id": 7}), Prompt([], {"id": 9})]


def test_a_function_gets_the_meta_and_finished_flags_it_names():
    fn = load_reward_fn("reward_fns:with_meta")
    values = call_reward_fn(fn, "reward_fns:with_meta", PROMPTS, ["a", "b"], [True, False])
    assert values.tolist() == [7.0, -1.0]
    says_is = load_reward_fn("reward_fns:says_is")  # (prompts, responses) only
    assert call_reward_fn(says_is, "s", PROMPTS, ["it is", "no"], [True, True]).tolist() == [1, 0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected module:function"),
        ("no_such_module_here:fn", "cannot import module 'no_such_module_here'"),
        ("reward_fns:missing", "module reward_fns has no function 'missing'"),
        ("reward_fns:NOT_CALLABLE", "module reward_fns has no function 'NOT_CALLABLE'"),
    ],
)
def test_loading_errors_name_the_spec(spec, message):
    with pytest.raises(UserError, match=message) as error:
        load_reward_fn(spec)
    assert spec in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("raises", "raised KeyError: 'no such task'"),
        ("too_few", "must return a list of 2 floats, one per response; it returned 1 values"),
        ("not_numbers", "returned 'good': every value must be a float"),
    ],
)
def test_calling_errors_name_the_spec(name, message):
    spec = f"reward_fns:{name}"
    with pytest.raises(UserError, match=message) as error:
        call_reward_fn(load_reward_fn(spec), spec, PROMPTS, ["a", "b"], [True, True])
    assert spec in str(error.value)


def test_the_gold_labeler_is_a_reward_function():
    from chatrl.world import gold_score, make_prompts, perfect_response

    prompts = make_prompts(4, 0, "train")
    responses = [perfect_response(prompts[0]), "I think it is 3, probably.", "no", "x " * 40]
    finished = [True, True, True, False]
    reward = Reward(reward_fn="chatrl.world:gold_reward", fn_weight=2.0)
    total, terms = reward.score(prompts, responses, finished)
    gold = [gold_score(p, r, f) for p, r, f in zip(prompts, responses, finished, strict=True)]
    assert terms["reward_fn_score"].tolist() == pytest.approx(gold)
    assert total.tolist() == pytest.approx([2 * g for g in gold]) and gold[0] == 1.0


def chatrl(*args, cwd=TESTS):
    command = [sys.executable, "-m", "chatrl", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_here:fn", "cannot import module"),  # before any model is loaded
        ("reward_fns:too_few", "must return a list of 8 floats"),  # on the first rollout
    ],
)
def test_cli_reward_fn_errors_are_one_line(micro_model, tmp_path, spec, message):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 8)
    run = chatrl(
        "grpo", "--policy", micro_model, "--reward-fn", spec, "--prompts", prompts,
        "--rollout-batch-size", 8, "--response-length", 4, "--out", tmp_path / "out",
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) <= 2  # the precision line, and the error


def test_cli_needs_a_reward_model_or_a_function(micro_model, tmp_path):
    run = chatrl("rloo", "--policy", micro_model, "--prompts", "p.jsonl", "--out", tmp_path)
    assert run.returncode == 2
    assert "set reward (a reward model), reward_fn (a function), or both" in run.stderr
