"""Evaluation by the world's gold labeler: metrics from texts, and models through the engine."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from chatrl.chat_format import encode_prompt
from chatrl.cli import app, main
from chatrl.data import read_jsonl, write_jsonl
from chatrl.engine import Engine, SamplingParams
from chatrl.evaluate import (
    evaluate_model,
    evaluate_responses,
    response_logprobs,
    table_rows,
    win_rate,
)
from chatrl.models import init_model, load_causal_lm
from chatrl.world import judge, make_prompts, perfect_response, pretrain_text, sft_conversations
from chatrl.world.tasks import REFUSAL

GOLD = {"judge": judge, "perfect": perfect_response}  # the world's gold labeler


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(40, 0, "heldout")


@pytest.fixture(scope="module")
def world_models(tmp_path_factory):
    """Two randomly initialised micro models sharing a tokenizer trained on the world's text."""
    texts = pretrain_text(400, 0) + [m["content"] for c in sft_conversations(400, 0) for m in c]
    root = tmp_path_factory.mktemp("world-models")
    first = init_model("micro", texts, root / "a", seed=0)
    second = init_model("micro", texts, root / "b", seed=1)
    return first, second


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 0.0, -1.0], [0.0, 0.0, 1.0]) == pytest.approx(0.5)
    assert win_rate([1.0, 1.0], [0.0, -1.0]) == 1.0


def test_perfect_responses_reach_the_ceiling(prompts):
    perfect = [perfect_response(p) for p in prompts]
    metrics = evaluate_responses(prompts, perfect, judge=judge)
    assert metrics["mean_gold"] == 1.0 and metrics["accuracy"] == 1.0
    assert set(metrics["accuracy_by_family"].values()) == {1.0}
    assert metrics["refusal_rate_harmful"] == 1.0
    assert metrics["over_refusal_rate_borderline"] == 0.0
    assert metrics["stop_rate"] == 1.0 and metrics["repetition_rate"] == 0.0
    assert metrics["verbose_rate"] == 0.0 and metrics["hedge_rate"] == 0.0


def test_always_refusing_policy(prompts):
    refusals = [REFUSAL] * len(prompts)
    perfect = [perfect_response(p) for p in prompts]
    metrics = evaluate_responses(prompts, refusals, baseline=perfect, judge=judge)
    assert metrics["refusal_rate_harmful"] == 1.0
    assert metrics["over_refusal_rate_borderline"] == 1.0
    harmful = sum(p.meta["family"] == "harmful" for p in prompts)
    assert metrics["accuracy"] == pytest.approx(harmful / len(prompts))
    # Refusing ties the perfect answer on harmful prompts and loses everywhere else.
    assert metrics["win_rate"] == pytest.approx(0.5 * harmful / len(prompts))


def test_unfinished_and_repetitive_responses_are_counted(prompts):
    responses = ["la la la la la la"] * len(prompts)
    finished = [i % 2 == 0 for i in range(len(prompts))]
    metrics = evaluate_responses(prompts, responses, finished, judge=judge)
    assert metrics["repetition_rate"] == 1.0
    assert metrics["stop_rate"] == pytest.approx(0.5)
    assert metrics["mean_words"] == 6.0
    with pytest.raises(Exception, match="40 prompts but 3 responses"):
        evaluate_responses(prompts, responses[:3], judge=judge)


def test_response_logprobs_match_the_engine(world_models, prompts):
    model, tokenizer = load_causal_lm(world_models[0])
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    completions = Engine(model, tokenizer).generate_chat([p.messages for p in prompts[:6]], params)
    prompt_ids = [encode_prompt(tokenizer, p.messages) for p in prompts[:6]]
    scored = response_logprobs(model, prompt_ids, [c.token_ids for c in completions], batch_size=4)
    for completion, logprobs in zip(completions, scored, strict=True):
        torch.testing.assert_close(logprobs, completion.model_logprobs, atol=1e-4, rtol=1e-4)


def test_evaluate_model_against_itself_and_another_model(world_models, prompts, tmp_path):
    first, second = world_models
    prompts = prompts[:20]
    same = evaluate_model(first, prompts, baseline_dir=first, max_new_tokens=16, seed=5, **GOLD)
    assert same["model"]["kl_vs_baseline"] == pytest.approx(0.0, abs=1e-3)
    assert same["model"]["win_rate_vs_baseline"] == 0.5  # same seed, same samples: all ties
    assert same["perfect"]["mean_gold"] == 1.0
    assert same["perfect"]["win_rate_vs_model"] > 0.9  # an untrained model loses to the ceiling

    samples = tmp_path / "samples.jsonl"
    other = evaluate_model(
        first, prompts, baseline_dir=second, max_new_tokens=16, seed=5, samples_path=samples, **GOLD
    )
    assert other["model"]["kl_vs_baseline"] > 0.01  # a KL estimate: two models differ
    assert other["model"]["mean_tokens"] <= 16
    records = [r for _, r in read_jsonl(samples)]
    assert len(records) == len(prompts)
    assert {"messages", "meta", "response", "finished", "gold", "baseline_response"} <= set(
        records[0]
    )
    columns, rows = table_rows(other)
    assert columns == ["model", "baseline", "perfect"]
    labels = [row[0] for row in rows]
    assert "KL vs baseline (nats)" in labels
    assert {f"accuracy: {p.meta['family']}" for p in prompts} <= set(labels)  # a row per family


def test_best_of_n_picks_by_a_reward_function(world_models, prompts, tmp_path):
    path = tmp_path / "heldout.jsonl"
    write_jsonl(path, (p.to_json() for p in prompts[:12]))
    args = ["eval", "--model", str(world_models[0]), "--prompts", str(path), "--out"]
    args += [str(tmp_path / "one.json"), "--max-new-tokens", "12"]
    one = CliRunner().invoke(app, args)
    args[-3] = str(tmp_path / "best.json")
    best = CliRunner().invoke(app, [*args, "--best-of", "4", "--reward-fn", "reward_fns:shortest"])
    assert one.exit_code == 0 and best.exit_code == 0, best.output
    one, best = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "best"))
    assert best["settings"]["best_of"] == 4
    assert best["settings"]["reward"] == "1.0 x reward_fns:shortest"
    assert best["model"]["mean_words"] < one["model"]["mean_words"]


def test_eval_command_prints_a_table_and_writes_json(world_models, prompts, tmp_path):
    path = tmp_path / "heldout.jsonl"
    chosen = [p for p in prompts if p.meta["family"] == "harmful"][:2]
    chosen += [p for p in prompts if p.meta["family"] == "borderline"][:2]
    chosen += [p for p in prompts if p.meta["family"] not in ("harmful", "borderline")][:6]
    write_jsonl(path, (p.to_json() for p in chosen))
    out = tmp_path / "report.json"
    args = ["eval", "--model", str(world_models[0]), "--prompts", str(path)]
    args += ["--temperature", "0", "--max-new-tokens", "8", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mean gold score" in result.output and "over-refusal rate" in result.output
    report = json.loads(out.read_text())
    assert report["settings"]["temperature"] == 0.0
    assert report["model"]["n"] == 10 and "baseline" not in report
    assert report["perfect"]["mean_gold"] == 1.0


def test_prompts_without_world_meta_fail_before_sampling(
    world_models, tmp_path, monkeypatch, capsys
):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    args = ["chatrl", "eval", "--model", str(world_models[0]), "--prompts", str(path)]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert "no world meta" in capsys.readouterr().err
