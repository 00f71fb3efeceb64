"""The ``chatrl`` command: one thin subcommand per stage. Parses, validates, calls the stage.

Every top-level command is here, each a few lines over its stage's function, with its ``--help``
text; the sub-apps (``label``, ``world``, ``teacher``) live with their packages.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from chatrl.config import BF16_HELP
from chatrl.errors import UserError
from chatrl.label.commands import label_app
from chatrl.teacher.commands import teacher_app
from chatrl.world.commands import label_simulate_cmd, world_app

app = typer.Typer(
    help=(
        "chatrl builds ChatGPT-style assistants with the InstructGPT recipe: "
        "SFT on dialogues, ranking sampled responses, a reward model, and PPO against it.\n\n"
        "Every stage reads and writes plain files (JSONL data, Hugging Face model directories), "
        "so each command can run alone. Start with `chatrl demo` to see the whole pipeline."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
err_console = Console(stderr=True)

# Commands that take any stage setting as --key value (see chatrl.config).
STAGE_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML file with this stage's settings.")
]


def _precision(value: str):
    """``--bf16 auto|true|false`` as a ``chatrl.precision.Precision``."""
    from chatrl.precision import parse_precision

    try:
        return parse_precision(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


Bf16Opt = Annotated[str, typer.Option(callback=_precision, help=BF16_HELP)]


def _stage_help(summary: str, cls) -> str:
    from chatrl.config import describe

    return f"{summary}\n\nSettings (also in --config FILE.toml):\n\n{describe(cls)}"


@app.command("init-model")
def init_model_cmd(
    data: Annotated[Path, typer.Option(help="Text to train the tokenizer on (.txt or JSONL).")],
    out: Annotated[Path, typer.Option(help="Directory to write the model and tokenizer to.")],
    preset: Annotated[
        str, typer.Option(help="Size: micro (~1M), tiny (~3M), small (~10M), bench (10.5M).")
    ] = "tiny",
    vocab_size: Annotated[
        int | None, typer.Option(help="Tokenizer vocabulary (default: the preset's).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 0,
) -> None:
    """Create a new, randomly initialised Llama-style model and train its BPE tokenizer.

    The result is a Hugging Face model directory: `AutoModelForCausalLM.from_pretrained(OUT)`
    loads it. Pretrain it with `chatrl pretrain`, then fine-tune with `chatrl sft`.
    """
    from chatrl.data import load_text
    from chatrl.models import count_parameters, init_model, load_causal_lm

    init_model(preset, load_text(data), out, seed=seed, vocab_size=vocab_size)
    model, _ = load_causal_lm(out)
    typer.echo(f"{preset} model, {count_parameters(model) / 1e6:.2f} M parameters -> {out}")


def _lm_command(ctx: typer.Context, config: Path | None, section: str, kind: str) -> None:
    from chatrl.config import LMConfig, load_stage, parse_overrides
    from chatrl.train.lm import train_lm

    cfg = load_stage(LMConfig, config, section, parse_overrides(ctx.args))
    out = train_lm(cfg, kind)
    typer.echo(f"model -> {out}")


def _lm_help(summary: str) -> str:
    from chatrl.config import LMConfig

    return _stage_help(summary, LMConfig)


@app.command(
    "pretrain",
    context_settings=STAGE_SETTINGS,
    help=_lm_help(
        "Pretrain a causal LM on plain text (next-token loss on every token).\n\n"
        "Example: chatrl pretrain --model base/ --data text.txt --out pretrained/"
    ),
)
def pretrain_cmd(ctx: typer.Context, config: ConfigOpt = None) -> None:
    _lm_command(ctx, config, "pretrain", "pretrain")


@app.command(
    "sft",
    context_settings=STAGE_SETTINGS,
    help=_lm_help(
        "Supervised fine-tuning on conversations (stage 1). The loss covers assistant turns "
        "only, end-of-turn token included, so the model learns to answer and to stop.\n\n"
        'Data: JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} per line.\n\n'
        "Example: chatrl sft --model pretrained/ --data sft.jsonl --out sft/"
    ),
)
def sft_cmd(ctx: typer.Context, config: ConfigOpt = None) -> None:
    _lm_command(ctx, config, "sft", "sft")


@app.command("sample")
def sample_cmd(
    model: Annotated[Path, typer.Option(help="Model directory to sample from (the SFT model).")],
    prompts: Annotated[Path, typer.Option(help='Prompts JSONL: {"messages": [...]} per line.')],
    out: Annotated[Path, typer.Option(help="Tasks JSONL to write.")],
    k: Annotated[int, typer.Option(help="Distinct responses per prompt.")] = 4,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (above 0).")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass; 1 is off.")] = 0.9,
    max_new_tokens: Annotated[int, typer.Option(help="Longest response, in tokens.")] = 128,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences (prompts x k) per batch.")] = 64,
) -> None:
    """Sample K distinct responses per prompt: the tasks people (or `chatrl label`) rank.

    Writes {"prompt", "responses", "meta"} per prompt, the prompt's meta carried along. Repeated
    responses are re-drawn a few times; repeats left after that are left out (meta["repeats"]
    counts them), and a prompt with fewer than 2 distinct responses gets no task.

    The defaults suit a pretrained chat model: on SmolLM2-135M-Instruct (40 world prompts,
    K = 4), temperature 1 and top-p 1 wandered off topic and stopped in 49% of responses at
    64 tokens; 0.7 and 0.9 stopped in 57% (67% at 128 tokens) and kept 3.8 of 4 distinct.
    """
    from chatrl.engine import SamplingParams
    from chatrl.sample import sample_tasks

    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    tasks, skipped = sample_tasks(model, prompts, out, k, params, batch_size)
    note = f" ({skipped} prompts without 2 distinct responses left out)" if skipped else ""
    responses = sum(len(task.responses) for task in tasks)
    typer.echo(f"{len(tasks)} tasks, {responses} responses -> {out}{note}")


app.add_typer(label_app, name="label")


label_app.command("simulate")(label_simulate_cmd)  # the world's annotators (world/commands.py)
app.add_typer(world_app, name="world")
app.add_typer(teacher_app, name="teacher")


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Option(help="Model directory to evaluate.")],
    prompts: Annotated[
        Path, typer.Option(help="World prompts JSONL (`chatrl world prompts --split heldout`).")
    ],
    baseline: Annotated[
        Path | None, typer.Option(help="Model to compare with (win rate, KL).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the report as JSON here.")] = None,
    samples: Annotated[
        Path | None, typer.Option(help="Write every response and its verdict here (JSONL).")
    ] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Longest response, in tokens.")] = 64,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    best_of: Annotated[
        int, typer.Option(min=1, help="Best-of-n: sample n, keep the one the reward ranks first.")
    ] = 1,
    reward: Annotated[
        Path | None, typer.Option(help="Best-of-n: reward model directory to pick by.")
    ] = None,
    reward_fn: Annotated[
        str | None,
        typer.Option(help="Best-of-n: reward function module:function (with --reward: summed)."),
    ] = None,
) -> None:
    """Score a model's responses to world prompts with the gold labeler.

    Reports mean gold score, win rate against the baseline (ties count half), refusal rate on
    harmful prompts, over-refusal rate on borderline ones, accuracy per family, length,
    repetition and stop rates, the KL divergence from the baseline, and the same figures for
    the world's perfect responses (the ceiling). With --best-of N, the model's response to
    each prompt is the best of N by a reward model and/or a reward function.
    """
    from rich.table import Table

    from chatrl.data import load_prompts, write_json
    from chatrl.evaluate import evaluate_model, table_rows
    from chatrl.reward_fn import Reward
    from chatrl.world import judge, perfect_response

    picker = Reward(reward, reward_fn) if reward is not None or reward_fn else None
    report = evaluate_model(
        model,
        load_prompts(prompts),
        baseline,
        temperature,
        seed,
        max_new_tokens,
        samples,
        judge=judge,
        perfect=perfect_response,
        best_of=best_of,
        reward=picker,
    )
    columns, rows = table_rows(report)
    table = Table(title=f"{prompts.name}, temperature {temperature}")
    for name in ["metric", *columns]:
        table.add_column(name, justify="left" if name == "metric" else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if out is not None:
        write_json(out, report)
        typer.echo(f"report -> {out}")


def _ppo_help() -> str:
    from chatrl.config import PPOConfig

    return _stage_help(
        "Fine-tune the SFT policy with PPO against a reward model (stage 3): sampled responses "
        "are scored by the reward model, less a KL penalty to the SFT model, and the policy "
        "follows the clipped surrogate; a critic started from the reward model estimates "
        "advantages. --reward-fn module:function scores with a Python function instead, or "
        "beside the reward model (a weighted sum). Writes the policy as a model directory; "
        "metrics.jsonl logs every update (with prompts from `chatrl world prompts`, also the "
        "gold labeler's score: gold_score, eval_gold_score). See docs/ppo.md.\n\n"
        "Example: chatrl ppo --policy sft/ --reward rm/ --prompts prompts.jsonl --out ppo/",
        PPOConfig,
    )


@app.command("ppo", context_settings=STAGE_SETTINGS, help=_ppo_help())
def ppo_cmd(ctx: typer.Context, config: ConfigOpt = None) -> None:
    from chatrl.config import PPOConfig
    from chatrl.train.ppo import train_ppo

    _online_command(ctx, config, "ppo", PPOConfig, train_ppo)


def _rloo_help() -> str:
    from chatrl.config import RLOOConfig

    return _stage_help(
        "Fine-tune the SFT policy with RLOO (stage 3, no critic): num_generations responses per "
        "prompt, each scored (reward model and/or --reward-fn) less β × its KL to the SFT model, "
        "and REINFORCE with the mean of the other responses' rewards as baseline (Ahmadian et "
        "al. 2024). Writes the policy as a model directory; metrics.jsonl as `chatrl ppo`'s. "
        "See docs/rl.md.\n\n"
        "Example: chatrl rloo --policy sft/ --reward rm/ --prompts prompts.jsonl --out rloo/",
        RLOOConfig,
    )


@app.command("rloo", context_settings=STAGE_SETTINGS, help=_rloo_help())
def rloo_cmd(ctx: typer.Context, config: ConfigOpt = None) -> None:
    from chatrl.config import RLOOConfig
    from chatrl.train.rloo import train_rloo

    _online_command(ctx, config, "rloo", RLOOConfig, train_rloo)


def _grpo_help() -> str:
    from chatrl.config import GRPOConfig

    return _stage_help(
        "Fine-tune the SFT policy with GRPO (stage 3, no critic): num_generations responses per "
        "prompt, advantages normalised within each group, the clipped surrogate and β × the k3 "
        "KL to the SFT model as a loss term (Shao et al. 2024); --loss-type dr_grpo "
        "--scale-rewards none is Dr. GRPO. Rewards from a reward model and/or --reward-fn "
        "(e.g. chatrl.world:gold_reward, a verifiable reward). See docs/rl.md.\n\n"
        "Example: chatrl grpo --policy sft/ --reward-fn chatrl.world:gold_reward "
        "--prompts prompts.jsonl --out grpo/",
        GRPOConfig,
    )


@app.command("grpo", context_settings=STAGE_SETTINGS, help=_grpo_help())
def grpo_cmd(ctx: typer.Context, config: ConfigOpt = None) -> None:
    from chatrl.config import GRPOConfig
    from chatrl.train.grpo import train_grpo

    _online_command(ctx, config, "grpo", GRPOConfig, train_grpo)


def _online_command(ctx: typer.Context, config: Path | None, section: str, cls, train) -> None:
    from chatrl.config import load_stage, parse_overrides

    cfg = load_stage(cls, config, section, parse_overrides(ctx.args))
    typer.echo(f"policy -> {train(cfg, rollout_metrics=_world_gold(cfg))}")


def _world_gold(cfg):
    """The world's gold score as a rollout metric when every prompt comes from the world."""
    from chatrl.data import load_prompts
    from chatrl.world import is_world_prompt, rollout_gold_score

    prompts = load_prompts(cfg.prompts)
    if cfg.eval_prompts:
        prompts += load_prompts(cfg.eval_prompts)
    if not prompts or not all(map(is_world_prompt, prompts)):
        return None
    typer.echo("world prompts: the gold labeler's score is logged (gold_score)", err=True)
    return rollout_gold_score


def _dpo_help() -> str:
    from chatrl.config import DPOConfig

    return _stage_help(
        "Fine-tune the SFT model on rankings with DPO (stage 3 without a reward model or "
        "sampling): the policy's log-probability ratio to the frozen SFT model is an implicit "
        "reward, trained to order each pair as the rankings do. A ranking of K responses is "
        "its K(K-1)/2 pairs, every response through the model once; TRL prompt/chosen/"
        "rejected and HH-RLHF pairs are K = 2. --loss-type ipo trains IPO, --label-smoothing "
        "conservative DPO. Writes the policy as a model directory; metrics.jsonl logs the "
        "implicit rewards (rewards/chosen, rewards/rejected, rewards/accuracies, "
        "rewards/margins). See docs/dpo.md.\n\n"
        "Example: chatrl dpo --model sft/ --data rankings.jsonl --out dpo/ --beta 0.1",
        DPOConfig,
    )


@app.command("dpo", context_settings=STAGE_SETTINGS, help=_dpo_help())
def dpo_cmd(ctx: typer.Context, config: ConfigOpt = None) -> None:
    from chatrl.config import DPOConfig, load_stage, parse_overrides
    from chatrl.train.dpo import train_dpo

    cfg = load_stage(DPOConfig, config, "dpo", parse_overrides(ctx.args))
    typer.echo(f"policy -> {train_dpo(cfg)}")


class _TrainByDefault(typer.core.TyperGroup):
    """A command group whose `train` runs when no subcommand is named (`chatrl rm --model …`)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


rm_app = typer.Typer(
    cls=_TrainByDefault,
    no_args_is_help=True,
    help=(
        "Reward model (stage 2): `chatrl rm --model SFT --data rankings.jsonl --out rm/` trains "
        "one; `chatrl rm score --model rm/ --data FILE` scores responses. See docs/reward.md."
    ),
)
app.add_typer(rm_app, name="rm")


def _rm_help() -> str:
    from chatrl.config import RMConfig

    return _stage_help(
        "Train a reward model on rankings (the default `chatrl rm` command). Each ranking of K "
        "responses is one batch element: its K responses go through the model once and the "
        "loss is the mean of -log σ(r_w - r_l) over its K(K-1)/2 pairs. TRL prompt/chosen/"
        "rejected and HH-RLHF pairs train as K = 2. Rewards are then normalised to mean 0, "
        "std 1 on SFT samples (--prompts) or on the training responses; --eval reports "
        "pairwise accuracy (eval.json).\n\n"
        "Example: chatrl rm --model sft/ --data rankings.jsonl --eval held-out.jsonl --out rm/",
        RMConfig,
    )


@rm_app.command("train", context_settings=STAGE_SETTINGS, help=_rm_help())
def rm_train_cmd(ctx: typer.Context, config: ConfigOpt = None) -> None:
    from chatrl.config import RMConfig, load_stage, parse_overrides
    from chatrl.train.reward import train_reward

    cfg = load_stage(RMConfig, config, "rm", parse_overrides(ctx.args))
    typer.echo(f"reward model -> {train_reward(cfg)}")


@rm_app.command("score")
def rm_score_cmd(
    model: Annotated[Path, typer.Option(help="Reward model directory (from `chatrl rm`).")],
    data: Annotated[
        Path, typer.Option(help="Conversations, tasks (`chatrl sample`), rankings or pairs.")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Write the scored records here (default: stdout).")
    ] = None,
    raw: Annotated[bool, typer.Option(help="Raw rewards instead of normalised ones.")] = False,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 32,
    bf16: Bf16Opt = "auto",
) -> None:
    """Score responses with a reward model, for inspection and Best-of-n.

    Each record gains `rewards` (one per response; a conversation's last assistant turn is its
    one response) and `best` (the index of the highest). Files with rankings or pairs also get
    the model's pairwise accuracy against them.
    """
    import json

    from chatrl.evaluate import print_report, ranked_records_report
    from chatrl.precision import resolve_bf16
    from chatrl.reward_model import score_file

    bf16 = resolve_bf16(bf16, "rm score")
    records = score_file(model, data, out, batch_size=batch_size, raw=raw, bf16=bf16)
    if out is None:
        for record in records:
            typer.echo(json.dumps(record, ensure_ascii=False))
    rewards = [r for record in records for r in record["rewards"]]
    err_console.print(
        f"{len(rewards)} responses scored, mean reward {sum(rewards) / len(rewards):.3f}"
        + (f" -> {out}" if out else ""),
        highlight=False,
    )
    report = ranked_records_report(records)
    if report:
        print_report(f"agreement with the rankings in {data}", report, file=sys.stderr)


RunOut = Annotated[Path, typer.Option("--out", help="Run directory: every stage writes below it.")]


def _run_and_report(config: Path, out: Path, from_stage: str | None) -> None:
    from chatrl.pipeline import WaitingForLabels, run_pipeline

    try:
        run_pipeline(config, out, from_stage)
    except WaitingForLabels as waiting:
        message = f"[bold yellow]waiting for rankings:[/] {escape(str(waiting))}"
        err_console.print(message, highlight=False, soft_wrap=True)  # keep URLs copyable
        raise typer.Exit(3) from None
    typer.echo((out / "report.md").read_text())
    typer.echo(f"report -> {out / 'report.md'}  (figures: report.json, plots: plots/)")


@app.command("run")
def run_cmd(
    config: Annotated[Path, typer.Argument(help="TOML file, a [section] per stage (demo.toml).")],
    out: RunOut = Path("runs/run"),
    from_stage: Annotated[
        str | None,
        typer.Option(
            "--from", help="Rerun from this stage: model, sft, sample, label, rm, ppo, eval."
        ),
    ] = None,
) -> None:
    """Run the whole pipeline: base model -> SFT -> sample -> rank -> reward model -> PPO -> eval.

    Rerunning the same command skips finished stages and resumes an interrupted one; a stage
    whose settings changed reruns with everything after it. Exit status 3 means the ranking
    step waits for people in the labeling app (the message says how to open it).
    """
    _run_and_report(config, out, from_stage)


@app.command("demo")
def demo_cmd(
    out: RunOut = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Seed of the whole run (world, models, sampling).")] = 0,
) -> None:
    """The whole InstructGPT pipeline on the bundled world, in minutes on a laptop CPU.

    Pretrains a tiny model on the world's text, fine-tunes it on flawed demonstrations,
    samples 4 responses per prompt, lets simulated annotators rank them, trains a reward
    model, runs PPO, and evaluates SFT, Best-of-8 and PPO on held-out prompts with the
    world's gold labeler. Ends with a report card (report.md, report.json, plots/).
    """
    from chatrl.pipeline import DEMO_CONFIG

    out.mkdir(parents=True, exist_ok=True)
    text = DEMO_CONFIG.read_text().replace("seed = 0", f"seed = {seed}", 1)
    config = out / "config.toml"
    config.write_text(text)
    _run_and_report(config, out, None)


@app.command("sweep")
def sweep_cmd(
    config: Annotated[Path, typer.Argument(help="The run config to search around (demo.toml).")],
    space: Annotated[
        Path,
        typer.Option(help="TOML: the settings to search ([ppo] learning_rate = { low, high }…)."),
    ],
    trials: Annotated[int, typer.Option(min=1, help="Trials the study runs in all.")] = 20,
    out: Annotated[
        Path, typer.Option(help="Sweep directory: trials/, stages/, study.db, best.toml, plots/.")
    ] = Path("runs/sweep"),
    workers: Annotated[
        int, typer.Option(min=1, help="Trials at once (they share the CPU cores).")
    ] = 1,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna storage URL (default sqlite:///OUT/study.db; or "
            "postgresql+psycopg://USER@HOST/DB): commands on one storage share the study."
        ),
    ] = None,
    study: Annotated[str, typer.Option(help="Study name in the storage.")] = "sweep",
    second_seed: Annotated[
        int | None,
        typer.Option(help="Seed the best trial is re-run on (default: the run's seed + 1)."),
    ] = None,
    confirm: Annotated[
        bool,
        typer.Option(help="Re-run the best trial and the config on the second seed."),
    ] = True,
    heartbeat: Annotated[
        int,
        typer.Option(
            min=1, help="Seconds between a trial's heartbeats; 3 missed: retried elsewhere."
        ),
    ] = 10,
) -> None:
    """Search any stage's settings with Optuna (TPE, pruning), each trial a pipeline run.

    Trials share finished stages (a PPO-only sweep trains SFT and the reward model once) and
    live in an Optuna database, so the same command resumes a killed sweep, and `--workers` or
    several commands share one study. Writes a table of the trials (sweep.md), the best
    settings as a runnable config (best.toml) and plots; the best is re-run on a second seed
    and called better only if it beats the config on both. A space file (docs/sweep.md):

        [ppo]
        learning_rate = { low = 1e-5, high = 2e-4, log = true }
        kl_coef = { choices = [0.02, 0.05, 0.1] }
        [objective]
        metric = "gap_closed"                  # or "ppo.gold_score", "log.ppo.eval_rm_score"…
        intermediate = "log.ppo.gold_score"    # prune on PPO's per-step gold score
    """
    from chatrl.pipeline import load_run_config
    from chatrl.sweep import run_sweep

    if confirm and second_seed is None:
        second_seed = load_run_config(config).seed + 1
    run_sweep(
        config,
        space,
        trials,
        out,
        workers=workers,
        storage=storage,
        study_name=study,
        heartbeat=heartbeat,
        confirm_seed=second_seed if confirm else None,
    )


ModelDirArg = Annotated[
    Path, typer.Argument(help="Model directory to talk to, e.g. runs/demo/ppo.", show_default=False)
]
ThreadsOpt = Annotated[
    int | None, typer.Option(min=1, help="CPU threads for the model (default: one per core).")
]


def _load_engine(model: Path, threads: int | None, bf16):
    """The engine for ``chat`` and ``serve``: weights in bf16 where ``--bf16`` says so."""
    import torch

    from chatrl.engine import load_engine
    from chatrl.precision import resolve_bf16

    dtype = torch.bfloat16 if resolve_bf16(bf16, "model") else torch.float32
    return load_engine(model, dtype, threads)


@app.command("chat")
def chat_cmd(
    model: ModelDirArg,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass; 1 is off.")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 256,
    seed: Annotated[
        int | None, typer.Option(help="Sampling seed: reply k of the session uses seed + k.")
    ] = None,
    system: Annotated[str | None, typer.Option(help="System message to start with.")] = None,
    threads: ThreadsOpt = None,
    bf16: Bf16Opt = "auto",
) -> None:
    """Chat with a model in the terminal. Replies stream as they are generated; the
    conversation is kept across turns.

    Commands: /reset, /system TEXT, /save FILE (the conversation as an SFT JSONL record),
    /help. Ctrl-C stops a reply; Ctrl-D leaves. See docs/serve.md.
    """
    from chatrl.engine import SamplingParams
    from chatrl.serve.chat import run_chat

    params = SamplingParams(
        max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    params.check()
    engine = _load_engine(model, threads, bf16)
    err_console.print(
        f"chatting with {model}: /help lists commands, Ctrl-C stops a reply, Ctrl-D leaves",
        highlight=False,
        soft_wrap=True,
    )
    run_chat(engine, params, system)


@app.command("serve")
def serve_cmd(
    model: ModelDirArg,
    host: Annotated[
        str, typer.Option(help="Address to bind (keep 127.0.0.1 unless behind a proxy).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="CHATRL_API_KEY",
            show_default=False,
            help="Require `Authorization: Bearer KEY` on every /v1 request.",
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="Model id clients see (default: the directory's name).")
    ] = None,
    max_tokens_limit: Annotated[
        int, typer.Option(min=1, help="Most tokens a request may ask for (max_tokens).")
    ] = 1024,
    max_n: Annotated[int, typer.Option(min=1, help="Most samples a request may ask for (n).")] = 8,
    max_request_bytes: Annotated[
        int, typer.Option(min=1, help="Largest request body; larger ones get 413.")
    ] = 1_000_000,
    max_queue: Annotated[
        int,
        typer.Option(
            min=1, help="Most generations (a request asks for n) queued or running; more get 429."
        ),
    ] = 256,
    max_queue_tokens: Annotated[
        int,
        typer.Option(
            min=1,
            help="Most tokens (prompt plus max_tokens, times n) queued or running; more get 429.",
        ),
    ] = 262_144,
    max_batch_size: Annotated[
        int, typer.Option(min=1, help="Most generations decoded together; more wait their turn.")
    ] = 64,
    max_batch_tokens: Annotated[
        int,
        typer.Option(
            min=1,
            help="Most KV-cache slots of the batch (generations times the longest one's prompt "
            "plus max_tokens); more wait their turn.",
        ),
    ] = 65_536,
    prefill_chunk: Annotated[
        int,
        typer.Option(min=1, help="Most prompt tokens of newcomers run between two decode steps."),
    ] = 512,
    stream_interval: Annotated[
        int,
        typer.Option(
            min=1,
            help="Tokens a write to a stream carries (the first token and the end go at once): "
            "fewer, larger writes save the server's time at many streams; 1 writes every token.",
        ),
    ] = 2,
    threads: ThreadsOpt = None,
    bf16: Bf16Opt = "auto",
) -> None:
    """Serve a model with an OpenAI-compatible API and a web chat page.

    `POST /v1/chat/completions` (streaming too), `GET /v1/models`, `GET /health`; the chat
    page is at `/`. Point any OpenAI client at http://HOST:PORT/v1. See docs/serve.md.
    """
    from chatrl.serve.app import ServeSettings, serve

    settings = ServeSettings(
        model_name=model_name or model.resolve().name,
        api_key=api_key or None,
        max_request_bytes=max_request_bytes,
        max_n=max_n,
        max_tokens_limit=max_tokens_limit,
        max_queue=max_queue,
        max_queue_tokens=max_queue_tokens,
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        prefill_chunk=prefill_chunk,
        stream_interval=stream_interval,
    )
    engine = _load_engine(model, threads, bf16)
    url = f"http://{host}:{port}"
    err_console.print(
        f"serving {model} as {settings.model_name!r}: chat page {url}/, OpenAI base URL {url}/v1"
        + (" (API key required)" if settings.api_key else ""),
        highlight=False,
        soft_wrap=True,
    )
    serve(engine, settings, host, port)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    # Model loading and saving would otherwise draw progress bars of their own.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # transformers' load reports (e.g. "score.weight MISSING" when a reward model starts
    # from an LM, as intended) would bury chatrl's own output.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        code = app(standalone_mode=False)  # returns typer.Exit's code instead of exiting
    except UserError as e:
        # Under torchrun every process prints its own errors: say which one failed.
        who = f" (process {os.environ['RANK']})" if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        err_console.print(
            f"[bold red]error{who}:[/] {escape(str(e))}", highlight=False, soft_wrap=True
        )
        sys.exit(2)
    except typer.TyperException as e:  # usage errors from typer's own click
        e.show()
        sys.exit(2)
    except typer.Abort:
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
