"""The shared training-loop pieces: Accelerate setup, optimiser and schedule, data order,
checkpoints and resumption, metrics log, progress bar.

Every trainer runs through Accelerate, so one code path serves one CPU process, DDP and FSDP:
only the main process writes files, each process gets its own seed derived from the run seed,
and each takes its own slice of every global batch.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import get_cosine_schedule_with_warmup

from chatrl.errors import UserError

CHECKPOINT_DIR = "checkpoint"


def make_accelerator(bf16: bool, gradient_accumulation_steps: int = 1) -> Accelerator:
    """An Accelerator with bf16 autocast when asked (CPU or GPU).

    Accelerate keeps its settings in a process-wide singleton; a later stage in the same
    process (the pipeline, tests) may want another precision, so that part is reset. The
    distributed part (PartialState) is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=gradient_accumulation_steps,
    )


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; each process gets ``seed + rank``."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def make_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float):
    """AdamW over trainable parameters; no decay on biases and norms (1-D tensors).

    The fused kernel (transformers' Trainer default too) updates a small model about 4x
    faster on a CPU than the per-tensor loop, a tenth of a reward-model step.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), fused=True)


def make_scheduler(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up, then cosine decay to zero."""
    warmup = math.ceil(total_steps * warmup_ratio)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def add_lora(model, cfg, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` in LoRA adapters on every linear layer (``cfg.lora_r/alpha/dropout``).

    ``task_type="SEQ_CLS"`` also trains the new score head of a reward or value model.
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        task_type=task_type,
    )
    return get_peft_model(model, lora)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: the same on every process and every resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batches(n: int, global_batch: int, seed: int, epochs: float) -> list[list[int]]:
    """Every update's example indices, in order, for ``epochs`` passes over ``n`` examples.

    Knowing the whole schedule up front makes the data position a plain step number, which is
    what checkpoints record.
    """
    if n == 0:
        raise UserError("no training examples")
    total = math.ceil(n * epochs)
    order: list[int] = []
    epoch = 0
    while len(order) < total:
        order += epoch_order(n, seed, epoch)
        epoch += 1
    order = order[:total]
    return [order[i : i + global_batch] for i in range(0, total, global_batch)]


def shard(batch: list[int], accelerator: Accelerator) -> list[int]:
    """This process's share of a global batch (strided, so shares differ by at most one)."""
    return batch[accelerator.process_index :: accelerator.num_processes]


def micro_batches(indices: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(indices), size):
        yield indices[i : i + size]


# ---------------------------------------------------------------- checkpoints


@dataclass
class TrainerState:
    """What resumption needs beyond model/optimizer/scheduler/RNG: the step reached."""

    step: int = 0
    extra: dict[str, Any] | None = None


def save_checkpoint(
    accelerator: Accelerator, out: Path, state: TrainerState, world_size: int
) -> None:
    """Model, optimisers, schedulers, RNG states and the trainer state, written atomically.

    Accelerate writes the state into a temporary directory; the main process then renames it
    over the previous checkpoint, so a kill at any moment leaves one complete checkpoint.
    """
    final = out / CHECKPOINT_DIR
    tmp = out / f".{CHECKPOINT_DIR}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        meta = {"step": state.step, "extra": state.extra or {}, "world_size": world_size}
        (tmp / "trainer_state.json").write_text(json.dumps(meta))
        old = out / f".{CHECKPOINT_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)  # left by a kill during an earlier save
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def has_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a checkpoint of an unfinished run."""
    return any(
        (out / name / "trainer_state.json").exists()
        for name in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.old")
    )


def remove_checkpoint(out: Path) -> None:
    """Delete the checkpoint once the run's final outputs are written."""
    for name in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.old", f".{CHECKPOINT_DIR}.tmp"):
        shutil.rmtree(out / name, ignore_errors=True)


def load_checkpoint(accelerator: Accelerator, out: Path) -> TrainerState | None:
    """Restore the last checkpoint in ``out``, or return None when there is none."""
    final = out / CHECKPOINT_DIR
    if not (final / "trainer_state.json").exists():
        final = out / f".{CHECKPOINT_DIR}.old"  # killed between save_checkpoint's two renames
    if not (final / "trainer_state.json").exists():
        return None
    meta = json.loads((final / "trainer_state.json").read_text())
    if meta["world_size"] != accelerator.num_processes:
        raise UserError(
            f"{final}: checkpoint written by {meta['world_size']} process(es), but this run has "
            f"{accelerator.num_processes}; resume with the same number of processes"
        )
    accelerator.load_state(str(final))
    return TrainerState(step=meta["step"], extra=meta["extra"])


# ---------------------------------------------------------------- logging


class MetricsLog:
    """Append-only JSONL metrics (main process only), plus TensorBoard when installed."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.writer = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                pass

    def log(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a resumed run restarts from)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def progress_bar(enabled: bool = True) -> Progress:
    """A rich progress bar with step counts, elapsed and remaining time, and a free-text field."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
    )
