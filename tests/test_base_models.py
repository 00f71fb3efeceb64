"""A base model without a chat template: every stage renders ChatML, adding its tokens and
growing the embeddings, and what a stage writes carries the template."""

from __future__ import annotations

import pytest
import torch
from conftest import arithmetic_lines, write_sft
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from chatrl.chat_format import CHATML_TEMPLATE, encode_prompt, stop_token_ids
from chatrl.config import LMConfig
from chatrl.engine import Engine, SamplingParams
from chatrl.errors import UserError
from chatrl.models import load_causal_lm, load_reward_model
from chatrl.train.lm import train_lm


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A GPT-2-style base model whose tokenizer has no chat template and no ChatML tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(arithmetic_lines(200), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    shape = dict(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=len(tokenizer))
    config = GPT2Config(**shape, bos_token_id=eos, eos_token_id=eos)
    out = tmp_path_factory.mktemp("base")
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_loading_gives_chatml_with_its_tokens_and_grown_embeddings(base_model, capfd):
    assert not AutoTokenizer.from_pretrained(base_model).chat_template
    model, tokenizer = load_causal_lm(base_model)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert "no chat template; using ChatML, adding <|im_start|> and <|im_end|>" in (
        capfd.readouterr().err
    )
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in stop_token_ids(tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "What is 1 + 2?"}])
    out = Engine(model.eval(), tokenizer).generate([ids], SamplingParams(8, temperature=0))
    assert len(out[0].token_ids) >= 1  # the grown embeddings serve the new tokens
    reward, reward_tokenizer = load_reward_model(base_model)
    assert reward_tokenizer.chat_template == CHATML_TEMPLATE
    assert reward.get_input_embeddings().num_embeddings == len(reward_tokenizer)


def test_sft_on_a_base_model_writes_a_chat_model(base_model, tmp_path):
    cfg = LMConfig(
        model=str(base_model),
        data=str(write_sft(tmp_path / "sft.jsonl", 16)),
        out=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=8,
        bf16=False,
    )
    out = train_lm(cfg, "sft")
    tokenizer = AutoTokenizer.from_pretrained(out)  # plain transformers reads what it wrote
    assert tokenizer.chat_template == CHATML_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert "<|im_end|>" in tokenizer.get_vocab()


# Llama 3's turn format: a non-ChatML template whose turns end with <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


def test_sft_with_a_named_template_trains_and_saves_that_format(base_model, tmp_path):
    template = tmp_path / "llama3.jinja"
    template.write_text(LLAMA3_TEMPLATE, encoding="utf-8")
    cfg = LMConfig(
        model=str(base_model),
        data=str(write_sft(tmp_path / "sft.jsonl", 16)),
        out=str(tmp_path / "sft"),
        chat_template_path=str(template),
        max_steps=2,
        per_device_train_batch_size=8,
        bf16=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(train_lm(cfg, "sft"))
    assert tokenizer.chat_template == LLAMA3_TEMPLATE
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert "<|im_end|>" not in tokenizer.get_vocab()  # no ChatML beside it
    assert stop_token_ids(tokenizer) == sorted({eot, tokenizer.eos_token_id})
    model, again = load_causal_lm(cfg.out)  # a later stage reads the saved format
    assert again.chat_template == LLAMA3_TEMPLATE
    assert model.get_input_embeddings().num_embeddings == len(again)


def test_a_template_copied_from_another_model(base_model, tmp_path):
    donor = tmp_path / "donor"
    load_causal_lm(base_model)[1].save_pretrained(donor)  # a tokenizer carrying ChatML
    _, tokenizer = load_causal_lm(base_model, chat_template=str(donor))
    assert tokenizer.chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.jinja", "chat template not found"),
        ("broken.jinja", "does not render a conversation"),
    ],
)
def test_a_bad_template_fails_in_one_line_before_the_model_loads(
    base_model, tmp_path, monkeypatch, spec, message
):
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content ", "utf-8")
    monkeypatch.chdir(tmp_path)

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the template was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_model)
    with pytest.raises(UserError, match=message):
        load_causal_lm(base_model, chat_template=spec)
