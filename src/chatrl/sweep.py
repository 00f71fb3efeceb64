"""`chatrl sweep`: hyper-parameter search over the pipeline's stages, with Optuna.

A trial is one run of the pipeline (`chatrl run`) in ``DIR/trials/NNN/``: the run config with
the settings the space file names set to the values Optuna's sampler (TPE by default) suggests.
Trials share a stage cache (``DIR/stages/``), so a stage whose settings and upstream match a
finished one is linked in rather than run again: a PPO-only sweep trains SFT and the reward model
once. Each trial runs in a child process; while it runs, the values it logs for the space's
``intermediate`` metric go to Optuna's pruner, which may stop it early.

Trials live in Optuna's RDB storage (``DIR/study.db``, SQLite, or a PostgreSQL URL), which any
number of workers share (``--workers``, or several commands on one storage). Each running trial
sends a heartbeat; a trial silent for three heartbeats (its worker was killed) is failed and
queued again with its parameters, and the retry resumes the killed run where it stopped.

At the end: a table of the trials (``sweep.md``, ``sweep.json``), the best trial's config as a
runnable TOML (``best.toml``), plots of each objective against each parameter and of the
reward–KL frontier (``plots/``). The best trial and the unchanged run config are then both run
on a second seed, and the best is reported as better only if it beats the config on both.
docs/sweep.md describes the space file.

One module for the whole command, in its order: the space file, metrics of a finished run, a
run in a child process, the workers, the second seed, the outputs; hence the length.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import tomlkit
from filelock import FileLock
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from chatrl.config import StageConfig, read_toml
from chatrl.data import load_json_file, write_json
from chatrl.errors import UserError
from chatrl.pipeline import METHODS, SETTINGS, STAGES, RunConfig, load_run_config, read_run_toml
from chatrl.report import FIRST
from chatrl.train.loop import progress_bar

console = Console(stderr=True)

# Keys of those settings that the pipeline sets itself: a searched value would be overwritten.
WIRED = {"out", "seed", "resume", "model", "data", "policy", "reward"}
SECTIONS = [
    name for name, f in RunConfig.model_fields.items() if isinstance(f.default, StageConfig)
]
# Report figures a metric may name (``gap_closed``, ``ppo.gold_score``, ``methods.dpo.kl_vs_sft``…),
# besides ``log.*``.
POLICY_ROWS = {*FIRST, "perfect", *METHODS, *(f"{m}_greedy" for m in METHODS)}
REPORT_NAMES = {"gap_closed", "rm_accuracy", "annotator_agreement", "seconds", "methods"}
REPORT_NAMES |= POLICY_ROWS
SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "none": optuna.pruners.NopPruner,
}
MAX_RETRY = 3  # a trial whose worker dies more often than this stays failed
# A trial's child process: the pipeline, stopped with its parent (a killed worker leaves none).
CHILD = "import sys; from chatrl.sweep import trial_main; trial_main(*sys.argv[1:])"


# ---------------------------------------------------------------- the space file


@dataclass(frozen=True)
class Param:
    """One searched setting: ``[section] key`` over a range (``log``: on a log scale; integers
    when both ends are) or over ``choices``."""

    section: str
    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            step = int(self.step or 1)
            return trial.suggest_int(self.name, self.low, self.high, step=step, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        integer = isinstance(self.low, int) and isinstance(self.high, int)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and (isinstance(value, int) or not integer) and self.low <= value <= self.high

    def extremes(self) -> list[Any]:
        """The values that show whether the whole range is valid for the setting."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


@dataclass(frozen=True)
class Space:
    """What to search and what for: the parameters, the objective(s) (each a weighted sum of
    named metrics), the metric to prune on, and the sampler's and pruner's settings."""

    path: Path
    params: list[Param]
    objectives: list[dict[str, float]]
    directions: list[str]
    intermediate: str | None
    sampler: dict[str, Any]
    pruner: dict[str, Any]

    def objective_names(self) -> list[str]:
        return [" + ".join(_term(n, w) for n, w in terms.items()) for terms in self.objectives]


def _term(name: str, weight: float) -> str:
    return name if weight == 1 else f"{weight:g}·{name}"


def searchable(section: str, key: str) -> bool:
    """Whether ``[section] key`` is a setting of the run config that a sweep can change."""
    if key in type(RunConfig.model_fields[section].default).model_fields:
        return True
    stage = SETTINGS.get(section)
    return stage is not None and key in stage.model_fields and key not in WIRED


def current_value(table: dict[str, Any], section: str, key: str) -> Any:
    """``[section] key`` in the run config ``table``, or its default (None if it has none)."""
    if key in table.get(section, {}):
        return table[section][key]
    fields = type(RunConfig.model_fields[section].default).model_fields
    field = fields.get(key) or SETTINGS[section].model_fields[key]
    return None if field.is_required() else field.default


def with_params(table: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The run config ``table`` with ``params`` (``"section.key": value``) set."""
    out = dict(table)
    for name, value in params.items():
        section, key = name.split(".", 1)
        out[section] = {**out.get(section, {}), key: value}
    return out


def load_space(path: Path, config: Path) -> Space:
    """The space file, every key and every end of every range checked against the run config's
    settings: a mistake is one line naming the file and the key."""
    table = read_toml(path)
    where = str(path)
    objective = table.pop("objective", {})
    sampler, pruner = table.pop("sampler", {}), table.pop("pruner", {})
    base = read_run_toml(config)
    load_run_config(config, base)
    params = []
    for section, keys in table.items():
        if section not in SECTIONS or not isinstance(keys, dict):
            raise UserError(
                f"{where}: unknown section [{section}]; a space file has the run config's "
                f"sections ({', '.join(SECTIONS)}) and [objective], [sampler], [pruner]"
            )
        for key, spec in keys.items():
            if not searchable(section, key):
                raise UserError(
                    f"{where}: [{section}] {key}: unknown key (not a setting of [{section}] "
                    "that a sweep can change)"
                )
            param = _param(f"{where}: [{section}] {key}", section, key, spec)
            for value in param.extremes():
                source = f"{where}: [{section}] {key} = {value!r} in {config}"
                load_run_config(source, with_params(base, {param.name: value}))
            params.append(param)
    if not params:
        raise UserError(
            f"{where}: nothing to search; add a setting with a range, e.g. "
            "[ppo] learning_rate = { low = 1e-5, high = 1e-4, log = true }"
        )
    objectives, directions, intermediate = _objective(where, objective)
    space = Space(path, params, objectives, directions, intermediate, sampler, pruner)
    make_sampler(space, 0), make_pruner(space)  # their settings are checked now
    return space


def _param(where: str, section: str, key: str, spec: Any) -> Param:
    if not isinstance(spec, dict):
        raise UserError(f"{where}: give {{ low = …, high = … }} or {{ choices = […] }}")
    unknown = set(spec) - {"low", "high", "log", "step", "choices"}
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices or len(spec) > 1:
            raise UserError(f"{where}: choices must be a non-empty list, and alone")
        return Param(section, key, choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
        raise UserError(f"{where}: a range needs numbers low and high")
    if low >= high:
        raise UserError(f"{where}: empty range (low {low} is not below high {high})")
    log, step = bool(spec.get("log", False)), spec.get("step")
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0")
    if step is not None and (log or not isinstance(step, int | float) or step <= 0):
        raise UserError(f"{where}: step must be a positive number, and without log")
    return Param(section, key, low, high, log, step)


def _objective(where: str, table: dict[str, Any]) -> tuple[list, list, str | None]:
    unknown = set(table) - {"metric", "direction", "intermediate"}
    if unknown:
        raise UserError(f"{where}: [objective] unknown key(s) {', '.join(sorted(unknown))}")
    metrics = table.get("metric", "gap_closed")
    metrics = metrics if isinstance(metrics, list) else [metrics]
    objectives = []
    for metric in metrics:
        terms = metric if isinstance(metric, dict) else {metric: 1.0}
        for name, weight in terms.items():
            check_metric(where, name)
            if not isinstance(weight, int | float):
                raise UserError(f"{where}: [objective] {name}: a weight must be a number")
        objectives.append({name: float(weight) for name, weight in terms.items()})
    directions = table.get("direction", "maximize")
    directions = directions if isinstance(directions, list) else [directions] * len(objectives)
    if len(directions) != len(objectives) or set(directions) - {"maximize", "minimize"}:
        raise UserError(f"{where}: [objective] direction: 'maximize' or 'minimize', one per metric")
    intermediate = table.get("intermediate")
    if intermediate is not None:
        check_metric(where, intermediate)
        if not intermediate.startswith("log.") or len(objectives) > 1:
            raise UserError(
                f"{where}: [objective] intermediate: a logged metric (log.STAGE.KEY), and "
                "with a single objective (Optuna prunes single-objective studies only)"
            )
    return objectives, directions, intermediate


def check_metric(where: str, name: Any) -> None:
    """A metric names a report figure (``gap_closed``, ``ppo.gold_score``, see report.json) or
    a stage's last logged value (``log.ppo.eval_rm_score``, from RUN/ppo/metrics.jsonl)."""
    parts = str(name).split(".")
    logged = parts[0] == "log" and len(parts) == 3 and parts[1] in STAGES
    if not (logged or (parts[0] != "log" and parts[0] in REPORT_NAMES)):
        raise UserError(
            f"{where}: [objective] {name!r}: unknown metric; name a figure of report.json "
            "(gap_closed, rm_accuracy, ppo.gold_score, ppo.kl_vs_sft…) or log.STAGE.KEY"
        )


def make_sampler(space: Space, offset: int) -> optuna.samplers.BaseSampler:
    """The space's ``[sampler]``: ``name`` (tpe, random, nsga2) and that Optuna class's keywords;
    its ``seed`` (default 0) plus ``offset``, so that workers, and a resumed sweep, draw anew."""
    settings = {"name": "tpe", **space.sampler}
    settings["seed"] = settings.get("seed", 0) + offset
    return _make(space, "sampler", SAMPLERS, settings)


def make_pruner(space: Space) -> optuna.pruners.BasePruner:
    """The space's ``[pruner]`` (median by default) when it prunes on an intermediate metric."""
    if space.intermediate is None:
        return optuna.pruners.NopPruner()
    return _make(space, "pruner", PRUNERS, {"name": "median", **space.pruner})


def _make(space: Space, kind: str, classes: dict[str, Any], settings: dict[str, Any]):
    settings = dict(settings)
    name = settings.pop("name")
    if name not in classes:
        raise UserError(f"{space.path}: [{kind}] name: one of {', '.join(classes)}")
    try:
        return classes[name](**settings)
    except (TypeError, ValueError) as e:
        raise UserError(f"{space.path}: [{kind}] {e}") from None


# ---------------------------------------------------------------- metrics of a finished run


def metric_value(run: Path, name: str) -> float | None:
    """``name``'s value in a finished run: a figure of report.json or a stage's last logged
    value (see ``check_metric``); None where the run has no such number."""
    parts = name.split(".")
    if parts[0] == "log":
        value = None
        path = run / parts[1] / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            value = json.loads(line).get(parts[2], value)
        return value
    value: Any = load_json_file(run / "report.json")
    for part in parts:
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def objective_values(run: Path, space: Space) -> list[float] | None:
    """The run's value of each objective, or None if one of its metrics has none."""
    values = []
    for terms in space.objectives:
        parts = {name: metric_value(run, name) for name, weight in terms.items()}
        if any(v is None for v in parts.values()):
            return None
        values.append(sum(weight * parts[name] for name, weight in terms.items()))
    return values


def reward_and_kl(run: Path) -> tuple[float | None, float | None]:
    """PPO's held-out gold score and KL to SFT where the world judged it, else its last
    rollout's reward-model score and KL: the two axes of the frontier."""
    gold, kl = metric_value(run, "ppo.gold_score"), metric_value(run, "ppo.kl_vs_sft")
    if gold is not None:
        return gold, kl
    return metric_value(run, "log.ppo.rm_score"), metric_value(run, "log.ppo.kl")


# ---------------------------------------------------------------- one run in a child process


def trial_main(config: str, out: str, stage_cache: str) -> None:
    """The child process of a trial: the pipeline, in ``out``, sharing ``stage_cache``; it ends
    when its parent does. Exit status 2 on a user error (its line on stderr), 3 if waiting for
    rankings."""
    from chatrl.pipeline import WaitingForLabels, run_pipeline

    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    try:
        run_pipeline(config, out, stage_cache=stage_cache)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except WaitingForLabels as e:
        print(f"waiting for rankings: {e}", file=sys.stderr)
        sys.exit(3)


def run_child(
    config: Path, run: Path, stage_cache: Path, threads: str, keep_going: Callable[[], bool]
) -> int | None:
    """Run the pipeline on ``config`` in ``run`` in a child process (its output in
    ``run/log.txt``); ``keep_going()`` is asked every second, and False stops the run.
    Returns the exit status, or None when stopped."""
    run.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    with (run / "log.txt").open("a") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(config), str(run), str(stage_cache)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            while True:
                try:
                    return child.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    if not keep_going():
                        child.kill()
                        child.wait()
                        return None
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


def last_line(run: Path) -> str:
    lines = (run / "log.txt").read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output"


def write_config(base_text: str, params: dict[str, Any], seed: int | None, path: Path) -> Path:
    """The run config ``base_text`` (its comments kept) with ``params`` set, and ``seed``; a
    set value's comment says so (the config's own comment explained the value it replaces)."""
    doc = tomlkit.parse(base_text)
    if seed is not None:
        doc["seed"] = seed
    for name, value in params.items():
        section, key = name.split(".", 1)
        if section not in doc:
            doc[section] = tomlkit.table()
        before = doc[section].get(key)
        item = tomlkit.item(value)
        was = f"; the run config has {before.unwrap()!r}" if before is not None else ""
        item.comment(f"set by chatrl sweep{was}")
        doc[section][key] = item
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomlkit.dumps(doc), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the sweep


@dataclass
class Sweep:
    """One sweep's settings, shared by its workers."""

    config: Path
    space: Space
    out: Path
    trials: int
    workers: int
    storage: str
    study_name: str
    heartbeat: int

    @property
    def stage_cache(self) -> Path:
        return self.out / "stages"

    def base_text(self) -> str:
        """The run config's text; an ``extends`` file made absolute, for trials elsewhere."""
        doc = tomlkit.parse(self.config.read_text(encoding="utf-8"))
        if doc.get("extends", "demo") != "demo":
            doc["extends"] = str((self.config.parent / doc["extends"]).resolve())
        return tomlkit.dumps(doc)

    def threads(self) -> str:
        """Threads per trial: the user's OMP_NUM_THREADS, else a share of the cores."""
        share = max(1, (os.cpu_count() or 1) // self.workers)
        return os.environ.get("OMP_NUM_THREADS", str(share))

    def open_storage(self) -> RDBStorage:
        engine = {"connect_args": {"timeout": 60}} if self.storage.startswith("sqlite") else {}
        try:
            return RDBStorage(
                self.storage,
                engine_kwargs=engine,
                heartbeat_interval=self.heartbeat,
                grace_period=3 * self.heartbeat,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(MAX_RETRY),
            )
        except Exception as e:  # a bad URL, a missing driver, a server that does not answer
            raise UserError(f"--storage {self.storage}: {e}") from None

    def open_study(self, worker: int) -> optuna.Study:
        storage = self.open_storage()
        study = optuna.load_study(study_name=self.study_name, storage=storage)
        offset = 1000 * len(study.get_trials(deepcopy=False)) + worker
        return optuna.load_study(
            study_name=self.study_name,
            storage=storage,
            sampler=make_sampler(self.space, offset),
            pruner=make_pruner(self.space),
        )


def create_study(sweep: Sweep) -> optuna.Study:
    """The sweep's study: created, or loaded to resume; refused if it was made for another
    run config or space file. Under the lock in ``out``: commands starting together would race
    to create the SQLite file's tables and to queue the first trial."""
    with FileLock(sweep.out / ".ask.lock"):
        return _create_study(sweep)


def _create_study(sweep: Sweep) -> optuna.Study:
    study = optuna.create_study(
        study_name=sweep.study_name,
        storage=sweep.open_storage(),
        directions=sweep.space.directions,
        load_if_exists=True,
    )
    made_for = {"config": sweep.base_text(), "space": sweep.space.path.read_text()}
    for key, text in made_for.items():
        stored = study.user_attrs.get(key)
        if stored is None:
            study.set_user_attr(key, text)
        elif stored != text:
            raise UserError(
                f"study {sweep.study_name!r} in {sweep.storage} was started with another "
                f"{'run config' if key == 'config' else 'space file'}; resume it with the same "
                "one, or choose another --study or --out"
            )
    wanted = [getattr(optuna.study.StudyDirection, d.upper()) for d in sweep.space.directions]
    if study.directions != wanted:
        raise UserError(f"study {sweep.study_name!r}: its directions differ from the space file's")
    config = run_config_params(sweep)
    if config is not None and not study.get_trials(deepcopy=False):
        # The first trial: the run config as it is, the baseline the others are seen against.
        study.enqueue_trial(config, user_attrs={"note": "the run config"})
    return study


def run_config_params(sweep: Sweep) -> dict[str, Any] | None:
    """The run config's own values of the searched settings, if all lie in the space."""
    table = read_run_toml(sweep.config)
    params = {p.name: current_value(table, p.section, p.key) for p in sweep.space.params}
    inside = all(p.contains(params[p.name]) for p in sweep.space.params)
    return params if inside else None


def counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, less those killed and queued again (their retry stands for them)."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.number not in retried]


def finished(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    return [t for t in counted(trials) if t.state.is_finished()]


class TrialFailed(Exception):
    """A trial's run stopped with an error: the trial fails, the sweep goes on."""


def run_worker(sweep: Sweep, worker: int) -> None:
    """Run trials until the study has ``sweep.trials`` finished ones, taking over any whose
    worker died. The ask is under a lock in ``out``, so workers there never overshoot."""
    study = sweep.open_study(worker)
    lock = FileLock(sweep.out / ".ask.lock")
    while True:
        lock.acquire()
        optuna.storages.fail_stale_trials(study)
        trials = counted(study.get_trials(deepcopy=False))
        if len(finished(trials)) >= sweep.trials:
            lock.release()
            return
        queued = any(t.state == TrialState.WAITING for t in trials)
        if len(trials) >= sweep.trials and not queued:  # the rest are running: wait for them
            lock.release()
            time.sleep(sweep.heartbeat)
            continue
        # Optuna asks inside optimize; the objective releases the lock once the trial is its own.
        try:
            study.optimize(lambda t: run_trial(sweep, t, lock), n_trials=1, catch=TrialFailed)
        finally:
            if lock.is_locked:
                lock.release()


def run_trial(sweep: Sweep, trial: optuna.Trial, lock: FileLock) -> list[float]:
    """Optuna's objective: one pipeline run with the trial's settings, pruned on the
    intermediate metric; its objective values. A retried trial resumes its first run's dir."""
    lock.release()
    params = {p.name: p.suggest(trial) for p in sweep.space.params}
    # A retry inherits the killed trial's attributes, its run directory among them.
    run = Path(trial.user_attrs.get("run_dir", sweep.out / "trials" / f"{trial.number:03d}"))
    trial.set_user_attr("run_dir", str(run))
    config = write_config(sweep.base_text(), params, None, run / "config.toml")
    started = time.perf_counter()
    reported: set[int] = set()
    pruned = False

    def keep_going() -> bool:
        nonlocal pruned
        if sweep.space.intermediate is None:
            return True
        _, stage, key = sweep.space.intermediate.split(".")
        path = run / stage / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            record = json.loads(line)
            if record.get(key) is not None and record["step"] not in reported:
                trial.report(record[key], record["step"])
                reported.add(record["step"])
        pruned = bool(reported) and trial.should_prune()
        return not pruned

    status = run_child(config, run, sweep.stage_cache, sweep.threads(), keep_going)
    trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
    if pruned:
        trial.set_user_attr("note", f"pruned at {sweep.space.intermediate} step {max(reported)}")
        raise optuna.TrialPruned()
    if status != 0:
        trial.set_user_attr("note", last_line(run))
        raise TrialFailed(last_line(run))
    values = objective_values(run, sweep.space)
    if values is None:
        names = ", ".join(n for terms in sweep.space.objectives for n in terms)
        raise UserError(f"{sweep.space.path}: [objective] {names}: not all in {run}'s report")
    reward, kl = reward_and_kl(run)
    trial.set_user_attr("reward", reward)
    trial.set_user_attr("kl", kl)
    return values


def run_sweep(
    config: Path,
    space_path: Path,
    trials: int,
    out: Path,
    workers: int = 1,
    storage: str | None = None,
    study_name: str = "sweep",
    heartbeat: int = 10,
    confirm_seed: int | None = None,
) -> dict[str, Any]:
    """The sweep (see the module doc); returns what sweep.json holds. ``confirm_seed``: the
    second seed the best trial and the run config are compared on (None: no second seed)."""
    space = load_space(space_path, config)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    sweep = Sweep(config, space, out, trials, workers, storage, study_name, heartbeat)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the progress bar and table say it all
    # Heartbeats and their retries are marked experimental (since Optuna 2.8, unchanged since).
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = create_study(sweep)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            run_worker(sweep, index)
        except BaseException as e:  # shown by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    with progress_bar() as bar:
        task = bar.add_task("sweep", total=trials, info="")
        while any(t.is_alive() for t in threads) and not errors:
            done = finished(study.get_trials(deepcopy=False))
            bar.update(task, completed=len(done), info=_best_info(study, space))
            time.sleep(1.0)
        done = finished(study.get_trials(deepcopy=False))
        bar.update(task, completed=len(done), info=_best_info(study, space))  # the last trial's
    if errors:
        raise errors[0]
    summary = summarise(sweep, study)
    if confirm_seed is not None and summary["best"] is not None:
        summary["confirmation"] = confirm(sweep, study, confirm_seed)
    write_outputs(sweep, study, summary)
    return summary


def _best_info(study: optuna.Study, space: Space) -> str:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete or len(space.directions) > 1:
        return f"{len(complete)} complete"
    best = study.best_trial
    return f"best {space.objective_names()[0]} {best.values[0]:.3f} (trial {best.number})"


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial; with several objectives, the Pareto front's best on the first."""
    front = study.best_trials
    if not front:
        return None
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(front, key=lambda t: sign * t.values[0])


def summarise(sweep: Sweep, study: optuna.Study) -> dict[str, Any]:
    trials = sorted(finished(study.get_trials()), key=lambda t: t.number)
    front = {t.number for t in study.best_trials}
    best = best_trial(study)
    return {
        "study": sweep.study_name,
        "storage": sweep.storage,
        "objectives": sweep.space.objective_names(),
        "directions": sweep.space.directions,
        "trials": [
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "params": t.params,
                "values": t.values,
                "pareto": t.number in front,
                **{k: t.user_attrs.get(k) for k in ("reward", "kl", "seconds", "note", "run_dir")},
            }
            for t in trials
        ],
        "best": None
        if best is None
        else {"number": best.number, "params": best.params, "run_dir": best.user_attrs["run_dir"]},
        "confirmation": None,
    }


# ---------------------------------------------------------------- the second seed


def confirm(sweep: Sweep, study: optuna.Study, seed: int) -> dict[str, Any]:
    """Run the best trial's settings and the unchanged run config on ``seed`` (and the config
    on the run's own seed, unless a trial ran it): the best is better only if it beats the
    config on the first objective on both seeds."""
    best = best_trial(study)
    first_seed = load_run_config(sweep.config).seed
    runs = {("best", first_seed): best.values[0]}
    todo = [("config", seed, {}), ("best", seed, best.params)]
    config = run_config_params(sweep)
    ran = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.params == config]
    if ran:
        runs[("config", first_seed)] = ran[0].values[0]
    else:
        todo.insert(0, ("config", first_seed, {}))
    with progress_bar() as bar:
        task = bar.add_task("second seed", total=len(todo), info="")
        for i, (name, run_seed, params) in enumerate(todo):
            run = sweep.out / "confirm" / f"{name}-seed{run_seed}"
            bar.update(task, completed=i, info=f"{name}, seed {run_seed}")
            config = write_config(sweep.base_text(), params, run_seed, run / "config.toml")
            status = run_child(config, run, sweep.stage_cache, sweep.threads(), lambda: True)
            if status != 0:
                raise UserError(f"{run}: the second-seed run failed: {last_line(run)}")
            values = objective_values(run, sweep.space)
            runs[(name, run_seed)] = None if values is None else values[0]
        bar.update(task, completed=len(todo))
    sign = 1 if sweep.space.directions[0] == "maximize" else -1
    seeds = [first_seed, seed]
    better = all(
        runs[("best", s)] is not None
        and runs[("config", s)] is not None
        and sign * (runs[("best", s)] - runs[("config", s)]) > 0
        for s in seeds
    )
    return {
        "trial": best.number,
        "objective": sweep.space.objective_names()[0],
        "seeds": seeds,
        "best": [runs[("best", s)] for s in seeds],
        "config": [runs[("config", s)] for s in seeds],
        "better": better,
        "is_config": best.params == config,
    }


def confirmation_text(c: dict[str, Any]) -> str:
    figures = " and ".join(
        f"{_fmt(b)} against the run config's {_fmt(r)} on seed {s}"
        for s, b, r in zip(c["seeds"], c["best"], c["config"], strict=True)
    )
    if c["is_config"]:
        verdict = "the best trial is the run config itself; no trial did better."
    elif c["better"]:
        verdict = "better on both seeds."
    else:
        verdict = "not better on both seeds, so it is not reported as better than the run config."
    return (
        f"Trial {c['trial']} was re-run on a second seed (seed {c['seeds'][1]}), and the run "
        f"config beside it: {c['objective']} {figures}: {verdict}"
    )


# ---------------------------------------------------------------- outputs


def _fmt(value: Any) -> str:
    """A table cell: 4 significant digits (learning rates are small numbers), – for none."""
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def trials_table(summary: dict[str, Any], params: list[str]) -> tuple[list[str], list[list[str]]]:
    """The table of trials: header and rows (a ``*`` marks the Pareto front)."""
    header = ["trial", "state", *params, *summary["objectives"], "reward", "kl", "seconds", "note"]
    rows = []
    for t in summary["trials"]:
        values = t["values"] or [None] * len(summary["objectives"])
        mark = "*" if t["pareto"] and len(summary["objectives"]) > 1 else ""
        rows.append(
            [f"{t['number']}{mark}", t["state"]]
            + [_fmt(t["params"].get(p)) for p in params]
            + [_fmt(v) for v in values]
            + [_fmt(t["reward"]), _fmt(t["kl"]), _fmt(t["seconds"]), t["note"] or ""]
        )
    return header, rows


def write_outputs(sweep: Sweep, study: optuna.Study, summary: dict[str, Any]) -> None:
    """sweep.json, sweep.md (the table, the best settings, the second seed), best.toml,
    plots/; the table on stdout."""
    params = [p.name for p in sweep.space.params]
    header, rows = trials_table(summary, params)
    table = Table(*header, title=f"sweep {sweep.study_name!r}: {len(rows)} trials")
    for row in rows:
        table.add_row(*map(escape, row))
    width = sum(max(map(len, column)) + 3 for column in zip(header, *rows, strict=True)) + 1
    stdout = Console()
    stdout.width = max(stdout.width, width)  # whole, even on a narrow terminal or in a file
    stdout.print(table)
    lines = [f"# chatrl sweep — study {sweep.study_name!r}", ""]
    lines += [f"Run config: {sweep.config}; space: {sweep.space.path}; storage: {sweep.storage}."]
    objectives = ", ".join(
        f"{d} {n}" for d, n in zip(summary["directions"], summary["objectives"], strict=True)
    )
    lines += ["", f"Objective: {objectives}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    best = summary["best"]
    if best is not None:
        settings = ", ".join(f"{k} = {_fmt(v)}" for k, v in best["params"].items())
        lines += ["", f"Best: trial {best['number']} ({settings}); its config: best.toml."]
        header_lines = [f"chatrl sweep: trial {best['number']} of study {sweep.study_name!r}"]
        if summary["confirmation"] is not None:
            text = confirmation_text(summary["confirmation"])
            lines += ["", text]
            header_lines.append(text)
            console.print(text, highlight=False, soft_wrap=True)
        else:
            lines += ["", "Not re-run on a second seed: not shown to be better than the config."]
        best_toml = Path(best["run_dir"], "config.toml").read_text()
        comment = "".join(f"# {line}\n" for line in header_lines)
        (sweep.out / "best.toml").write_text(comment + best_toml, encoding="utf-8")
    summary["plots"] = plot(sweep, summary)
    lines += [""] + [f"![{p}]({p})" for p in summary["plots"]]
    write_json(sweep.out / "sweep.json", summary)
    (sweep.out / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    console.print(f"sweep -> {sweep.out / 'sweep.md'}  (best.toml, sweep.json, plots/)")


def plot(sweep: Sweep, summary: dict[str, Any]) -> list[str]:
    """plots/params.png (each objective against each parameter) and plots/frontier.png (the
    reward–KL frontier: every complete trial, the Pareto front joined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = sweep.out / "plots"
    plots.mkdir(exist_ok=True)
    complete = [t for t in summary["trials"] if t["state"] == "complete"]
    params, names = sweep.space.params, summary["objectives"]
    fig, axes = plt.subplots(
        len(names), len(params), figsize=(4 * len(params), 3.2 * len(names)), squeeze=False
    )
    for i, name in enumerate(names):
        for j, param in enumerate(params):
            ax = axes[i][j]
            points = [(t["params"][param.name], t["values"][i]) for t in complete]
            if param.choices is not None:
                points = [(str(x), y) for x, y in points]
            if points:
                ax.scatter(*zip(*points, strict=True))
            if param.log:
                ax.set_xscale("log")
            ax.set_xlabel(param.name)
            ax.set_ylabel(name)
    fig.tight_layout()
    fig.savefig(plots / "params.png", dpi=110)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    points = [
        (t["kl"], t["reward"], t["number"]) for t in complete if None not in (t["kl"], t["reward"])
    ]
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points])
        for kl, reward, number in points:
            ax.annotate(str(number), (kl, reward), fontsize=8)
        front, best_reward = [], -math.inf
        for kl, reward, _ in sorted(points):
            if reward > best_reward:
                front.append((kl, reward))
                best_reward = reward
        ax.plot(*zip(*front, strict=True), "o-", color="tab:red", label="Pareto front")
        ax.legend()
    ax.set_xlabel("PPO's KL to SFT (nats per response)")
    ax.set_ylabel("PPO's gold score" if _judged(complete) else "PPO's reward-model score")
    ax.set_title("reward–KL frontier of the trials")
    fig.tight_layout()
    fig.savefig(plots / "frontier.png", dpi=110)
    plt.close("all")
    return ["plots/params.png", "plots/frontier.png"]


def _judged(trials: list[dict[str, Any]]) -> bool:
    return any(Path(t["run_dir"], "eval", "eval.json").exists() for t in trials if t["run_dir"])
