"""``chatrl sample``: K distinct responses per prompt, written as ranking tasks.

Identical responses teach a ranker nothing, and the labeling app and the reward model refuse
them, so a prompt whose K samples repeat one another is sampled again, up to ``MAX_REDRAWS``
more times, for as many responses as were repeats. Repeats left after that are left out: the
task holds fewer than K responses and ``meta["repeats"]`` says how many draws were left out. A
prompt with fewer than two distinct responses cannot be ranked and gets no task.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from chatrl.data import Prompt, Task, load_prompts, write_jsonl
from chatrl.engine import Engine, SamplingParams, load_engine
from chatrl.errors import UserError

MAX_REDRAWS = 3
# Engine batches of prompts sampled together, so that the prompts whose samples repeat are
# re-drawn together in full batches: re-drawing one engine batch's repeats in near-empty
# batches of their own took about as long as the batch itself (demo's SFT model, 800 prompts:
# 14.0 s a batch at a time, 11.0 s at once).
BATCHES_PER_ROUND = 8


class _Sampler:
    """Draws responses in batches, each call with its own seed drawn from the run's seed."""

    def __init__(self, engine: Engine, params: SamplingParams, seed: int | None):
        self.engine, self.params, self.seeds = engine, params, random.Random(seed)

    def __call__(self, prompts: list[Prompt], n: int) -> list[list[str]]:
        params = replace(self.params, n=n, seed=self.seeds.randrange(2**31))
        completions = self.engine.generate_chat([p.messages for p in prompts], params)
        return [[c.text for c in completions[i * n : (i + 1) * n]] for i in range(len(prompts))]


Draw = Callable[[list[Prompt], int], list[list[str]]]


def distinct_tasks(draw: Draw, prompts: list[Prompt], k: int) -> list[Task]:
    """Tasks of up to ``k`` distinct responses from ``draw(prompts, n)`` (n responses each),
    repeats re-drawn up to MAX_REDRAWS times; prompts left with fewer than 2 get no task."""
    responses = [list(dict.fromkeys(r)) for r in draw(prompts, k)]
    for _ in range(MAX_REDRAWS):
        short = [i for i, r in enumerate(responses) if len(r) < k]
        if not short:
            break
        missing = max(k - len(responses[i]) for i in short)
        for i, fresh in zip(short, draw([prompts[i] for i in short], missing), strict=True):
            new = [text for text in dict.fromkeys(fresh) if text not in responses[i]]
            responses[i] += new[: k - len(responses[i])]
    tasks = []
    for prompt, texts in zip(prompts, responses, strict=True):
        if len(texts) < 2:
            continue
        meta = dict(prompt.meta)
        if len(texts) < k:
            meta["repeats"] = k - len(texts)
        tasks.append(Task(prompt.messages, texts, meta=meta))
    return tasks


def sample_tasks(
    model: str | Path,
    prompts: str | Path,
    out: str | Path,
    k: int,
    params: SamplingParams,
    batch_size: int = 64,
    console: Console | None = None,
) -> tuple[list[Task], int]:
    """Sample ``k`` responses to every prompt of a prompts file and write them as tasks (JSONL).

    Returns the tasks and how many prompts got none (fewer than 2 distinct responses).
    ``params.n`` is ignored (``k`` is the number of samples); ``params.seed`` seeds the run.
    ``batch_size`` is the number of sequences (prompts x k) generated at once.
    """
    if k < 2:
        raise UserError(f"--k must be at least 2 (responses to rank), got {k}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if params.temperature == 0:
        raise UserError("--temperature 0 is greedy: every response would be the same")
    params.check()
    loaded = load_prompts(prompts)
    draw = _Sampler(load_engine(model, max_batch_size=batch_size), params, params.seed)
    per_round = max(1, batch_size // k) * BATCHES_PER_ROUND
    tasks: list[Task] = []
    with Progress(console=console or Console(stderr=True)) as progress:
        bar = progress.add_task(f"sampling {k} responses per prompt", total=len(loaded))
        for start in range(0, len(loaded), per_round):
            chunk = loaded[start : start + per_round]
            tasks += distinct_tasks(draw, chunk, k)
            progress.advance(bar, len(chunk))
    write_jsonl(out, (task.to_json() for task in tasks))
    return tasks, len(loaded) - len(tasks)
