"""The language-model trainer: pretraining on text and SFT on conversations share it.

SFT's loss covers assistant tokens only (end-of-turn included); pretraining's covers every token.
The loss is summed over the global batch's target tokens and divided by their count, so the
result does not depend on how the batch is split into micro-batches or processes
(docs/scaling.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from chatrl.chat_format import (
    IGNORE_INDEX,
    Row,
    encode_conversation,
    encode_text,
    pack,
    unpacked,
)
from chatrl.config import LMConfig
from chatrl.data import load_conversations, load_text
from chatrl.errors import UserError
from chatrl.models import load_causal_lm, save_model
from chatrl.train.loop import (
    add_lora,
    batch_schedule,
    micro_batches,
    process_sum,
    start_run,
    train_autocast,
)


class CausalLMLoss(nn.Module):
    """Summed next-token cross-entropy over labelled positions only.

    The output head runs on the positions that have a target, not on every position: with
    assistant-only labels most positions have none, and the head is a large share of a small
    model's compute. Wrapping the model in this module (rather than calling its parts from the
    loop) keeps DDP/FSDP hooks on the forward that actually runs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        # use_cache=False: with a cache, transformers ignores position-id restarts and lets
        # packed conversations attend to each other.
        hidden = self.model.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, use_cache=False
        )
        hidden = hidden.last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.model.get_output_embeddings()(hidden[keep]).float()
        loss_sum = F.cross_entropy(logits, targets[keep], reduction="sum")
        return loss_sum, keep.sum()


def build_rows(cfg: LMConfig, tokenizer, kind: str, path: str) -> list[Row]:
    """Tokenised training rows of a data file (packed when ``cfg.packing``)."""
    if kind == "sft":
        examples = [
            encode_conversation(tokenizer, messages, cfg.max_length)
            for messages in load_conversations(path)
        ]
    else:
        examples = [
            ex for text in load_text(path) for ex in encode_text(tokenizer, text, cfg.max_length)
        ]
    examples = [ex for ex in examples if any(label != IGNORE_INDEX for label in ex.labels[1:])]
    if not examples:
        raise UserError(
            f"{path}: no example has a token to learn from within max_length={cfg.max_length}"
        )
    # Pretraining text is always packed: documents are short lines, and padding them would
    # waste most of each row.
    return (
        pack(examples, cfg.max_length) if cfg.packing or kind == "pretrain" else unpacked(examples)
    )


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into tensors.

    No attention mask: padding sits to the right of every real token, and attention is
    causal, so real tokens never see it. (Packing a micro-batch's rows into one row instead
    was measured slower here: the mask it needs costs more than the padding it saves.)
    """
    width = max(len(r.input_ids) for r in rows)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    return {
        "input_ids": torch.tensor([padded(r.input_ids, pad_id) for r in rows]),
        "labels": torch.tensor([padded(r.labels, IGNORE_INDEX) for r in rows]),
        "position_ids": torch.tensor(
            [r.position_ids + list(range(len(r.position_ids), width)) for r in rows]
        ),
    }


def target_count(rows: list[Row]) -> int:
    return sum(sum(1 for label in r.labels[1:] if label != IGNORE_INDEX) for r in rows)


@torch.no_grad()
def eval_loss(
    loss_module: CausalLMLoss, rows: list[Row], cfg: LMConfig, pad_id: int, accelerator
) -> float:
    """Mean next-token loss over ``rows``."""
    loss_module.eval()
    total, count = 0.0, 0
    for batch in micro_batches(list(range(len(rows))), cfg.per_device_train_batch_size):
        tensors = collate([rows[i] for i in batch], pad_id)
        with accelerator.autocast():
            loss_sum, n = loss_module(**{k: v.to(accelerator.device) for k, v in tensors.items()})
        total, count = total + loss_sum.item(), count + n.item()
    loss_module.train()
    return total / max(count, 1)


def build_model(cfg: LMConfig):
    """The model to train and its tokenizer: ``cfg.model``, under LoRA adapters if asked."""
    model, tokenizer = load_causal_lm(cfg.model, chat_template=cfg.chat_template_path)
    return (add_lora(model, cfg) if cfg.use_peft else model), tokenizer


def train_lm(cfg: LMConfig, kind: str) -> Path:
    """Pretrain (``kind="pretrain"``) or fine-tune (``kind="sft"``) a causal LM; return --out."""
    run = start_run(cfg, kind)
    cfg, accelerator = run.cfg, run.accelerator
    model, tokenizer = build_model(cfg)
    run.seed_process()
    rows = build_rows(cfg, tokenizer, kind, cfg.data)
    eval_rows = build_rows(cfg, tokenizer, kind, cfg.eval_data) if cfg.eval_data else []
    schedule = batch_schedule(cfg, len(rows))
    loss_module, optimizer, scheduler = run.prepare(CausalLMLoss(model), len(schedule))
    start = run.begin()

    pad_id = tokenizer.pad_token_id
    loss_module.train()
    tokens_seen, started = 0, time.perf_counter()
    with run.progress(len(schedule)) as show:
        for step in range(start, len(schedule)):
            global_rows = [rows[i] for i in schedule[step]]
            # Every process divides by the global target count; DDP averages gradients over
            # processes, so scale back up by their number.
            scale = accelerator.num_processes / max(target_count(global_rows), 1)
            loss_total = 0.0
            for micro, weight in run.accumulate(loss_module, schedule[step]):
                tensors = collate([rows[i] for i in micro], pad_id)
                tensors = {k: v.to(accelerator.device) for k, v in tensors.items()}
                with train_autocast(accelerator, tensors["input_ids"]):
                    loss_sum, _ = loss_module(**tensors)
                accelerator.backward(loss_sum * scale * weight)
                loss_total += loss_sum.item() * scale * weight / accelerator.num_processes
                tokens_seen += sum(len(rows[i].input_ids) for i in micro) * weight
            done = step + 1
            grad_norm = run.optimizer_step(loss_module, optimizer, scheduler, done)
            (loss_total,) = process_sum(accelerator, loss_total)

            tokens_per_s = tokens_seen * accelerator.num_processes / (time.perf_counter() - started)
            # All tokens of the rows, prompts included (padding not); the loss's are fewer.
            show(done, f"loss {loss_total:.3f}  {tokens_per_s:,.0f} tok/s (all input tokens)")
            if done % cfg.logging_steps == 0 or done == len(schedule):
                run.log.log(
                    done,
                    loss=loss_total,
                    grad_norm=float(grad_norm),
                    learning_rate=scheduler.get_last_lr()[0],
                    tokens_per_s=tokens_per_s,
                )
            if eval_rows and cfg.eval_steps and done % cfg.eval_steps == 0:
                run.log.log(
                    done, eval_loss=eval_loss(loss_module, eval_rows, cfg, pad_id, accelerator)
                )
            run.maybe_checkpoint(done, len(schedule))

    if eval_rows:
        run.log.log(
            len(schedule), eval_loss=eval_loss(loss_module, eval_rows, cfg, pad_id, accelerator)
        )
    return run.finish(
        loss_module,
        lambda trained: save_model(trained.model, tokenizer, run.out),
        rebuild=lambda: CausalLMLoss(build_model(cfg)[0]),
    )
