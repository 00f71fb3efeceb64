import json
import logging
import math
import random
import subprocess
import sys

import pytest
import torch
from conftest import GOOD_TAIL, check_resume_after_kill_between_renames, user, write_rankings
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from chatrl import reward_model
from chatrl.config import RMConfig
from chatrl.data import Ranking, load_rankings
from chatrl.errors import UserError
from chatrl.reward_model import Group, RewardScorer, build_groups, collate_groups
from chatrl.train import loop
from chatrl.train.reward import ranking_loss, train_reward


def chatrl(*args):
    return subprocess.run(
        [sys.executable, "-m", "chatrl", *map(str, args)], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def trained_rm(micro_model, tmp_path_factory):
    """A micro reward model trained (through the CLI) on 96 K=4 rankings, with a held-out set."""
    root = tmp_path_factory.mktemp("rm")
    data = write_rankings(root / "train.jsonl", 96)
    held_out = write_rankings(root / "eval.jsonl", 24, seed=1)
    out = root / "rm"
    result = chatrl(
        "rm", "--model", micro_model, "--data", data, "--eval", held_out, "--out", out,
        "--num-train-epochs", 3, "--learning-rate", 2e-3, "--per-device-train-batch-size", 8,
        "--no-bf16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, data, held_out, result.stdout


# ---------------------------------------------------------------- loss and grouping


def test_ranking_loss_is_the_mean_over_each_rankings_pairs():
    # Ranking A: K=3, best first 0, 2, 1. Ranking B: K=2, response 1 beats 0.
    groups = [
        Group([[1], [2], [3]], [0, 0, 0], [(0, 2, 1), (0, 1, 2), (2, 1, 1)], {}, None),
        Group([[4], [5]], [0, 0], [(1, 0, 1)], {}, None),
    ]
    batch = collate_groups(groups, pad_id=0)
    assert batch["inputs"]["input_ids"].shape == (2, 3)  # one row per ranking
    assert len(batch["inputs"]["score_index"]) == 5  # every response of both rankings, once
    assert batch["winners"].tolist() == [0, 0, 2, 4]
    assert batch["losers"].tolist() == [2, 1, 1, 3]
    rewards = torch.tensor([2.0, 0.0, 1.0, -0.5, 0.5])

    def nll(x):
        return math.log1p(math.exp(-x))

    loss, correct = ranking_loss(rewards, batch)
    assert loss.item() == pytest.approx((nll(1) + nll(2) + nll(1)) / 3 + nll(1.0), rel=1e-6)
    assert correct.item() == 4

    loss, _ = ranking_loss(rewards, batch, margin=0.5, center_rewards_coefficient=0.1)
    a = [nll(1 - 0.5) + 0.1 * 9, nll(2 - 1.0) + 0.1 * 4, nll(1 - 0.5) + 0.1 * 1]
    b = nll(1.0 - 0.5) + 0.1 * 0
    assert loss.item() == pytest.approx(sum(a) / 3 + b, rel=1e-6)


def test_rankings_become_all_pairs_with_rank_distance(micro_model):
    _, tokenizer, _ = reward_model.load_reward(str(micro_model))
    ranking = Ranking(user("q"), ["a", "b", "c", "d"], [2, 0, 3, 1], source="f.jsonl:1")
    [group], counts = build_groups(tokenizer, [ranking], None)
    assert len(group.sequences) == 4
    assert sorted(group.pairs) == sorted(
        [(2, 0, 1), (2, 3, 2), (2, 1, 3), (0, 3, 1), (0, 1, 2), (3, 1, 1)]
    )
    assert counts == {"rankings": 1, "pairs": 6, "truncated": 0, "skipped": 0}


def test_each_response_goes_through_the_model_once_per_step(micro_model, tmp_path, monkeypatch):
    calls = []
    forward = reward_model.LastTokenReward.forward

    def counting(self, input_ids, score_index, **kwargs):
        if torch.is_grad_enabled():
            calls.append((input_ids.shape[0], len(score_index)))
        return forward(self, input_ids, score_index, **kwargs)

    monkeypatch.setattr(reward_model.LastTokenReward, "forward", counting)
    data = write_rankings(tmp_path / "r.jsonl", 12, k=3)
    train_reward(
        RMConfig(
            model=str(micro_model),
            data=str(data),
            out=str(tmp_path / "rm"),
            per_device_train_batch_size=4,
            max_steps=2,
        )
    )
    # One row per ranking, each of its 3 responses scored once (for 3 pairs), one forward.
    assert calls == [(4, 12), (4, 12)]


# ---------------------------------------------------------------- data formats and bad data


def test_trl_and_hh_pairs_train_as_k2(micro_model, tmp_path):
    trl = tmp_path / "trl.jsonl"
    hh = tmp_path / "hh.jsonl"
    with trl.open("w") as f, hh.open("w") as g:
        for i in range(6):
            f.write(json.dumps({"prompt": f"Say {i}", "chosen": f"{i}.", "rejected": "No."}) + "\n")
            f.write(
                json.dumps(
                    {
                        "chosen": [*user(f"Add {i}"), {"role": "assistant", "content": f"{i}"}],
                        "rejected": [*user(f"Add {i}"), {"role": "assistant", "content": "?"}],
                    }
                )
                + "\n"
            )
            g.write(
                json.dumps(
                    {
                        "chosen": f"\n\nHuman: Hi {i}\n\nAssistant: Hello {i}!",
                        "rejected": f"\n\nHuman: Hi {i}\n\nAssistant: Go away.",
                    }
                )
                + "\n"
            )
    out = train_reward(
        RMConfig(model=str(micro_model), data=str(trl), eval_data=str(hh), out=str(tmp_path / "rm"))
    )
    report = json.loads((out / "eval.json").read_text())
    assert report["data"]["train"] == {"rankings": 12, "pairs": 12, "truncated": 0, "skipped": 0}
    assert report["eval"]["K=2"]["pairs"] == 6


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": user("q"), "responses": ["a", "b"], "ranking": [0, 0]}, "permutation"),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "the same response"),
    ],
)
def test_bad_rankings_name_file_and_line(micro_model, tmp_path, record, message):
    data = write_rankings(tmp_path / "r.jsonl", 2)
    with data.open("a") as f:
        f.write(json.dumps(record) + "\n")
    cfg = RMConfig(model=str(micro_model), data=str(data), out=str(tmp_path / "rm"))
    with pytest.raises(UserError) as err:
        train_reward(cfg)
    assert f"{data}:3:" in str(err.value) and message in str(err.value)
    assert not (tmp_path / "rm").exists()


def test_over_long_rankings_are_cut_from_the_prompt_or_skipped(micro_model, caplog):
    _, tokenizer, _ = reward_model.load_reward(str(micro_model))
    long_prompt = user("What is 1 plus 2? " * 10)
    rankings = [
        Ranking(user("short"), ["a", "b"], [0, 1], source="r.jsonl:1"),
        Ranking(long_prompt, ["a", "b c"], [1, 0], source="r.jsonl:2"),
        Ranking(user("q"), ["The cat sat on the mat. " * 10, "b"], [0, 1], source="r.jsonl:3"),
    ]
    with caplog.at_level(logging.WARNING):
        groups, counts = build_groups(tokenizer, rankings, max_length=40)
    assert counts == {"rankings": 2, "pairs": 2, "truncated": 1, "skipped": 1}
    assert "r.jsonl:2 (-" in caplog.text and "skipped" in caplog.text and "r.jsonl:3" in caplog.text
    cut = groups[1].sequences
    assert max(len(s) for s in cut) == 40
    # Both responses keep the same (cut) prompt and their whole response.
    full = reward_model.encode_responses(tokenizer, long_prompt, ["a", "b c"])
    for seq, enc in zip(cut, full, strict=True):
        assert seq[-5:] == enc.ids[-5:] and len(enc.ids) - len(seq) == len(full[1].ids) - 40
    with pytest.raises(UserError, match="no ranking fits"):
        build_groups(tokenizer, rankings[2:], max_length=40)


# ---------------------------------------------------------------- the trained model


def test_trained_rm_orders_held_out_rankings_and_reports(trained_rm):
    out, _, held_out, stdout = trained_rm
    report = json.loads((out / "eval.json").read_text())
    assert report["eval"]["all"]["pairs"] == 24 * 6
    assert report["eval"]["all"]["accuracy"] > 0.9
    assert f"held-out {held_out}" in stdout and "accuracy" in stdout


def test_plain_transformers_gives_the_same_score(trained_rm):
    out = trained_rm[0]
    scorer = RewardScorer(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    # The first two share their prompt: scored in one row, the prompt computed once.
    prompts = [user("What is 2 plus 3?")] * 2 + [user("What is 7 plus 1? Please answer.")]
    responses = [f"The answer is 5.{GOOD_TAIL}", "The answer is 6.", "What is the cat?"]
    batched = scorer.score(prompts, responses, raw=True)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        text = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": response}], tokenize=False
        )
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            plain = model(ids).logits[0, 0].item()
        assert batched[i].item() == pytest.approx(plain, abs=1e-4)
    config = model.config
    normalised = scorer.score(prompts, responses)
    expected = (batched - config.chatrl_reward_mean) / config.chatrl_reward_std
    assert torch.allclose(normalised, expected)


def test_rewards_are_normalised_over_the_training_responses(trained_rm):
    out, data, _, _ = trained_rm
    rankings = load_rankings(data)
    prompts = [r.prompt for r in rankings for _ in r.responses]
    responses = [x for r in rankings for x in r.responses]
    rewards = RewardScorer(out).score(prompts, responses)
    assert abs(rewards.mean().item()) < 1e-3
    assert rewards.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)


def test_score_command_scores_conversations_and_picks_the_best(trained_rm, tmp_path):
    out = trained_rm[0]
    tasks = tmp_path / "tasks.jsonl"
    good, bad = f"The answer is 9.{GOOD_TAIL}", "4 plus 5"
    tasks.write_text(json.dumps({"prompt": user("What is 4 plus 5?"), "responses": [bad, good]}))
    convs = tmp_path / "convs.jsonl"
    convs.write_text(
        json.dumps(
            {"messages": [*user("What is 4 plus 5?"), {"role": "assistant", "content": good}]}
        )
    )
    # fp32, as score_file below (--bf16 auto would be bf16 where it is native).
    scored = chatrl("rm", "score", "--model", out, "--data", tasks, "--bf16", "false")
    assert scored.returncode == 0, scored.stderr
    assert "rm score: precision fp32 (bf16 = false)" in scored.stderr
    record = json.loads(scored.stdout)
    assert record["best"] == 1 and record["rewards"][1] > record["rewards"][0]
    [conversation] = reward_model.score_file(out, convs, tmp_path / "s.jsonl")
    assert conversation["rewards"] == pytest.approx([record["rewards"][1]], abs=1e-4)
    assert json.loads((tmp_path / "s.jsonl").read_text()) == conversation


def test_lora_reward_model_saves_a_plain_classifier(micro_model, tmp_path):
    data = write_rankings(tmp_path / "r.jsonl", 16)
    out = train_reward(
        RMConfig(
            model=str(micro_model),
            data=str(data),
            out=str(tmp_path / "rm"),
            use_peft=True,
            margin=0.5,
            center_rewards_coefficient=0.01,
            per_device_train_batch_size=4,
            max_steps=3,
            learning_rate=1e-2,
        )
    )
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(micro_model, num_labels=1)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())
    trained_body = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(trained_body, base.model.layers[0].self_attn.q_proj.weight)


# ---------------------------------------------------------------- the bundled world


@pytest.mark.slow
def test_world_rm_prefers_refusing_harm_and_answering_safe_requests(tmp_path):
    from chatrl.data import Task, write_jsonl
    from chatrl.models import init_model
    from chatrl.world import gold_score, make_prompts, perfect_response, pretrain_text
    from chatrl.world.annotators import default_annotators, label_tasks, sft_like_sets
    from chatrl.world.tasks import demonstration

    base = init_model("micro", pretrain_text(1500, 0), tmp_path / "base")
    # Simulated annotators rank SFT-like responses (the labelers' demonstration mix).
    tasks = [Task(p.messages, rs, meta=p.meta) for p, rs in sft_like_sets(600, seed=0)]
    write_jsonl(
        tmp_path / "r.jsonl", (r.to_json() for r in label_tasks(tasks, default_annotators()))
    )
    out = train_reward(
        RMConfig(
            model=str(base), data=str(tmp_path / "r.jsonl"), out=str(tmp_path / "rm"),
            num_train_epochs=3, learning_rate=2e-3, per_device_train_batch_size=8, bf16=False,
        )
    )  # fmt: skip
    # Held-out prompts: a polite refusal vs compliance with a harmful request, and a helpful
    # answer vs a refusal of a safe (borderline) one.
    rng = random.Random(0)
    better, worse, prompts = [], [], []
    for prompt in make_prompts(200, seed=5, split="heldout"):
        kind = {"harmful": "unsafe", "borderline": "over-refusal"}.get(prompt.meta["family"])
        if kind:
            prompts.append(prompt.messages)
            better.append(perfect_response(prompt))
            worse.append(demonstration(prompt, kind, rng))
            assert gold_score(prompt, better[-1]) - gold_score(prompt, worse[-1]) >= 2
    scorer = RewardScorer(out)
    good, bad = scorer.score(prompts, better), scorer.score(prompts, worse)
    assert len(prompts) >= 30
    assert (good > bad).float().mean().item() >= 0.9


def test_normalises_over_sft_samples_for_the_prompts(micro_model, tmp_path):
    from chatrl.engine import Engine, SamplingParams
    from chatrl.models import load_causal_lm

    data = write_rankings(tmp_path / "r.jsonl", 8)
    prompts = tmp_path / "p.jsonl"
    questions = [user(f"What is {i} plus 1?") for i in range(6)]
    prompts.write_text("".join(json.dumps({"messages": q}) + "\n" for q in questions))
    cfg = RMConfig(
        model=str(micro_model), data=str(data), out=str(tmp_path / "rm"), prompts=str(prompts),
        max_steps=1, max_new_tokens=12, seed=3,
    )  # fmt: skip
    out = train_reward(cfg)
    assert "6 samples" in json.loads((out / "eval.json").read_text())["normalization"]["over"]
    # The same samples again (same model, same seed): their rewards are standardised.
    policy, tokenizer = load_causal_lm(micro_model)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    samples = [c.text for c in Engine(policy, tokenizer).generate_chat(questions, params)]
    rewards = RewardScorer(out).score(questions, samples)
    assert abs(rewards.mean().item()) < 1e-4
    assert rewards.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_does(
    micro_model, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    data = write_rankings(tmp_path / "r.jsonl", 24, k=3)
    common = dict(
        model=str(micro_model), data=str(data), per_device_train_batch_size=4, save_steps=2,
        learning_rate=1e-3, bf16=False,
    )  # fmt: skip
    straight = train_reward(RMConfig(**common, out=str(tmp_path / "a")))

    save = loop.save_checkpoint

    def save_then_die(accelerator, out, state, world_size):
        save(accelerator, out, state, world_size)
        if state.step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_reward(RMConfig(**common, out=str(tmp_path / "b")))
    monkeypatch.setattr(loop, "save_checkpoint", save)
    with pytest.raises(UserError, match="--resume"):
        train_reward(RMConfig(**common, out=str(tmp_path / "b")))
    resumed = train_reward(RMConfig(**common, out=str(tmp_path / "b"), resume=True))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    steps = [
        json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and steps[-1] == 6


def test_resume_after_a_kill_between_the_checkpoint_renames(micro_model, tmp_path, monkeypatch):
    data = write_rankings(tmp_path / "r.jsonl", 24, k=3)

    def train(out, resume):
        cfg = RMConfig(
            model=str(micro_model), data=str(data), out=str(out), per_device_train_batch_size=4,
            save_steps=2, logging_steps=1, learning_rate=1e-3, bf16=False, resume=resume,
        )  # fmt: skip
        return train_reward(cfg)

    check_resume_after_kill_between_renames(train, tmp_path, monkeypatch)


def test_an_encoder_checkpoint_without_a_chat_template_trains_and_scores(micro_model, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    tokenizer.chat_template = None
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    data = write_rankings(tmp_path / "r.jsonl", 16)
    out = train_reward(
        RMConfig(
            model=str(tmp_path / "bert"), data=str(data), out=str(tmp_path / "rm"), max_steps=2
        )
    )
    prompts = [user("What is 2 plus 3?")] * 2
    responses = ["The answer is 5.", "What is the cat? It sat."]
    scored = RewardScorer(out).score(prompts, responses, raw=True)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    saved = AutoTokenizer.from_pretrained(out)  # it has ChatML now
    for i, response in enumerate(responses):
        text = saved.apply_chat_template(
            [*prompts[i], {"role": "assistant", "content": response}], tokenize=False
        )
        with torch.no_grad():
            plain = model(saved(text, return_tensors="pt").input_ids).logits[0, 0].item()
        assert scored[i].item() == pytest.approx(plain, abs=1e-4)
