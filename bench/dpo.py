"""DPO pairs/s: chatrl's trainer vs TRL 1.12's DPOTrainer, side by side.

Both sides fine-tune the whole bench model (10.49 M parameters) with the sigmoid DPO loss
(β = 0.1) on the same 448 preference pairs as bench/reward.py (TRL's conversational
prompt/chosen/rejected format, prompts and responses of 3-9 words), batch 16 pairs, one
epoch, one after the other in child processes of this one, in one precision: by default bf16
autocast where the hardware runs bf16 natively, fp32 elsewhere (--precision forces one).

pairs/s = pairs trained on / (the reference pass + the training loop). chatrl's clock starts
at its reference pass (its log-probs for every response, once) and stops when its training
loop ends; TRL's runs through `train()`, plus, where it precomputes the reference log-probs
(`precompute_ref_log_probs=True`, done in its constructor), that pass. Tokenisation and model
loading are outside both clocks; chatrl's whole run (loading, tokenisation, saving) is
reported too. Pairs per CPU-second of each process over the same span are also given (on a
busy shared machine the wall clock mostly measures the other tenants).

TRL runs three ways: its defaults (a reference forward every step, gradient checkpointing
on), without gradient checkpointing, and with precomputed reference log-probs and no
checkpointing (its fastest here). chatrl also runs on K = 4 rankings of the same kind of text
(112 rankings, 8 per batch: 32 responses per forward like 16 pairs), counting K(K-1)/2 = 6
pairs per ranking: every response of a ranking goes through the model once, its prompt once.

    python bench/dpo.py                    # prints a table, then one JSON line
    python bench/dpo.py --reps 3           # three alternating rounds, medians (shared machine)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

N_PAIRS, N_RANKINGS, K, BATCH, EPOCHS = 448, 112, 4, 16, 1
LEARNING_RATE, BETA = 1e-5, 0.1
TRL_VARIANTS = {  # name: (gradient checkpointing, precomputed reference log-probs)
    "default": (True, False),
    "no-checkpointing": (False, False),
    "precomputed-ref": (False, True),
}


def run_chatrl(model: Path, data: Path, out: Path, batch: int, bf16: bool) -> dict[str, float]:
    from chatrl.config import DPOConfig
    from chatrl.train import dpo

    cfg = DPOConfig(
        model=str(model), data=str(data), out=str(out), per_device_train_batch_size=batch,
        num_train_epochs=EPOCHS, bf16=bf16, save_steps=10**9, learning_rate=LEARNING_RATE,
        warmup_ratio=0.0, beta=BETA,
    )  # fmt: skip
    loop, total = common.Clock(), common.Clock()
    reference = dpo.reference_logprobs

    def timed_reference(*args, **kwargs):  # the first pass (training rankings) starts the clock
        if not loop.started:
            loop.start()
        return reference(*args, **kwargs)

    dpo.reference_logprobs = timed_reference
    total.start()
    with common.clocked_training_loop(loop):
        dpo.train_dpo(cfg)
    total.stop()
    return {"seconds": loop.wall, "cpu_seconds": loop.cpu, "whole_run": total.wall}


def run_trl(model_dir: Path, data: Path, out: Path, variant: str, bf16: bool) -> dict[str, float]:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    checkpointing, precompute = TRL_VARIANTS[variant]
    clock = common.Clock()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
        bf16=bf16, use_cpu=True, gradient_checkpointing=checkpointing, max_length=1024,
        learning_rate=LEARNING_RATE, beta=BETA, loss_type=["sigmoid"],
        precompute_ref_log_probs=precompute, report_to="none", save_strategy="no",
        logging_steps=10**9, dataloader_num_workers=0,
    )  # fmt: skip
    dataset = load_dataset("json", data_files=str(data), split="train")
    reference = DPOTrainer._precompute_ref_logps

    def timed_reference(self, *args, **kwargs):  # in the constructor, after tokenisation
        clock.start()
        return reference(self, *args, **kwargs)

    DPOTrainer._precompute_ref_logps = timed_reference
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.add_callback(common.trl_clock(clock))
    trainer.train()
    return {"seconds": clock.wall, "cpu_seconds": clock.cpu}


def main(reps: int, precision: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    model, pairs, rankings = common.preference_data(work, N_PAIRS, N_RANKINGS, K)
    runs = [
        *((f"trl_{variant}", pairs, N_PAIRS) for variant in TRL_VARIANTS),
        ("chatrl_pairs", pairs, N_PAIRS),
        ("chatrl_rankings-k4", rankings, N_RANKINGS * K * (K - 1) // 2),
    ]
    results = common.pairs_rounds(__file__, runs, model, precision, reps, EPOCHS)

    def ratio(a: str, b: str, key: str = "pairs_per_s") -> float:
        return round(results[a][key] / results[b][key], 2)

    summary = {
        "bench": "dpo",
        "pairs": N_PAIRS * EPOCHS,
        "reps": reps,
        **results,
        **{
            f"ratio_vs_trl_{variant}": ratio("chatrl_pairs", f"trl_{variant}")
            for variant in TRL_VARIANTS
        },
        "ratio_cpu_vs_trl_default": ratio("chatrl_pairs", "trl_default", "pairs_per_cpu_s"),
        "ratio_k4_vs_trl_default": ratio("chatrl_rankings-k4", "trl_default"),
    }
    print(
        f"medians over {reps} round(s), chatrl pairs / TRL 1.12: defaults "
        f"{summary['ratio_vs_trl_default']}x wall-clock ({summary['ratio_cpu_vs_trl_default']}x "
        f"per CPU-second), no checkpointing {summary['ratio_vs_trl_no-checkpointing']}x, "
        f"precomputed reference {summary['ratio_vs_trl_precomputed-ref']}x; K=4 rankings / "
        f"TRL defaults: {summary['ratio_k4_vs_trl_default']}x"
    )
    common.print_result(summary, precision)


if __name__ == "__main__":
    parser = common.side_parser(__doc__)
    parser.add_argument("--reps", type=int, default=1, help="rounds of all five runs")
    args = parser.parse_args()
    precision = common.resolve_precision(args.precision, "bench/dpo.py")
    if args.side:
        common.preference_side(args, precision, run_chatrl, run_trl, BATCH, K)
    else:
        main(args.reps, precision)
