"""Does a reward model tell a right answer from a wrong one? A probe in the bundled world.

For world prompts with one exact answer (arithmetic, lists, facts, text), it pairs the
perfect response with the labelers' wrong one: the same sentence with a plausible wrong answer
(off by one, another capital, two numbers swapped in a sort…), as in the flawed SFT
demonstrations. It keeps the pairs the gold labeler scores right above wrong and reports by
family the share the reward model scores right above wrong, its mean margin (normalised
reward), and the share the simulated annotators it learned from rank right first. Style,
length and format are the same on both sides: only correctness differs.

    python bench/reward_correctness.py runs/demo/rm               # rank and heldout splits
    python bench/reward_correctness.py runs/demo/rm --prompts 3000

Prints a table, then one JSON line. The reward model scores in bf16 where the hardware runs it
natively, fp32 elsewhere (--precision forces one).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from chatrl.data import Prompt  # noqa: E402
from chatrl.reward_model import RewardScorer  # noqa: E402
from chatrl.world import DEMO_MIX, gold_score, make_prompts  # noqa: E402
from chatrl.world.annotators import default_annotators  # noqa: E402
from chatrl.world.tasks import demonstration, perfect_text  # noqa: E402


def pairs(prompts: list[Prompt], seed: int) -> list[tuple[Prompt, str, str]]:
    """(prompt, right, wrong): the perfect answer and the labelers' wrong one (the same sentence
    with a plausible wrong answer), for the prompts the gold labeler scores right above wrong."""
    rng = random.Random(seed)
    found = []
    for prompt in prompts:
        if "wrong" not in DEMO_MIX[prompt.meta.get("base_family", prompt.meta["family"])]:
            continue  # no single right answer to get wrong (small talk, safety)
        right, wrong = perfect_text(prompt.meta), demonstration(prompt, "wrong", rng)
        if gold_score(prompt, right) > gold_score(prompt, wrong):
            found.append((prompt, right, wrong))
    return found


def probe(scorer: RewardScorer, found, seed: int) -> dict[str, dict[str, float]]:
    messages = [p.messages for p, _, _ in found]
    right = scorer.score(messages, [r for _, r, _ in found])
    wrong = scorer.score(messages, [w for _, _, w in found])
    team = default_annotators(seed)
    by_family: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for i, (prompt, r, w) in enumerate(found):
        annotators = sum(a.rank(prompt, [r, w])[0] == 0 for a in team) / len(team)
        margin = (right[i] - wrong[i]).item()
        family = prompt.meta.get("base_family", prompt.meta["family"])
        by_family[family].append((float(margin > 0), margin, annotators))
    by_family["all"] = [row for rows in list(by_family.values()) for row in rows]
    return {
        family: {
            "pairs": len(rows),
            "rm_right_first": sum(r[0] for r in rows) / len(rows),
            "rm_margin": sum(r[1] for r in rows) / len(rows),
            "annotators_right_first": sum(r[2] for r in rows) / len(rows),
        }
        for family, rows in sorted(by_family.items())
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reward_model", help="a reward model directory (`chatrl rm` output)")
    parser.add_argument("--prompts", type=int, default=2000, help="world prompts per split")
    parser.add_argument("--seed", type=int, default=0)
    common.add_precision(parser)
    args = parser.parse_args()
    precision = common.resolve_precision(args.precision, "bench/reward_correctness.py")

    scorer = RewardScorer(args.reward_model, bf16=precision == "bf16")
    results = {}
    print(
        f"{'split':>8} {'family':>11} {'pairs':>6} {'RM right>wrong':>15} {'margin':>7} "
        f"{'annotators':>11}"
    )
    for split in ("rank", "heldout"):
        found = pairs(make_prompts(args.prompts, args.seed, split), args.seed)
        results[split] = probe(scorer, found, args.seed)
        for family, r in results[split].items():
            print(
                f"{split:>8} {family:>11} {r['pairs']:>6} {r['rm_right_first']:>15.3f} "
                f"{r['rm_margin']:>+7.3f} {r['annotators_right_first']:>11.3f}"
            )
    common.print_result(
        {"bench": "reward_correctness", "reward_model": args.reward_model, "results": results},
        precision,
    )


if __name__ == "__main__":
    main()
