"""`chatrl run` and `chatrl demo`: the stages joined into one resumable pipeline.

model → sft → sample → label → rm → stage 3 → eval, each writing to ``RUN/<stage>/``. Stage 3
is the list ``methods`` (default ``["ppo"]``): each method trains from the same SFT model (and
reward model), side by side, and eval compares them on the same held-out prompts. A stage
records a hash of its settings and of everything upstream in ``RUN/<stage>/stage.json``; a
rerun skips stages whose hash matches and that finished, resumes the one that was
interrupted (trainers continue from their checkpoint), and reruns a stage whose settings
changed, with everything that depends on it (a method's settings touch only that method and
eval). Nothing is written outside the run directory.

With ``world = true`` (the default) the bundled world supplies the data (pretraining text,
flawed demonstrations, prompt splits), the simulated annotators and the gold labeler used by
the final evaluation. Held-out prompts come from the world's ``heldout`` split, which no
stage trains on; stages never see the gold labeler beyond what the simulated annotators do.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
from filelock import FileLock
from rich.console import Console

from chatrl.config import (
    DPOConfig,
    GRPOConfig,
    LMConfig,
    PPOConfig,
    RLOOConfig,
    RMConfig,
    StageConfig,
    build,
    read_toml,
)
from chatrl.data import load_json_file, write_json, write_jsonl
from chatrl.errors import UserError

UPSTREAM = ("model", "sft", "sample", "label", "rm")
METHODS = ("ppo", "dpo", "rloo", "grpo")  # stage 3's methods, in the order a run trains them
STAGES = (*UPSTREAM, *METHODS, "eval")  # every stage a run may have, in order
# The trainer settings behind the sections whose extra keys go to a trainer.
SETTINGS = {
    "model": LMConfig, "sft": LMConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig,
    "rloo": RLOOConfig, "grpo": GRPOConfig,
}  # fmt: skip
DEMO_CONFIG = Path(__file__).parent / "demo.toml"
console = Console(stderr=True)


class WaitingForLabels(Exception):
    """The ranking step needs people: printed as instructions, exit status 3."""


# ---------------------------------------------------------------- settings
# Each section holds the pipeline's own keys; every other key goes to the stage's settings
# (LMConfig, RMConfig, PPOConfig), which name any unknown key.


class ModelSection(StageConfig, extra="allow"):
    path: str | None = None  # an existing HF causal LM: skip init and pretraining
    preset: str = "small"
    vocab_size: int | None = None
    text: str | None = None  # pretraining text file (default: the world's)
    world_docs: int = 20000
    pretrain: bool = True


class SFTSection(StageConfig, extra="allow"):
    data: str | None = None  # SFT conversations (default: the world's flawed demonstrations)
    world_demos: int = 4000


class SampleSection(StageConfig):
    prompts: str | None = None  # prompts to rank (default: the world's "rank" split)
    world_prompts: int = 1000
    k: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 64  # sequences (prompts x k) generated at once


class LabelSection(StageConfig):
    mode: str = "simulate"  # "simulate" (the world's annotators) or "app" (people)
    db: str | None = None  # default: sqlite:///RUN/label/labels.db
    annotators: int = 3
    min_rankings: int | None = None  # "app": how many to wait for (default: every task)


class RMSection(StageConfig, extra="allow"):
    pass


class OnlineSection(StageConfig, extra="allow"):  # PPO, RLOO, GRPO
    prompts: str | None = None  # default: the world's "train" split
    world_prompts: int = 2000


class DPOSection(StageConfig, extra="allow"):
    pass


class EvalSection(StageConfig):
    world_prompts: int = 300
    best_of: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 48


class RunConfig(StageConfig):
    seed: int = 0
    world: bool = True
    methods: list[str] = ["ppo"]  # stage 3, side by side from the same SFT model
    model: ModelSection = ModelSection()
    sft: SFTSection = SFTSection()
    sample: SampleSection = SampleSection()
    label: LabelSection = LabelSection()
    rm: RMSection = RMSection()
    ppo: OnlineSection = OnlineSection()
    dpo: DPOSection = DPOSection()
    rloo: OnlineSection = OnlineSection()
    grpo: OnlineSection = OnlineSection()
    eval: EvalSection = EvalSection()


def read_run_toml(path: str | Path) -> dict[str, Any]:
    """A run config's table, with ``extends = "demo"`` (the bundled demo.toml) or ``extends =
    "FILE.toml"`` (relative to this file) resolved: that config's sections, with this file's
    keys in their place where both set one."""
    table = read_toml(path)
    base = table.pop("extends", None)
    if base is None:
        return table
    if not isinstance(base, str):
        raise UserError(f'{path}: extends must name a config file, or "demo"')
    merged = read_run_toml(DEMO_CONFIG if base == "demo" else Path(path).parent / base)
    for key, value in table.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both else value
    return merged


def load_run_config(path: str | Path, table: dict[str, Any] | None = None) -> RunConfig:
    """A run's TOML config; errors name the file, the section and the key. ``table``: the
    config's contents, already read (``read_run_toml``; ``path`` then only names it in
    errors)."""
    cfg = build(RunConfig, read_run_toml(path) if table is None else table, str(path))
    assert isinstance(cfg, RunConfig)
    if cfg.model.path:
        cfg.model.path = _expand(cfg.model.path, f"{path}: [model] path")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or not cfg.methods or len(set(cfg.methods)) < len(cfg.methods):
        raise UserError(
            f"{path}: methods must list stage-3 methods once each, of {', '.join(METHODS)}"
            + (f" (not {', '.join(unknown)})" if unknown else "")
        )
    if cfg.label.mode not in ("simulate", "app"):
        raise UserError(f"{path}: [label] mode must be 'simulate' or 'app'")
    if not cfg.world:
        missing = [
            name
            for name, value in [
                ("[model] path or text", cfg.model.path or cfg.model.text),
                ("[sft] data", cfg.sft.data),
                ("[sample] prompts", cfg.sample.prompts),
                ("[ppo] prompts", cfg.ppo.prompts),
            ]
            if not value
        ]
        if missing:
            raise UserError(f"{path}: world = false needs {', '.join(missing)}")
        if cfg.label.mode == "simulate":
            raise UserError(f"{path}: simulated annotators need world = true; use mode = 'app'")
    for section in ("model", "sft", "rm", *METHODS):
        _stage_settings(cfg, section, Path("RUN"), str(path))  # names unknown keys now
    for section, value in [
        ("[model] text", cfg.model.text),
        ("[sft] data", cfg.sft.data),
        ("[sample] prompts", cfg.sample.prompts),
        ("[ppo] prompts", cfg.ppo.prompts),
    ]:
        if value and not Path(value).is_file():
            raise UserError(f"{path}: {section}: {value}: file not found")
    return cfg


def _expand(value: str, where: str) -> str:
    """``~`` and ``$VAR`` / ``${VAR}`` expanded (a shared config names a model file that lies
    somewhere else on each machine); an unset variable is an error naming it."""
    expanded = os.path.expandvars(os.path.expanduser(value))
    unset = re.search(r"\$\{?(\w+)", expanded)
    if unset:
        raise UserError(f"{where}: environment variable {unset.group(1)} is not set")
    return expanded


def _extras(section: StageConfig) -> dict[str, Any]:
    return dict(section.model_extra or {})


def _stage_settings(cfg: RunConfig, stage: str, run: Path, source: str = "config") -> StageConfig:
    """The stage's own settings: its section's extra keys plus the pipeline's wiring."""
    where = f"{source} [{stage}]"
    seed = {"seed": cfg.seed}
    if stage == "model":
        wiring = {"model": str(run / "model" / "init"), "data": str(run / "model" / "text.txt")}
        return build(
            LMConfig, {**seed, **_extras(cfg.model), **wiring, "out": str(run / "model")}, where
        )
    if stage == "sft":
        wiring = {"model": str(_base_model(cfg, run)), "data": str(_sft_data(cfg, run))}
        return build(
            LMConfig, {**seed, **_extras(cfg.sft), **wiring, "out": str(run / "sft")}, where
        )
    if stage == "rm":
        # No "prompts": the rankings' responses are SFT samples already (from `sample`), so the
        # rewards are normalised over them rather than over fresh samples drawn again.
        wiring = {
            "model": str(run / "sft"),
            "data": str(run / "label" / "rankings.jsonl"),
            "out": str(run / "rm"),
        }
        return build(RMConfig, {**seed, **_extras(cfg.rm), **wiring}, where)
    if stage == "dpo":  # on the same rankings as the reward model, from the SFT model
        wiring = {
            "model": str(run / "sft"),
            "data": str(run / "label" / "rankings.jsonl"),
            "out": str(run / "dpo"),
        }
        return build(DPOConfig, {**seed, **_extras(cfg.dpo), **wiring}, where)
    wiring = {  # an online method: from the SFT model, against the reward model
        "policy": str(run / "sft"),
        "reward": str(run / "rm"),
        "prompts": str(run / stage / "prompts.jsonl"),
        "out": str(run / stage),
    }
    return build(SETTINGS[stage], {**seed, **_extras(getattr(cfg, stage)), **wiring}, where)


def _base_model(cfg: RunConfig, run: Path) -> Path | str:
    return cfg.model.path or run / "model"


def _sft_data(cfg: RunConfig, run: Path) -> Path:
    return Path(cfg.sft.data) if cfg.sft.data else run / "sft" / "data.jsonl"


# ---------------------------------------------------------------- stages


@dataclass
class Run:
    """One run directory and its settings, shared by the stage functions."""

    cfg: RunConfig
    dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    def stage_dir(self, stage: str) -> Path:
        path = self.dir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path


def run_model(run: Run) -> None:
    """A base model: the user's, or a new one pretrained on the world's text."""
    from chatrl.data import load_text
    from chatrl.models import init_model
    from chatrl.train.lm import train_lm

    cfg = run.cfg
    if cfg.model.path:
        return
    out = run.stage_dir("model")
    if cfg.model.text:
        texts = load_text(cfg.model.text)
    else:
        from chatrl.world import pretrain_text

        texts = pretrain_text(cfg.model.world_docs, cfg.seed)
    (out / "text.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    if not (out / "init" / "config.json").exists():
        init_model(
            cfg.model.preset, texts, out / "init", seed=cfg.seed, vocab_size=cfg.model.vocab_size
        )
    settings = _stage_settings(cfg, "model", run.dir)
    if cfg.model.pretrain:
        settings.resume = True
        train_lm(settings, "pretrain")
    else:
        shutil.copytree(out / "init", out, dirs_exist_ok=True)


def run_sft(run: Run) -> None:
    from chatrl.train.lm import train_lm

    cfg = run.cfg
    if not cfg.sft.data:
        from chatrl.world import sft_conversations

        conversations = sft_conversations(cfg.sft.world_demos, cfg.seed)
        write_jsonl(run.stage_dir("sft") / "data.jsonl", ({"messages": c} for c in conversations))
    settings = _stage_settings(cfg, "sft", run.dir)
    settings.resume = True
    train_lm(settings, "sft")


def _world_prompts(n: int, seed: int, split: str, path: Path) -> Path:
    from chatrl.world import make_prompts

    write_jsonl(path, (p.to_json() for p in make_prompts(n, seed, split)))
    return path


def _stage_prompts(run: Run, stage: str, split: str) -> Path:
    """The stage's prompts in ``RUN/<stage>/prompts.jsonl``: a copy of its ``prompts`` file,
    or ``world_prompts`` prompts of the world's ``split``."""
    from chatrl.data import load_prompts

    section, path = getattr(run.cfg, stage), run.stage_dir(stage) / "prompts.jsonl"
    if section.prompts:
        write_jsonl(path, (p.to_json() for p in load_prompts(section.prompts)))
        return path
    return _world_prompts(section.world_prompts, run.cfg.seed, split, path)


def run_sample(run: Run) -> None:
    """K responses per prompt from the SFT model: the tasks to rank."""
    from chatrl.engine import SamplingParams
    from chatrl.sample import sample_tasks

    cfg, out = run.cfg, run.stage_dir("sample")
    sample_tasks(
        model=run.dir / "sft",
        prompts=_stage_prompts(run, "sample", "rank"),
        out=out / "tasks.jsonl",
        k=cfg.sample.k,
        params=SamplingParams(
            max_new_tokens=cfg.sample.max_new_tokens,
            temperature=cfg.sample.temperature,
            seed=cfg.seed,
        ),
        batch_size=cfg.sample.batch_size,
    )


def run_label(run: Run) -> None:
    """Rankings of the sampled tasks, by simulated annotators or by people in the app."""
    from chatrl.data import load_tasks
    from chatrl.label.store import LabelStore, simulate

    cfg, out = run.cfg, run.stage_dir("label")
    db = cfg.label.db or f"sqlite:///{out / 'labels.db'}"
    store = LabelStore(db)
    try:
        tasks = load_tasks(run.dir / "sample" / "tasks.jsonl")
        store.import_tasks(tasks)
        if cfg.label.mode == "simulate":
            from chatrl.world.annotators import agreement_report, default_annotators
            from chatrl.world.tasks import Prompt

            team = default_annotators(cfg.seed)[: cfg.label.annotators]
            simulate(store, {a.name: a.rank for a in team})
            sets = [(Prompt(t.prompt, t.meta), t.responses) for t in tasks[:500]]
            run.metrics["annotators"] = agreement_report(team, sets)
        rankings = store.rankings()
        # Identical tasks (same prompt, same responses) are stored once.
        needed = cfg.label.min_rankings or len({t.key() for t in tasks})
        if len(rankings) < needed:
            raise WaitingForLabels(
                f"{len(rankings)} of {needed} rankings are in. Open the labeling app:\n"
                f"  chatrl label serve --db {db}\n"
                f"  chatrl label add-annotator NAME --db {db}   (prints a login token)\n"
                "then rerun the same `chatrl run` command; it continues from here."
            )
        write_jsonl(out / "rankings.jsonl", (r.to_json() for r in rankings))
    finally:
        store.close()


def run_rm(run: Run) -> None:
    from chatrl.train.reward import train_reward

    settings = _stage_settings(run.cfg, "rm", run.dir)
    settings.resume = True
    train_reward(settings)


def _run_online(run: Run, method: str) -> None:
    """PPO, RLOO or GRPO on the world's "train" prompts (or the section's own)."""
    from chatrl.train.grpo import train_grpo
    from chatrl.train.ppo import train_ppo
    from chatrl.train.rloo import train_rloo
    from chatrl.world import rollout_gold_score

    train = {"ppo": train_ppo, "rloo": train_rloo, "grpo": train_grpo}[method]
    _stage_prompts(run, method, "train")
    settings = _stage_settings(run.cfg, method, run.dir)
    settings.resume = True
    # In the world, the method logs the gold score of its rollouts: over-optimisation shows.
    train(settings, rollout_metrics=rollout_gold_score if run.cfg.world else None)


def run_dpo(run: Run) -> None:
    from chatrl.train.dpo import train_dpo

    settings = _stage_settings(run.cfg, "dpo", run.dir)
    settings.resume = True
    train_dpo(settings)


def run_eval(run: Run) -> None:
    from chatrl.evaluate import evaluate_run
    from chatrl.world import judge, perfect_response

    cfg, out = run.cfg, run.stage_dir("eval")
    if not cfg.world:
        return  # no gold labeler: the report shows training curves only
    prompts_path = _world_prompts(
        cfg.eval.world_prompts, cfg.seed, "heldout", out / "prompts.jsonl"
    )
    evaluation = evaluate_run(
        run.dir,
        prompts_path,
        cfg.eval,
        cfg.seed,
        judge=judge,
        perfect=perfect_response,
        methods={m: run.dir / m for m in run_stages(cfg) if m in METHODS},
        base=cfg.model.path,  # a pretrained model: how it did before SFT and RL
    )
    write_json(out / "eval.json", evaluation)


STAGE_FUNCTIONS: dict[str, Callable[[Run], None]] = {
    "model": run_model,
    "sft": run_sft,
    "sample": run_sample,
    "label": run_label,
    "rm": run_rm,
    "ppo": functools.partial(_run_online, method="ppo"),
    "dpo": run_dpo,
    "rloo": functools.partial(_run_online, method="rloo"),
    "grpo": functools.partial(_run_online, method="grpo"),
    "eval": run_eval,
}


# ---------------------------------------------------------------- running


def _file_digest(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return path
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_stages(cfg: RunConfig) -> tuple[str, ...]:
    """The stages of this run, in order: upstream, the methods it compares, eval."""
    return (*UPSTREAM, *(m for m in METHODS if m in cfg.methods), "eval")


def _upstream(cfg: RunConfig, stage: str, digests: dict[str, str]) -> str:
    """What a stage depends on: the stage before it; a method, the reward model (methods do
    not depend on each other); eval, every method."""
    if stage == "eval":
        return "+".join(digests[m] for m in run_stages(cfg) if m in METHODS)
    if stage in METHODS:
        return digests["rm"]
    previous = UPSTREAM.index(stage) - 1
    return digests[UPSTREAM[previous]] if previous >= 0 else ""


def _forced(cfg: RunConfig, stage: str, from_stage: str | None) -> bool:
    """Whether ``--from from_stage`` reruns ``stage``: that stage and what depends on it."""
    if from_stage is None:
        return False
    order = run_stages(cfg)
    if from_stage in METHODS:
        return stage in (from_stage, "eval")
    return from_stage in order and order.index(stage) >= order.index(from_stage)


def stage_hash(cfg: RunConfig, stage: str, upstream: str) -> str:
    """A hash of the stage's settings (and of the files they name) and of all upstream stages."""
    section = getattr(cfg, stage).model_dump()
    files = {
        k: _file_digest(v) for k, v in section.items() if k in ("path", "text", "data", "prompts")
    }
    record = {"stage": stage, "seed": cfg.seed, "world": cfg.world, "section": section}
    record |= {"files": files, "upstream": upstream}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_state(path: Path) -> dict[str, Any]:
    return load_json_file(path) if path.exists() else {}


def _stage_lock(stage_cache: Path | None, stage: str, digest: str):
    """While held, no other run sharing ``stage_cache`` runs or stores this stage's ``digest``."""
    if stage_cache is None:
        return contextlib.nullcontext()
    stage_cache.mkdir(parents=True, exist_ok=True)
    return FileLock(stage_cache / f"{stage}-{digest}.lock")


def _link_tree(source: Path, target: Path) -> None:
    """A copy of ``source`` at ``target`` made of hard links (a plain copy across file systems),
    written beside it and renamed into place. Stages never change a finished stage's files."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, copy_function=link)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def keep_config(config_path: str | Path, run_dir: Path) -> None:
    """``RUN/config.toml``: a copy of the config, which reproduces the run; one that extends
    another is written out whole, since its ``extends`` may be a path relative to it."""
    copy = run_dir / "config.toml"
    if Path(config_path).resolve() == copy.resolve():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if "extends" in read_toml(config_path):
        copy.write_text(tomlkit.dumps(read_run_toml(config_path)), encoding="utf-8")
    else:
        shutil.copyfile(config_path, copy)


def run_pipeline(
    config_path: str | Path,
    out: str | Path,
    from_stage: str | None = None,
    stage_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage; return the stage records and metrics. See the module doc.

    ``stage_cache``: a directory that runs share (``chatrl sweep``'s trials). A stage finished
    there with the same hash (the same settings and upstream) is linked into this run instead of
    run again, and every stage this run finishes is stored there. Trainers record their paths
    (train_config.json, the reward model's eval.json) for people only: nothing reads them back.
    """
    stage_cache = Path(stage_cache) if stage_cache is not None else None
    cfg = load_run_config(config_path)
    if from_stage is not None and from_stage not in STAGES:
        raise UserError(f"--from must be one of {', '.join(STAGES)}")
    if from_stage is not None and from_stage not in run_stages(cfg):
        raise UserError(f"--from {from_stage}: this run has no such stage")
    run = Run(cfg, Path(out))
    run.dir.mkdir(parents=True, exist_ok=True)
    keep_config(config_path, run.dir)
    digests: dict[str, str] = {}
    records = {}
    for stage in run_stages(cfg):
        forced = _forced(cfg, stage, from_stage)
        digest = digests[stage] = stage_hash(cfg, stage, _upstream(cfg, stage, digests))
        state_path = run.dir / stage / "stage.json"
        with _stage_lock(stage_cache, stage, digest):
            state = _read_state(state_path)
            cached = stage_cache / f"{stage}-{digest}" if stage_cache else None
            if state.get("hash") == digest and state.get("done") and not forced:
                console.print(
                    f"[green]✓[/] {stage}: done earlier ({state['seconds']:.0f} s), skipped"
                )
            elif cached and cached.exists() and not forced:
                _link_tree(cached, run.dir / stage)
                state = _read_state(state_path)
                console.print(f"[green]✓[/] {stage}: reused from the stage cache, skipped")
            else:
                if state and (state.get("hash") != digest or forced):
                    shutil.rmtree(run.dir / stage)  # settings changed: start the stage afresh
                elif state:
                    console.print(f"[yellow]↻[/] {stage}: resuming an interrupted run")
                console.print(f"[bold]▶ {stage}[/]")
                run.stage_dir(stage)
                write_json(state_path, {"hash": digest, "done": False})
                started = time.perf_counter()
                STAGE_FUNCTIONS[stage](run)
                seconds = time.perf_counter() - started + state.get("seconds_before", 0.0)
                state = {"hash": digest, "done": True, "seconds": seconds, "metrics": run.metrics}
                write_json(state_path, state)
                run.metrics = {}
                console.print(f"[green]✓[/] {stage}: {seconds:.0f} s")
                if cached and not cached.exists():
                    _link_tree(run.dir / stage, cached)
        records[stage] = state
    from chatrl.report import write_report

    write_report(run.dir, records, cfg.seed)
    return records
