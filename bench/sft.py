"""SFT tokens/s: chatrl's trainer vs TRL 1.12's SFTTrainer, same model, data, batch, precision.

Both sides train the same model on the same conversations of ~36 tokens, assistant-only loss
(TRL on the rows chatrl tokenises, so on the same tokens), one after the other in child
processes of this one, in one precision: by default bf16 autocast where the hardware runs bf16
natively, fp32 elsewhere (--precision forces one).
tokens/s = real (non-padding) tokens of the rows, prompts included, / training time: the
tokens every forward pass reads, as chatrl's progress bar counts them. Also reported: TRL
without gradient checkpointing (its default turns it on), chatrl with packing (its best
setting), and model FLOPs utilisation against the matmul peak of that precision, measured
now: 6 x the parameters that multiply (the head included, tied or not) per token for full
fine-tuning, 4 x with LoRA (no weight gradients; the adapters' own FLOPs are negligible).

    python bench/sft.py                      # the bench model (10.49 M), 1024 chats, batch 16
    python bench/sft.py --precision bf16     # bf16 even where it is emulated (slow)
    python bench/sft.py --model X.gguf       # a real model (directory or .gguf): 64 chats, batch 4
    python bench/sft.py --model X --lora     # LoRA (r 16, every linear layer) on both sides
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

# Conversations, batch and epochs: for the bench model, and for a real one (--model).
SIZES = {"bench": (1024, 16, 2), "real": (64, 4, 1)}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}


def prepare(work: Path, real_model: str | None, n: int) -> tuple[Path, Path, int]:
    """The model directory (the bench model, saved; or ``real_model`` resolved), the data file,
    and its token count."""
    from chatrl.chat_format import encode_conversation
    from chatrl.data import write_jsonl
    from chatrl.models import load_tokenizer, resolve_model

    if real_model:
        model_dir = Path(resolve_model(real_model))
        tokenizer = load_tokenizer(model_dir)
    else:
        model_dir = work / "model"
        tokenizer = common.bench_tokenizer()
        common.bench_model(tokenizer).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    convs = common.conversations(n)
    write_jsonl(work / "sft.jsonl", ({"messages": c} for c in convs))
    tokens = sum(len(encode_conversation(tokenizer, c, 1024).input_ids) for c in convs)
    return model_dir, work / "sft.jsonl", tokens


def matmul_parameters(model_dir: Path) -> int:
    """Parameters that multiply per token: all but the input embedding, plus the output head
    when it is tied to that embedding (it still multiplies)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    return total if tied else total - embedding.numel()


def run_chatrl(model: Path, data: Path, out: Path, packing: bool, bf16: bool, args) -> float:
    from chatrl.config import LMConfig
    from chatrl.train.lm import train_lm

    cfg = LMConfig(
        model=str(model),
        data=str(data),
        out=str(out),
        per_device_train_batch_size=args.batch,
        num_train_epochs=args.epochs,
        bf16=bf16,
        use_peft=args.lora,
        lora_r=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
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


def run_trl(model_dir: Path, data: Path, out: Path, checkpointing: bool, bf16: bool, args) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from chatrl.chat_format import encode_conversation
    from chatrl.data import read_jsonl

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
        per_device_train_batch_size=args.batch,
        num_train_epochs=args.epochs,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=checkpointing,
        max_length=1024,
        learning_rate=2e-5,
        report_to="none",
        save_strategy="no",
        logging_steps=10**9,
        dataloader_num_workers=0,
    )
    # chatrl's tokenised rows, labels on assistant tokens only: TRL trains on exactly the tokens
    # chatrl does, whatever the template (its own assistant_only_loss needs {% generation %}
    # markers, which SmolLM2's template lacks). Tokenising is outside both sides' clocks.
    rows = [encode_conversation(tokenizer, r["messages"], 1024) for _, r in read_jsonl(data)]
    dataset = Dataset.from_list([{"input_ids": r.input_ids, "labels": r.labels} for r in rows])
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(**LORA, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.add_callback(Clock())
    trainer.train()
    return Clock.end - Clock.start


def side(args, precision: str) -> None:
    out, bf16 = Path(tempfile.mkdtemp()), precision == "bf16"
    model, data = Path(args.model), Path(args.data)
    if args.side == "chatrl":
        seconds = run_chatrl(model, data, out / "o", args.variant == "packing", bf16, args)
    else:
        seconds = run_trl(model, data, out / "o", args.variant == "default", bf16, args)
    print(json.dumps({"seconds": seconds}))


def main(args, precision: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    model, data, tokens = prepare(work, args.model, args.conversations)
    flops_per_token = (4 if args.lora else 6) * matmul_parameters(model)
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
            "--model",  # the model's directory (a .gguf file resolved)
            str(model),
            "--data",
            str(data),
            "--precision",
            precision,
            *("--batch", str(args.batch), "--epochs", str(args.epochs)),
            *(["--lora"] if args.lora else []),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name} {variant} failed:\n{done.stderr[-3000:]}")
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        rate = tokens * args.epochs / seconds
        mfu = rate * flops_per_token / (peak * 1e9)
        results[f"{name}_{variant}"] = {"tokens_per_s": round(rate, 1), "mfu": round(mfu, 4)}
        print(f"{name:7s} {variant:17s} {rate:8.0f} tokens/s  MFU {mfu:.1%} of {precision} peak")
    base = results["trl_default"]["tokens_per_s"]
    summary = {
        "bench": "sft",
        "model": args.model or "bench",
        "lora": args.lora,
        "conversations": args.conversations,
        "batch": args.batch,
        "tokens": tokens * args.epochs,
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
    parser = common.side_parser(__doc__)  # --model: a real model, directory or .gguf
    parser.add_argument("--lora", action="store_true", help="LoRA on both sides")
    parser.add_argument("--conversations", type=int, help="default: 1024, or 64 with --model")
    parser.add_argument("--batch", type=int, help="default: 16, or 4 with --model")
    parser.add_argument("--epochs", type=float, help="default: 2, or 1 with --model")
    args = parser.parse_args()
    defaults = SIZES["real" if args.model else "bench"]
    for name, default in zip(("conversations", "batch", "epochs"), defaults, strict=True):
        setattr(args, name, getattr(args, name) or default)
    precision = common.resolve_precision(args.precision, "bench/sft.py")
    side(args, precision) if args.side else main(args, precision)
