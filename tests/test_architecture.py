"""The dependency rules of ../shared/DESIGN.md, checked on the source: core pieces import only
core pieces, no stage imports another stage, and only the apps on top import the world."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import chatrl

PACKAGE = Path(chatrl.__file__).parent

# Core pieces: what every stage may use.
CORE = {
    "chatrl", "chatrl.errors", "chatrl.precision", "chatrl.config", "chatrl.data",
    "chatrl.chat_format", "chatrl.models", "chatrl.llama_decode", "chatrl.engine",
    "chatrl.batching", "chatrl.reward_model", "chatrl.reward_fn", "chatrl.evaluate",
    "chatrl.train", "chatrl.train.loop", "chatrl.train.rollout",
}  # fmt: skip
# Stages, by the prefix of their modules: each may import the core and itself.
STAGES = (
    "chatrl.sample", "chatrl.train.lm", "chatrl.train.reward", "chatrl.train.ppo",
    "chatrl.train.dpo", "chatrl.train.rloo", "chatrl.train.grpo", "chatrl.label",
    "chatrl.teacher",
)  # fmt: skip
# The one stage-to-stage import allowed: the teacher's human check feeds the labeling app
# through LabelStore's public methods (DESIGN.md says why).
ALLOWED = {("chatrl.teacher.rank", "chatrl.label.store")}
WORLD = "chatrl.world"
# On top: they wire stages, the world and users together.
APPS = {
    "chatrl.__main__", "chatrl.cli", "chatrl.pipeline", "chatrl.report", "chatrl.serve",
    "chatrl.serve.app", "chatrl.serve.chat", "chatrl.serve.worker", "chatrl.world.commands",
    "chatrl.label.commands", "chatrl.teacher.commands", "chatrl.sweep",
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def chatrl_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chatrl"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("chatrl")}
    return found


def stage_of(module: str) -> str | None:
    return next((s for s in STAGES if module == s or module.startswith(s + ".")), None)


def kind(module: str) -> str:
    if module in APPS:
        return "app"
    if module in CORE:
        return "core"
    if stage_of(module):
        return "stage"
    if module == WORLD or module.startswith(WORLD + "."):
        return "world"
    return "unknown"


def problems(module: str, deps: set[str]) -> list[str]:
    """What breaks the rules when ``module`` imports ``deps``."""
    own = kind(module)
    if own == "unknown":
        return [f"{module}: add it to a layer in this test (and DESIGN.md)"]
    found = []
    for dep in sorted(deps):
        dep_kind = kind(dep)
        if own == "core" and dep_kind != "core":
            found.append(f"core module {module} imports {dep_kind} {dep}")
        elif own == "world" and dep_kind not in ("core", "world"):
            found.append(f"the world's {module} imports {dep_kind} {dep}")
        elif own == "stage" and dep_kind not in ("core", "stage"):
            found.append(f"stage {module} imports {dep_kind} {dep}")
        elif (
            own == "stage"
            and stage_of(dep) not in (None, stage_of(module))
            and (module, dep) not in ALLOWED
        ):
            found.append(f"stage {module} imports stage {dep}")
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module):
    assert problems(module, chatrl_imports(MODULES[module])) == []


def test_the_rules_catch_each_kind_of_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from chatrl.world import judge\nimport chatrl.train.ppo\n")
    assert chatrl_imports(bad) == {"chatrl.world", "chatrl.train.ppo"}
    assert problems("chatrl.train.lm", {"chatrl.train.ppo"}) == [
        "stage chatrl.train.lm imports stage chatrl.train.ppo"
    ]
    assert problems("chatrl.sample", {"chatrl.world.judge"})  # a stage importing the world
    assert problems("chatrl.engine", {"chatrl.sample"})  # core importing a stage
    assert problems("chatrl.world.tasks", {"chatrl.label.store"})  # the world importing a stage
    assert problems("chatrl.newthing", set())  # an unclassified module
    assert problems("chatrl.teacher.rank", {"chatrl.label.store", "chatrl.teacher.batch"}) == []
    assert problems("chatrl.pipeline", {"chatrl.world", "chatrl.train.ppo"}) == []
