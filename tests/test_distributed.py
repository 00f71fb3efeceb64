"""Several processes on torch.distributed (gloo, loopback): ``torchrun -m chatrl <stage>``.

Each multi-process run sets CHATRL_CHECK_REPLICAS=1, so it fails if the processes' weights ever
differ after an update; and each must end where a one-process run with the same settings does
(the global batch does not depend on the number of processes), within floating-point noise.
"""

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import write_prompts, write_sft
from safetensors.torch import load_file

from chatrl.config import DPOConfig, LMConfig, PPOConfig, RMConfig
from chatrl.errors import UserError
from chatrl.models import load_causal_lm, load_reward_model, save_model
from chatrl.train.dpo import train_dpo
from chatrl.train.lm import train_lm
from chatrl.train.loop import CHECK_REPLICAS, check_replicas, process_micro_batches
from chatrl.train.ppo import train_ppo
from chatrl.train.reward import train_reward

TESTS = Path(__file__).parent
SFT_ARGS = dict(
    num_train_epochs=1,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,  # global batch 8: 2 micro-batches on 1 process, 1 on 2
    learning_rate=3e-3,
    bf16=False,
    logging_steps=1,
)


def cli_args(settings: dict) -> list[str]:
    """Stage settings as ``chatrl`` flags."""
    args = []
    for key, value in settings.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{name}" if value else f"--no-{name}")
        else:
            args += [f"--{name}", str(value)]
    return args


def torchrun(*args, extra_env=None, timeout=300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` on loopback, weights checked every step."""
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_ADDR": "127.0.0.1",
        CHECK_REPLICAS: "1",
        **(extra_env or {}),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def max_difference(a: Path, b: Path) -> float:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_two_processes_match(
    command: str,
    settings: dict,
    one: Path,
    two: Path,
    steps: list[int],
    keys,
    tol: float,
    rel: float,
) -> None:
    """Run ``chatrl COMMAND`` on two processes into ``two``: its weights (within ``tol``) and
    its logged ``keys`` at every step (within ``rel``) must be those of the one-process run in
    ``one``, and only process 0 writes the log."""
    run = torchrun("-m", "chatrl", command, *cli_args(settings), "--out", two)
    assert run.returncode == 0, run.stderr[-3000:]
    assert max_difference(one, two) < tol
    alone, together = metrics(one), metrics(two)
    assert [r["step"] for r in together] == steps
    for key in keys:
        assert [r[key] for r in together] == pytest.approx([r[key] for r in alone], rel=rel)


@pytest.fixture(scope="module")
def sft(micro_model, tmp_path_factory):
    """17 conversations (updates of 8, 8 and 1: the last leaves process 1 without a row) and the
    one-process run on them."""
    root = tmp_path_factory.mktemp("sft")
    data = write_sft(root / "sft.jsonl", 17)
    settings = dict(model=str(micro_model), data=str(data), **SFT_ARGS)
    train_lm(LMConfig(**settings, out=str(root / "one")), "sft")
    return settings, root / "one"


# ---------------------------------------------------------------- in one process


def fake_accelerator(rank: int, processes: int, **more) -> SimpleNamespace:
    return SimpleNamespace(process_index=rank, num_processes=processes, **more)


@pytest.mark.parametrize("rows", [1, 3, 8, 17])
def test_every_process_gets_as_many_micro_batches_and_together_the_whole_batch(rows):
    batch = list(range(100, 100 + rows))
    shares = [process_micro_batches(batch, 2, fake_accelerator(r, 3)) for r in range(3)]
    assert len({len(share) for share in shares}) == 1
    assert sorted(i for share in shares for micro in share for i in micro) == batch
    assert all(len(micro) <= 2 for share in shares for micro in share)


def test_replica_check_names_the_process_whose_weights_differ(monkeypatch):
    model = torch.nn.Linear(3, 2)
    drifted = torch.nn.Linear(3, 2)
    copies = {"same": model, "drifted": drifted}

    def accelerator(other: str) -> SimpleNamespace:
        def gather(sums):  # what process 1 would send: the sums of its own copy
            theirs = [p.detach().double() for p in copies[other].parameters()]
            row = torch.stack([torch.stack((p.sum(), p.square().sum())) for p in theirs])
            return torch.cat([sums, row.flatten()[None]])

        return fake_accelerator(
            0, 2, distributed_type=DistributedType.MULTI_CPU, device="cpu", gather=gather
        )

    check_replicas(accelerator("drifted"), model, 3)  # off unless asked
    monkeypatch.setenv(CHECK_REPLICAS, "1")
    check_replicas(accelerator("same"), model, 3)
    with pytest.raises(RuntimeError, match=r"step 3: .*process\(es\) \[1\]"):
        check_replicas(accelerator("drifted"), model, 3)


# ---------------------------------------------------------------- on two processes


@pytest.mark.distributed
def test_sft_on_two_processes_ends_where_one_process_does(sft, tmp_path):
    settings, one = sft
    # The logged loss is the whole global batch's.
    assert_two_processes_match(
        "sft", settings, one, tmp_path / "two", [1, 2, 3], ["loss"], tol=1e-6, rel=1e-5
    )


@pytest.mark.distributed
def test_fsdp_run_survives_a_failed_process_and_resumes_on_as_many(sft, tmp_path):
    """FSDP (full sharding) on gloo: process 1 fails in update 3 of 3, after the checkpoint of
    update 2; the job ends with its error; resuming on 1 process is refused, on 2 it ends where
    a one-process run does, and the model it writes is a plain one-process model."""
    settings, one = sft
    out = tmp_path / "fsdp"
    args = [*cli_args(settings), "--fsdp", "--save-steps", 2, "--out", out]
    started = time.monotonic()
    failed = torchrun(TESTS / "fail_one_process.py", "sft", *args, extra_env={"FAIL_AT": "3"})
    assert failed.returncode != 0
    assert "error (process 1): deliberate failure" in failed.stderr
    assert time.monotonic() - started < 240  # the other process did not wait out a timeout
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 2
    assert (out / "checkpoint" / "pytorch_model_fsdp_0" / ".metadata").exists()  # sharded (DCP)

    with pytest.raises(UserError, match="written by 2 process.*this run has 1"):
        train_lm(LMConfig(**settings, out=str(out), fsdp=True, resume=True), "sft")

    resumed = torchrun("-m", "chatrl", "sft", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_difference(one, out) < 1e-6
    assert not (out / "checkpoint").exists()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def write_rankings(path: Path, n: int) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            best_first = [f"The answer is {a + b}.", f"{a} plus {b}", "What is the cat?"]
            shown = rng.sample(range(3), 3)
            record = {
                "prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                "responses": [best_first[j] for j in shown],
                "ranking": [shown.index(j) for j in range(3)],
            }
            f.write(json.dumps(record) + "\n")
    return path


@pytest.mark.distributed
def test_reward_model_on_two_processes_ends_where_one_process_does(micro_model, tmp_path):
    settings = dict(
        model=str(micro_model),
        data=str(write_rankings(tmp_path / "rankings.jsonl", 11)),  # updates of 6 and 5
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        bf16=False,
        logging_steps=1,
    )
    train_reward(RMConfig(**settings, out=str(tmp_path / "one")))
    keys = ["loss", "accuracy", "reward_mean"]
    assert_two_processes_match(
        "rm", settings, tmp_path / "one", tmp_path / "two", [1, 2], keys, tol=1e-6, rel=1e-5
    )
    assert json.loads((tmp_path / "two" / "eval.json").read_text())["normalization"]["std"] > 0


@pytest.mark.distributed
def test_dpo_on_two_processes_ends_where_one_process_does(micro_model, tmp_path):
    """The processes split the reference pass and each update's rankings."""
    settings = dict(
        model=str(micro_model),
        data=str(write_rankings(tmp_path / "rankings.jsonl", 11)),  # updates of 6 and 5
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        bf16=False,
        logging_steps=1,
    )
    train_dpo(DPOConfig(**settings, out=str(tmp_path / "one")))
    keys = ["loss", "rewards/accuracies", "rewards/margins", "logps/chosen"]
    assert_two_processes_match(
        "dpo", settings, tmp_path / "one", tmp_path / "two", [1, 2], keys, tol=1e-6, rel=1e-5
    )


@pytest.mark.distributed
def test_ppo_on_two_processes_ends_where_one_process_does(micro_model, tmp_path):
    """Each process samples its own prompts' rollouts; advantages are whitened and losses
    averaged over both. Near-greedy sampling makes the responses the same as one process's,
    so the updates must be too."""
    torch.manual_seed(0)  # the reward model's new head: not whatever earlier tests left
    policy, tokenizer = load_causal_lm(micro_model)
    with torch.no_grad():  # the random model's logits are nearly flat: float noise would flip
        policy.get_output_embeddings().weight.mul_(30)  # its greedy choices
    save_model(policy, tokenizer, tmp_path / "policy")
    reward, tokenizer = load_reward_model(micro_model)
    save_model(reward, tokenizer, tmp_path / "rm")
    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"What is {rng.randint(0, 9)}?"}]})
            + "\n"
            for _ in range(16)
        )
    )
    settings = dict(
        policy=str(tmp_path / "policy"),
        reward=str(tmp_path / "rm"),
        prompts=str(prompts),
        rollout_batch_size=8,
        num_mini_batches=1,
        num_ppo_epochs=2,
        response_length=8,
        max_steps=2,
        temperature=1e-6,
        learning_rate=1e-3,
        bf16=False,  # the 1e-4 tolerance is fp32's (bf16 is the default where it is native)
    )
    train_ppo(PPOConfig(**settings, out=str(tmp_path / "one")))
    keys = ["rm_score", "reward", "value_loss"]
    assert_two_processes_match(
        "ppo", settings, tmp_path / "one", tmp_path / "two", [1, 2], keys, tol=1e-4, rel=1e-4
    )


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_critic_free_method_trains_on_two_processes_in_step(micro_model, tmp_path, method):
    """Each process samples its own prompts' groups; the replica check stops the run should
    the processes' weights ever differ. (Unlike PPO's, this run cannot be compared with one
    process: near-greedy sampling would make every group's responses equal and so every
    advantage zero, and at temperature 1 each process draws its own samples.)"""
    settings = dict(
        policy=str(micro_model),
        reward_fn="reward_fns:shortest",
        prompts=str(write_prompts(tmp_path / "prompts.jsonl", 16)),
        rollout_batch_size=16,
        num_generations=4,
        num_mini_batches=2,
        response_length=8,
        max_steps=2,
        learning_rate=1e-3,
        bf16=False,
    )
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    run = torchrun(
        "-m", "chatrl", method, *cli_args(settings), "--out", tmp_path / "two",
        extra_env={"PYTHONPATH": path},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert max_difference(Path(micro_model), tmp_path / "two") > 0  # it trained
    log = metrics(tmp_path / "two")
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["grad_norm"] > 0 and math.isfinite(r["loss"]) for r in log)
