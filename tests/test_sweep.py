import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import TINY, kill_once_written

from chatrl.errors import UserError
from chatrl.pipeline import load_run_config
from chatrl.sweep import load_space, objective_values

# A PPO-only space: every trial after the first reuses model, sft, sample, label and rm. The
# run config's values (PPO's defaults) lie in it, so they are the first trial.
SPACE = """
[ppo]
learning_rate = { low = 1e-5, high = 1e-3, log = true }
kl_coef = { choices = [0.02, 0.05, 0.1] }

[objective]
metric = "ppo.gold_score"
intermediate = "log.ppo.gold_score"
"""


def write(tmp_path: Path, space: str = SPACE) -> tuple[Path, Path]:
    (tmp_path / "run.toml").write_text(TINY)
    (tmp_path / "space.toml").write_text(space)
    return tmp_path / "run.toml", tmp_path / "space.toml"


def sweep_command(config: Path, space: Path, out: Path, *args) -> list[str]:
    return [sys.executable, "-m", "chatrl", "sweep", str(config), "--space", str(space),
            "--out", str(out), "--heartbeat", "1", *map(str, args)]  # fmt: skip


def sweep(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(*args), capture_output=True, text=True, **kwargs)


def trials(out: Path) -> list[dict]:
    return json.loads((out / "sweep.json").read_text())["trials"]


@pytest.mark.slow
def test_micro_sweep_reuses_upstream_stages_and_checks_a_second_seed(tmp_path):
    config, space = write(tmp_path)
    out = tmp_path / "sweep"
    result = sweep(config, space, out, "--trials", 2, "--workers", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    done = trials(out)
    assert [t["state"] for t in done] == ["complete", "complete"]
    assert all(t["values"][0] == t["reward"] for t in done)  # ppo.gold_score is the reward axis
    assert done[0]["params"] == {"ppo.learning_rate": 2e-5, "ppo.kl_coef": 0.05}
    assert done[0]["note"] == "the run config"
    # The two trials' upstream stages are the same files: trained once, linked into both runs.
    sft = [Path(t["run_dir"], "sft", "model.safetensors").stat().st_ino for t in done]
    assert sft[0] == sft[1]
    logs = " ".join(Path(t["run_dir"], "log.txt").read_text() for t in done)
    assert logs.count("rm: reused from the stage cache") >= 1
    assert all(Path(t["run_dir"], "ppo", "model.safetensors").exists() for t in done)
    # The best trial's settings as a runnable config, and its second-seed check in the report.
    summary = json.loads((out / "sweep.json").read_text())
    best = summary["best"]
    cfg = load_run_config(out / "best.toml")
    assert cfg.ppo.model_extra["learning_rate"] == best["params"]["ppo.learning_rate"]
    assert cfg.ppo.model_extra["kl_coef"] == best["params"]["ppo.kl_coef"]
    confirmation = summary["confirmation"]
    assert confirmation["seeds"] == [0, 1] and confirmation["config"][0] == done[0]["values"][0]
    assert None not in confirmation["config"] + confirmation["best"]
    assert sorted(p.name for p in (out / "confirm").iterdir()) == ["best-seed1", "config-seed1"]
    report = (out / "sweep.md").read_text()
    assert f"Trial {best['number']} was re-run on a second seed (seed 1)" in report
    for name in ("params.png", "frontier.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert "ppo.learning_rate" in result.stdout  # the table of trials


@pytest.mark.slow
def test_killed_sweep_resumes_and_retries_the_killed_trial(tmp_path):
    config, space = write(tmp_path)
    out = tmp_path / "sweep"
    command = sweep_command(config, space, out, "--trials", 2, "--no-confirm")
    kill_once_written(command, out / "trials" / "000" / "sft" / "stage.json")  # trial 0 in sft
    result = sweep(config, space, out, "--trials", 2, "--no-confirm", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    done = trials(out)
    assert [t["state"] for t in done] == ["complete", "complete"]
    # The killed trial was queued again with its settings and resumed in its own directory.
    retried = [t for t in done if t["run_dir"].endswith("000")]
    assert len(retried) == 1 and retried[0]["number"] > 0
    log = Path(retried[0]["run_dir"], "log.txt").read_text()
    assert "model: done earlier" in log and "sft: resuming" in log


@pytest.mark.slow
def test_two_commands_share_one_sqlite_study_and_lose_no_trial(tmp_path):
    config, space = write(tmp_path)
    out = tmp_path / "sweep"
    procs = [
        subprocess.Popen(
            sweep_command(config, space, out, "--trials", 3, "--no-confirm"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE"] * 3  # three trials in all, none twice, none lost
    runs = {t.user_attrs["run_dir"] for t in study.get_trials()}
    assert len(runs) == 3 and all(Path(r, "report.json").exists() for r in runs)


@pytest.mark.slow
@pytest.mark.postgres
def test_sweep_on_postgresql(tmp_path, postgres_db):
    config, space = write(tmp_path)
    out = tmp_path / "sweep"
    result = sweep(config, space, out, "--trials", 1, "--no-confirm", "--storage", postgres_db)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [t["state"] for t in trials(out)] == ["complete"]
    assert not (out / "study.db").exists()


@pytest.mark.parametrize(
    "space, message",
    [
        (SPACE.replace("learning_rate", "lerning_rate"), "[ppo] lerning_rate: unknown key"),
        (SPACE.replace("high = 1e-3", "high = 1e-5"), "[ppo] learning_rate: empty range"),
        (SPACE.replace("[0.02, 0.05, 0.1]", "[]"), "[ppo] kl_coef: choices must be a non-empty"),
        (SPACE.replace("log = true", "log = true, step = 1e-5"), "step must be a positive"),
        (SPACE + "[ppo2]\nx = 1\n", "unknown section [ppo2]"),
        ("[ppo]\npolicy = { choices = ['a'] }\n", "[ppo] policy: unknown key"),
        (
            SPACE.replace("low = 1e-5", "low = 0.0").replace(", log = true", ""),
            "[ppo] learning_rate = 0.0 in",
        ),
        (SPACE.replace('"ppo.gold_score"', '"ppo_gold"'), "'ppo_gold': unknown metric"),
        (SPACE + "[sampler]\nname = 'tpe'\nn_startup = 3\n", "[sampler]"),
        ("[objective]\n", "nothing to search"),
        (
            SPACE.replace('"ppo.gold_score"', '["ppo.gold_score", "ppo.kl_vs_sft"]'),
            "intermediate: a logged metric (log.STAGE.KEY), and with a single objective",
        ),
    ],
)
def test_space_mistakes_name_the_file_and_key(tmp_path, space, message):
    config, path = write(tmp_path, space)
    with pytest.raises(UserError) as error:
        load_space(path, config)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_bad_space_file_is_one_line_with_exit_2(tmp_path):
    config, space = write(tmp_path, SPACE.replace("high = 1e-3", "high = 1e-5"))
    result = sweep(config, space, tmp_path / "sweep", "--trials", 2)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "learning_rate: empty range" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "sweep").exists()


def test_objectives_are_report_figures_or_logged_values_weighted(tmp_path):
    space = """
[ppo]
kl_coef = { low = 0.01, high = 0.1 }
[objective]
metric = ["ppo.gold_score", { "log.ppo.eval_rm_score" = 1.0, "log.ppo.eval_kl" = -0.5 }]
direction = ["maximize", "maximize"]
"""
    config, path = write(tmp_path, space)
    run = tmp_path / "run"
    (run / "ppo").mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({"ppo": {"gold_score": 0.25}}))
    records = [{"step": 1, "eval_rm_score": 0.1, "eval_kl": 0.2}, {"step": 2, "kl": 9.0},
               {"step": 3, "eval_rm_score": 0.5, "eval_kl": 0.4}]  # fmt: skip
    (run / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert objective_values(run, load_space(path, config)) == [0.25, pytest.approx(0.3)]
    (run / "report.json").write_text(json.dumps({"ppo": {"gold_score": None}}))
    assert objective_values(run, load_space(path, config)) is None  # no figure: no value
