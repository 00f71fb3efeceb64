from chatrl.chat_format import (
    IGNORE_INDEX,
    encode_conversation,
    encode_prompt,
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
