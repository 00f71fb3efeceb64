"""The trainer skeleton (``chatrl.train.loop.Run``) under a toy trainer that writes only its own
data, model and step: resumption, the kill between the checkpoint renames, trainer state."""

from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import check_resume_after_kill_between_renames
from safetensors.torch import save_file

from chatrl.config import BatchConfig
from chatrl.train.loop import batch_schedule, start_run


def train_toy(out: Path, resume: bool, extras: list[dict]) -> Path:
    """Linear regression on 24 points: 6 updates of 2 micro-batches, a checkpoint every 2."""
    cfg = BatchConfig(
        out=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, bf16=False, save_steps=2, logging_steps=1, resume=resume,
    )  # fmt: skip
    run = start_run(cfg, "toy")
    module = torch.nn.Linear(4, 1)
    run.seed_process()
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(0))
    y = x.sum(1, keepdim=True)
    schedule = batch_schedule(run.cfg, len(x))
    module, optimizer, scheduler = run.prepare(module, len(schedule))
    start = run.begin()
    extras.append(run.extra)
    with run.progress(len(schedule)) as show:
        for step in range(start, len(schedule)):
            for micro, weight in run.accumulate(module, schedule[step]):
                loss = F.mse_loss(module(x[micro]), y[micro], reduction="sum")
                run.accelerator.backward(loss * weight / len(schedule[step]))
            run.optimizer_step(module, optimizer, scheduler, step + 1)
            run.log.log(step + 1, loss=loss.item())
            show(step + 1, f"loss {loss.item():.3f}")
            run.maybe_checkpoint(step + 1, len(schedule), {"updates": step + 1})
    return run.finish(module, lambda m: save_file(m.state_dict(), run.out / "model.safetensors"))


def test_a_toy_trainer_resumes_after_a_kill_between_the_checkpoint_renames(tmp_path, monkeypatch):
    extras: list[dict] = []  # each run's trainer state from begin()
    check_resume_after_kill_between_renames(
        lambda out, resume: train_toy(out, resume, extras), tmp_path, monkeypatch
    )
    # straight, killed, (refused before begin), killed again and resumed: both from step 2
    assert extras == [{}, {}, {"updates": 2}, {"updates": 2}]
