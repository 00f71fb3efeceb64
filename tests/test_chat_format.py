from chatrl.chat_format import (
    IGNORE_INDEX,
    encode_conversation,
    encode_prompt,
    end_of_turn_id,
    pack,
    stop_token_ids,
)
from chatrl.models import load_tokenizer

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 1 + 1?"},
    {"role": "assistant", "content": "2"},
]


def labelled_text(tokenizer, encoded):
    return tokenizer.decode(
        [
            t
            for t, label in zip(encoded.input_ids, encoded.labels, strict=True)
            if label != IGNORE_INDEX
        ]
    )


def test_only_assistant_turns_carry_labels_and_end_of_turn_is_included(micro_model):
    tok = load_tokenizer(micro_model)
    enc = encode_conversation(tok, CONV, max_length=512)
    assert labelled_text(tok, enc) == "5<|im_end|>\n2<|im_end|>\n"
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    labelled_eot = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label == eot]
    assert len(labelled_eot) == 2  # both assistant turns teach the model to stop
    assert eot in stop_token_ids(tok)


def test_mask_agrees_with_transformers_generation_mask(micro_model):
    tok = load_tokenizer(micro_model)
    out = tok.apply_chat_template(CONV, return_dict=True, return_assistant_tokens_mask=True)
    mine = encode_conversation(tok, CONV, max_length=512)
    assert out["input_ids"] == mine.input_ids
    ours = [int(label != IGNORE_INDEX) for label in mine.labels]
    # transformers' mask covers the assistant text and <|im_end|>; ours adds the newline after it.
    assert all(o >= t for o, t in zip(ours, out["assistant_masks"], strict=True))
    assert sum(ours) - sum(out["assistant_masks"]) == 2


def test_prompt_ends_with_generation_prompt(micro_model):
    tok = load_tokenizer(micro_model)
    ids = encode_prompt(tok, CONV[:2])
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_packing_restarts_positions_and_ignores_boundary_labels(micro_model):
    tok = load_tokenizer(micro_model)
    examples = [encode_conversation(tok, CONV[1:3], 64) for _ in range(3)]
    n = len(examples[0].input_ids)
    rows = pack(examples, max_length=2 * n)
    assert [len(r.input_ids) for r in rows] == [2 * n, n]
    assert rows[0].position_ids == list(range(n)) * 2
    assert rows[0].labels[n] == IGNORE_INDEX


GEMMA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) }}"
    "{{ '\\n' + message['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def test_stop_tokens_come_from_the_template_and_the_generation_config(micro_model):
    from transformers import GenerationConfig

    tok = load_tokenizer(micro_model)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA_TEMPLATE
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    chatml_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == end
    assert end in stop_token_ids(tok) and chatml_end not in stop_token_ids(tok)
    config = GenerationConfig(eos_token_id=[7, 11])
    assert set(stop_token_ids(tok, config)) == {end, tok.eos_token_id, 7, 11}
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=5)) == sorted(
        {end, tok.eos_token_id, 5}
    )
    # A template that ends turns with plain text names no end-of-turn token: EOS only.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    )
    assert end_of_turn_id(tok) is None and stop_token_ids(tok) == [tok.eos_token_id]
