"""Reward-model comparisons/s: chatrl's trainer vs TRL 1.12's RewardTrainer, side by side.

Both sides train a reward model from the bench model (10.49 M parameters: a one-output score
head on its decoder) on the same 448 preference pairs (TRL's conversational
prompt/chosen/rejected format, prompts and responses of 3-9 words), batch 16 pairs, bf16
autocast, two epochs, one after the other in child processes of this one.
pairs/s = pairs trained on / training time (chatrl's clock includes its setup: a fair,
slightly pessimistic bound; TRL's starts at `train()`).

Also reported: TRL without gradient checkpointing (its default turns it on), and chatrl on
K = 4 rankings of the same kind of text (112 rankings, 8 per batch — 32 responses per forward
like 16 pairs — two epochs), counting K(K-1)/2 = 6 pairs per ranking: every ranking's
responses share one forward and their prompt is computed once.

    python bench/reward.py            # prints a table, then one JSON line
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

N_PAIRS, N_RANKINGS, K, BATCH, EPOCHS = 448, 112, 4, 16, 2
LEARNING_RATE = 1e-4


def user(rng: random.Random) -> list[dict[str, str]]:
    return [{"role": "user", "content": common.sentence(rng, rng.randint(3, 6))}]


def assistant(rng: random.Random) -> str:
    return common.sentence(rng, rng.randint(3, 8))


def prepare(work: Path) -> tuple[Path, Path, Path]:
    """The bench model directory, the pairs file and the rankings file."""
    from chatrl.data import write_jsonl

    tokenizer = common.bench_tokenizer()
    model = common.bench_model(tokenizer)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    rng = random.Random(0)
    pairs = []
    for _ in range(N_PAIRS):
        chosen, rejected = assistant(rng), assistant(rng)
        pairs.append(
            {
                "prompt": user(rng),
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    write_jsonl(work / "pairs.jsonl", pairs)
    rankings = []
    for _ in range(N_RANKINGS):
        order = list(range(K))
        rng.shuffle(order)
        prompt = user(rng)
        rankings.append(
            {"prompt": prompt, "responses": [assistant(rng) for _ in range(K)], "ranking": order}
        )
    write_jsonl(work / "rankings.jsonl", rankings)
    return work / "model", work / "pairs.jsonl", work / "rankings.jsonl"


def run_chatrl(model: Path, data: Path, out: Path, batch: int) -> float:
    from chatrl.config import RMConfig
    from chatrl.train.reward import train_reward

    cfg = RMConfig(
        model=str(model), data=str(data), out=str(out), per_device_train_batch_size=batch,
        num_train_epochs=EPOCHS, bf16=True, save_steps=10**9, learning_rate=LEARNING_RATE,
        warmup_ratio=0.0,
    )  # fmt: skip
    start = time.time()  # the metrics log's clock
    train_reward(cfg)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The last step's record: setup included, the normalisation pass after training not.
    return log[-1]["time"] - start


def run_trl(model_dir: Path, data: Path, out: Path, checkpointing: bool) -> float:
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    class Clock(TrainerCallback):
        start = end = 0.0

        def on_train_begin(self, *args, **kwargs):
            Clock.start = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            Clock.end = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    config = RewardConfig(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
        bf16=True, use_cpu=True, gradient_checkpointing=checkpointing, max_length=1024,
        learning_rate=LEARNING_RATE, report_to="none", save_strategy="no",
        logging_steps=10**9, dataloader_num_workers=0,
    )  # fmt: skip
    dataset = load_dataset("json", data_files=str(data), split="train")
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.add_callback(Clock())
    trainer.train()
    return Clock.end - Clock.start


def side(args) -> None:
    out = Path(tempfile.mkdtemp()) / "o"
    if args.side == "chatrl":
        batch = BATCH if args.variant == "pairs" else BATCH * 2 // K
        seconds = run_chatrl(Path(args.model), Path(args.data), out, batch)
    else:
        seconds = run_trl(Path(args.model), Path(args.data), out, args.variant == "default")
    print(json.dumps({"seconds": seconds}))


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    model, pairs, rankings = prepare(work)
    runs = [
        ("trl", "default", pairs, N_PAIRS),
        ("trl", "no-checkpointing", pairs, N_PAIRS),
        ("chatrl", "pairs", pairs, N_PAIRS),
        ("chatrl", "rankings-k4", rankings, N_RANKINGS * K * (K - 1) // 2),
    ]
    results = {}
    for name, variant, data, n_pairs in runs:
        cmd = [sys.executable, __file__, "--side", name, "--variant", variant]
        cmd += ["--model", str(model), "--data", str(data)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name} {variant} failed:\n{done.stderr[-3000:]}")
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        rate = n_pairs * EPOCHS / seconds
        results[f"{name}_{variant}"] = {"pairs_per_s": round(rate, 1), "seconds": round(seconds, 2)}
        print(
            f"{name:7s} {variant:17s} {rate:8.1f} pairs/s  "
            f"({n_pairs} pairs x {EPOCHS} epochs in {seconds:.1f} s)"
        )
    base = results["trl_default"]["pairs_per_s"]
    summary = {
        "bench": "reward",
        "pairs": N_PAIRS * EPOCHS,
        **results,
        "ratio_vs_trl_default": round(results["chatrl_pairs"]["pairs_per_s"] / base, 2),
        "ratio_vs_trl_no_checkpointing": round(
            results["chatrl_pairs"]["pairs_per_s"] / results["trl_no-checkpointing"]["pairs_per_s"],
            2,
        ),
        "ratio_k4_vs_trl_default": round(results["chatrl_rankings-k4"]["pairs_per_s"] / base, 2),
    }
    print(
        f"chatrl / TRL 1.12 (defaults), pairs: {summary['ratio_vs_trl_default']}x; "
        f"vs TRL without checkpointing: {summary['ratio_vs_trl_no_checkpointing']}x; "
        f"chatrl K=4 rankings / TRL: {summary['ratio_k4_vs_trl_default']}x"
    )
    common.print_result(summary)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--side", choices=["chatrl", "trl"])
    parser.add_argument("--variant")
    parser.add_argument("--model")
    parser.add_argument("--data")
    args = parser.parse_args()
    side(args) if args.side else main()
