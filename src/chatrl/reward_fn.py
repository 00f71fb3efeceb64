"""Programmatic rewards: a Python function named ``module:function``, alone or summed with a
reward model, the one way every online trainer (PPO, RLOO, GRPO) and Best-of-n score responses.

A reward function is called on a whole batch, as TRL calls its reward functions:

    fn(prompts, responses) -> list[float]      # one float per response

``prompts`` are the prompts' messages (a list of ``{"role", "content"}`` lists) and
``responses`` the response texts. A function whose signature also names ``meta`` (the prompts'
``meta`` dicts) or ``finished`` (whether each response stopped on its own), or takes
``**kwargs``, gets those as keyword arguments too: the bundled world's gold labeler
(``chatrl.world:gold_reward``) reads the task from the meta.

The module is imported with ``importlib`` (the current directory is searched too, as
``python -m`` does), so this module imports no user code, and nothing of the world, itself.
Whatever goes wrong — a module or function that is missing, a function that raises or returns
something other than one number per response — is a ``UserError`` naming the spec.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable
from numbers import Real
from pathlib import Path

import torch

from chatrl.data import Prompt
from chatrl.errors import UserError
from chatrl.reward_model import RewardScorer

RewardFn = Callable[..., list[float]]
OPTIONAL_ARGUMENTS = ("meta", "finished")


def load_reward_fn(spec: str) -> RewardFn:
    """The callable ``spec`` (``module:function``) names; a UserError when there is none."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UserError(f"reward_fn {spec!r}: expected module:function, e.g. my_rewards:length")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"reward_fn {spec}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"reward_fn {spec}: module {module_name} has no function {name!r}")
    return fn


def call_reward_fn(
    fn: RewardFn, spec: str, prompts: list[Prompt], responses: list[str], finished: list[bool]
) -> torch.Tensor:
    """``fn`` on the batch (see the module docstring), checked: one finite number per response."""
    extra = {"meta": [p.meta for p in prompts], "finished": finished}
    parameters = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {k: v for k, v in extra.items() if takes_all or k in parameters}
    try:
        values = fn([p.messages for p in prompts], responses, **kwargs)
    except Exception as e:  # the user's code: any failure is theirs to fix, in one line
        raise UserError(f"reward_fn {spec} raised {type(e).__name__}: {e}") from None
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, list | tuple) or len(values) != len(responses):
        got = f"{len(values)} values" if isinstance(values, list | tuple) else repr(values)[:80]
        raise UserError(
            f"reward_fn {spec} must return a list of {len(responses)} floats, one per "
            f"response; it returned {got}"
        )
    for value in values:
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise UserError(f"reward_fn {spec} returned {value!r}: every value must be a float")
    return torch.tensor([float(v) for v in values])


class Reward:
    """The reward a trainer maximises: reward_model_weight · r_θ(x, y) (the normalised reward
    model's score) + reward_fn_weight · f(x, y) (the reward function's), either term optional.

    ``score`` returns the total and each term by name (``rm_score``, ``reward_fn_score``), for
    the metrics. ``reward_fn`` is the spec as given, which train_config.json records.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        reward_fn: str | None = None,
        model_weight: float = 1.0,
        fn_weight: float = 1.0,
        device: str | torch.device | None = None,
        bf16: bool = False,
    ):
        if model_dir is None and reward_fn is None:
            raise UserError("no reward: give a reward model, a reward function, or both")
        self.model_dir, self.reward_fn = model_dir, reward_fn
        self.fn = load_reward_fn(reward_fn) if reward_fn else None
        self.scorer = RewardScorer(model_dir, device, bf16) if model_dir is not None else None
        self.model_weight, self.fn_weight = model_weight, fn_weight

    def describe(self) -> str:
        """What the reward is, in words: the report's record of it."""
        terms = [f"{self.model_weight} x reward model {self.model_dir}"] if self.scorer else []
        terms += [f"{self.fn_weight} x {self.reward_fn}"] if self.fn else []
        return " + ".join(terms)

    def score(
        self, prompts: list[Prompt], responses: list[str], finished: list[bool]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum for each response, float32 on the CPU, and its terms."""
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(responses))
        if self.scorer is not None:
            terms["rm_score"] = self.scorer.score([p.messages for p in prompts], responses)
            total += self.model_weight * terms["rm_score"]
        if self.fn is not None:
            terms["reward_fn_score"] = call_reward_fn(
                self.fn, self.reward_fn, prompts, responses, finished
            )
            total += self.fn_weight * terms["reward_fn_score"]
        return total, terms
