"""``chatrl sample``: K distinct responses per prompt, written as ranking tasks.

Identical responses teach a ranker nothing, so a prompt whose K samples repeat one another is
sampled again, up to ``MAX_REDRAWS`` more times, for as many responses as were repeats. When a
prompt still has repeats after that (a model that always answers the same way), they are kept
and the task's ``meta["duplicates"]`` lists the indices of the responses that repeat an earlier
one, so the labeling app and the reward model can tell.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from chatrl.data import Prompt, Task, load_prompts, write_jsonl
from chatrl.engine import Engine, SamplingParams
from chatrl.errors import UserError
from chatrl.models import load_causal_lm

MAX_REDRAWS = 3


def _repeats(responses: list[str]) -> list[int]:
    """Indices of the responses equal to an earlier one."""
    seen: set[str] = set()
    repeats = []
    for i, response in enumerate(responses):
        if response in seen:
            repeats.append(i)
        seen.add(response)
    return repeats


class _Sampler:
    """Draws responses in batches, each call with its own seed drawn from the run's seed."""

    def __init__(self, engine: Engine, params: SamplingParams, seed: int | None):
        self.engine, self.params, self.seeds = engine, params, random.Random(seed)

    def draw(self, prompts: list[Prompt], n: int) -> list[list[str]]:
        params = replace(self.params, n=n, seed=self.seeds.randrange(2**31))
        completions = self.engine.generate_chat([p.messages for p in prompts], params)
        return [[c.text for c in completions[i * n : (i + 1) * n]] for i in range(len(prompts))]


def _distinct(sampler: _Sampler, prompts: list[Prompt], k: int) -> list[Task]:
    """K responses for each prompt, repeats re-drawn where possible and marked otherwise."""
    responses = sampler.draw(prompts, k)
    for _ in range(MAX_REDRAWS):
        pending = [i for i, r in enumerate(responses) if _repeats(r)]
        if not pending:
            break
        n = max(len(_repeats(responses[i])) for i in pending)
        for i, fresh in zip(pending, sampler.draw([prompts[i] for i in pending], n), strict=True):
            new = [text for text in dict.fromkeys(fresh) if text not in responses[i]]
            for slot, text in zip(_repeats(responses[i]), new, strict=False):
                responses[i][slot] = text
    tasks = []
    for prompt, texts in zip(prompts, responses, strict=True):
        meta = dict(prompt.meta)
        if repeats := _repeats(texts):
            meta["duplicates"] = repeats
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
) -> list[Task]:
    """Sample ``k`` responses to every prompt of a prompts file and write them as tasks (JSONL).

    ``params.n`` is ignored (``k`` is the number of samples); ``params.seed`` seeds the run.
    ``batch_size`` is the number of sequences (prompts x k) generated at once.
    """
    if k < 2:
        raise UserError(f"--k must be at least 2 (responses to rank), got {k}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    params.check()
    loaded = load_prompts(prompts)
    policy, tokenizer = load_causal_lm(model)
    sampler = _Sampler(Engine(policy, tokenizer, max_batch_size=batch_size), params, params.seed)
    per_batch = max(1, batch_size // k)
    tasks: list[Task] = []
    with Progress(console=console or Console(stderr=True), transient=False) as progress:
        bar = progress.add_task(f"sampling {k} responses per prompt", total=len(loaded))
        for start in range(0, len(loaded), per_batch):
            chunk = loaded[start : start + per_batch]
            tasks += _distinct(sampler, chunk, k)
            progress.advance(bar, len(chunk))
    write_jsonl(out, (task.to_json() for task in tasks))
    return tasks
