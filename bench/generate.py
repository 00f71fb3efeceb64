"""Generation tokens/s: chatrl's Engine vs Hugging Face ``model.generate()``, side by side.

Same bench model (10.49 M parameters, randomly initialised), same left-padded chat prompts of
about 22 tokens, same dtype, sampling at temperature 1 (no top-k, no top-p), 64 new tokens
forced on both sides (no stop tokens), a warm-up run each, then the three (``generate()``,
the engine, the engine with ``compile=True``) alternate ``--reps`` times and each one's median
counts; the compiled engine's warm-up includes its compilation, which is not counted.
tokens/s = batch x 64 / wall time of the whole call (prefill included). The machine may be
shared: compare the columns, not runs.

fp32, the reference, always runs, and bf16 too where it is the precision chosen: by default
where the hardware runs bf16 natively (--precision bf16 forces it, --dtypes chooses freely).

    python bench/generate.py                     # batch 1, 16, 64; fp32 (and bf16 if native)
    python bench/generate.py --dtypes bf16       # bf16 only
    python bench/generate.py --threads 1         # steadier on a machine shared with others
    python bench/generate.py --profile 16        # where the engine's time goes, batch 16
    python bench/generate.py --model X.gguf      # a real model (a directory or a .gguf file)

Rooflines, measured in the same run: at batch 1 a decode step reads every weight once, so
weight bytes x tokens/s over the measured copy bandwidth is the fraction of the memory roofline
reached; 2 x parameters x tokens/s over the measured matmul peak is the fraction of compute. Weights
that fit in the CPU's caches (the 42 MB bench model) read faster than memory: over 100%.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from chatrl.chat_format import encode_prompt  # noqa: E402
from chatrl.engine import Engine, SamplingParams  # noqa: E402

NEW_TOKENS = 64


def prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """Chat prompts of about 22 tokens: a short user turn plus the generation prompt."""
    rng = random.Random(seed)
    return [
        encode_prompt(
            tokenizer, [{"role": "user", "content": common.sentence(rng, rng.randint(5, 8))}]
        )
        for _ in range(n)
    ]


def left_padded(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    return ids, mask


def hf_runner(model, tokenizer, batch: list[list[int]]):
    ids, mask = (t.to(model.device) for t in left_padded(batch, tokenizer.pad_token_id))

    def run() -> int:
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=None,  # never stop early (min_new_tokens would add a processor)
                pad_token_id=tokenizer.pad_token_id,
            )
        return (out.shape[1] - ids.shape[1]) * len(batch)

    return run


def engine_runner(model, tokenizer, batch: list[list[int]], compile: bool = False):
    # static_weights, as `chatrl sample` loads it (load_engine): nothing trains it meanwhile.
    engine = Engine(
        model, tokenizer, max_batch_size=len(batch), compile=compile, static_weights=True
    )
    engine.stop_token_ids = []  # never stop early, as eos_token_id=None for generate()
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=0)

    def run() -> int:
        return sum(len(c.token_ids) for c in engine.generate(batch, params))

    return run


def timed(run) -> float:
    start = time.perf_counter()
    tokens = run()
    common.synchronize()
    return tokens / (time.perf_counter() - start)


def compare(model, tokenizer, batch_size: int, reps: int) -> dict[str, float]:
    batch = prompts(tokenizer, batch_size)
    runners = {
        "generate": hf_runner(model, tokenizer, batch),
        "engine": engine_runner(model, tokenizer, batch),
        "compiled": engine_runner(model, tokenizer, batch, compile=True),
    }
    for run in runners.values():
        run()  # warm-up (and the compiled engine's compilation)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            rates[name].append(timed(run))
    result = {name: statistics.median(r) for name, r in rates.items()}
    result["ratio"] = result["engine"] / result["generate"]
    result["compiled_ratio"] = result["compiled"] / result["generate"]
    return result


def profile(model, tokenizer, batch_size: int) -> None:
    """The engine's top operators by CPU time for one batch."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run = engine_runner(model, tokenizer, prompts(tokenizer, batch_size))
    run()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument(
        "--dtypes", help="comma-separated, of fp32 and bf16 (default: fp32, and bf16 if chosen)"
    )
    common.add_precision(parser)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--profile", type=int, metavar="BATCH", help="profile the engine instead")
    parser.add_argument("--model", help="a model directory or .gguf file (default: bench model)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = common.resolve_precision(args.precision, "bench/generate.py")
    dtypes = args.dtypes or ("fp32,bf16" if precision == "bf16" else "fp32")

    model, tokenizer = common.load_bench_model(args.model)
    model.eval()
    sizes = [len(p) for p in prompts(tokenizer, 64)]
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model or 'bench model'}: {parameters / 1e6:.2f} M parameters, "
        f"prompts {min(sizes)}-{max(sizes)} tokens (mean {statistics.mean(sizes):.1f}), "
        f"{NEW_TOKENS} new tokens, {torch.get_num_threads()} threads",
        flush=True,
    )
    if args.profile:
        profile(model, tokenizer, args.profile)
        return
    results = {}
    print(
        f"{'dtype':>5} {'batch':>5} {'generate tok/s':>15} {'engine tok/s':>13} {'ratio':>6} "
        f"{'compiled tok/s':>15} {'ratio':>6}"
    )
    for dtype_name in dtypes.split(","):
        model.to(common.DTYPES[dtype_name])
        for batch_size in map(int, args.batch_sizes.split(",")):
            r = compare(model, tokenizer, batch_size, args.reps)
            results[f"{dtype_name}_batch{batch_size}"] = r
            print(
                f"{dtype_name:>5} {batch_size:>5} {r['generate']:>15.0f} {r['engine']:>13.0f} "
                f"{r['ratio']:>5.2f}x {r['compiled']:>15.0f} {r['compiled_ratio']:>5.2f}x",
                flush=True,
            )
    # Measured after the timings: a second of AMX matrix products can lower the clock of what
    # runs right after it (bf16 generation ran about 25% slower, generate() and engine alike).
    rooflines = {"bandwidth_gb_s": round(common.copy_bandwidth(), 1)}
    for dtype_name in dtypes.split(","):
        dtype = common.DTYPES[dtype_name]
        peak = common.matmul_peak(dtype)
        rooflines[f"{dtype_name}_matmul_peak_gflops"] = round(peak, 1)
        weight_bytes = parameters * torch.finfo(dtype).bits // 8
        for batch_size in map(int, args.batch_sizes.split(",")):
            r = results[f"{dtype_name}_batch{batch_size}"]
            # A decode step reads the weights once for the whole batch: tokens/s / batch steps/s.
            steps = r["engine"] / batch_size
            r["of_bandwidth"] = weight_bytes * steps / 1e9 / rooflines["bandwidth_gb_s"]
            r["of_peak"] = 2 * parameters * r["engine"] / 1e9 / peak
            print(
                f"{dtype_name:>5} {batch_size:>5}: engine at {r['of_bandwidth']:.0%} of the "
                f"memory roofline ({rooflines['bandwidth_gb_s']:.0f} GB/s), {r['of_peak']:.0%} "
                f"of the matmul peak ({peak:.0f} GFLOP/s)"
            )
    results = {name: {k: round(v, 3) for k, v in r.items()} for name, r in results.items()}
    common.print_result(
        {
            "bench": "generate",
            "model": args.model or "bench",
            "parameters": parameters,
            "new_tokens": NEW_TOKENS,
            "rooflines": rooflines,
            "threads": torch.get_num_threads(),
            "results": results,
        },
        precision,
    )


if __name__ == "__main__":
    main()
