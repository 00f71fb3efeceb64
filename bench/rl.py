"""Critic-free RL samples/s: chatrl's GRPO against TRL 1.12's ``GRPOTrainer``, and chatrl's
RLOO and GRPO against chatrl's own PPO, all at identical settings.

bench/ppo.py's set-up: the bench policy (10.49 M parameters), a reward model built from the
same config (8.4 M, started from the policy's weights), 256 prompts of about 22 tokens; here
4 prompts per update with 4 responses each (16 responses per update, up to 32 tokens at
temperature 1), one pass of one mini-batch per rollout (TRL: num_iterations 1, one
generation per optimiser step), β = 0.04 (the KL loss term needs the reference model's
log-probs on both sides), the same learning rate, fp32. PPO samples 4 responses per prompt
too and trains its critic (a separate value model, started from the reward model) beside the
policy. Each side runs in a child process of this one, one after the other.

samples/s = responses of every update but the first (which warms up) / the wall time they took;
CPU s/update is the process's CPU time over the same updates (less inflated by a busy
machine than wall time; with --threads 1 not at all).

    python bench/rl.py                 # prints a table, then one JSON line
    python bench/rl.py --threads 1     # one torch thread per side: CPU times comparable
    python bench/rl.py --updates 6     # shorter (TRL's side is the slow one)
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
import ppo as ppo_bench  # noqa: E402 (bench/ppo.py: the same models, prompts and rates)

GROUP, BETA = 4, 0.04
BATCH, RESPONSE, LEARNING_RATE = ppo_bench.BATCH, ppo_bench.RESPONSE, ppo_bench.LEARNING_RATE
SIDES = ["trl-grpo", "grpo", "rloo", "ppo"]


def run_chatrl(work: Path, method: str, updates: int) -> dict:
    """One of chatrl's trainers on the bench set-up; time stamps once per update."""
    from chatrl.config import GRPOConfig, PPOConfig, RLOOConfig
    from chatrl.train.grpo import train_grpo
    from chatrl.train.ppo import train_ppo
    from chatrl.train.rloo import train_rloo

    common_settings = dict(
        policy=str(work / "policy"),
        reward=str(work / "reward"),
        prompts=str(work / "prompts.jsonl"),
        out=str(work / method),
        rollout_batch_size=BATCH,
        num_mini_batches=1,
        response_length=RESPONSE,
        temperature=1.0,
        learning_rate=LEARNING_RATE,
        max_steps=updates,
        bf16=False,
    )
    if method == "ppo":
        cfg = PPOConfig(
            **common_settings, samples_per_prompt=GROUP, num_ppo_epochs=1, kl_coef=BETA,
            value_learning_rate=LEARNING_RATE,
        )  # fmt: skip
        train = train_ppo
    else:
        cls, train = (GRPOConfig, train_grpo) if method == "grpo" else (RLOOConfig, train_rloo)
        cfg = cls(**common_settings, num_generations=GROUP, num_iterations=1, beta=BETA)
    stamps: list[tuple[float, float]] = []

    def clock(metas, responses, stopped) -> dict[str, float]:
        stamps.append((time.perf_counter(), time.process_time()))  # once per update
        return {}

    train(cfg, rollout_metrics=clock)
    log = [json.loads(line) for line in (work / method / "metrics.jsonl").read_text().splitlines()]
    timed = log[1:]
    phases = ppo_bench.PHASES
    return {
        "stamps": stamps,
        "phases": {p: sum(r.get(f"time_{p}", 0.0) for r in timed) / len(timed) for p in phases},
        "response_length": sum(r["response_length"] for r in log) / len(log),
    }


def run_trl(work: Path, updates: int) -> dict:
    """TRL 1.12's GRPOTrainer with the same models, prompts and settings."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from chatrl.data import load_prompts

    stamps: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            stamps.append((time.perf_counter(), time.process_time()))

    tokenizer = AutoTokenizer.from_pretrained(work / "policy", padding_side="left")
    reward = AutoModelForSequenceClassification.from_pretrained(work / "reward", num_labels=1)
    prompts = [p.messages for p in load_prompts(work / "prompts.jsonl")]
    args = GRPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        num_generations=GROUP,
        generation_batch_size=BATCH,
        max_completion_length=RESPONSE,
        temperature=1.0,
        num_iterations=1,
        beta=BETA,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=LEARNING_RATE,
        max_steps=updates,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,  # TRL defaults to True; chatrl does not checkpoint
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=str(work / "policy"),
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        reward_processing_classes=AutoTokenizer.from_pretrained(work / "reward"),
        callbacks=[Clock()],
    )
    trainer.train()
    return {"stamps": stamps}


def side(args) -> None:
    """One side, in a child process: print its measurements as a JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.side == "trl-grpo":
        result = run_trl(work, args.updates)
    else:
        result = run_chatrl(work, args.side, args.updates)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--updates", type=int, default=16, help="updates per side (default 16)")
    args = parser.parse_args()
    if args.side:
        side(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ppo_bench.prepare(work)
        results = {}
        for name in SIDES:
            cmd = [sys.executable, __file__, "--side", name, "--work", str(work)]
            cmd += ["--threads", str(args.threads), "--updates", str(args.updates)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])

    measured = {name: ppo_bench.rates(r["stamps"]) for name, r in results.items()}
    speed = {name: m[0] for name, m in measured.items()}
    cpu = {name: m[1] for name, m in measured.items()}
    print(
        f"RL: batch {BATCH} ({BATCH // GROUP} prompts x {GROUP}), responses up to {RESPONSE} "
        f"tokens, 1 pass x 1 mini-batch, beta {BETA}, {args.updates} updates, fp32, torch threads: "
        f"{args.threads or 'default'}"
    )
    labels = {"trl-grpo": "TRL 1.12 GRPOTrainer", "grpo": "chatrl GRPO", "rloo": "chatrl RLOO"}
    labels["ppo"] = "chatrl PPO"
    for name in SIDES:
        print(
            f"  {labels[name]:<21} {speed[name]:6.1f} samples/s  "
            f"{BATCH / speed[name]:5.2f} s/update  {cpu[name]:5.2f} CPU s/update"
        )
    for name in SIDES[1:]:
        phases = results[name]["phases"]
        parts = "  ".join(f"{p} {s:.3f} s" for p, s in phases.items())
        print(f"  {name} per update: {parts}")
    ratios = {
        "grpo_vs_trl_grpo": speed["grpo"] / speed["trl-grpo"],
        "grpo_vs_ppo": speed["grpo"] / speed["ppo"],
        "rloo_vs_ppo": speed["rloo"] / speed["ppo"],
    }
    for key, value in ratios.items():
        print(f"  {key.replace('_vs_', ' / ')} samples/s: {value:.2f}x")
    summary = {
        "bench": "rl",
        "threads": args.threads or None,
        "samples_per_s": {k: round(v, 2) for k, v in speed.items()},
        "cpu_s_per_update": {k: round(v, 3) for k, v in cpu.items()},
        "ratios": {k: round(v, 2) for k, v in ratios.items()},
        "mean_response_tokens": {k: round(results[k]["response_length"], 1) for k in SIDES[1:]},
    }
    common.print_result(summary, "fp32")


if __name__ == "__main__":
    main()
