"""PPO samples/s: chatrl's trainer vs TRL 1.12's ``trl.experimental.ppo.PPOTrainer``.

Identical settings on both sides: the bench policy (10.49 M parameters), a reward model and a
value model built from the same config (the decoder with a one-output head, 8.4 M, started
from the policy's weights), 256 prompts of about 22 tokens (the same token ids), 16 prompts
per update, one response each of up to 32 tokens at temperature 1, one PPO epoch of one
mini-batch, KL coefficient 0.05, the same learning rate, fp32 (TRL's bf16 switch has no
effect on a CPU). The sides run one after the other, each in a child process of this one;
where the precision chosen is bf16 (by default where the hardware runs bf16 natively;
--precision bf16 forces it), chatrl also runs a second time with bf16 autocast.

samples/s = responses of updates 2–16 / the wall time they took (the first update warms up);
CPU s/update is the process's CPU time over the same updates, which a busy machine inflates
far less than wall time (with --threads 1 not at all: no thread waits for another). chatrl's
time per update is broken down into generate / score (reward model) / forward (reference
log-probs and values) / train.

    python bench/ppo.py                    # prints a table, then one JSON line
    python bench/ppo.py --threads 1        # one torch thread per side: CPU times comparable
    python bench/ppo.py --precision fp32   # without chatrl's bf16 run
    python bench/ppo.py --model SmolLM2-135M-Instruct.Q4_1.gguf --updates 4 --threads 1

``--model PATH`` (a directory or .gguf file) puts a real model in the bench model's place: the
policy is that model with LoRA on both sides (chatrl's defaults: rank 16, alpha 32, every
linear layer; the reference is the policy with its adapters off), the reward and value models
its backbone with a one-output head, fully trained as before. ``--updates N`` runs N updates
(default 16).
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

PROMPTS, BATCH, RESPONSE, LEARNING_RATE, KL_COEF = 256, 16, 32, 3e-6, 0.05
PHASES = ["generate", "score", "forward", "train"]


def prepare(work: Path, model_path: str | None = None) -> None:
    """The policy (the bench model, or ``model_path``'s) and reward-model directories and the
    prompts, under ``work``."""
    from chatrl.data import write_jsonl
    from chatrl.models import load_reward_model, save_model

    model, tokenizer = common.load_bench_model(model_path)
    save_model(model, tokenizer, work / "policy")
    reward, reward_tokenizer = load_reward_model(work / "policy")
    save_model(reward, reward_tokenizer, work / "reward")
    rng = random.Random(0)
    prompts = [
        {"messages": [{"role": "user", "content": common.sentence(rng, rng.randint(3, 7))}]}
        for _ in range(PROMPTS)
    ]
    write_jsonl(work / "prompts.jsonl", prompts)


def prompt_ids(work: Path) -> list[list[int]]:
    from chatrl.chat_format import encode_prompt
    from chatrl.data import load_prompts
    from chatrl.models import load_tokenizer

    tokenizer = load_tokenizer(work / "policy")
    return [encode_prompt(tokenizer, p.messages) for p in load_prompts(work / "prompts.jsonl")]


def run_chatrl(work: Path, bf16: bool, lora: bool, updates: int) -> dict:
    from chatrl.config import PPOConfig
    from chatrl.train.ppo import train_ppo

    out = work / ("chatrl-bf16" if bf16 else "chatrl")
    cfg = PPOConfig(
        policy=str(work / "policy"),
        reward=str(work / "reward"),
        prompts=str(work / "prompts.jsonl"),
        out=str(out),
        rollout_batch_size=BATCH,
        num_ppo_epochs=1,
        num_mini_batches=1,
        response_length=RESPONSE,
        temperature=1.0,
        kl_coef=KL_COEF,
        learning_rate=LEARNING_RATE,
        value_learning_rate=LEARNING_RATE,
        use_peft=lora,
        max_steps=updates,
        bf16=bf16,
    )
    stamps: list[tuple[float, float]] = []

    def clock(metas, responses, stopped) -> dict[str, float]:
        stamps.append((time.perf_counter(), time.process_time()))  # once per update
        return {}

    train_ppo(cfg, rollout_metrics=clock)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = log[1:]
    return {
        "stamps": stamps,
        "phases": {p: sum(r[f"time_{p}"] for r in timed) / len(timed) for p in PHASES},
        "response_length": sum(r["response_length"] for r in log) / len(log),
        "first_ratio": log[0]["ratio"],
    }


def run_trl(work: Path, lora: bool, updates: int) -> dict:
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    stamps: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            stamps.append((time.perf_counter(), time.process_time()))

    tokenizer = AutoTokenizer.from_pretrained(work / "policy", padding_side="left")
    ids = prompt_ids(work)
    policy = AutoModelForCausalLM.from_pretrained(work / "policy")
    reference = None if lora else AutoModelForCausalLM.from_pretrained(work / "policy")
    reward = AutoModelForSequenceClassification.from_pretrained(work / "reward", num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(work / "reward", num_labels=1)
    args = PPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        num_ppo_epochs=1,
        num_mini_batches=1,
        response_length=RESPONSE,
        temperature=1.0,
        total_episodes=updates * BATCH,
        local_rollout_forward_batch_size=BATCH,
        kl_coef=KL_COEF,
        learning_rate=LEARNING_RATE,
        stop_token="eos",
        bf16=False,
        num_sample_generations=0,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        seed=0,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward,
        value_model=value,
        peft_config=chatrl_lora() if lora else None,
        train_dataset=Dataset.from_dict({"input_ids": ids}),
        eval_dataset=Dataset.from_dict({"input_ids": ids[:BATCH]}),
        callbacks=[Clock()],
    )
    trainer.train()
    return {"stamps": stamps}


def chatrl_lora():
    """TRL's LoRA settings: chatrl's defaults (``train.loop.add_lora``)."""
    from peft import LoraConfig

    from chatrl.config import PPOConfig

    defaults = {name: PPOConfig.model_fields[f"lora_{name}"].default for name in ("r", "alpha")}
    return LoraConfig(r=defaults["r"], lora_alpha=defaults["alpha"], target_modules="all-linear")


def rates(stamps: list[tuple[float, float]]) -> tuple[float, float]:
    """samples/s (wall) and CPU seconds per update, over all updates but the first."""
    (wall0, cpu0), (wall1, cpu1) = stamps[0], stamps[-1]
    updates = len(stamps) - 1
    return updates * BATCH / (wall1 - wall0), (cpu1 - cpu0) / updates


def side(args) -> None:
    """One side, in a child process: print its measurements as a JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work, lora = Path(args.work), bool(args.model)
    if args.side == "trl":
        result = run_trl(work, lora, args.updates)
    else:
        result = run_chatrl(work, args.side == "chatrl-bf16", lora, args.updates)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", choices=["trl", "chatrl", "chatrl-bf16"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--model", help="a model directory or .gguf file (LoRA policy)")
    parser.add_argument("--updates", type=int, default=16, help="updates per side (default 16)")
    common.add_precision(parser)
    args = parser.parse_args()
    if args.side:
        side(args)
        return
    precision = common.resolve_precision(args.precision, "bench/ppo.py")
    names = ["trl", "chatrl"] + (["chatrl-bf16"] if precision == "bf16" else [])

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.model)
        lengths = [len(p) for p in prompt_ids(work)]
        results = {}
        for name in names:
            cmd = [sys.executable, __file__, "--side", name, "--work", str(work)]
            cmd += ["--threads", str(args.threads), "--updates", str(args.updates)]
            cmd += ["--model", args.model] if args.model else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])

    measured = {name: rates(r["stamps"]) for name, r in results.items()}
    speed = {name: m[0] for name, m in measured.items()}
    cpu = {name: m[1] for name, m in measured.items()}
    print(
        f"PPO on {args.model or 'the bench model'}{' (LoRA)' if args.model else ''}: "
        f"{PROMPTS} prompts (mean {sum(lengths) / len(lengths):.1f} tokens), batch {BATCH}, "
        f"responses up to {RESPONSE} tokens, 1 PPO epoch x 1 mini-batch, "
        f"{len(results['trl']['stamps'])} updates, torch threads: {args.threads or 'default'}"
    )
    labels = {"trl": "TRL 1.12 PPOTrainer", "chatrl": "chatrl fp32", "chatrl-bf16": "chatrl bf16"}
    for name in names:
        print(
            f"  {labels[name]:<20} {speed[name]:6.1f} samples/s  "
            f"{BATCH / speed[name]:5.2f} s/update  {cpu[name]:5.2f} CPU s/update"
        )
    for name in names[1:]:
        phases = results[name]["phases"]
        total = sum(phases.values())
        parts = "  ".join(f"{p} {s:.3f} s ({s / total:.0%})" for p, s in phases.items())
        print(f"  {name} per update: {parts}")
    summary = {
        "bench": "ppo",
        "model": args.model or "bench",
        "threads": args.threads or None,
        "trl_samples_per_s": round(speed["trl"], 2),
        "cpu_s_per_update": {k: round(v, 3) for k, v in cpu.items()},
        "mean_response_tokens": round(results["chatrl"]["response_length"], 1),
    }
    for name in names[1:]:
        suffix = name.removeprefix("chatrl").replace("-", "_")  # "" or "_bf16"
        ratio, cpu_ratio = speed[name] / speed["trl"], cpu["trl"] / cpu[name]
        print(f"  {name} / TRL samples/s: {ratio:.2f}x; TRL / {name} CPU time: {cpu_ratio:.2f}x")
        summary |= {
            f"chatrl{suffix}_samples_per_s": round(speed[name], 2),
            f"ratio{suffix}": round(ratio, 2),
            f"cpu_ratio{suffix}": round(cpu_ratio, 2),
            f"chatrl{suffix}_phases_s": {
                k: round(v, 3) for k, v in results[name]["phases"].items()
            },
        }
    if "chatrl-bf16" in results:
        summary["bf16_first_ratio"] = round(results["chatrl-bf16"]["first_ratio"], 5)
    common.print_result(summary, precision)


if __name__ == "__main__":
    main()
