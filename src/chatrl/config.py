"""Stage settings: pydantic models, TOML loading and ``--key value`` overrides, clear errors.

Each stage's settings are one pydantic model with ``extra="forbid"``, so an unknown or
mistyped key is an error that names it. Keys follow TRL's names where the meaning is the
same (``learning_rate``, ``per_device_train_batch_size``, ``gradient_accumulation_steps``…).
Every key can come from a TOML file (``--config FILE.toml``, a ``[section]`` per stage) and be
overridden on the command line as ``--key value`` (``--flag`` / ``--no-flag`` for booleans).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from chatrl.errors import UserError
from chatrl.precision import Precision

BF16_HELP = (
    "bf16 autocast: true, false, or auto (bf16 where the hardware runs it natively: a GPU, or "
    "a CPU with AVX-512 BF16 or AMX; fp32 elsewhere, where bf16 is emulated and many times slower)"
)


class StageConfig(BaseModel):
    """Base of every stage's settings: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Shared keys whose default differs by stage: the type holds the checks and the description,
# and a stage redeclares the key with its own default.
LearningRate = Annotated[float, Field(gt=0, description="peak AdamW learning rate")]
WarmupRatio = Annotated[float, Field(ge=0, le=1, description="share of steps for linear warm-up")]
SaveSteps = Annotated[int, Field(gt=0, description="checkpoint every N updates")]


class TrainConfig(StageConfig):
    """The keys every trainer shares (``chatrl.train.loop.start_run`` reads them): output, seed,
    optimiser and schedule, length, precision, LoRA, evaluation and checkpoints."""

    out: str = Field(description="output directory: the trained model, its metrics, checkpoints")
    seed: int = Field(0, description="random seed (data order, new weights, sampling, dropout)")
    learning_rate: LearningRate = 1e-4
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: WarmupRatio = 0.05
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    num_train_epochs: float = Field(1.0, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, gt=0, description="stop after this many updates")
    bf16: Precision = Field("auto", description=BF16_HELP)
    use_peft: bool = Field(
        False,
        description="train LoRA adapters instead of all weights (rm: and the head; ppo, dpo: the "
        "reference is the policy with its adapters off)",
    )
    lora_r: int = Field(16, gt=0, description="LoRA rank")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    eval_steps: int = Field(
        0, ge=0, description="evaluate every N updates (0: at the end only; ppo: also at the start)"
    )
    save_steps: SaveSteps = 200
    resume: bool = Field(False, description="continue from the last checkpoint in --out")


class BatchConfig(TrainConfig):
    """A trainer over a fixed data set, one global batch of micro-batches per update."""

    per_device_train_batch_size: int = Field(
        16, gt=0, description="examples per forward pass (micro-batch) on each process"
    )
    gradient_accumulation_steps: int = Field(
        1,
        gt=0,
        description="micro-batches per update: the global batch is this times "
        "per_device_train_batch_size whatever the number of processes (they split it)",
    )
    fsdp: bool = Field(
        False,
        description="shard weights, gradients and optimiser state over the processes (FSDP) "
        "instead of a full copy on each (DDP); see docs/scaling.md",
    )
    logging_steps: int = Field(10, gt=0, description="log metrics every N updates")


class LMConfig(BatchConfig):
    """Settings of the language-model trainer (``chatrl pretrain`` and ``chatrl sft``)."""

    model: str = Field(description="model directory, hub id or GGUF file to start from")
    data: str = Field(description="training data: JSONL conversations (sft) or text (pretrain)")
    eval_data: str | None = Field(None, description="held-out data for the periodic eval loss")
    max_length: int = Field(256, gt=0, description="tokens per row; longer examples are cut")
    packing: bool = Field(False, description="pack short examples into full rows")
    chat_template_path: str | None = Field(
        None,
        description="chat template to train with instead of the model's own (a base model "
        "without one gets ChatML): chatml, a Jinja file, or a model directory to copy it from; "
        "saved with the output, so every later stage renders chats the same way",
    )
    learning_rate: LearningRate = 1e-3


class RolloutConfig(TrainConfig):
    """What every online RL trainer shares (PPO, RLOO, GRPO; ``chatrl.train.rollout``): the
    policy, the reward (a reward model, a reward function or a weighted sum of both), the
    prompts, and how responses are sampled."""

    policy: str = Field(description="SFT model directory: the starting policy and the reference")
    reward: str | None = Field(None, description="reward model directory (from `chatrl rm`)")
    reward_fn: str | None = Field(
        None,
        description="reward function module:function, called on (prompt messages, response "
        "texts) batched, returning floats (chatrl.world:gold_reward: the world's gold labeler)",
    )
    reward_model_weight: float = Field(1.0, description="weight of the reward model's score")
    reward_fn_weight: float = Field(1.0, description="weight of the reward function's value")
    prompts: str = Field(description="JSONL prompts to roll out on")
    eval_prompts: str | None = Field(None, description="held-out JSONL prompts for evaluation")
    rollout_batch_size: int = Field(64, gt=0, description="responses sampled per update")
    num_mini_batches: int = Field(2, gt=0, description="optimiser steps per pass over a rollout")
    learning_rate: LearningRate = Field(2e-5, description="policy AdamW learning rate")
    warmup_ratio: WarmupRatio = 0.0
    response_length: int = Field(48, gt=0, description="most tokens per sampled response")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of rollouts")
    kl_budget: float | None = Field(
        None, gt=0, description="stop when a rollout's mean KL to the SFT model exceeds this"
    )
    missing_eos_penalty: float = Field(
        1.0, ge=0, description="subtracted from the score of responses that never stop"
    )
    reject_truncated: bool = Field(
        False, description="leave responses that never stop out of the update instead"
    )
    save_steps: SaveSteps = 20

    @model_validator(mode="after")
    def _needs_a_reward(self) -> RolloutConfig:
        if self.reward is None and self.reward_fn is None:
            raise ValueError("set reward (a reward model), reward_fn (a function), or both")
        return self


class PPOConfig(RolloutConfig):
    """Settings of ``chatrl ppo`` (stage 3); docs/ppo.md gives the reasons for the defaults."""

    value_model: str | None = Field(
        None, description="directory to start the critic from (default: the reward model)"
    )
    value_head: bool = Field(
        False, description="value head on the policy instead of a separate critic (less memory)"
    )
    samples_per_prompt: int = Field(1, gt=0, description="responses per prompt in a rollout")
    num_ppo_epochs: int = Field(4, gt=0, description="passes over each rollout batch")
    value_learning_rate: float = Field(1e-4, gt=0, description="critic AdamW learning rate")
    kl_coef: float = Field(0.05, ge=0, description="β: per-token KL penalty (initial if adaptive)")
    adaptive_kl: bool = Field(False, description="adapt β to reach kl_target (Ziegler et al.)")
    kl_target: float = Field(6.0, gt=0, description="adaptive β: target KL per response (nats)")
    kl_horizon: int = Field(10000, gt=0, description="adaptive β: horizon in responses")
    cliprange: float = Field(0.2, gt=0, description="PPO ratio clipping ε")
    cliprange_value: float = Field(0.2, gt=0, description="value clipping around old values")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount γ")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    ptx_data: str | None = Field(
        None, description="PPO-ptx: SFT conversations or text for the language-model loss"
    )
    ptx_coef: float = Field(0.2, ge=0, description="PPO-ptx: γ, weight of that loss")
    ptx_batch_size: int = Field(8, gt=0, description="PPO-ptx: rows per mini-batch")
    ptx_max_length: int = Field(256, gt=0, description="PPO-ptx: tokens per row")


class GroupConfig(RolloutConfig):
    """The critic-free methods (RLOO, GRPO): a group of responses per prompt is its own
    baseline. Names as TRL's RLOOConfig and GRPOConfig."""

    num_generations: int = Field(4, gt=1, description="responses per prompt: a group")
    num_iterations: int = Field(1, gt=0, description="μ: passes over each rollout batch")
    num_mini_batches: int = Field(1, gt=0, description="optimiser steps per pass over a rollout")
    epsilon: float = Field(0.2, gt=0, description="ratio clipping ε")


class RLOOConfig(GroupConfig):
    """Settings of ``chatrl rloo``: REINFORCE with a leave-one-out baseline (Ahmadian et al.
    2024), the KL to the SFT model in the reward; docs/rl.md."""

    beta: float = Field(0.05, ge=0, description="β: KL penalty in the reward (per response)")


class GRPOConfig(GroupConfig):
    """Settings of ``chatrl grpo``: group-normalised advantages and the KL as a loss term
    (Shao et al. 2024); Dr. GRPO with loss_type dr_grpo and scale_rewards none; docs/rl.md."""

    beta: float = Field(0.04, ge=0, description="β: weight of the k3 KL loss term (0: none)")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "grpo",
        description="grpo: token mean per response, then mean; dr_grpo: token sum over "
        "responses × response_length (Dr. GRPO); dapo: token mean over the mini-batch",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="divide advantages by the std of the group's rewards, the batch's, or not "
        "at all (none: Dr. GRPO)",
    )


class RMConfig(BatchConfig):
    """Settings of the reward-model trainer (``chatrl rm``)."""

    model: str = Field(description="SFT model (or any causal LM / encoder) to start from")
    data: str = Field(description="rankings, TRL preference pairs or HH-RLHF pairs (JSONL)")
    eval_data: str | None = Field(
        None,
        validation_alias=AliasChoices("eval_data", "eval"),
        description="held-out rankings for pairwise accuracy (--eval for short)",
    )
    prompts: str | None = Field(
        None,
        description="training prompts: normalise rewards over SFT samples for them "
        "(default: over the responses in --data)",
    )
    max_length: int | None = Field(
        None, gt=0, description="tokens per prompt + response (default: the model's context)"
    )
    margin: float = Field(
        0.0, ge=0, description="margin per rank of distance: r_w - r_l must exceed margin * d"
    )
    center_rewards_coefficient: float = Field(
        0.0, ge=0, description="penalty on (r_w + r_l)^2 that keeps rewards centred (TRL's)"
    )
    max_new_tokens: int = Field(64, gt=0, description="length of the normalisation samples")
    temperature: float = Field(1.0, ge=0, description="temperature of the normalisation samples")


class DPOConfig(BatchConfig):
    """Settings of ``chatrl dpo``: direct preference optimisation on rankings; docs/dpo.md."""

    model: str = Field(description="SFT model: the starting policy and the frozen reference")
    data: str = Field(description="rankings, TRL preference pairs or HH-RLHF pairs (JSONL)")
    eval_data: str | None = Field(
        None,
        validation_alias=AliasChoices("eval_data", "eval"),
        description="held-out rankings: implicit-reward accuracy and loss (--eval for short)",
    )
    max_length: int | None = Field(
        None, gt=0, description="tokens per prompt + response (default: the model's context)"
    )
    beta: float = Field(
        0.1, gt=0, description="β: strength of the pull towards the reference (IPO: τ)"
    )
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="sigmoid: DPO (Rafailov et al. 2023, eq. 7; with label_smoothing, "
        "conservative DPO); ipo: IPO (Azar et al. 2023, eq. 17, per-token log-ratios as TRL)",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="sigmoid only: ε, the assumed share of flipped labels (conservative DPO)",
    )
    learning_rate: LearningRate = 1e-6

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self) -> DPOConfig:
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("label_smoothing applies to loss_type 'sigmoid' only")
        return self


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def build(cls: type[StageConfig], values: dict[str, Any], source: str) -> StageConfig:
    """Validate ``values`` into ``cls``; errors name the source and the key."""
    try:
        return cls(**values)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = _format_loc(err["loc"]) or "(config)"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            elif err["type"] == "missing":
                problems.append(f"missing required key '{key}'")
            else:
                problems.append(f"'{key}': {err['msg']}")
        raise UserError(f"{source}: " + "; ".join(problems)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``--key value`` / ``--flag`` / ``--no-flag`` command-line words as a dict."""
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--"):
            raise UserError(f"unexpected argument {word!r}; options look like --key value")
        key = word[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
            values[key] = value
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            values[key] = args[i + 1]
            i += 2
        else:
            negated = key.startswith("no_")
            values[key[3:] if negated else key] = not negated
            i += 1
    return values


def load_stage(
    cls: type[StageConfig],
    config_file: str | Path | None,
    section: str | None,
    overrides: dict[str, Any],
) -> StageConfig:
    """Settings from an optional TOML file (its ``[section]`` if given), then overrides."""
    values: dict[str, Any] = {}
    source = "command line"
    if config_file is not None:
        table = read_toml(config_file)
        if section is not None:
            table = table.get(section, {})
            if not isinstance(table, dict):
                raise UserError(f"{config_file}: [{section}] must be a table")
        values.update(table)
        source = f"{config_file}" + (f" [{section}]" if section else "")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build(cls, values, source)


def describe(cls: type[StageConfig]) -> str:
    """One line per key (flag, default, description), for ``--help``: required keys first, then
    the stage's own, then those it shares with other stages (from a base class)."""
    shared = {name for base in cls.__mro__[1:] for name in getattr(base, "model_fields", {})}
    lines = []
    order = sorted(
        cls.model_fields, key=lambda k: (not cls.model_fields[k].is_required(), k in shared)
    )
    for name in order:
        field = cls.model_fields[name]
        flag = "--" + name.replace("_", "-")
        default = "required" if field.is_required() else f"default {field.default!r}"
        lines.append(f"* `{flag}` ({default}): {field.description or ''}")
    return "\n".join(lines)
