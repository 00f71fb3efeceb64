"""What the benchmarks share: the bench model, its tokenizer, data, and this machine's peak.

The bench model is REFERENCE.md's: Llama, 6 layers, hidden 256, FFN 1024, 4 heads, vocabulary
8192, untied head (10.49 M parameters). Everything is built locally from a seed.
"""

from __future__ import annotations

import json
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chatrl.models import train_tokenizer

VOCAB = 8192
WORDS = (
    "the a cat dog sat ran on under mat house red blue green quick slow river stone tree light "
    "what is how why when where who tell me about please answer question number city capital "
    "of and or but not very more less plus minus times equals sum list sort reverse word letter"
).split()


def sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    if rng.random() < 0.5:
        words.append(str(rng.randint(0, 999)))
    return " ".join(words).capitalize() + "."


def bench_tokenizer(seed: int = 0):
    """A byte-level BPE tokenizer with 8192 entries, trained on generated text."""
    rng = random.Random(seed)
    words = [f"{w}{s}" for w in WORDS for s in ("", "s", "ed", "ing", "er", "ly")]
    # Enough distinct strings for the BPE trainer to fill the vocabulary.
    lines = [
        " ".join(rng.choice(words) + rng.choice(WORDS) for _ in range(12)) for _ in range(20000)
    ]
    return train_tokenizer(lines, VOCAB)


def bench_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(
        num_hidden_layers=6,
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def bench_model(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(bench_config(tokenizer))


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Short single-turn chats (about 36 tokens each with the chat template)."""
    rng = random.Random(seed)
    return [
        [
            {"role": "user", "content": sentence(rng, rng.randint(3, 6))},
            {"role": "assistant", "content": sentence(rng, rng.randint(3, 8))},
        ]
        for _ in range(n)
    ]


def matmul_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """Measured torch.mm throughput in GFLOP/s on this machine, now."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


def print_result(result: dict) -> None:
    """The final JSON line every benchmark ends with."""
    print(json.dumps(result), flush=True)
