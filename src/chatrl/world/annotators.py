"""Simulated annotators: noisy, slightly biased people ranking responses by the gold score.

Each annotator ranks K responses by sampling from a Plackett–Luce model whose utilities are
the gold scores plus the annotator's own small bias, divided by a noise temperature — the
same as sorting ``utility / noise + Gumbel noise``. The noise is calibrated so that two
annotators agree on about 73% of response pairs on SFT-like mixes of responses, the
inter-annotator agreement InstructGPT reports (72.6 ± 1.5%); ``chatrl world agreement``
measures it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from chatrl.data import Prompt, Ranking, Task
from chatrl.errors import UserError
from chatrl.world.judge import gold_score, is_refusal
from chatrl.world.tasks import demo_kind, demonstration, make_prompts

# Plackett–Luce temperature, found by `calibrate_noise()` (bisection to 73% agreement on
# 2,000 pairs of SFT-like responses; `chatrl world agreement --calibrate` reruns it).
NOISE = 0.547


@dataclass
class SimulatedAnnotator:
    """A labeler who ranks by gold score, with noise and a small bias of their own."""

    name: str
    noise: float = NOISE
    length_bias: float = 0.0  # added per word: > 0 likes longer answers
    exclamation_bias: float = 0.0  # added when the response has an exclamation mark
    refusal_bias: float = 0.0  # added when the response refuses
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(f"chatrl-annotator:{self.name}:{self.seed}")

    def utility(self, prompt: Prompt, response: str, finished: bool = True) -> float:
        """What this annotator thinks of a response before noise: gold score plus bias."""
        return (
            gold_score(prompt, response, finished)
            + self.length_bias * len(response.split())
            + self.exclamation_bias * ("!" in response)
            + self.refusal_bias * is_refusal(response)
        )

    def rank(
        self, prompt: Prompt, responses: list[str], finished: list[bool] | None = None
    ) -> list[int]:
        """Response indices, best first, sampled from the Plackett–Luce model."""
        finished = finished or [True] * len(responses)
        keys = [
            self.utility(prompt, r, f) / self.noise - math.log(-math.log(self._uniform()))
            for r, f in zip(responses, finished, strict=True)
        ]
        return sorted(range(len(responses)), key=lambda i: -keys[i])

    def _uniform(self) -> float:
        return self._rng.random() or 1e-12


def default_annotators(seed: int = 0, noise: float = NOISE) -> list[SimulatedAnnotator]:
    """Three annotators: one likes longer answers, one exclamation marks, one refusals."""
    return [
        SimulatedAnnotator("likes-long", noise, length_bias=0.03, seed=seed),
        SimulatedAnnotator("likes-cheerful", noise, exclamation_bias=0.2, seed=seed),
        SimulatedAnnotator("likes-caution", noise, refusal_bias=0.2, seed=seed),
    ]


def _order(ranking: list[int]) -> dict[int, int]:
    return {index: place for place, index in enumerate(ranking)}


def pairwise_agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, int]:
    """Share of response pairs two sets of rankings order the same way, and the pair count."""
    agree = total = 0
    for rank_a, rank_b in zip(a, b, strict=True):
        place_a, place_b = _order(rank_a), _order(rank_b)
        for i, j in combinations(range(len(rank_a)), 2):
            total += 1
            agree += (place_a[i] < place_a[j]) == (place_b[i] < place_b[j])
    return (agree / total if total else float("nan")), total


def gold_agreement(rankings: list[list[int]], scores: list[list[float]]) -> float:
    """Share of pairs with different gold scores that the rankings order as the gold does."""
    agree = total = 0
    for ranking, gold in zip(rankings, scores, strict=True):
        place = _order(ranking)
        for i, j in combinations(range(len(ranking)), 2):
            if gold[i] != gold[j]:
                total += 1
                agree += (place[i] < place[j]) == (gold[i] > gold[j])
    return agree / total if total else float("nan")


def sft_like_sets(pairs: int, seed: int, k: int = 4) -> list[tuple[Prompt, list[str]]]:
    """``rank``-split prompts, each with up to ``k`` distinct labeler demonstrations (drawn from
    the SFT mix), enough of them to hold at least ``pairs`` response pairs."""
    rng = random.Random(f"chatrl-world:sft-like:{seed}")
    sets: list[tuple[Prompt, list[str]]] = []
    total, batch = 0, 0
    while total < pairs:
        for prompt in make_prompts(64, seed * 1000 + batch, "rank"):
            responses: list[str] = []
            for _ in range(20 * k):
                response = demonstration(prompt, demo_kind(prompt, rng), rng)
                if response not in responses:
                    responses.append(response)
                if len(responses) == k:
                    break
            if len(responses) >= 2:
                sets.append((prompt, responses))
                total += len(responses) * (len(responses) - 1) // 2
            if total >= pairs:
                break
        batch += 1
    return sets


def agreement_report(
    annotators: list[SimulatedAnnotator], sets: list[tuple[Prompt, list[str]]]
) -> dict[str, Any]:
    """Every annotator ranks every set: inter-annotator agreement (mean over annotator pairs;
    None with one annotator) and each annotator's agreement with the gold ordering."""
    rankings = {a.name: [a.rank(p, rs) for p, rs in sets] for a in annotators}
    gold = [[gold_score(p, r) for r in rs] for p, rs in sets]
    between = {
        f"{a.name} / {b.name}": pairwise_agreement(rankings[a.name], rankings[b.name])[0]
        for a, b in combinations(annotators, 2)
    }
    return {
        "pairs": sum(len(rs) * (len(rs) - 1) // 2 for _, rs in sets),
        "inter_annotator": sum(between.values()) / len(between) if between else None,
        "between": between,
        "with_gold": {name: gold_agreement(r, gold) for name, r in rankings.items()},
    }


def calibrate_noise(
    target: float = 0.73, pairs: int = 2000, seed: int = 0, repeats: int = 5
) -> float:
    """The noise at which the default annotators agree on ``target`` of the pairs
    (bisection; each point averages ``repeats`` annotator seeds)."""
    sets = sft_like_sets(pairs, seed)

    def agreement(noise: float) -> float:
        runs = [
            agreement_report(default_annotators(seed + r, noise), sets)["inter_annotator"]
            for r in range(repeats)
        ]
        return sum(runs) / len(runs)

    low, high = 0.01, 10.0
    for _ in range(25):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if agreement(mid) > target else (low, mid)
    return round(math.sqrt(low * high), 3)


def label_tasks(tasks: list[Task], annotators: list[SimulatedAnnotator]) -> list[Ranking]:
    """Rank each task's responses by one annotator, taking turns (as each InstructGPT
    comparison was labeled by one person). Tasks must carry the world's prompt meta."""
    rankings = []
    for i, task in enumerate(tasks):
        if not task.meta:
            raise UserError(
                f"task {i + 1} has no meta: simulated annotators only rank responses to "
                "prompts made by `chatrl world prompts`"
            )
        annotator = annotators[i % len(annotators)]
        order = annotator.rank(Prompt(task.prompt, task.meta), task.responses)
        rankings.append(
            Ranking(task.prompt, task.responses, order, annotator.name, dict(task.meta))
        )
    return rankings
