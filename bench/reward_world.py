"""Reward-model quality in the bundled world: held-out agreement with the gold labeler.

The InstructGPT data flow, end to end: an SFT model (given with --sft, or built here: world
text -> new model -> pretraining -> SFT on the world's flawed demonstrations) samples K = 4
responses per prompt; the simulated annotators rank them (each task by one annotator, in
turn, as in InstructGPT); `chatrl rm` trains on the rankings. Then, on the samples for
held-out prompts (the world's `heldout` split, disjoint from every training prompt), it
measures the share of response pairs with different gold scores that the reward model orders
as the gold labeler does — next to the same share for every annotator ranking those same sets.
Also: pairwise accuracy against the annotators' held-out rankings, and the mean normalised
reward by family and verdict (does it punish harmful compliance and over-refusal?).

    python bench/reward_world.py                 # builds everything under --work
    python bench/reward_world.py --sft runs/demo/sft

Prints a table, then one JSON line. Sizes default to the demo's; it takes a while on a CPU.
Training and scoring run in bf16 where the hardware runs it natively, fp32 elsewhere
(--precision forces one); sampling runs in fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from chatrl.config import LMConfig, RMConfig  # noqa: E402
from chatrl.data import Prompt, Task, load_tasks, write_jsonl  # noqa: E402
from chatrl.engine import SamplingParams  # noqa: E402
from chatrl.models import init_model  # noqa: E402
from chatrl.reward_model import RewardScorer  # noqa: E402
from chatrl.sample import sample_tasks  # noqa: E402
from chatrl.train.lm import train_lm  # noqa: E402
from chatrl.train.reward import train_reward  # noqa: E402
from chatrl.world import make_prompts, pretrain_text, sft_conversations  # noqa: E402
from chatrl.world.annotators import default_annotators, gold_agreement, label_tasks  # noqa: E402
from chatrl.world.judge import judge  # noqa: E402


def build_sft(work: Path, args, bf16: bool) -> Path:
    """A small model pretrained on the world's text and fine-tuned on its demonstrations."""
    if (work / "sft" / "config.json").exists():
        return work / "sft"
    texts = pretrain_text(args.docs, args.seed)
    (work / "text.txt").write_text("\n".join(texts) + "\n")
    init_model(args.preset, texts, work / "init", seed=args.seed)
    train_lm(
        LMConfig(
            model=str(work / "init"), data=str(work / "text.txt"), out=str(work / "pretrained"),
            max_steps=args.pretrain_steps, per_device_train_batch_size=32, max_length=128,
            learning_rate=3e-3, seed=args.seed, bf16=bf16,
        ),
        "pretrain",
    )  # fmt: skip
    write_jsonl(
        work / "sft.jsonl", ({"messages": m} for m in sft_conversations(args.demos, args.seed))
    )
    train_lm(
        LMConfig(
            model=str(work / "pretrained"), data=str(work / "sft.jsonl"), out=str(work / "sft"),
            num_train_epochs=2, learning_rate=1e-3, seed=args.seed, bf16=bf16,
        ),
        "sft",
    )  # fmt: skip
    return work / "sft"


def sampled(sft: Path, work: Path, name: str, prompts: list[Prompt], seed: int) -> list[Task]:
    """K = 4 samples per prompt (duplicates dropped: rankings need distinct responses)."""
    path = work / f"{name}-tasks.jsonl"
    if not path.exists():
        write_jsonl(work / f"{name}-prompts.jsonl", (p.to_json() for p in prompts))
        params = SamplingParams(max_new_tokens=48, temperature=1.0, seed=seed)
        sample_tasks(sft, work / f"{name}-prompts.jsonl", path, 4, params)
    tasks = []
    for task in load_tasks(path):
        distinct = list(dict.fromkeys(task.responses))
        if len(distinct) >= 2:
            tasks.append(Task(task.prompt, distinct, meta=task.meta))
    return tasks


def rank_by(rewards: list[float]) -> list[int]:
    return sorted(range(len(rewards)), key=lambda i: -rewards[i])


def reward_by_verdict(tasks: list[Task], rewards: list[list[float]]) -> dict[str, dict]:
    """Mean normalised reward of harmful compliance vs refusal, over-refusal vs answering."""
    cells: dict[str, list[float]] = defaultdict(list)
    for task, scores in zip(tasks, rewards, strict=True):
        prompt = Prompt(task.prompt, task.meta)
        for response, reward in zip(task.responses, scores, strict=True):
            verdict = judge(prompt, response)
            if verdict.family == "harmful":
                cells["harmful: refused" if verdict.correct else "harmful: complied"].append(reward)
            else:
                kind = (
                    "over-refused" if verdict.refused else "right" if verdict.correct else "wrong"
                )
                cells[f"{verdict.family}: {kind}"].append(reward)
    return {k: {"n": len(v), "mean_reward": sum(v) / len(v)} for k, v in sorted(cells.items())}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sft", type=Path, help="SFT model directory (default: build one)")
    parser.add_argument("--work", type=Path, default=Path("runs/reward-world"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--demos", type=int, default=4000)
    parser.add_argument("--train-prompts", type=int, default=1000)
    parser.add_argument("--heldout-prompts", type=int, default=300)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    common.add_precision(parser)
    args = parser.parse_args()
    precision = common.resolve_precision(args.precision, "bench/reward_world.py")
    bf16 = precision == "bf16"
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    sft = args.sft or build_sft(work, args, bf16)
    train_tasks = sampled(
        sft, work, "train", make_prompts(args.train_prompts, args.seed, "rank"), args.seed
    )
    held_tasks = sampled(
        sft,
        work,
        "heldout",
        make_prompts(args.heldout_prompts, args.seed, "heldout"),
        args.seed + 1,
    )
    annotators = default_annotators(args.seed)
    write_jsonl(
        work / "rankings.jsonl", (r.to_json() for r in label_tasks(train_tasks, annotators))
    )
    write_jsonl(
        work / "heldout-rankings.jsonl", (r.to_json() for r in label_tasks(held_tasks, annotators))
    )
    rm = train_reward(
        RMConfig(
            model=str(sft), data=str(work / "rankings.jsonl"), out=str(work / "rm"),
            eval_data=str(work / "heldout-rankings.jsonl"), num_train_epochs=args.epochs,
            learning_rate=args.learning_rate, seed=args.seed, bf16=bf16,
        )
    )  # fmt: skip

    scorer = RewardScorer(rm, bf16=bf16)
    flat = scorer.score(
        [t.prompt for t in held_tasks for _ in t.responses],
        [r for t in held_tasks for r in t.responses],
    ).tolist()
    rewards, offset = [], 0
    for task in held_tasks:
        rewards.append(flat[offset : offset + len(task.responses)])
        offset += len(task.responses)
    prompts = [Prompt(t.prompt, t.meta) for t in held_tasks]
    gold = [
        [judge(p, r).score for r in t.responses] for p, t in zip(prompts, held_tasks, strict=True)
    ]
    rm_agreement = gold_agreement([rank_by(r) for r in rewards], gold)
    annotator_agreement = {
        # A fresh copy of each annotator ranks every held-out set.
        a.name: gold_agreement(
            [a.rank(p, t.responses) for p, t in zip(prompts, held_tasks, strict=True)], gold
        )
        for a in default_annotators(args.seed + 1)
    }
    best = max(annotator_agreement.values())
    held_out = json.loads((rm / "eval.json").read_text())["eval"]["all"]
    verdicts = reward_by_verdict(held_tasks, rewards)

    print(f"SFT model {sft}; {len(train_tasks)} training rankings, {len(held_tasks)} held-out sets")
    print(f"reward model agreement with the gold ordering (held-out): {rm_agreement:.1%}")
    for name, value in annotator_agreement.items():
        print(f"  annotator {name:<16} {value:.1%}")
    print(f"gap to the best annotator: {100 * (best - rm_agreement):+.1f} points (target <= 5)")
    print(
        f"pairwise accuracy against the annotators' held-out rankings: {held_out['accuracy']:.1%}"
    )
    for key, cell in verdicts.items():
        print(f"  {key:<28} mean reward {cell['mean_reward']:+.2f}  (n={cell['n']})")
    common.print_result(
        {
            "bench": "reward_world",
            "sft": str(sft),
            "train_rankings": len(train_tasks),
            "heldout_sets": len(held_tasks),
            "rm_gold_agreement": round(rm_agreement, 4),
            "annotator_gold_agreement": {k: round(v, 4) for k, v in annotator_agreement.items()},
            "gap_points": round(100 * (best - rm_agreement), 1),
            "rm_accuracy_vs_annotators": round(held_out["accuracy"], 4),
            "reward_by_verdict": verdicts,
            "seconds": round(time.perf_counter() - started),
        },
        precision,
    )


if __name__ == "__main__":
    main()
