"""Chat template rendering, assistant-only loss masks (end-of-turn included), and packing.

One rule for every template: the assistant's part of turn ``i`` is the text that rendering
``messages[: i + 1]`` adds to rendering ``messages[:i]`` with the generation prompt. That part
ends with the template's end-of-turn marker (``<|im_end|>`` in ChatML), so the loss covers it
and a trained model learns to stop — the token other toolkits' masks drop.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError

from chatrl.data import Message
from chatrl.errors import UserError

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"

# ChatML, the template of the models chatrl builds. ``{% generation %}`` marks assistant text
# for transformers' own ``return_assistant_tokens_mask``, so other tools see the same mask.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def render(tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text, in the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template; use a chat model or one from `chatrl init-model`"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_prompt(tokenizer, messages: list[Message]) -> list[int]:
    """Token ids of a conversation followed by the assistant's generation prompt."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer) -> int | None:
    """The special token that closes an assistant turn in the tokenizer's chat template
    (``<|im_end|>`` in ChatML, ``<end_of_turn>`` in Gemma's, ``<|eot_id|>`` in Llama 3's):
    the first token the template puts after an assistant reply, when it is a special token.
    None without a template, or when the template closes turns with plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    reply = "Fine."
    try:
        text = render(tokenizer, [{"role": "user", "content": "Hi"}, _assistant(reply)])
    except TemplateError:  # a template that refuses this conversation names no marker
        return None
    after = text[text.rindex(reply) + len(reply) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return ids[0] if ids and ids[0] in special else None


def _assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids that end an assistant turn: the template's end-of-turn token, the tokenizer's
    EOS and every ``eos_token_id`` of the model's generation config (an int or a list)."""
    ids = {end_of_turn_id(tokenizer), tokenizer.eos_token_id}
    eos = getattr(generation_config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, list) else {eos}
    return sorted(i for i in ids if i is not None)


def assistant_spans(tokenizer, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans of every assistant turn in it."""
    full = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise UserError(
                "the chat template renders earlier turns differently as the conversation grows; "
                "chatrl cannot locate assistant turns for the loss mask"
            )
        spans.append((len(before), len(through)))
    return full, spans


@dataclass
class Encoded:
    """One tokenised conversation: ids and labels (IGNORE_INDEX outside assistant turns)."""

    input_ids: list[int]
    labels: list[int]


def encode_conversation(tokenizer, messages: list[Message], max_length: int) -> Encoded:
    """Tokenise a conversation; only assistant tokens (end-of-turn included) carry labels.

    Conversations longer than ``max_length`` are cut at the end.
    """
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for token_id, (start, _end) in zip(ids, enc["offset_mapping"], strict=True):
        inside = any(a <= start < b for a, b in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return Encoded(ids[:max_length], labels[:max_length])


def encode_text(tokenizer, text: str, max_length: int) -> list[Encoded]:
    """Pretraining text: an EOS-terminated document split into rows of at most max_length."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return [
        Encoded(ids[i : i + max_length], ids[i : i + max_length])
        for i in range(0, len(ids), max_length)
    ]


@dataclass
class Row:
    """A training row: one example, or several packed ones with their own position ids."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def pack(examples: list[Encoded], max_length: int) -> list[Row]:
    """Greedily pack examples into rows of up to ``max_length`` tokens (first-fit, in order).

    Position ids restart at 0 for each example; transformers' flash/sdpa paths read restarts
    as sequence boundaries (``position_ids``-based packing), so attention does not cross
    examples. Labels at each example's first token are ignored, so no loss spans a boundary.
    """
    rows: list[Row] = []
    current = Row([], [], [])
    for ex in examples:
        if current.input_ids and len(current.input_ids) + len(ex.input_ids) > max_length:
            rows.append(current)
            current = Row([], [], [])
        current.input_ids += ex.input_ids
        current.labels += [IGNORE_INDEX] + ex.labels[1:]
        current.position_ids += list(range(len(ex.input_ids)))
    if current.input_ids:
        rows.append(current)
    return rows


def unpacked(examples: list[Encoded]) -> list[Row]:
    """One row per example."""
    return [Row(ex.input_ids, ex.labels, list(range(len(ex.input_ids)))) for ex in examples]
