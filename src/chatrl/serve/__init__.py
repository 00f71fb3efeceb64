"""Talking to a model: the terminal chat (``chat.py``) and the OpenAI-compatible server with its
web chat page (``app.py``, ``worker.py``, ``static/``)."""

from __future__ import annotations

from pathlib import Path

import torch

from chatrl.chat_format import encode_prompt
from chatrl.engine import Engine
from chatrl.models import load_causal_lm
from chatrl.precision import Precision, resolve_bf16


def load_engine(
    model_dir: str | Path, threads: int | None = None, bf16: Precision = "auto"
) -> Engine:
    """The model directory's causal LM, ready to chat; ``threads`` sets torch's threads, and
    ``bf16`` the weights' precision ("auto": bf16 where the hardware runs it natively)."""
    if threads is not None:
        torch.set_num_threads(threads)
    dtype = torch.bfloat16 if resolve_bf16(bf16, "model") else torch.float32
    model, tokenizer = load_causal_lm(model_dir, dtype)
    encode_prompt(tokenizer, [{"role": "user", "content": "hi"}])  # no chat template: say so now
    return Engine(model.eval(), tokenizer)
