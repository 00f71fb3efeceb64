"""Reward-model comparisons/s: chatrl's trainer vs TRL 1.12's RewardTrainer, side by side.

Both sides train a reward model from the bench model (10.49 M parameters: a one-output score
head on its decoder) on the same 448 preference pairs (TRL's conversational
prompt/chosen/rejected format, prompts and responses of 3-9 words), batch 16 pairs, two
epochs, one after the other in child processes of this one, in one precision: by default bf16
autocast where the hardware runs bf16 natively, fp32 elsewhere (--precision forces one).
pairs/s = pairs trained on / training time. TRL's clock runs through `train()` (its
tokenisation happened before, in the trainer's constructor); chatrl's through its training
loop. chatrl's whole run (model loading and tokenisation before the loop, the normalisation
pass and saving after it) is reported too. Each side also reports pairs per CPU-second of its
process over the same span: on a busy shared machine the wall clock mostly measures the other
tenants, and CPU time (with OMP_NUM_THREADS=1, where no thread spins waiting) measures the
work each side does.

Also reported: TRL without gradient checkpointing (its default turns it on), and chatrl on
K = 4 rankings of the same kind of text (112 rankings, 8 per batch — 32 responses per forward
like 16 pairs — two epochs), counting K(K-1)/2 = 6 pairs per ranking: every ranking's
responses share one forward and their prompt is computed once.

    python bench/reward.py                    # prints a table, then one JSON line
    python bench/reward.py --reps 3           # three alternating rounds, medians (shared machine)
    python bench/reward.py --precision bf16   # bf16 even where it is emulated (slow)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

N_PAIRS, N_RANKINGS, K, BATCH, EPOCHS = 448, 112, 4, 16, 2
LEARNING_RATE = 1e-4


def run_chatrl(model: Path, data: Path, out: Path, batch: int, bf16: bool) -> dict[str, float]:
    from chatrl.config import RMConfig
    from chatrl.train import reward

    cfg = RMConfig(
        model=str(model), data=str(data), out=str(out), per_device_train_batch_size=batch,
        num_train_epochs=EPOCHS, bf16=bf16, save_steps=10**9, learning_rate=LEARNING_RATE,
        warmup_ratio=0.0,
    )  # fmt: skip
    loop, total = common.Clock(), common.Clock()
    total.start()
    with common.clocked_training_loop(loop):
        reward.train_reward(cfg)
    total.stop()
    return {"seconds": loop.wall, "cpu_seconds": loop.cpu, "whole_run": total.wall}


def run_trl(model_dir: Path, data: Path, out: Path, variant: str, bf16: bool) -> dict[str, float]:
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    clock = common.Clock()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    config = RewardConfig(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
        bf16=bf16, use_cpu=True, gradient_checkpointing=variant == "default", max_length=1024,
        learning_rate=LEARNING_RATE, report_to="none", save_strategy="no",
        logging_steps=10**9, dataloader_num_workers=0,
    )  # fmt: skip
    dataset = load_dataset("json", data_files=str(data), split="train")
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.add_callback(common.trl_clock(clock))
    trainer.train()
    return {"seconds": clock.wall, "cpu_seconds": clock.cpu}


def main(reps: int, precision: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    model, pairs, rankings = common.preference_data(work, N_PAIRS, N_RANKINGS, K)
    runs = [
        ("trl_default", pairs, N_PAIRS),
        ("trl_no-checkpointing", pairs, N_PAIRS),
        ("chatrl_pairs", pairs, N_PAIRS),
        ("chatrl_rankings-k4", rankings, N_RANKINGS * K * (K - 1) // 2),
    ]
    results = common.pairs_rounds(__file__, runs, model, precision, reps, EPOCHS)

    def ratio(a: str, b: str, key: str = "pairs_per_s") -> float:
        return round(results[a][key] / results[b][key], 2)

    summary = {
        "bench": "reward",
        "pairs": N_PAIRS * EPOCHS,
        "reps": reps,
        **results,
        "ratio_vs_trl_default": ratio("chatrl_pairs", "trl_default"),
        "ratio_vs_trl_no_checkpointing": ratio("chatrl_pairs", "trl_no-checkpointing"),
        "ratio_k4_vs_trl_default": ratio("chatrl_rankings-k4", "trl_default"),
        "ratio_cpu_vs_trl_default": ratio("chatrl_pairs", "trl_default", "pairs_per_cpu_s"),
        "ratio_whole_run_vs_trl_default": round(
            results["chatrl_pairs"]["pairs_per_s_whole_run"]
            / results["trl_default"]["pairs_per_s"],
            2,
        ),
    }
    print(
        f"medians over {reps} round(s), chatrl pairs / TRL 1.12 defaults: "
        f"{summary['ratio_vs_trl_default']}x wall-clock, {summary['ratio_cpu_vs_trl_default']}x "
        f"per CPU-second; / TRL without checkpointing: "
        f"{summary['ratio_vs_trl_no_checkpointing']}x; K=4 rankings / TRL defaults: "
        f"{summary['ratio_k4_vs_trl_default']}x"
    )
    common.print_result(summary, precision)


if __name__ == "__main__":
    parser = common.side_parser(__doc__)
    parser.add_argument("--reps", type=int, default=1, help="rounds of all four runs")
    args = parser.parse_args()
    precision = common.resolve_precision(args.precision, "bench/reward.py")
    if args.side:
        common.preference_side(args, precision, run_chatrl, run_trl, BATCH, K)
    else:
        main(args.reps, precision)
