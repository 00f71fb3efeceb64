import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import kill_at_first_checkpoint, user, write_rankings
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatrl.chat_format import encode_prompt
from chatrl.config import DPOConfig, load_stage
from chatrl.data import Ranking
from chatrl.engine import SamplingParams, load_engine
from chatrl.errors import UserError
from chatrl.models import init_model, load_causal_lm
from chatrl.reward_model import build_groups, collate_groups
from chatrl.train import dpo
from chatrl.train.dpo import SequenceLogProbs, preference_loss, train_dpo


def chatrl(*args):
    return subprocess.run(
        [sys.executable, "-m", "chatrl", *map(str, args)], capture_output=True, text=True
    )


def metrics_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, sample_text):
    from chatrl.data import load_text

    return init_model("tiny", load_text(sample_text), tmp_path_factory.mktemp("m") / "tiny")


# ---------------------------------------------------------------- the losses, by hand


def pair_loss_and_grads(loss_type, label_smoothing=0.0, tokens=(1.0, 1.0), ratios=(1.0, -1.0)):
    chosen = torch.tensor([ratios[0]], requires_grad=True)
    rejected = torch.tensor([ratios[1]], requires_grad=True)
    loss = preference_loss(
        chosen, rejected, 0.5, loss_type, label_smoothing, *map(torch.tensor, tokens)
    )
    loss.sum().backward()
    return loss.item(), chosen.grad.item(), rejected.grad.item()


def test_dpo_loss_and_gradient_by_hand():
    # β = 0.5, log-ratios 1 and -1: h = 2, βh = 1. loss = -log σ(1) = log(1 + e^-1) = 0.3132617;
    # d loss / d h = -β σ(-βh) = -0.5 / (1 + e) = -0.1344707, +0.1344707 for the rejected.
    loss, d_chosen, d_rejected = pair_loss_and_grads("sigmoid")
    assert loss == pytest.approx(0.3132617, abs=1e-6)
    assert d_chosen == pytest.approx(-0.1344707, abs=1e-6)
    assert d_rejected == pytest.approx(0.1344707, abs=1e-6)


def test_conservative_dpo_by_hand():
    # ε = 0.2: loss = 0.8 log(1 + e^-1) + 0.2 log(1 + e) = 0.8 · 0.3132617 + 0.2 · 1.3132617
    # = 0.5132617; d loss / d h = -0.8 β σ(-1) + 0.2 β σ(1) = -0.1075766 + 0.0731059 = -0.0344707.
    loss, d_chosen, d_rejected = pair_loss_and_grads("sigmoid", label_smoothing=0.2)
    assert loss == pytest.approx(0.5132617, abs=1e-6)
    assert d_chosen == pytest.approx(-0.0344707, abs=1e-6)
    assert d_rejected == pytest.approx(0.0344707, abs=1e-6)


def test_ipo_loss_and_gradient_by_hand():
    # Log-ratio 3 over 3 tokens (1 a token) and -2 over 4 tokens (-0.5): h̄ = 1.5, and with
    # β = 0.5 the target 1 / (2β) = 1: loss = (1.5 - 1)² = 0.25; d loss / d chosen =
    # 2 · 0.5 / 3 = 1/3, d loss / d rejected = -2 · 0.5 / 4 = -0.25.
    loss, d_chosen, d_rejected = pair_loss_and_grads("ipo", tokens=(3.0, 4.0), ratios=(3.0, -2.0))
    assert loss == pytest.approx(0.25, abs=1e-6)
    assert d_chosen == pytest.approx(1 / 3, abs=1e-6)
    assert d_rejected == pytest.approx(-0.25, abs=1e-6)


def test_a_ranking_is_its_pairs_mean_and_rewards_are_beta_log_ratios():
    # One K=3 ranking (best first 0, 2, 1) and one pair (1 beats 0); β = 0.5.
    groups = build_groups_by_hand()
    batch = collate_groups(groups, pad_id=0, logprobs=True)
    logps = torch.tensor([-1.0, -3.0, -2.0, -4.0, -5.0])
    ref = torch.tensor([-2.0, -2.0, -2.0, -4.0, -4.0])  # log-ratios 1, -1, 0, 0, -1
    cfg = DPOConfig(model="m", data="d", out="o", beta=0.5)
    loss, sums = dpo.ranking_terms(logps, ref, batch, cfg)

    def nll(x):
        return math.log1p(math.exp(-x))

    # Pairs (0, 2): h = 1; (0, 1): h = 2; (2, 1): h = 1; the pair (4, 3): h = -1.
    assert loss.item() == pytest.approx((nll(0.5) + nll(1) + nll(0.5)) / 3 + nll(-0.5), rel=1e-6)
    assert sums["rewards/accuracies"] == 3
    assert sums["rewards/chosen"] == pytest.approx(0.5 * (1 + 1 + 0 - 1))
    assert sums["rewards/margins"] == pytest.approx(0.5 * (1 + 2 + 1 - 1))


def build_groups_by_hand():
    from chatrl.reward_model import Group

    return [
        Group([[1, 2], [1, 3], [1, 4]], [1, 1, 1], [(0, 2, 1), (0, 1, 2), (2, 1, 1)], {}, None),
        Group([[5, 6], [5, 7]], [1, 1], [(1, 0, 1)], {}, None),
    ]


# ---------------------------------------------------------------- log-probs, one forward


def test_packed_log_probs_are_each_responses_alone_in_one_forward(micro_model, monkeypatch):
    model, tokenizer = load_causal_lm(micro_model)
    rankings = [
        Ranking(
            user("What is 2 plus 3?"), ["The answer is 5.", "The answer is 6.", "5"], [0, 2, 1]
        ),
        Ranking(user("Hi"), ["Hello there.", "Go."], [1, 0]),
    ]
    groups, _ = build_groups(tokenizer, rankings, None)
    batch = collate_groups(groups, tokenizer.pad_token_id, logprobs=True)
    calls = []
    decoder = model.get_decoder()
    forward = type(decoder).forward

    def counting(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return forward(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(type(decoder), "forward", counting)
        packed = SequenceLogProbs(model)(**batch["inputs"])
    assert calls == [(2, calls[0][1])]  # one forward, one row per ranking
    expected = []
    for group in groups:
        for sequence, start in zip(group.sequences, group.response_starts, strict=True):
            logits = model(torch.tensor([sequence])).logits[0].log_softmax(-1)
            expected.append(
                sum(logits[j - 1, sequence[j]].item() for j in range(start, len(sequence)))
            )
    assert packed.tolist() == pytest.approx(expected, abs=1e-4)
    # The response starts after the prompt: the prompt's tokens are not counted.
    prompt = encode_prompt(tokenizer, rankings[1].prompt)
    assert groups[1].response_starts == [len(prompt)] * 2


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """DPO through the CLI on 48 K=4 rankings (288 pairs), with held-out rankings."""
    root = tmp_path_factory.mktemp("dpo")
    data = write_rankings(root / "train.jsonl", 48)
    held_out = write_rankings(root / "eval.jsonl", 16, seed=1)
    out = root / "dpo"
    result = chatrl(
        "dpo", "--model", tiny_model, "--data", data, "--eval", held_out, "--out", out,
        "--learning-rate", 1e-3, "--per-device-train-batch-size", 8, "--num-train-epochs", 2,
        "--logging-steps", 1, "--no-bf16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_training_orders_the_pairs_and_lowers_the_loss(trained):
    out, stdout = trained
    logged = [r for r in metrics_of(out) if "loss" in r]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # π_θ = π_ref at first
    assert logged[-1]["loss"] < 0.3 and logged[-1]["rewards/accuracies"] > 0.9
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"] == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["data"]["train"]["pairs"] == 48 * 6
    assert report["eval"]["rewards/accuracies"] > 0.9 and report["eval"]["loss"] < 0.3
    assert "implicit reward accuracy" in stdout


def test_the_result_is_a_plain_chat_model_with_the_sft_tokenizer(trained, tiny_model):
    out, _ = trained
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer, sft = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_model)
    assert tokenizer.chat_template == sft.chat_template
    assert tokenizer.get_vocab() == sft.get_vocab()
    assert (
        model.config.vocab_size
        == AutoModelForCausalLM.from_pretrained(tiny_model).config.vocab_size
    )
    engine = load_engine(out, threads=1)  # as `chatrl sample` and `chatrl chat` load it
    [completion] = engine.generate_chat(
        [user("What is 1 plus 2?")], SamplingParams(max_new_tokens=8, seed=0)
    )
    assert completion.token_ids


def test_lora_reference_is_the_policy_with_adapters_off(micro_model, tmp_path):
    data = write_rankings(tmp_path / "r.jsonl", 16, k=3)
    out = train_dpo(
        DPOConfig(
            model=str(micro_model),
            data=str(data),
            out=str(tmp_path / "lora"),
            use_peft=True,
            learning_rate=1e-2,
            per_device_train_batch_size=4,
            logging_steps=1,
            bf16=False,
            loss_type="ipo",
        )  # fmt: skip
    )
    logged = metrics_of(out)
    assert logged[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)  # h̄ = 0
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert not (out / "adapter_config.json").exists()
    merged = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in merged)


def test_every_preference_format_of_rm_trains(micro_model, tmp_path):
    trl, hh = tmp_path / "trl.jsonl", tmp_path / "hh.jsonl"
    trl.write_text(
        "".join(
            json.dumps({"prompt": f"Say {i}", "chosen": f"{i}.", "rejected": "No."}) + "\n"
            for i in range(4)
        )
    )
    hh.write_text(
        "".join(
            json.dumps(
                {
                    "chosen": f"\n\nHuman: Hi {i}\n\nAssistant: Hello {i}!",
                    "rejected": f"\n\nHuman: Hi {i}\n\nAssistant: Go away.",
                }
            )
            + "\n"
            for i in range(4)
        )
    )
    out = train_dpo(
        DPOConfig(model=str(micro_model), data=str(trl), eval_data=str(hh), out=str(tmp_path / "o"))
    )
    report = json.loads((out / "eval.json").read_text())
    assert report["data"] == {
        "train": {"rankings": 4, "pairs": 4, "truncated": 0, "skipped": 0},
        "eval": {"rankings": 4, "pairs": 4, "truncated": 0, "skipped": 0},
    }


def test_a_bad_data_file_gives_one_line_and_exit_2(micro_model, tmp_path):
    data = write_rankings(tmp_path / "r.jsonl", 2)
    with data.open("a") as f:
        f.write(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    result = chatrl("dpo", "--model", micro_model, "--data", data, "--out", tmp_path / "o")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and f"{data}:3:" in last and "the same response" in last
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": user("q"), "responses": ["a", "b"], "ranking": [0, 0]}, "permutation"),
        ({"prompt": user("q"), "responses": ["a"], "ranking": [0]}, "at least 2"),
    ],
)
def test_bad_rankings_name_file_and_line(micro_model, tmp_path, record, message):
    data = write_rankings(tmp_path / "r.jsonl", 2)
    with data.open("a") as f:
        f.write(json.dumps(record) + "\n")
    with pytest.raises(UserError) as err:
        train_dpo(DPOConfig(model=str(micro_model), data=str(data), out=str(tmp_path / "o")))
    assert f"{data}:3:" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss_type": "ipo", "label_smoothing": "0.1"}, "label_smoothing applies to"),
        ({"loss_type": "kto"}, "'loss_type': Input should be 'sigmoid' or 'ipo'"),
        ({"label_smoothing": "0.5"}, "'label_smoothing'"),
        ({"beta": "0"}, "'beta'"),
    ],
)
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(UserError, match=message):
        load_stage(DPOConfig, None, "dpo", {"model": "m", "data": "d", "out": "o", **overrides})


def test_resume_after_sigkill_ends_where_an_uninterrupted_run_does(micro_model, tmp_path):
    data = write_rankings(tmp_path / "r.jsonl", 40, k=3)  # 20 updates of 2
    args = ["dpo", "--model", micro_model, "--data", data, "--save-steps", 3, "--no-bf16"]
    args += ["--per-device-train-batch-size", 2, "--learning-rate", 1e-3, "--logging-steps", 1]
    settings = dict(
        model=str(micro_model), data=str(data), save_steps=3, bf16=False, logging_steps=1,
        per_device_train_batch_size=2, learning_rate=1e-3,
    )  # fmt: skip
    train_dpo(DPOConfig(**settings, out=str(tmp_path / "straight")))

    out = tmp_path / "killed"
    step = kill_at_first_checkpoint(args, out)["step"]
    assert 0 < step < 20 and not (out / "model.safetensors").exists()
    refused = chatrl(*args, "--out", out)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = chatrl(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr

    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    straight, again = metrics_of(tmp_path / "straight"), metrics_of(out)
    assert [r["step"] for r in again] == [r["step"] for r in straight] == list(range(1, 21))
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in straight], rel=1e-5)
