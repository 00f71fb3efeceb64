"""Talking to a model: the terminal chat (``chat.py``) and the OpenAI-compatible server with its
web chat page (``app.py``, ``worker.py``, ``static/``)."""

from __future__ import annotations

from pathlib import Path

import torch

from chatrl.chat_format import encode_prompt
from chatrl.engine import Engine
from chatrl.models import load_causal_lm


def load_engine(model_dir: str | Path, threads: int | None = None) -> Engine:
    """The model directory's causal LM, ready to chat; ``threads`` sets torch's threads."""
    if threads is not None:
        torch.set_num_threads(threads)
    model, tokenizer = load_causal_lm(model_dir)
    encode_prompt(tokenizer, [{"role": "user", "content": "hi"}])  # no chat template: say so now
    return Engine(model.eval(), tokenizer)


def context_length(engine: Engine) -> int | None:
    """The most tokens (prompt plus reply) the engine's model takes, when its config says."""
    return getattr(engine.config, "max_position_embeddings", None)
