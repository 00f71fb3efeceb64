import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = """
seed = 0
[model]
preset = "micro"
world_docs = 400
max_steps = 6
[sft]
world_demos = 160
max_steps = 10
save_steps = 2
per_device_train_batch_size = 8
[sample]
world_prompts = 24
k = 3
max_new_tokens = 12
[label]
annotators = 3
[rm]
max_steps = 3
[ppo]
world_prompts = 32
max_steps = 2
rollout_batch_size = 8
num_mini_batches = 1
response_length = 12
[eval]
world_prompts = 12
best_of = 3
max_new_tokens = 12
"""


def chatrl(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "chatrl", *map(str, args)], capture_output=True, text=True, **kwargs
    )


def config(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pipeline")
    out = tmp / "run"
    result = chatrl("run", config(tmp), "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def kill_once_written(cmd: list[str], path: Path) -> None:
    """Start ``cmd`` and SIGKILL it, with every process it started, as soon as ``path`` exists
    (a sweep's trial runs in a child, which would otherwise work on for up to half a second:
    long enough to finish a tiny stage)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, f"{path} was never written"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


REPORT_FIELDS = ("gold_score", "win_rate_vs_sft", "refusal_rate", "over_refusal_rate")
REPORT_FIELDS += ("stop_rate", "mean_length", "kl_vs_sft")


@pytest.mark.slow
def test_run_writes_every_stage_and_a_report(finished_run):
    for stage in ("model", "sft", "sample", "label", "rm", "ppo", "eval"):
        state = json.loads((finished_run / stage / "stage.json").read_text())
        assert state["done"] and state["seconds"] > 0
    report = json.loads((finished_run / "report.json").read_text())
    for policy in ("sft", "best_of_n", "ppo", "perfect", "sft_greedy", "ppo_greedy"):
        assert set(REPORT_FIELDS) <= set(report[policy])
    assert report["perfect"]["gold_score"] > report["sft"]["gold_score"]  # the ceiling is above
    assert report["sft"]["win_rate_vs_sft"] == 0.5
    gap = report["targets"]["PPO closes >= 60% of the SFT → perfect gap"]
    assert gap == {"value": report["gap_closed"], "met": report["gap_closed"] >= 0.6}
    assert len(report["targets"]) == 7
    for key in ("rm_accuracy", "annotator_agreement", "seconds", "seed", "chatrl_version"):
        assert key in report
    card = (finished_run / "report.md").read_text()
    assert card.startswith("# chatrl report card")
    # The precision each trainer chose, and the CPU it ran on, are on the card.
    assert set(report["precision"]) == {"model", "sft", "rm", "ppo"}
    assert set(report["precision"].values()) <= {"bf16", "fp32"}
    precisions = ", ".join(f"{stage} {p}" for stage, p in report["precision"].items())
    assert f"Precision: {precisions}." in card
    assert report["hardware"]["name"] in card
    for plot in ("training.png", "ppo.png", "families.png"):
        assert (finished_run / "plots" / plot).stat().st_size > 1000
    assert (finished_run / "config.toml").exists()
    assert (finished_run / "ppo" / "model.safetensors").exists()


def test_a_run_from_a_pretrained_model_also_evaluates_it(finished_run, tmp_path):
    """``[model] path``: the base model gets rows of its own, here the micro run's base."""
    import shutil

    from chatrl.evaluate import evaluate_run
    from chatrl.pipeline import EvalSection
    from chatrl.report import write_report
    from chatrl.world import judge, perfect_response

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    settings = EvalSection(world_prompts=12, best_of=3, max_new_tokens=12)
    base = finished_run / "model"
    evaluation = evaluate_run(
        run, run / "eval" / "prompts.jsonl", settings, 0, judge=judge, perfect=perfect_response,
        base=base,
    )  # fmt: skip
    policies = evaluation["policies"]
    assert set(REPORT_FIELDS) <= set(policies["base"]) and "base_greedy" in policies
    # An estimate (k1, may be negative on 12 prompts), nonzero: the base model is not SFT's.
    assert policies["base"]["kl_vs_sft"] != 0.0 and policies["sft"]["kl_vs_sft"] == 0.0
    (run / "eval" / "eval.json").write_text(json.dumps(evaluation))
    records = {s: json.loads((run / s / "stage.json").read_text()) for s in ("model", "ppo")}
    write_report(run, records, 0)
    card = (run / "report.md").read_text()
    assert "| base |" in card and "| base_greedy |" in card
    assert card.index("| base |") < card.index("| sft |")


@pytest.mark.slow
def test_rerun_skips_finished_stages(finished_run, tmp_path):
    before = {p: p.stat().st_mtime for p in finished_run.glob("*/model.safetensors")}
    result = chatrl("run", finished_run / "config.toml", "--out", finished_run)
    assert result.returncode == 0
    assert result.stderr.count("skipped") == 7
    assert before and before == {p: p.stat().st_mtime for p in before}  # nothing retrained


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(finished_run, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "chatrl", "run", str(config(tmp_path)), "--out", str(out)]
    kill_once_written(cmd, out / "sft" / "checkpoint" / "trainer_state.json")
    result = chatrl("run", out / "config.toml", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model: done earlier" in result.stderr and "sft: resuming" in result.stderr
    resumed = json.loads((out / "report.json").read_text())
    straight = json.loads((finished_run / "report.json").read_text())
    for policy in ("sft", "ppo", "best_of_n"):
        for field in REPORT_FIELDS:
            assert resumed[policy][field] == pytest.approx(straight[policy][field], abs=1e-6)


@pytest.mark.slow
def test_changed_section_reruns_from_that_stage(finished_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    changed = (out / "config.toml").read_text().replace("max_steps = 3", "max_steps = 2", 1)
    result = chatrl("run", config(tmp_path, changed), "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [
        line.split(":")[0].strip("✓ ") for line in result.stderr.splitlines() if "skipped" in line
    ]
    assert skipped == ["model", "sft", "sample", "label"]


@pytest.mark.slow
def test_methods_train_side_by_side_and_the_card_compares_them(finished_run, tmp_path):
    """Adding DPO, RLOO and GRPO to stage 3 trains each from the same SFT model (and rankings
    or reward model), keeps PPO, reruns eval; ``--from dpo`` reruns DPO and eval only."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    text = (out / "config.toml").read_text()
    text = text.replace("seed = 0", 'seed = 0\nmethods = ["grpo", "dpo", "ppo", "rloo"]')
    online = "world_prompts = 32\nmax_steps = 2\nrollout_batch_size = 8\nresponse_length = 12\n"
    text += "[dpo]\nmax_steps = 3\nlearning_rate = 1e-3\n"
    text += f"[rloo]\n{online}[grpo]\n{online}reward_fn = 'chatrl.world:gold_reward'\n"
    result = chatrl("run", config(tmp_path, text), "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [
        line.split(":")[0].strip("✓ ") for line in result.stderr.splitlines() if "skipped" in line
    ]
    assert skipped == ["model", "sft", "sample", "label", "rm", "ppo"]
    report = json.loads((out / "report.json").read_text())
    methods = report["methods"]
    assert list(methods) == ["ppo", "dpo", "rloo", "grpo"]  # the pipeline's order
    for name, method in methods.items():
        assert method["tokens"] > 0 and method["seconds"] > 0, name
        assert set(REPORT_FIELDS) <= set(report[name]) and f"{name}_greedy" in report["policies"]
    assert methods["ppo"]["gold_score"] == report["ppo"]["gold_score"]
    assert methods["dpo"]["trained_on"] == "rankings"
    assert methods["rloo"]["trained_on"] == "reward model"
    assert methods["grpo"]["trained_on"] == "reward model + gold labeler"
    card = (out / "report.md").read_text()
    assert "| method |" in card and "| dpo |" in card and "| grpo_greedy |" in card
    assert "**grpo trained on the gold labeler's reward**" in card

    again = chatrl("run", config(tmp_path, text), "--out", out, "--from", "dpo")
    assert again.returncode == 0, again.stderr[-3000:]
    ran = [line.split("▶")[1].strip() for line in again.stderr.splitlines() if "▶" in line]
    assert ran == ["dpo", "eval"]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            TINY.replace("[sft]\n", "[sft]\nlerning_rate = 1.0\n"),
            "[sft]: unknown key 'lerning_rate'",
        ),
        (TINY + "\n[stage9]\nx = 1\n", "unknown key 'stage9'"),
        (
            TINY.replace("[sample]\n", '[sample]\nprompts = "missing.jsonl"\n'),
            "missing.jsonl: file not found",
        ),
        (TINY.replace("seed = 0", "seed = 'zero'"), "'seed': Input should be a valid integer"),
        ("seed = [", "invalid TOML"),
        (
            TINY.replace("seed = 0", 'seed = 0\nmethods = ["ppo", "sac"]'),
            "methods must list stage-3 methods once each, of ppo",
        ),
        (
            TINY.replace("[model]\n", '[model]\npath = "${CHATRL_NO_SUCH_MODEL}"\n'),
            "[model] path: environment variable CHATRL_NO_SUCH_MODEL is not set",
        ),
    ],
)
def test_config_errors_are_one_line_with_exit_2(tmp_path, text, message):
    result = chatrl("run", config(tmp_path, text), "--out", tmp_path / "run")
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr.replace("\n", "")
    assert "Traceback" not in result.stderr


def test_model_path_expands_environment_variables(tmp_path, monkeypatch):
    from chatrl.pipeline import load_run_config

    monkeypatch.setenv("CHATRL_TEST_MODELS", str(tmp_path))
    path = config(tmp_path, TINY.replace("[model]\n", '[model]\npath = "$CHATRL_TEST_MODELS/m"\n'))
    assert load_run_config(path).model.path == f"{tmp_path}/m"


def test_a_config_extends_another_and_the_run_keeps_the_settings(tmp_path):
    from chatrl.pipeline import keep_config, load_run_config, read_run_toml

    (tmp_path / "base.toml").write_text(TINY)
    child = tmp_path / "child" / "run.toml"
    child.parent.mkdir()
    child.write_text('extends = "../base.toml"\nseed = 3\n[rm]\nmax_steps = 5\n')
    cfg = load_run_config(child)
    assert cfg.seed == 3 and cfg.rm.model_extra["max_steps"] == 5
    assert cfg.ppo.model_extra["max_steps"] == 2  # the base's, untouched
    assert cfg.model.preset == "micro"
    keep_config(child, tmp_path / "run")  # what a run directory keeps: the settings themselves
    assert load_run_config(tmp_path / "run" / "config.toml") == cfg
    demo = tmp_path / "demo.toml"
    demo.write_text('extends = "demo"\nmethods = ["ppo", "dpo"]\n')
    assert read_run_toml(demo)["ppo"]["max_steps"] == 45 and read_run_toml(demo)["seed"] == 0


def test_missing_config_file(tmp_path):
    result = chatrl("run", tmp_path / "nope.toml", "--out", tmp_path / "run")
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_app_mode_waits_for_people_with_instructions(tmp_path, monkeypatch):
    text = TINY.replace("[label]\n", '[label]\nmode = "app"\n')
    out = tmp_path / "run"
    # Only the stages before ranking run; the ranking step explains how to continue.
    result = chatrl("run", config(tmp_path, text), "--out", out, timeout=600)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "chatrl label serve --db sqlite:///" in result.stderr
    assert "0 of 24 rankings" in result.stderr


SMOLLM2 = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize(
    "name, stages, model_path",
    [
        ("compare.toml", ("ppo", "dpo", "rloo", "grpo"), None),  # the demo's model, pretrained
        ("smollm2.toml", ("ppo",), SMOLLM2),  # the pretrained model, named by the environment
    ],
)
def test_the_configs_in_the_repo_load_with_their_stages(name, stages, model_path, monkeypatch):
    from chatrl.pipeline import load_run_config, run_stages

    monkeypatch.setenv("SMOLLM2_GGUF", SMOLLM2)
    cfg = load_run_config(Path(__file__).parents[1] / "configs" / name)
    assert run_stages(cfg) == ("model", "sft", "sample", "label", "rm", *stages, "eval")
    assert cfg.model.path == model_path


@pytest.mark.parametrize("scale", ["gpu", "dry-run"])
def test_the_gpu_scripts_configs_load_with_its_changes(scale, tmp_path):
    """bench/gpu.py runs only where a GPU is lent; its configs are checked here, so that a
    renamed setting shows before that."""
    import importlib.util

    from chatrl.pipeline import load_run_config

    spec = importlib.util.spec_from_file_location("gpu", Path(__file__).parents[1] / "bench/gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    gpu.write_config(tmp_path / "run.toml", Path(SMOLLM2), scale)
    cfg = load_run_config(tmp_path / "run.toml")
    assert cfg.model.path == SMOLLM2
    for section, changes in gpu.SCALES[scale].items():
        settings = getattr(cfg, section).model_dump()
        assert {k: settings[k] for k in changes} == changes
