"""``chatrl world …``: write the bundled world's data sets and measure its simulated annotators;
and ``chatrl label simulate``, where the world's annotators rank in the labeling app.

``chatrl.cli`` mounts ``world_app`` and adds ``label_simulate_cmd`` to ``chatrl label``: the
labeling app never imports the world; this command, on top of both, hands the world's
annotators to ``label.store.simulate`` as plain rank functions. The world itself is imported
inside each command, so ``chatrl --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chatrl.errors import UserError
from chatrl.label.commands import DEFAULT_DB, DbOpt

world_app = typer.Typer(
    help=(
        "The bundled assistant world: prompts whose best answer is known exactly, flawed "
        "demonstrations for SFT, pretraining text, a gold labeler and simulated annotators. "
        "See docs/world.md."
    ),
    no_args_is_help=True,
)

NOpt = Annotated[int, typer.Option("--n", help="How many records to write.", min=1)]
SeedOpt = Annotated[int, typer.Option(help="Random seed (the same seed writes the same data).")]
OutOpt = Annotated[Path, typer.Option(help="File to write.")]


@world_app.command("sft-data")
def sft_data_cmd(n: NOpt = 4000, seed: SeedOpt = 0, out: OutOpt = Path("sft.jsonl")) -> None:
    """Labeler-written conversations in the SFT format, with realistic flaws (padding,
    hedging, wrong answers, unsafe compliance, over-refusal) in documented proportions."""
    from chatrl.data import write_jsonl
    from chatrl.world.judge import judge
    from chatrl.world.tasks import sft_examples

    examples = sft_examples(n, seed)
    write_jsonl(out, ({"messages": conversation} for _, conversation in examples))
    verdicts = [judge(prompt, conversation[-1]["content"]) for prompt, conversation in examples]
    best = sum(v.score == 1.0 for v in verdicts) / n
    correct = sum(v.correct for v in verdicts) / n
    typer.echo(
        f"{n} conversations -> {out}  (concise and correct: {best:.0%}, correct: {correct:.0%}, "
        f"mean gold score {sum(v.score for v in verdicts) / n:.2f})"
    )


@world_app.command("prompts")
def prompts_cmd(
    n: NOpt = 500,
    seed: SeedOpt = 0,
    split: Annotated[
        str, typer.Option(help="sft, rank, train or heldout (heldout never overlaps the others).")
    ] = "train",
    out: OutOpt = Path("prompts.jsonl"),
) -> None:
    """Prompt-only sets (for sampling, PPO and evaluation); ``meta`` holds what the gold
    labeler needs."""
    from chatrl.data import write_jsonl
    from chatrl.world import make_prompts

    prompts = make_prompts(n, seed, split)
    write_jsonl(out, (p.to_json() for p in prompts))
    typer.echo(f"{n} {split} prompts -> {out}")


@world_app.command("text")
def text_cmd(n: NOpt = 20000, seed: SeedOpt = 0, out: OutOpt = Path("text.txt")) -> None:
    """Plain text for pretraining a base model: facts, equations, sentences, no dialogue
    markup. One document per line (.txt), or ``{"text": ...}`` records for a .jsonl path."""
    from chatrl.data import atomic_write, write_jsonl
    from chatrl.world import pretrain_text

    documents = pretrain_text(n, seed)
    if out.suffix == ".jsonl":
        write_jsonl(out, ({"text": d} for d in documents))
    else:
        with atomic_write(out) as f:
            f.writelines(d + "\n" for d in documents)
    typer.echo(f"{n} documents -> {out}")


@world_app.command("agreement")
def agreement_cmd(
    pairs: Annotated[int, typer.Option(help="Response pairs to rank (at least).", min=1)] = 2000,
    seed: SeedOpt = 0,
    calibrate: Annotated[
        bool, typer.Option(help="Also search the noise that gives 73% agreement.")
    ] = False,
) -> None:
    """How often the simulated annotators agree with each other and with the gold ordering,
    on SFT-like mixes of responses (InstructGPT's labelers: 72.6 ± 1.5%)."""
    from chatrl.world.annotators import (
        NOISE,
        agreement_report,
        calibrate_noise,
        default_annotators,
        sft_like_sets,
    )

    report = agreement_report(default_annotators(seed), sft_like_sets(pairs, seed))
    agreement, pairs = report["inter_annotator"], report["pairs"]
    typer.echo(f"inter-annotator agreement: {agreement:.1%} on {pairs} pairs (noise {NOISE})")
    for names, value in report["between"].items():
        typer.echo(f"  {names}: {value:.1%}")
    for name, value in report["with_gold"].items():
        typer.echo(f"agreement with the gold ordering, {name}: {value:.1%}")
    if calibrate:
        typer.echo(f"calibrated noise for 73%: {calibrate_noise(pairs=pairs, seed=seed)}")


@world_app.command("rank")
def rank_cmd(
    data: Annotated[Path, typer.Option(help="Tasks JSONL (what `chatrl sample` writes).")],
    out: OutOpt = Path("rankings.jsonl"),
    seed: SeedOpt = 0,
) -> None:
    """Rank sampled responses with the simulated annotators (each task by one, in turn)."""
    from chatrl.data import load_tasks, write_jsonl
    from chatrl.world.annotators import default_annotators, label_tasks

    rankings = label_tasks(load_tasks(data), default_annotators(seed))
    write_jsonl(out, (r.to_json() for r in rankings))
    typer.echo(f"{len(rankings)} rankings -> {out}")


def label_simulate_cmd(
    db: DbOpt = DEFAULT_DB,
    annotators: Annotated[int, typer.Option(help="How many simulated annotators.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the simulated annotators.")] = 0,
) -> None:
    """Let the bundled world's simulated annotators rank every waiting task.

    They submit through the same code path as people do (for the demo and the tests)."""
    from chatrl.label.store import LabelStore, simulate
    from chatrl.world.annotators import default_annotators

    team = default_annotators(seed)
    if not 1 <= annotators <= len(team):
        raise UserError(f"--annotators must be between 1 and {len(team)}")
    done = simulate(LabelStore(db), {a.name: a.rank for a in team[:annotators]})
    typer.echo(", ".join(f"{name}: {count} rankings" for name, count in done.items()))
