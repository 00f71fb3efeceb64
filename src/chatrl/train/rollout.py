"""What every online RL trainer shares (PPO, RLOO, GRPO): sampling responses with the engine,
scoring them, log-probs under the policy and the reference, the KL to the reference, held-out
metrics, and the loop of updates.

A trainer hands ``run_updates`` its two steps: ``collect`` (a rollout from
``sample_responses``, with the method's advantages) and ``update`` (its losses on that
rollout). Everything else about an update — the prompts of each step, seeds, the KL budget,
logging, held-out evaluation, checkpoints — is the same for all of them, and lives here.
``train/ppo.py`` writes both steps itself (it has a critic to train too); the critic-free
methods share ``train_group_method``, so ``train/rloo.py`` and ``train/grpo.py`` hold only
their equations: the advantages and the loss.

A rollout keeps each sequence as prompt + response, one right-padded row per response. The
forwards of the policy, the reference and the critic read them packed (``Rollout.packed``):
the responses to one prompt share a row, the prompt computed once for all of them, each
response seeing the prompt and itself only (``reward_model.pack_groups``, as the reward
model and DPO read rankings). A prompt with k responses costs its tokens once, not k times.
The output head runs only at the positions that predict response tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn

from chatrl.chat_format import encode_prompt
from chatrl.config import GroupConfig, RolloutConfig
from chatrl.data import Prompt, load_prompts
from chatrl.engine import Completion, Engine, SamplingParams
from chatrl.errors import UserError
from chatrl.evaluate import completion_texts, kl_per_response
from chatrl.models import disable_dropout, load_causal_lm, save_model
from chatrl.reward_fn import Reward
from chatrl.reward_model import pack_groups
from chatrl.train.loop import (
    Run,
    add_lora,
    check_replicas,
    global_batches,
    shard,
    start_run,
    train_autocast,
)

# rollout_metrics(prompt meta per response, response texts, stopped flags) -> {name: value}:
# how a caller with a held-out signal (the bundled world's gold judge) adds it to every step.
RolloutMetrics = Callable[[list[dict[str, Any]], list[str], list[bool]], dict[str, float]]


# ---------------------------------------------------------------- the loop of updates


@dataclass
class Rollouts:
    """An online run's prompts, schedule and models: what ``run_updates`` samples from."""

    run: Run
    cfg: RolloutConfig
    prompts: list[Prompt]
    eval_prompts: list[Prompt]  # this process's share
    schedule: list[list[int]]  # the prompts of every update
    reward: Reward
    rollout_metrics: RolloutMetrics | None
    models: Models | None = None  # set by ``start``, once the policy is prepared

    def start(self, policy: nn.Module, reference: nn.Module | None, tokenizer) -> None:
        """The models rollouts sample and score with: the engine on the (unwrapped) policy,
        the reference, and the reward."""
        engine = Engine(policy, tokenizer, max_batch_size=self.cfg.rollout_batch_size)
        self.models = Models(policy, reference, self.reward, tokenizer, engine)


def run_updates(
    rollouts: Rollouts,
    collect: Callable[[list[Prompt], int, Stopwatch], tuple[Rollout, dict[str, float]]],
    update: Callable[[Rollout, int, dict[str, float]], dict[str, float]],
    trained: nn.Module,
    state: Callable[[], dict[str, Any]] = dict,
) -> None:
    """Every update of the run from the step it (re)starts at: ``collect(prompts, seed, clock)``
    samples and scores a rollout, with advantages; ``update(rollout, seed, metrics)`` trains on
    it (``metrics``: the rollout's, over every process). Held-out metrics before the first and
    after the last, and every ``eval_steps``; a checkpoint every ``save_steps``, with the
    method's ``state()`` (JSON, given back in ``run.extra`` on resume)."""
    run, cfg, accelerator = rollouts.run, rollouts.cfg, rollouts.run.accelerator
    schedule, start = rollouts.schedule, run.step
    if rollouts.eval_prompts and start == 0:
        run.log.log(0, **held_out_metrics(rollouts))
    trained.train()
    done = start
    with run.progress(len(schedule)) as show:
        for step in range(start, len(schedule)):
            clock = Stopwatch()
            batch = [rollouts.prompts[i] for i in shard(schedule[step], accelerator)]
            seed = rollout_seed(cfg.seed, step, accelerator)
            rollout, metrics = collect(batch, seed, clock)
            caller = caller_metrics(rollout, batch, rollouts.rollout_metrics)
            clock.lap("score")
            metrics = process_mean(accelerator, {**metrics, **caller})
            if cfg.kl_budget is not None and metrics["kl"] > cfg.kl_budget:
                # Over-optimisation guard: this policy already drifted past the budget; stop
                # here rather than push it further (docs/ppo.md).
                run.log.log(step, **metrics, stopped_on_kl_budget=1.0)
                break
            metrics |= process_mean(accelerator, update(rollout, seed, metrics))
            clock.lap("train")
            check_replicas(accelerator, trained, step + 1)
            metrics["samples_per_s"] = cfg.rollout_batch_size / sum(clock.seconds.values())
            metrics["tokens"] = sequence_tokens(rollout) * accelerator.num_processes
            metrics |= {f"time_{phase}": seconds for phase, seconds in clock.seconds.items()}
            done = step + 1
            run.log.log(done, **metrics)
            show(done, progress_info(metrics, caller))
            before_end = done < len(schedule)  # the end has held-out metrics of its own
            if (
                rollouts.eval_prompts
                and cfg.eval_steps
                and done % cfg.eval_steps == 0
                and before_end
            ):
                run.log.log(done, **held_out_metrics(rollouts))
            run.maybe_checkpoint(done, len(schedule), state())
    if rollouts.eval_prompts:
        run.log.log(done, **held_out_metrics(rollouts))


# Step 1 of a critic-free method: the rollout's advantages (set in place), and its metrics.
Advantages = Callable[["Rollout", GroupConfig, Any], dict[str, float]]
# Step 2: the loss on a mini-batch, from the policy's log-probs of its tokens; and its stats.
Loss = Callable[[torch.Tensor, "Rollout", GroupConfig, Any], tuple[torch.Tensor, dict]]


def train_group_method(
    cfg: GroupConfig,
    stage: str,
    advantages: Advantages,
    loss: Loss,
    rollout_metrics: RolloutMetrics | None = None,
) -> Path:
    """Train the policy with a critic-free method (RLOO, GRPO): ``num_generations`` responses
    per prompt, ``advantages`` from the group's rewards, and ``num_iterations`` passes of
    ``num_mini_batches`` optimiser steps on ``loss``; write it to ``cfg.out``. The method's
    module defines both steps; ``rollout_metrics`` as ``train_ppo``'s."""
    run = start_run(cfg, stage)
    cfg, accelerator = run.cfg, run.accelerator
    rollouts = plan_rollouts(run, "num_generations", rollout_metrics)
    run.seed_process()
    policy, reference, tokenizer = load_policy(cfg, accelerator)
    steps = len(rollouts.schedule) * cfg.num_iterations * cfg.num_mini_batches
    model, optimizer, scheduler = run.prepare(PolicyLogits(policy), steps)
    run.begin()
    rollouts.start(accelerator.unwrap_model(model).policy, reference, tokenizer)

    def collect(prompts, seed, clock):
        n = cfg.num_generations
        rollout = sample_responses(rollouts.models, cfg, prompts, n, seed, accelerator, clock)
        metrics = response_metrics(rollout) | advantages(rollout, cfg, accelerator)
        clock.lap("forward")
        return rollout, metrics

    def update(rollout, seed, metrics):
        stats: dict[str, list[float]] = {}
        for _, _, mb in mini_batches(rollout, cfg.num_iterations, cfg.num_mini_batches, seed):
            inputs = mb.packed()
            with train_autocast(accelerator, inputs["input_ids"]):
                logits = model(**inputs)
            mb_loss, mb_stats = loss(token_logprobs(logits, mb.tokens), mb, cfg, accelerator)
            accelerator.backward(mb_loss)
            # The replica check (CHATRL_CHECK_REPLICAS) counts optimiser steps here.
            grad_norm = run.optimizer_step(model, optimizer, scheduler, scheduler.last_epoch + 1)
            with torch.no_grad():
                mb_stats |= {"loss": mb_loss, "grad_norm": grad_norm}
                mb_stats["entropy"] = masked_mean(entropy(logits), mb.mask)
            for key, value in mb_stats.items():
                stats.setdefault(key, []).append(float(value.detach()))
        means = {key: sum(v) / len(v) for key, v in stats.items()}
        return means | {"learning_rate": scheduler.get_last_lr()[0]}

    run_updates(rollouts, collect, update, model)
    return run.finish(model, lambda trained: save_model(trained.policy, tokenizer, run.out))


def plan_rollouts(run: Run, per_prompt: str, rollout_metrics: RolloutMetrics | None) -> Rollouts:
    """The prompts, the schedule of updates (``cfg.<per_prompt>`` responses to each prompt,
    after checking that the batch splits evenly) and the reward (reward model and/or function,
    before the policy is loaded: a bad --reward-fn stops the run at once); the policy comes
    with ``Rollouts.start``."""
    cfg, accelerator = run.cfg, run.accelerator
    refuse_fsdp(accelerator, run.stage)
    prompts = load_prompts(cfg.prompts)
    eval_prompts = load_prompts(cfg.eval_prompts) if cfg.eval_prompts else []
    eval_prompts = [eval_prompts[i] for i in shard(list(range(len(eval_prompts))), accelerator)]
    schedule = update_schedule(cfg, len(prompts), per_prompt, accelerator.num_processes)
    weights = cfg.reward_model_weight, cfg.reward_fn_weight
    reward = Reward(cfg.reward, cfg.reward_fn, *weights, accelerator.device, cfg.bf16)
    return Rollouts(run, cfg, prompts, eval_prompts, schedule, reward, rollout_metrics)


def rollout_seed(seed: int, step: int, accelerator) -> int:
    """The sampling seed of update ``step`` on this process: one of its own for each process,
    and a function of the run's seed, the step and the process alone, so that a resumed run
    samples what an uninterrupted one would (and runs with other seeds never share one)."""
    return (seed * 1_000_003 + step) * accelerator.num_processes + accelerator.process_index


def update_seed(rollout_seed: int) -> int:
    """The seed of an update's shuffles (``seed + epoch``) and anything else it draws: its
    rollout's, so a resumed run repeats them, spread so that updates of different steps and
    processes share none while epochs × mini-batches < 31."""
    return rollout_seed * 31


def mini_batches(
    rollout: Rollout, epochs: int, num_mini_batches: int, seed: int
) -> Iterator[tuple[int, int, Rollout]]:
    """``epochs`` passes over the rollout in ``num_mini_batches`` shuffled mini-batches:
    ``(epoch, index, mini-batch)``; ``seed`` is the rollout's."""
    base = update_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(
            len(rollout.completions), generator=torch.Generator().manual_seed(base + epoch)
        )
        for m, rows in enumerate(order.chunk(num_mini_batches)):
            yield epoch, m, rollout.rows(rows.to(rollout.tokens.device))


# ---------------------------------------------------------------- sampling and scoring


@dataclass
class Rollout:
    """A batch of sampled responses, scored, and what an update needs of them.

    ``sample_responses`` sets the fields up to ``ref_logprobs``; the method's ``collect`` the
    rest. ``input_ids`` [B, W]: prompt + response, right-padded; ``prompt_lengths``,
    ``scores``, ``stopped`` [B]; ``advantages`` [B] (one per response) or [B, R]; every other
    tensor is per response token [B, R]: column t is response token t. ``mask`` is 1 on the
    response's tokens; once collected, on those the update trains on.
    """

    completions: list[Completion]
    input_ids: torch.Tensor
    prompt_lengths: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor  # log π_old(y_t), from the engine's sampling pass
    scores: torch.Tensor  # the reward: reward model and/or function, weighted
    stopped: torch.Tensor  # bool: the response ended on its own
    terms: dict[str, torch.Tensor]  # the reward's terms by name (rm_score, reward_fn_score)
    ref_logprobs: torch.Tensor | None = None  # log π_SFT(y_t)
    advantages: torch.Tensor | None = None

    def rows(self, selection: torch.Tensor) -> Rollout:
        """The responses ``selection`` picks (a mini-batch)."""

        def pick(value):
            if isinstance(value, list):
                return [value[i] for i in selection.tolist()]
            if isinstance(value, dict):
                return {name: pick(v) for name, v in value.items()}
            return value if value is None else value[selection]

        return type(self)(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})

    def packed(self) -> dict[str, torch.Tensor]:
        """Model inputs for these responses (``response_states``' keyword arguments): those
        to one prompt share a row (``reward_model.pack_groups``), and ``index`` [B, R] is the
        flat place (row × width + position) of the output that predicts response token t of
        response b."""
        groups: dict[int, list[int]] = {}  # prompt -> its responses' rows, in order
        for b, completion in enumerate(self.completions):
            groups.setdefault(completion.prompt_index, []).append(b)
        rows, prompt_lengths = self.input_ids.tolist(), self.prompt_lengths.tolist()
        lengths = [len(c.token_ids) for c in self.completions]
        rows = [row[: prompt_lengths[b] + lengths[b]] for b, row in enumerate(rows)]
        sequences = [[rows[b] for b in g] for g in groups.values()]
        starts = [[prompt_lengths[b] for b in g] for g in groups.values()]
        # Padding is never attended to (pack_groups' docstring), so any id pads.
        batch = pack_groups(sequences, 0, True, starts)
        flat = batch.pop("logprob_index").tolist()
        index = torch.zeros(self.tokens.shape, dtype=torch.long)
        offset = 0
        for b in (b for g in groups.values() for b in g):  # pack_groups' order
            index[b, : lengths[b]] = torch.tensor(flat[offset : offset + lengths[b]])
            offset += lengths[b]
        inputs = {"input_ids": batch["input_ids"], "index": index}
        inputs |= {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        return {name: t.to(self.tokens.device) for name, t in inputs.items()}


@dataclass
class Models:
    """Everything a rollout touches; the policy is updated in place by training."""

    policy: nn.Module  # unwrapped (no DDP): rollouts need no gradients
    reference: nn.Module | None  # None with LoRA: the policy with its adapters disabled
    reward: Reward
    tokenizer: Any
    engine: Engine


def sample_responses(
    models: Models, cfg: RolloutConfig, prompts, n, seed, accelerator, clock: Stopwatch
) -> Rollout:
    """``n`` responses per prompt (seeded, ``cfg``'s length and temperature; prompt-major: the
    ``n`` responses to prompt i are rows i·n to i·n + n − 1), with their log π_old (from the
    engine), their reward and log π_SFT."""
    prompt_ids = [encode_prompt(models.tokenizer, p.messages) for p in prompts]
    params = SamplingParams(cfg.response_length, cfg.temperature, n=n, seed=seed)
    completions = models.engine.generate(prompt_ids, params)
    clock.lap("generate")
    texts, stopped = completion_texts(completions)
    scored = models.reward.score([prompts[c.prompt_index] for c in completions], texts, stopped)
    clock.lap("score")
    rollout = rollout_from_completions(
        completions, prompt_ids, scored, stopped, models.tokenizer.pad_token_id, accelerator
    )
    with accelerator.autocast():
        rollout.ref_logprobs = reference_logprobs(models, rollout)
    clock.lap("forward")
    return rollout


def training_scores(rollout: Rollout, cfg: RolloutConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores and mask an update trains on. Responses that never stop get a lower score
    (The N Implementation Details of RLHF with PPO, Huang et al. 2024), or with
    ``reject_truncated`` no part in the update at all."""
    scores = rollout.scores - cfg.missing_eos_penalty * (~rollout.stopped).float()
    mask = rollout.mask * rollout.stopped[:, None] if cfg.reject_truncated else rollout.mask
    return scores, mask


def rollout_from_completions(completions, prompt_ids, scored, stopped, pad_id, accelerator):
    """The engine's completions, with their reward and its terms (``Reward.score``), as a
    rollout's tensors (no log π_SFT yet)."""
    rows = [prompt_ids[c.prompt_index] + c.token_ids for c in completions]
    input_ids = pad_rows(rows, pad_id)
    tokens = pad_rows([c.token_ids for c in completions], pad_id)
    lengths = torch.tensor([len(c.token_ids) for c in completions])
    prompt_lengths = torch.tensor([len(prompt_ids[c.prompt_index]) for c in completions])
    mask = (torch.arange(tokens.size(1)) < lengths[:, None]).float()
    logprobs = torch.zeros(tokens.shape)
    for b, c in enumerate(completions):
        logprobs[b, : len(c.token_ids)] = c.model_logprobs
    scores, terms = scored
    tensors = (input_ids, prompt_lengths, tokens, mask, logprobs, scores, torch.tensor(stopped))
    device = accelerator.device
    terms = {name: t.to(device) for name, t in terms.items()}
    return Rollout(completions, *(t.to(device) for t in tensors), terms)


def pad_rows(rows: list[list[int]], fill: int) -> torch.Tensor:
    """Right-pad lists of ints into a [len(rows), longest] tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows])


# ---------------------------------------------------------------- metrics


def response_metrics(rollout: Rollout) -> dict[str, float]:
    """Reward (and its terms), KL to the SFT model (k1 and k3), length and share stopped."""
    kl, kl_k3 = kl_per_response(rollout.logprobs, rollout.ref_logprobs, rollout.mask)
    return {
        "score": rollout.scores.mean().item(),
        **{name: t.mean().item() for name, t in rollout.terms.items()},
        "kl": kl.mean().item(),
        "kl_k3": kl_k3.mean().item(),
        "response_length": rollout.mask.sum(1).mean().item(),
        "stopped": rollout.stopped.float().mean().item(),
    }


def caller_metrics(rollout: Rollout, prompts: list[Prompt], rollout_metrics) -> dict[str, float]:
    """What the trainer's caller measures of the responses (none without ``rollout_metrics``)."""
    if rollout_metrics is None:
        return {}
    texts, stopped = completion_texts(rollout.completions)
    metas = [prompts[c.prompt_index].meta for c in rollout.completions]
    return rollout_metrics(metas, texts, stopped)


def held_out_metrics(rollouts: Rollouts) -> dict[str, float]:
    """Reward, KL to the SFT model and the caller's metrics on held-out prompts, as eval_*
    (one sample each, same seed every time, so they differ by the policy alone)."""
    cfg, accelerator, prompts = rollouts.cfg, rollouts.run.accelerator, rollouts.eval_prompts
    totals: dict[str, float] = {}
    for start in range(0, len(prompts), cfg.rollout_batch_size):
        chunk = prompts[start : start + cfg.rollout_batch_size]
        rollout = sample_responses(
            rollouts.models, cfg, chunk, 1, cfg.seed + start, accelerator, Stopwatch()
        )
        caller = caller_metrics(rollout, chunk, rollouts.rollout_metrics)
        for key, value in {**response_metrics(rollout), **caller}.items():
            totals[key] = totals.get(key, 0.0) + value * len(rollout.completions)
    means = {f"eval_{k}": v / len(prompts) for k, v in totals.items()}
    return process_mean(accelerator, means)


def process_mean(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over processes."""
    if accelerator.num_processes == 1:
        return metrics
    values = torch.tensor(list(metrics.values()), device=accelerator.device)
    return dict(zip(metrics, accelerator.reduce(values, "mean").tolist(), strict=True))


class Stopwatch:
    """Seconds an update spends in each phase: ``lap(phase)`` adds the time since the last lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now


def progress_info(metrics: dict[str, float], caller: dict[str, float]) -> str:
    """The progress bar's line: reward, KL, the caller's metrics, share stopped, speed."""
    info = f"score {metrics['score']:+.3f}  kl {metrics['kl']:.2f}  "
    info += "".join(f"{name} {metrics[name]:.3f}  " for name in caller)
    return info + f"stop {metrics['stopped']:.0%}  {metrics['samples_per_s']:.1f} samples/s"


# ---------------------------------------------------------------- forward passes


class PolicyLogits(nn.Module):
    """The policy, its forward giving logits at the response positions only: one module for
    the DDP wrapper, which syncs gradients of what goes through its forward."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits [B, R, vocab] of ``Rollout.packed`` inputs."""
        states = response_states(self.policy, **inputs)
        return self.policy.get_output_embeddings()(states).float()


def response_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    index: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decoder's hidden states [B, R, hidden] at the outputs that predict each response
    token, from ``Rollout.packed`` inputs (``index``: their flat places)."""
    hidden = model.get_decoder()(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state
    return hidden.flatten(0, 1)[index]


@torch.no_grad()
def sequence_tokens(rollout: Rollout) -> int:
    """The rollout's tokens, prompts and responses, as if each were its own sequence: this
    process's."""
    prompts = int(rollout.prompt_lengths.sum())
    return prompts + sum(len(c.token_ids) for c in rollout.completions)


def policy_logprobs(model: nn.Module, rollout: Rollout) -> torch.Tensor:
    """log π(y_t) of every response token of ``rollout`` under a causal LM."""
    states = response_states(model, **rollout.packed())
    return token_logprobs(model.get_output_embeddings()(states).float(), rollout.tokens)


def reference_logprobs(models: Models, rollout: Rollout) -> torch.Tensor:
    """log π_SFT(y_t): the frozen SFT model, or with LoRA the policy with adapters off."""
    if models.reference is not None:
        return policy_logprobs(models.reference, rollout)
    with models.policy.disable_adapter():
        return policy_logprobs(models.policy, rollout)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token], without materialising the whole log-softmax."""
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - logits.logsumexp(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each categorical distribution given by ``logits``."""
    return logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate (Schulman et al. 2017, eq. 7) per element, as a loss to minimise:

    −min(ρ A, clip(ρ, 1 − ε, 1 + ε) A),   ρ = exp(log_ratio) = π_φ / π_old;

    and where the clipped term won. PPO and GRPO take it per token, RLOO per response."""
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - epsilon, 1 + epsilon)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def token_share(mask: torch.Tensor, accelerator) -> torch.Tensor:
    """This process's weight on its token-mean losses: its share of the mini-batch's tokens ×
    processes. DDP averages the processes' gradients; so weighed, that is the mean over every
    token of the mini-batch, as one process would take it."""
    tokens = mask.sum()
    return tokens * accelerator.num_processes / accelerator.reduce(tokens, "sum").clamp(min=1)


# ---------------------------------------------------------------- loading


def refuse_fsdp(accelerator, stage: str) -> None:
    """Online RL runs on one process or DDP."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserError(
            f"{stage} does not run under FSDP (rollouts sample from the whole policy on every "
            "process); launch it with DDP, with --use-peft to save memory"
        )


def load_policy(cfg: RolloutConfig, accelerator) -> tuple[nn.Module, nn.Module | None, Any]:
    """The policy (LoRA adapters on it if asked), dropout off; the frozen reference (None with
    LoRA: the policy with its adapters off); the tokenizer."""
    policy, tokenizer = load_causal_lm(cfg.policy)
    reference = None
    if cfg.use_peft:
        policy = add_lora(policy, cfg)
    else:
        reference, _ = load_causal_lm(cfg.policy)
        reference.requires_grad_(False)
        reference.to(accelerator.device).eval()
    disable_dropout(policy)
    return policy, reference, tokenizer


def update_schedule(
    cfg: RolloutConfig, num_prompts: int, per_prompt: str, num_processes: int
) -> list[list[int]]:
    """The prompts of every update, ``rollout_batch_size / cfg.<per_prompt>`` each, at most
    ``max_steps`` updates, after checking that the batch splits evenly."""
    per_update = check_batch_shape(cfg, per_prompt, num_processes)
    schedule = [
        batch
        for batch in global_batches(num_prompts, per_update, cfg.seed, cfg.num_train_epochs)
        if len(batch) == per_update  # a short last batch would unbalance processes
    ][: cfg.max_steps]
    if not schedule:
        raise UserError(
            f"{cfg.prompts}: {num_prompts} prompts, fewer than one update's {per_update}"
        )
    return schedule


def check_batch_shape(cfg: RolloutConfig, per_prompt: str, num_processes: int) -> int:
    """Prompts per update, after checking that the batch splits evenly; ``per_prompt`` names
    the setting with the number of responses per prompt."""
    n = getattr(cfg, per_prompt)
    if cfg.rollout_batch_size % n:
        raise UserError(
            f"rollout_batch_size={cfg.rollout_batch_size} is not a multiple of {per_prompt}={n}"
        )
    per_update = cfg.rollout_batch_size // n
    if per_update % num_processes:
        raise UserError(
            f"{per_update} prompts per update do not split over {num_processes} processes"
        )
    local = cfg.rollout_batch_size // num_processes
    if local % cfg.num_mini_batches:
        raise UserError(
            f"{local} responses per process do not split into "
            f"num_mini_batches={cfg.num_mini_batches}"
        )
    return per_update
