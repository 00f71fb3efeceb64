"""What the benchmarks share: the bench model, its tokenizer, data, this machine's peak, the
precision choice, and the result line that records both.

The bench model is REFERENCE.md's: Llama, 6 layers, hidden 256, FFN 1024, 4 heads, vocabulary
8192, untied head (10.49 M parameters). Everything is built locally from a seed.

Precision follows chatrl's: ``--precision auto`` (the default) is bf16 where the hardware runs
it natively (a GPU, or a CPU with AVX-512 BF16 or AMX) and fp32 elsewhere, where bf16 is
emulated and many times slower; ``fp32`` or ``bf16`` forces one. Every result line names the
precision and the machine, so that figures from different machines are never mixed up.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chatrl.models import train_tokenizer
from chatrl.precision import cpu_model, hardware, resolve_bf16

VOCAB = 8192
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as chatrl chooses
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WORDS = (
    "the a cat dog sat ran on under mat house red blue green quick slow river stone tree light "
    "what is how why when where who tell me about please answer question number city capital "
    "of and or but not very more less plus minus times equals sum list sort reverse word letter"
).split()


def sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    if rng.random() < 0.5:
        words.append(str(rng.randint(0, 999)))
    return " ".join(words).capitalize() + "."


def bench_tokenizer(seed: int = 0):
    """A byte-level BPE tokenizer with 8192 entries, trained on generated text."""
    rng = random.Random(seed)
    words = [f"{w}{s}" for w in WORDS for s in ("", "s", "ed", "ing", "er", "ly")]
    # Enough distinct strings for the BPE trainer to fill the vocabulary.
    lines = [
        " ".join(rng.choice(words) + rng.choice(WORDS) for _ in range(12)) for _ in range(20000)
    ]
    return train_tokenizer(lines, VOCAB)


def bench_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(
        num_hidden_layers=6,
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def bench_model(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(bench_config(tokenizer))


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Short single-turn chats (about 36 tokens each with the chat template)."""
    rng = random.Random(seed)
    return [
        [
            {"role": "user", "content": sentence(rng, rng.randint(3, 6))},
            {"role": "assistant", "content": sentence(rng, rng.randint(3, 8))},
        ]
        for _ in range(n)
    ]


def user_turn(rng: random.Random) -> list[dict[str, str]]:
    return [{"role": "user", "content": sentence(rng, rng.randint(3, 6))}]


def reply(rng: random.Random) -> str:
    return sentence(rng, rng.randint(3, 8))


def preference_data(work: Path, n_pairs: int, n_rankings: int, k: int) -> tuple[Path, Path, Path]:
    """The bench model directory, a file of ``n_pairs`` preference pairs (TRL's conversational
    prompt/chosen/rejected format) and one of ``n_rankings`` rankings of ``k`` responses: the
    preference benchmarks' data (prompts and responses of 3-9 words)."""
    from chatrl.data import write_jsonl

    tokenizer = bench_tokenizer()
    model = bench_model(tokenizer)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    rng = random.Random(0)
    pairs = []
    for _ in range(n_pairs):
        chosen, rejected = reply(rng), reply(rng)
        pairs.append(
            {
                "prompt": user_turn(rng),
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    write_jsonl(work / "pairs.jsonl", pairs)
    rankings = []
    for _ in range(n_rankings):
        order = list(range(k))
        rng.shuffle(order)
        prompt = user_turn(rng)
        rankings.append(
            {"prompt": prompt, "responses": [reply(rng) for _ in range(k)], "ranking": order}
        )
    write_jsonl(work / "rankings.jsonl", rankings)
    return work / "model", work / "pairs.jsonl", work / "rankings.jsonl"


class Clock:
    """Wall and CPU (this process) seconds between ``start()`` and ``stop()``."""

    started = False

    def start(self) -> None:
        self.started = True
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


@contextmanager
def clocked_training_loop(clock: Clock) -> Iterator[None]:
    """While inside, a chatrl trainer's training loop runs on ``clock``: the progress bar that
    the trainer skeleton (``Run.progress``) opens around it starts the clock (unless something
    earlier did) and stops it when the loop ends."""
    from chatrl.train import loop as train_loop

    bar = train_loop.progress_bar

    @contextmanager
    def timed_bar(enabled: bool = True):
        if not clock.started:
            clock.start()
        with bar(enabled) as b:
            yield b
        clock.stop()

    train_loop.progress_bar = timed_bar
    try:
        yield
    finally:
        train_loop.progress_bar = bar


def trl_clock(clock: Clock):
    """A transformers ``TrainerCallback`` that runs ``clock`` through ``Trainer.train()``
    (unless something earlier started it)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            if not clock.started:
                clock.start()

        def on_train_end(self, *args, **kwargs):
            clock.stop()

    return Timer()


def run_side(script: str, name: str, model: Path, data: Path, precision: str) -> dict:
    """Run one side of a side-by-side benchmark, ``NAME`` = ``side_variant``, in a child process
    (``script --side SIDE --variant VARIANT --model --data --precision``); its last stdout line
    is its JSON result."""
    side, variant = name.split("_", 1)
    cmd = [sys.executable, script, "--side", side, "--variant", variant]
    cmd += ["--model", str(model), "--data", str(data), "--precision", precision]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def preference_side(args, precision: str, run_chatrl, run_trl, batch: int, k: int) -> None:
    """One side of a preference benchmark (``run_side`` started it), its result as a JSON line:
    ``run_chatrl(model, data, out, batch, bf16)`` with ``batch`` pairs, or with K-way rankings
    as many responses per forward; or ``run_trl(model, data, out, variant, bf16)``."""
    out, bf16 = Path(tempfile.mkdtemp()) / "o", precision == "bf16"
    model, data = Path(args.model), Path(args.data)
    if args.side == "chatrl":
        rankings = batch if args.variant == "pairs" else batch * 2 // k
        print(json.dumps(run_chatrl(model, data, out, rankings, bf16)))
    else:
        print(json.dumps(run_trl(model, data, out, args.variant, bf16)))


def pairs_line(name: str, n_pairs: int, epochs: int, run: dict) -> str:
    """One run's pairs/s (wall, whole run where measured, per CPU-second), for the table."""
    done = n_pairs * epochs
    whole = f", {done / run['whole_run']:.1f} whole run" if "whole_run" in run else ""
    return (
        f"{name:26s} {done / run['seconds']:7.1f} pairs/s  ({n_pairs} pairs x {epochs} epochs "
        f"in {run['seconds']:.1f} s{whole}; {done / run['cpu_seconds']:.1f} pairs per CPU-second)"
    )


def pairs_rounds(
    script: str,
    runs: list[tuple[str, Path, int]],
    model: Path,
    precision: str,
    reps: int,
    epochs: int,
) -> dict:
    """``reps`` rounds of every run (name, data file, pairs in it) through ``run_side``, each
    printed by ``pairs_line`` as it ends; then per run the medians over rounds of pairs/s, per
    CPU-second and over the whole run (where measured), and every round's seconds."""
    measured: dict[str, list[dict]] = {name: [] for name, _, _ in runs}
    for _ in range(reps):  # rounds alternate the sides, so a busy spell hits all of them
        for name, data, n_pairs in runs:
            run = run_side(script, name, model, data, precision)
            measured[name].append(run)
            print(pairs_line(name, n_pairs, epochs, run), flush=True)
    results = {}
    for name, _, n_pairs in runs:
        done = n_pairs * epochs
        results[name] = {
            key: round(done / statistics.median(run[field] for run in measured[name]), 1)
            for key, field in [
                ("pairs_per_s", "seconds"),
                ("pairs_per_cpu_s", "cpu_seconds"),
                ("pairs_per_s_whole_run", "whole_run"),
            ]
            if field in measured[name][0]
        }
        results[name]["seconds"] = [round(run["seconds"], 2) for run in measured[name]]
    return results


def synchronize() -> None:
    """Wait for the GPU's queued work (timings end there); nothing on a CPU."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _rate(work, per_call: float, seconds: float) -> float:
    """``per_call`` units of ``work()`` per second, over ``seconds`` after three warm-ups."""
    for _ in range(3):
        work()
    synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        work()
        n += 1
    synchronize()
    return per_call * n / (time.perf_counter() - start)


def matmul_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """Measured torch.mm throughput in GFLOP/s on this machine's device, now (8192-wide on a
    GPU, which 1024-wide products leave mostly idle)."""
    size = 8192 if DEVICE.type == "cuda" else size
    a, b = (torch.randn(size, size, dtype=dtype, device=DEVICE) for _ in range(2))
    return _rate(lambda: a @ b, 2 * size**3 / 1e9, seconds)


def copy_bandwidth(megabytes: int = 512, seconds: float = 1.0) -> float:
    """Measured memory bandwidth in GB/s: bytes read plus bytes written by a large tensor copy
    (far beyond the caches), the ceiling of a decode step that reads every weight once."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    return _rate(lambda: dst.copy_(src), 2 * src.nbytes / 1e9, seconds)


def load_bench_model(path: str | None):
    """``--model PATH`` (a directory, hub id or .gguf file) and its tokenizer; or the bench
    model."""
    if path is None:
        tokenizer = bench_tokenizer()
        return bench_model(tokenizer).to(DEVICE), tokenizer
    from chatrl.models import load_causal_lm

    model, tokenizer = load_causal_lm(path)
    return model.to(DEVICE), tokenizer


def add_precision(parser: argparse.ArgumentParser) -> None:
    """``--precision {auto,fp32,bf16}``, default auto."""
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto (default): bf16 where this hardware runs it natively (a GPU, or a CPU with "
        "AVX-512 BF16 or AMX), fp32 elsewhere; fp32 or bf16 forces one (bf16 where it is only "
        "emulated runs, many times slower, after a warning)",
    )


def side_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a side-by-side benchmark: ``--side``, ``--variant``, ``--model`` and
    ``--data`` (how ``run_side`` starts one side in a child process) and ``--precision``."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--side", choices=["chatrl", "trl"])
    parser.add_argument("--variant")
    parser.add_argument("--model")
    parser.add_argument("--data")
    add_precision(parser)
    return parser


def resolve_precision(choice: str, what: str) -> str:
    """``"fp32"`` or ``"bf16"`` for a ``--precision`` choice, said on stderr as chatrl says it."""
    setting = {"auto": "auto", "fp32": False, "bf16": True}[choice]
    return "bf16" if resolve_bf16(setting, what) else "fp32"


def machine() -> dict:
    """This machine: the device that trains (``device``, ``name``, ``capability``,
    ``bf16_native``: the GPU if there is one), the CPU and its capability, torch's threads and
    version."""
    return {
        **hardware().to_json(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def print_result(result: dict, precision: str) -> None:
    """The final JSON line every benchmark ends with, with the precision and the machine."""
    print(json.dumps({**result, "precision": precision, "machine": machine()}), flush=True)
