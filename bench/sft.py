"""SFT tokens/s: chatrl's trainer vs TRL 1.12's SFTTrainer, same model, data, batch, precision.

Both sides train the bench model (10.49 M parameters) on the same 1024 conversations of ~36
tokens, batch 16, assistant-only loss, two epochs, one after the other in child processes of
this one, in one precision: by default bf16 autocast where the hardware runs bf16 natively,
fp32 elsewhere (--precision forces one). tokens/s = real (non-padding) tokens trained on /
training time. Also reported: TRL without gradient checkpointing (its default turns it on),
chatrl with packing (its best setting), and model FLOPs utilisation against the matmul peak of
that precision, measured now.

    python bench/sft.py                    # prints a table, then one JSON line
    python bench/sft.py --precision bf16   # bf16 even where it is emulated (slow)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

N_CONVERSATIONS, BATCH, EPOCHS = 1024, 16, 2


def prepare(work: Path) -> tuple[Path, Path, int]:
    """The bench model directory, the data file, and its token count."""
    from chatrl.chat_format import encode_conversation
    from chatrl.data import write_jsonl

    tokenizer = common.bench_tokenizer()
    model = common.bench_model(tokenizer)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    convs = common.conversations(N_CONVERSATIONS)
    write_jsonl(work / "sft.jsonl", ({"messages": c} for c in convs))
    tokens = sum(len(encode_conversation(tokenizer, c, 1024).input_ids) for c in convs)
    return work / "model", work / "sft.jsonl", tokens


def run_chatrl(model: Path, data: Path, out: Path, packing: bool, bf16: bool) -> float:
    from chatrl.config import LMConfig
    from chatrl.train.lm import train_lm

    cfg = LMConfig(
        model=str(model),
        data=str(data),
        out=str(out),
        per_device_train_batch_size=BATCH,
        num_train_epochs=EPOCHS,
        bf16=bf16,
        packing=packing,
        max_length=576 if packing else 1024,
        save_steps=10**9,
        learning_rate=2e-5,
        warmup_ratio=0.0,
    )
    start = time.time()  # the metrics log stamps records with time.time()
    train_lm(cfg, "sft")
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_seconds = log[-1]["time"] - start  # includes setup: a fair, slightly pessimistic bound
    return train_seconds


def run_trl(model_dir: Path, data: Path, out: Path, checkpointing: bool, bf16: bool) -> float:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Clock(TrainerCallback):
        start = end = 0.0

        def on_train_begin(self, *args, **kwargs):
            Clock.start = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            Clock.end = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        num_train_epochs=EPOCHS,
        bf16=bf16,
        use_cpu=True,
        gradient_checkpointing=checkpointing,
        assistant_only_loss=True,
        max_length=1024,
        learning_rate=2e-5,
        report_to="none",
        save_strategy="no",
        logging_steps=10**9,
        dataloader_num_workers=0,
    )
    dataset = load_dataset("json", data_files=str(data), split="train")
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.add_callback(Clock())
    trainer.train()
    return Clock.end - Clock.start


def side(args, precision: str) -> None:
    out, bf16 = Path(tempfile.mkdtemp()), precision == "bf16"
    model, data = Path(args.model), Path(args.data)
    if args.side == "chatrl":
        seconds = run_chatrl(model, data, out / "o", args.variant == "packing", bf16)
    else:
        seconds = run_trl(model, data, out / "o", args.variant == "default", bf16)
    print(json.dumps({"seconds": seconds}))


def main(precision: str) -> None:
    from chatrl.models import count_parameters

    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    model, data, tokens = prepare(work)
    lm = common.bench_model(common.bench_tokenizer())
    # Model FLOPs per token: 6 x parameters that multiply (all but the input embedding).
    flops_per_token = 6 * (count_parameters(lm) - lm.get_input_embeddings().weight.numel())
    peak = common.matmul_peak(common.DTYPES[precision])
    runs = [
        ("trl", "default"),
        ("trl", "no-checkpointing"),
        ("chatrl", "padded"),
        ("chatrl", "packing"),
    ]
    results = {}
    for name, variant in runs:
        cmd = [
            sys.executable,
            __file__,
            "--side",
            name,
            "--variant",
            variant,
            "--model",
            str(model),
            "--data",
            str(data),
            "--precision",
            precision,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name} {variant} failed:\n{done.stderr[-3000:]}")
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        rate = tokens * EPOCHS / seconds
        mfu = rate * flops_per_token / (peak * 1e9)
        results[f"{name}_{variant}"] = {"tokens_per_s": round(rate, 1), "mfu": round(mfu, 4)}
        print(f"{name:7s} {variant:17s} {rate:8.0f} tokens/s  MFU {mfu:.1%} of {precision} peak")
    base = results["trl_default"]["tokens_per_s"]
    summary = {
        "bench": "sft",
        "tokens": tokens * EPOCHS,
        "matmul_peak_gflops": {precision: round(peak, 1)},
        **results,
        "ratio_vs_trl_default": round(results["chatrl_padded"]["tokens_per_s"] / base, 2),
        "ratio_vs_trl_no_checkpointing": round(
            results["chatrl_padded"]["tokens_per_s"]
            / results["trl_no-checkpointing"]["tokens_per_s"],
            2,
        ),
        "ratio_packing_vs_trl_default": round(results["chatrl_packing"]["tokens_per_s"] / base, 2),
    }
    print(
        f"chatrl / TRL 1.12 (defaults): {summary['ratio_vs_trl_default']}x; "
        f"vs TRL without checkpointing: {summary['ratio_vs_trl_no_checkpointing']}x; "
        f"chatrl packed / TRL: {summary['ratio_packing_vs_trl_default']}x"
    )
    common.print_result(summary, precision)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--side", choices=["chatrl", "trl"])
    parser.add_argument("--variant")
    parser.add_argument("--model")
    parser.add_argument("--data")
    common.add_precision(parser)
    args = parser.parse_args()
    precision = common.resolve_precision(args.precision, "bench/sft.py")
    side(args, precision) if args.side else main(precision)
