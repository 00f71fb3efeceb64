import json
import subprocess
import sys

import pytest
import torch
from conftest import check_resume_after_kill_between_renames, kill_at_first_checkpoint, write_sft
from safetensors.torch import load_file

from chatrl.chat_format import (
    encode_conversation,
    encode_prompt,
    pack,
    stop_token_ids,
    unpacked,
)
from chatrl.config import LMConfig
from chatrl.models import load_causal_lm
from chatrl.train.lm import CausalLMLoss, collate, train_lm


def chatrl(*args, check=False):
    result = subprocess.run(
        [sys.executable, "-m", "chatrl", *map(str, args)], capture_output=True, text=True
    )
    assert not check or result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_sft_model_answers_the_pattern_and_stops(micro_model, sample_text, tmp_path):
    pre = train_lm(
        LMConfig(
            model=str(micro_model),
            data=str(sample_text),
            out=str(tmp_path / "pre"),
            max_steps=60,
            learning_rate=3e-3,
        ),
        "pretrain",
    )
    data = write_sft(tmp_path / "sft.jsonl", 400)
    sft = train_lm(
        LMConfig(
            model=str(pre),
            data=str(data),
            out=str(tmp_path / "sft"),
            num_train_epochs=4,
            learning_rate=3e-3,
        ),
        "sft",
    )
    model, tok = load_causal_lm(sft)
    ids = torch.tensor([encode_prompt(tok, [{"role": "user", "content": "What is 2 + 1?"}])])
    out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=stop_token_ids(tok))
    reply = tok.decode(out[0, ids.shape[1] :])
    assert reply.startswith("The answer is")
    assert reply.endswith("<|im_end|>")  # it learned to stop
    log = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    assert json.loads((sft / "train_config.json").read_text())["stage"] == "sft"


def test_packed_conversations_do_not_see_each_other(micro_model):
    # Packed into one row, with position ids restarting per conversation, the loss and its
    # gradient are those of the conversations in rows of their own; if attention crossed
    # conversations, or a loss spanned two, they would differ.
    model, tokenizer = load_causal_lm(micro_model)
    convs = [
        [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a + b}"},
        ]
        for a, b in [(1, 2), (13, 4), (5, 67), (8, 9)]
    ]
    convs[1] = [{"role": "system", "content": "Be brief."}, *convs[1]]
    examples = [encode_conversation(tokenizer, c, 64) for c in convs]
    loss = CausalLMLoss(model)
    results = []
    for rows in (unpacked(examples), pack(examples, 1024)):
        tensors = collate(rows, tokenizer.pad_token_id)
        model.zero_grad()
        loss_sum, count = loss(**tensors)
        loss_sum.backward()
        results.append((loss_sum.item(), count.item(), model.lm_head.weight.grad.clone()))
    (alone_loss, alone_count, alone_grad), (packed_loss, packed_count, packed_grad) = results
    assert packed_count == alone_count
    assert abs(packed_loss - alone_loss) < 1e-4 * alone_loss
    assert torch.allclose(packed_grad, alone_grad, atol=1e-5)


def test_gradient_accumulation_matches_a_full_batch(micro_model, tmp_path):
    data = write_sft(tmp_path / "sft.jsonl", 32)
    common = dict(
        model=str(micro_model), data=str(data), max_steps=3, bf16=False, learning_rate=1e-3
    )
    full = train_lm(
        LMConfig(**common, out=str(tmp_path / "a"), per_device_train_batch_size=8), "sft"
    )
    accum = train_lm(
        LMConfig(
            **common,
            out=str(tmp_path / "b"),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
        ),
        "sft",
    )
    a, b = load_file(full / "model.safetensors"), load_file(accum / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_resume_after_sigkill_ends_where_an_uninterrupted_run_does(micro_model, tmp_path):
    data = write_sft(tmp_path / "sft.jsonl", 200)
    args = ["sft", "--model", micro_model, "--data", data, "--max-steps", 40, "--save-steps", 5]
    args += ["--per-device-train-batch-size", 4]
    chatrl(*args, "--out", tmp_path / "straight", check=True)

    out = tmp_path / "killed"
    step = kill_at_first_checkpoint(args, out)["step"]
    assert 0 < step < 40 and not (out / "model.safetensors").exists()

    refused = chatrl(*args, "--out", out)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    chatrl(*args, "--out", out, "--resume", check=True)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_resume_after_a_kill_between_the_checkpoint_renames(micro_model, tmp_path, monkeypatch):
    data = write_sft(tmp_path / "sft.jsonl", 48)

    def train(out, resume):
        cfg = LMConfig(
            model=str(micro_model), data=str(data), out=str(out), max_steps=6, save_steps=2,
            logging_steps=1, per_device_train_batch_size=4, bf16=False, resume=resume,
        )  # fmt: skip
        return train_lm(cfg, "sft")

    check_resume_after_kill_between_renames(train, tmp_path, monkeypatch)


def test_config_file_and_flags(micro_model, tmp_path):
    data = write_sft(tmp_path / "sft.jsonl", 8)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[sft]\nmodel = "{micro_model}"\ndata = "{data}"\nmax_steps = 1\nlearning_rate = 1e-4\n'
    )
    chatrl("sft", "--config", config, "--out", tmp_path / "o", "--max-length", 64, check=True)
    saved = json.loads((tmp_path / "o" / "train_config.json").read_text())
    assert saved["max_steps"] == 1 and saved["learning_rate"] == 1e-4 and saved["max_length"] == 64


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--learning-rat", "1e-3"], "unknown key 'learning_rat'"),
        (["--max-steps", "many"], "'max_steps': Input should be a valid integer"),
        ([], "missing required key 'data'"),
    ],
)
def test_bad_settings_exit_2_with_one_line(micro_model, tmp_path, extra, message):
    args = ["sft", "--model", micro_model, "--out", tmp_path / "o", *extra]
    if "missing" not in message:
        args += ["--data", write_sft(tmp_path / "d.jsonl", 4)]
    result = chatrl(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_data_exit_2_and_nothing_written(micro_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n'
    )
    result = chatrl("sft", "--model", micro_model, "--data", data, "--out", tmp_path / "o")
    assert result.returncode == 2
    assert (
        f"{data}:1: messages[1].role must be one of system, user, assistant"
        in result.stderr.replace("\n", "")
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_lora_sft_saves_a_merged_plain_model(micro_model, tmp_path):
    data = write_sft(tmp_path / "sft.jsonl", 16)
    out = train_lm(
        LMConfig(
            model=str(micro_model),
            data=str(data),
            out=str(tmp_path / "lora"),
            max_steps=2,
            use_peft=True,
        ),
        "sft",
    )
    model, _ = load_causal_lm(out)
    base, _ = load_causal_lm(micro_model)
    assert not (out / "adapter_config.json").exists()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())
