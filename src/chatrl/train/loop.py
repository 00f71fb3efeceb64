"""The shared training-loop pieces: Accelerate setup, optimiser and schedule, data order,
checkpoints and resumption, metrics log, progress bar; and ``Run``, the skeleton every trainer
stands on, so that a trainer is its data, its model and its step:

    run = start_run(cfg, "rm")                  # run.cfg: bf16 decided
    module = build(run.cfg)                     # new weights alike on every process
    run.seed_process()
    module, optimizer, scheduler = run.prepare(module, total)
    start = run.begin()                         # resumed, metrics log, train_config.json
    with run.progress(total) as show:
        for step in range(start, total):
            ...                                 # the trainer's own step; show(done, info)
            run.maybe_checkpoint(step + 1, total)
    return run.finish(module, save)             # save on the main process

Every trainer runs through Accelerate, so one code path serves one CPU process, DDP and FSDP
(docs/scaling.md): only the main process writes files, each process gets its own seed derived
from the run seed, and each takes its own slice of every global batch. An update's global batch
does not depend on the number of processes (they split its micro-batches between them), so a run
ends where a one-process run with the same settings does, within floating-point noise.

Everything trainers share lives here (a new trainer writes only its own step), hence the length.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import get_cosine_schedule_with_warmup

from chatrl.config import BatchConfig, StageConfig, TrainConfig
from chatrl.data import write_json
from chatrl.errors import UserError
from chatrl.precision import hardware, resolve_bf16

CHECKPOINT_DIR = "checkpoint"
CHECK_REPLICAS = "CHATRL_CHECK_REPLICAS"  # env var: compare weights across processes every step
# Rows up to this many tokens train with the math attention kernel on a CPU (see train_autocast).
SHORT_ROWS = 256


def make_accelerator(bf16: bool, fsdp: bool = False) -> Accelerator:
    """An Accelerator with bf16 autocast when asked, on the GPU if there is one.

    Under ``torchrun`` or ``accelerate launch`` it joins the process group (gloo on CPU, NCCL on
    GPU). ``fsdp`` shards parameters, gradients and optimiser state over the processes
    (FSDP2, one shard unit per transformer block, see ``prepare``); otherwise each process
    holds a full copy (DDP). Accelerate keeps its settings in a process-wide singleton; a later
    stage in the same process (the pipeline, tests) may want another precision, so that part
    is reset. The distributed part (PartialState) is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    plugin = None
    if fsdp:
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            state_dict_type="SHARDED_STATE_DICT",
        )
    accelerator = Accelerator(
        # Without cpu=True, Accelerate ignores torchrun's process group on a machine without a
        # GPU: every process would train alone on the whole batch.
        cpu=not torch.accelerator.is_available(),
        mixed_precision="bf16" if bf16 else "no",
        fsdp_plugin=plugin,
    )
    if plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate turns FSDP on for accelerator devices only and silently falls back to DDP
        # on CPU, though torch's FSDP2 runs there on gloo. Switch it on as Accelerate does on a
        # GPU (the process-wide part too: Accelerate re-reads it when it wraps the optimiser).
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if bf16:
            plugin.set_mixed_precision("bf16")
    return accelerator


def decide_precision(cfg: StageConfig, stage: str) -> StageConfig:
    """``cfg`` with ``bf16`` decided for this machine (``"auto"``: bf16 where it is native, see
    ``chatrl.precision``), the choice said on stderr. Trainers save these effective settings."""
    return cfg.model_copy(update={"bf16": resolve_bf16(cfg.bf16, stage)})


def write_train_config(out: Path, stage: str, cfg: StageConfig) -> None:
    """The effective settings of a training run, and the hardware they ran on, in --out."""
    record = {"stage": stage, **cfg.model_dump(), "hardware": hardware().to_json()}
    write_json(out / "train_config.json", record)


@contextlib.contextmanager
def train_autocast(accelerator: Accelerator, input_ids: torch.Tensor) -> Iterator[None]:
    """``accelerator.autocast()`` for a training forward over ``input_ids`` [rows, tokens].

    On a CPU, rows of at most ``SHORT_ROWS`` tokens also get SDPA's math kernel: torch's CPU
    flash-attention backward is slow on short rows (bench model, 16 chats of ~40 tokens: 43 ms
    of a 222 ms step; the math kernel's backward makes the step 1.3x faster). Longer rows keep
    flash attention, whose memory does not grow with the square of their length.
    """
    short = input_ids.device.type == "cpu" and input_ids.shape[-1] <= SHORT_ROWS
    kernel = sdpa_kernel([SDPBackend.MATH]) if short else contextlib.nullcontext()
    with accelerator.autocast(), kernel:
        yield


def prepare(accelerator: Accelerator, module: torch.nn.Module, *optimizers) -> tuple:
    """``accelerator.prepare(module, *optimizers)``; under FSDP every transformer block of the
    models inside ``module`` is its own shard unit, so a forward gathers one block's weights at
    a time rather than the whole model's."""
    plugin = accelerator.state.fsdp_plugin if accelerator.is_fsdp2 else None
    if plugin is not None and plugin.transformer_cls_names_to_wrap is None:
        blocks = {
            name for m in module.modules() for name in getattr(m, "_no_split_modules", None) or []
        }
        plugin.transformer_cls_names_to_wrap = sorted(blocks)
    return accelerator.prepare(module, *optimizers)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch with ``seed + rank``.

    Trainers seed with ``rank=0`` on every process while they build their models (a new head
    or LoRA adapters start the same everywhere, as FSDP needs: it keeps each process's shard of
    its own initial weights), then with their own rank (sampling, dropout).
    """
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
    # peft 0.21 reads transformers 5.23's deprecated ``is_gradient_checkpointing``; the warning
    # it raises on every trainer's start is about their pairing, not about anything we do.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
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


def process_micro_batches(batch: list[int], size: int, accelerator: Accelerator) -> list[list[int]]:
    """This process's share of a global batch, split evenly into micro-batches of at most ``size``.

    Every process gets the same number of micro-batches: DDP synchronises gradients and FSDP
    gathers weights in every forward and backward, so a process that ran one pass fewer would
    leave the others waiting. A process whose share runs short (a last batch smaller than
    that, or with fewer rows than processes) gets empty micro-batches (see ``accumulate``).
    """
    per_process = math.ceil(len(batch) / accelerator.num_processes)
    count = math.ceil(per_process / size)
    mine = shard(batch, accelerator)
    return [mine[i * len(mine) // count : (i + 1) * len(mine) // count] for i in range(count)]


def accumulate(
    accelerator: Accelerator, module: torch.nn.Module, pieces: list[list[int]], stand_in: list[int]
) -> Iterator[tuple[list[int], float]]:
    """Iterate one update's micro-batches, synchronising gradients on the last one only (DDP
    all-reduces, FSDP reduce-scatters once per update rather than once per micro-batch).

    Yields ``(indices, weight)``: weight 1, or 0 for an empty micro-batch, which becomes
    ``stand_in`` — the trainer runs its pass with the loss times 0, which keeps this process in
    step with the others without touching the gradients.
    """
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(module):
            yield (piece, 1.0) if piece else (stand_in, 0.0)


def process_sum(accelerator: Accelerator, *values: float) -> list[float]:
    """Each value summed over processes (for metrics: one small all-reduce)."""
    if accelerator.num_processes == 1:
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(totals, "sum").tolist()


def check_replicas(accelerator: Accelerator, module: torch.nn.Module, step: int) -> None:
    """With ``CHATRL_CHECK_REPLICAS=1``, stop when the processes' copies of the trained weights
    differ after an update (DDP keeps them bit-identical; a difference means a process skipped
    a synchronisation or stepped differently). A debugging aid: one all-gather per update.
    Under FSDP each process holds different shards, so there is nothing to compare.
    """
    if (
        os.environ.get(CHECK_REPLICAS) != "1"
        or accelerator.num_processes == 1
        or accelerator.distributed_type == DistributedType.FSDP
    ):
        return
    params = [p.detach().double() for p in module.parameters() if p.requires_grad]
    sums = torch.stack([torch.stack((p.sum(), p.square().sum())) for p in params]).flatten()
    every = accelerator.gather(sums[None].to(accelerator.device)).cpu()
    differing = [rank for rank in range(len(every)) if not torch.equal(every[rank], every[0])]
    if differing:
        raise RuntimeError(
            f"step {step}: the weights of process(es) {differing} differ from process 0's"
        )


def trained_module(
    accelerator: Accelerator,
    module: torch.nn.Module,
    rebuild: Callable[[], torch.nn.Module] | None = None,
) -> torch.nn.Module | None:
    """The trained module, whole, on the main process; every process must call this.

    Under FSDP each process holds a shard of every weight: the full state dict is gathered on
    the main process (Accelerate's full-state-dict gather, offloaded to the CPU) and loaded into
    a fresh copy from ``rebuild`` (which a trainer that refuses FSDP need not give); other
    processes get None. Otherwise ``module`` unwrapped.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.unwrap_model(module)
    state = accelerator.get_state_dict(module)
    if not accelerator.is_main_process:
        return None
    fresh = rebuild()
    fresh.load_state_dict(state)
    return fresh


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

    Accelerate writes the state into a temporary directory (under FSDP, each process its own
    shards, with torch.distributed.checkpoint); once every process is done, the main process
    renames it over the previous checkpoint, so a kill at any moment leaves one complete
    checkpoint.
    """
    final = out / CHECKPOINT_DIR
    tmp = out / f".{CHECKPOINT_DIR}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every process's RNG state and shards are in tmp
    if accelerator.is_main_process:
        meta = {"step": state.step, "extra": state.extra or {}, "world_size": world_size}
        (tmp / "trainer_state.json").write_text(json.dumps(meta))
        old = out / f".{CHECKPOINT_DIR}.old"
        if final.exists():
            # An old copy beside a complete one is stale (a kill during an earlier save); with
            # no complete one it is the only checkpoint (a run resumed from it) and stays
            # until the new one is in place.
            shutil.rmtree(old, ignore_errors=True)
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


def refuse_unfinished_run(out: Path, resume: bool) -> None:
    """Stop a run that would start over the checkpoint in ``out`` unless it is to resume it."""
    if has_checkpoint(out) and not resume:
        raise UserError(
            f"{out} holds a checkpoint of an unfinished run; pass --resume to continue it, "
            "or choose another --out"
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
            f"{accelerator.num_processes}; resume with the same number of processes (the "
            "checkpoint holds each process's random state and, under FSDP, its shards)"
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


# ---------------------------------------------------------------- the run


def batch_schedule(cfg: BatchConfig, n: int) -> list[list[int]]:
    """``global_batches`` of ``n`` examples up to ``max_steps``; a global batch is
    per_device_train_batch_size x gradient_accumulation_steps, however many processes split it."""
    size = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    return global_batches(n, size, cfg.seed, cfg.num_train_epochs)[: cfg.max_steps]


@dataclass
class Run:
    """One training run's set-up, checkpoints and tear-down, the same for every trainer.

    ``cfg``: the effective settings (bf16 decided). ``begin`` sets ``log``, ``step`` (0, or the
    resumed checkpoint's) and ``extra`` (the trainer state that checkpoint holds)."""

    cfg: TrainConfig
    stage: str
    accelerator: Accelerator
    out: Path
    log: MetricsLog | None = None
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def seed_process(self) -> None:
        """This process's own seed (sampling, dropout), once the new weights that must be the
        same on every process (``start_run`` seeded those) are built."""
        seed_everything(self.cfg.seed, self.accelerator.process_index)

    def prepare(self, module: torch.nn.Module, total_steps: int) -> tuple:
        """``module`` with AdamW and a schedule over ``total_steps`` from the settings, prepared,
        the schedule in checkpoints. Other optimisers: prepare and register them yourself."""
        optimizer = make_optimizer(module, self.cfg.learning_rate, self.cfg.weight_decay)
        scheduler = make_scheduler(optimizer, total_steps, self.cfg.warmup_ratio)
        module, optimizer = prepare(self.accelerator, module, optimizer)
        self.accelerator.register_for_checkpointing(scheduler)
        return module, optimizer, scheduler

    def begin(self) -> int:
        """After ``prepare``: restore the checkpoint when resuming, open the metrics log (without
        records past that checkpoint), write train_config.json; returns the step to start at."""
        accelerator = self.accelerator
        self.log = MetricsLog(self.out / "metrics.jsonl", accelerator.is_main_process)
        state = load_checkpoint(accelerator, self.out) if self.cfg.resume else None
        if state is not None:
            self.step, self.extra = state.step, state.extra or {}
        self.log.truncate_after(self.step)
        if accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            write_train_config(self.out, self.stage, self.cfg)
        return self.step

    def accumulate(
        self, module: torch.nn.Module, batch: list[int]
    ) -> Iterator[tuple[list[int], float]]:
        """``accumulate`` over this process's micro-batches of ``batch`` (a ``BatchConfig``'s)."""
        size = self.cfg.per_device_train_batch_size
        pieces = process_micro_batches(batch, size, self.accelerator)
        return accumulate(self.accelerator, module, pieces, batch[:1])

    def optimizer_step(self, module: torch.nn.Module, optimizer, scheduler, done: int):
        """Clip, step the optimiser and schedule, zero the gradients, ``check_replicas``;
        returns the gradient norm before clipping."""
        grad_norm = self.accelerator.clip_grad_norm_(module.parameters(), self.cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        check_replicas(self.accelerator, module, done)
        return grad_norm

    @contextlib.contextmanager
    def progress(self, total: int) -> Iterator[Callable[[int, str], None]]:
        """A progress bar over ``total`` updates from ``step``; yields ``show(done, info)``."""
        with progress_bar(self.accelerator.is_main_process) as bar:
            task = bar.add_task(self.stage, total=total, completed=self.step, info="")
            yield lambda done, info: bar.update(task, completed=done, info=info)

    def maybe_checkpoint(self, done: int, total: int, extra: dict[str, Any] | None = None):
        """Checkpoint every ``save_steps`` updates but the last, with the trainer's ``extra``
        state (JSON), which ``begin`` gives back on resume."""
        if done % self.cfg.save_steps == 0 and done < total:
            state = TrainerState(done, extra)
            save_checkpoint(self.accelerator, self.out, state, self.accelerator.num_processes)

    def finish(
        self,
        module: torch.nn.Module,
        save: Callable[[torch.nn.Module], None],
        rebuild: Callable[[], torch.nn.Module] | None = None,
    ) -> Path:
        """On every process: the main one saves the trained module, whole (``trained_module``;
        ``rebuild`` for FSDP) with ``save``, then deletes the checkpoint. Returns ``out``."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        trained = trained_module(accelerator, module, rebuild)
        if accelerator.is_main_process:
            save(trained)
            remove_checkpoint(self.out)
        accelerator.wait_for_everyone()
        return self.out


def start_run(cfg: TrainConfig, stage: str) -> Run:
    """A run of ``stage``, before its models are built: ``refuse_unfinished_run``, bf16 decided,
    the Accelerator (FSDP if ``cfg.fsdp``), every process seeded alike (new weights agree)."""
    out = Path(cfg.out)
    refuse_unfinished_run(out, cfg.resume)
    cfg = decide_precision(cfg, stage)
    accelerator = make_accelerator(cfg.bf16, getattr(cfg, "fsdp", False))  # ppo has no fsdp
    seed_everything(cfg.seed)
    return Run(cfg, stage, accelerator, out)
