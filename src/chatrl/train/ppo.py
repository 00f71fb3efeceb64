"""PPO (stage 3): fine-tune the SFT policy against the reward model, as InstructGPT does.

The objective (Ouyang et al. 2022, eq. 2), maximised over the policy π_φ:

    objective(φ) = E_{(x,y) ~ π_φ} [ r_θ(x, y) − β log(π_φ(y|x) / π_SFT(y|x)) ]
                 + γ_ptx E_{x ~ D_pretrain} [ log π_φ(x) ]

``train_ppo`` repeats one update; this module defines its steps in order, after the loop:

1. rollout (``collect_rollout``, ``sample_responses``): sample responses y to a batch of prompts
   x with the generation engine, which also returns log π_old(y_t) of every sampled token; the
   reward model scores (x, y), the reference gives log π_SFT(y_t) and the critic V(s_t);
2. rewards (``per_token_rewards``): each response token gets −β (log π_old(y_t) − log π_SFT(y_t)),
   the last one also gets the score — the first term of eq. 2, spread over tokens;
3. advantages (``gae``, ``whiten``): generalised advantage estimation with the critic's values;
4. losses (``policy_loss``, ``value_loss``, ``ptx_loss``): the clipped surrogate, the clipped
   value loss and, with PPO-ptx, the language-model loss (the second term of eq. 2), which the
   update (``ppo_update``) minimises in epochs over mini-batches of the rollout;
5. KL control (``KLController``): β fixed, or adapted towards a target KL.

Then the plumbing: metrics (``held_out_metrics``), forward passes (``ActorCritic``), loading.
One file on purpose, as CleanRL's ``ppo.py``: every PPO detail can be read in one pass, top to
bottom, hence the length.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch import nn

from chatrl.chat_format import (
    IGNORE_INDEX,
    Encoded,
    encode_conversation,
    encode_prompt,
    encode_text,
)
from chatrl.config import PPOConfig
from chatrl.data import Prompt, load_conversations, load_prompts, load_text, read_jsonl
from chatrl.engine import Completion, Engine, SamplingParams
from chatrl.errors import UserError
from chatrl.evaluate import completion_texts, kl_per_response
from chatrl.models import disable_dropout, load_causal_lm, load_reward_model, save_model
from chatrl.reward_model import RewardScorer
from chatrl.train.loop import (
    add_lora,
    check_replicas,
    global_batches,
    make_optimizer,
    make_scheduler,
    shard,
    start_run,
    train_autocast,
)

# rollout_metrics(prompt meta per response, response texts, stopped flags) -> {name: value}:
# how a caller with a held-out signal (the bundled world's gold judge) adds it to every step.
RolloutMetrics = Callable[[list[dict[str, Any]], list[str], list[bool]], dict[str, float]]


# ---------------------------------------------------------------- the training run


def train_ppo(cfg: PPOConfig, rollout_metrics: RolloutMetrics | None = None) -> Path:
    """Train the policy with PPO against the reward model; write it to ``cfg.out``.

    ``rollout_metrics`` (optional) is called on every rollout and evaluation with the prompts'
    ``meta``, the response texts and whether each stopped; its numbers are logged beside the
    reward-model score (e.g. a gold score, to see reward-model over-optimisation).
    """
    # Set-up: models, prompts, the schedule of updates, optimisers, and the checkpoint if resuming.
    run = start_run(cfg, "ppo")
    cfg, accelerator = run.cfg, run.accelerator
    refuse_fsdp(accelerator)
    run.seed_process()
    per_update = check_batch_shape(cfg, accelerator.num_processes)
    actor_critic, reference, tokenizer = load_actor_critic(cfg, accelerator)
    prompts = load_prompts(cfg.prompts)
    eval_prompts = load_prompts(cfg.eval_prompts) if cfg.eval_prompts else []
    eval_prompts = [eval_prompts[i] for i in shard(list(range(len(eval_prompts))), accelerator)]
    ptx_rows = load_ptx_rows(cfg.ptx_data, tokenizer, cfg.ptx_max_length) if cfg.ptx_data else None
    pad_id = tokenizer.pad_token_id
    schedule = update_schedule(cfg, len(prompts), per_update)
    prepared, optimizers, schedulers = prepare_training(cfg, accelerator, actor_critic, schedule)
    start = run.begin()
    beta = KLController(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon)
    beta.value = run.extra.get("kl_coef", beta.value)  # adaptive β resumes as it was
    unwrapped = accelerator.unwrap_model(prepared)
    engine = Engine(unwrapped.policy, tokenizer, max_batch_size=cfg.rollout_batch_size)
    scorer = RewardScorer(cfg.reward, accelerator.device, cfg.bf16)
    models = Models(unwrapped, reference, scorer, tokenizer, engine)

    if eval_prompts and start == 0:
        run.log.log(0, **held_out_metrics(models, cfg, eval_prompts, accelerator, rollout_metrics))
    prepared.train()
    done = start
    with run.progress(len(schedule)) as show:
        for step in range(start, len(schedule)):
            clock = Stopwatch()
            batch = [prompts[i] for i in shard(schedule[step], accelerator)]
            seed = rollout_seed(cfg.seed, step, accelerator)
            # 1–3. Rollout: sample and score responses, per-token rewards, advantages.
            rollout, metrics = collect_rollout(
                models, cfg, batch, beta.value, seed, accelerator, clock
            )
            caller = caller_metrics(rollout, batch, rollout_metrics)
            clock.lap("score")
            metrics = process_mean(accelerator, {**metrics, **caller})
            if cfg.kl_budget is not None and metrics["kl"] > cfg.kl_budget:
                # Over-optimisation guard: this policy already drifted past the budget; stop
                # here rather than push it further (docs/ppo.md).
                run.log.log(step, **metrics, stopped_on_kl_budget=1.0)
                break
            # 4. Losses: epochs of clipped-surrogate, value and PPO-ptx steps on the rollout.
            metrics |= ppo_update(
                prepared, optimizers, schedulers, rollout, cfg, accelerator, seed, ptx_rows, pad_id
            )
            clock.lap("train")
            check_replicas(accelerator, prepared, step + 1)
            metrics = process_mean(accelerator, metrics)
            # 5. KL control: β of the next rollout.
            metrics["kl_coef"] = beta.value
            beta.update(metrics["kl"], cfg.rollout_batch_size)
            metrics["samples_per_s"] = cfg.rollout_batch_size / sum(clock.seconds.values())
            metrics["learning_rate"] = schedulers[0].get_last_lr()[0]
            metrics |= {f"time_{phase}": seconds for phase, seconds in clock.seconds.items()}
            done = step + 1
            run.log.log(done, **metrics)
            show(done, progress_info(metrics, caller))
            before_end = done < len(schedule)  # the end has held-out metrics and a save of its own
            if eval_prompts and cfg.eval_steps and done % cfg.eval_steps == 0 and before_end:
                held_out = held_out_metrics(models, cfg, eval_prompts, accelerator, rollout_metrics)
                run.log.log(done, **held_out)
            run.maybe_checkpoint(done, len(schedule), {"kl_coef": beta.value})

    # The end: held-out metrics of the final policy, which is saved in place of the checkpoint.
    if eval_prompts:
        run.log.log(
            done, **held_out_metrics(models, cfg, eval_prompts, accelerator, rollout_metrics)
        )
    return run.finish(prepared, lambda trained: save_model(trained.policy, tokenizer, run.out))


# ---------------------------------------------------------------- 1. rollout


@dataclass
class Rollout:
    """A batch of sampled responses, scored, and what the PPO update needs of them.

    Filled in as the rollout proceeds: ``sample_responses`` (step 1) sets the fields up to
    ``ref_logprobs``, ``collect_rollout`` (steps 2–3) the rest. ``input_ids`` [B, W]: prompt +
    response, right-padded; ``scores``, ``stopped`` [B]; every other tensor is per response
    token [B, R]: column t is response token t, predicted by the output at ``index[b, t]``.
    ``mask`` is 1 on the response's tokens; from step 2 on, on those the update trains on.
    """

    completions: list[Completion]
    input_ids: torch.Tensor
    index: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor  # log π_old(y_t), from the engine's sampling pass
    scores: torch.Tensor  # r_θ(x, y): normalised reward-model scores
    stopped: torch.Tensor  # bool: the response ended on its own
    ref_logprobs: torch.Tensor | None = None  # log π_SFT(y_t)
    values: torch.Tensor | None = None  # V_old(s_t)
    advantages: torch.Tensor | None = None  # whitened GAE advantages
    returns: torch.Tensor | None = None  # GAE targets of the value function

    def rows(self, selection: torch.Tensor) -> Rollout:
        """The responses ``selection`` picks (a mini-batch)."""
        picked = [self.completions[i] for i in selection.tolist()]
        tensors = (getattr(self, f.name) for f in fields(self)[1:])  # all but the completions
        return Rollout(picked, *(t if t is None else t[selection] for t in tensors))


def collect_rollout(models, cfg, prompts, beta, seed, accelerator, clock) -> tuple[Rollout, dict]:
    """Steps 1–3 of an update: sample, reward, and estimate advantages. Returns the rollout
    and its metrics."""
    rollout = sample_responses(
        models, cfg, prompts, cfg.samples_per_prompt, seed, accelerator, clock
    )
    metrics = response_metrics(rollout)
    with torch.no_grad(), accelerator.autocast():
        values = models.actor_critic.values(rollout.input_ids, rollout.index).float()

    # 2. Rewards. Responses that never stop: a lower score (The N Implementation Details of RLHF
    # with PPO, Huang et al. 2024), or no part in the update at all.
    scores = rollout.scores - cfg.missing_eos_penalty * (~rollout.stopped).float()
    mask = rollout.mask * rollout.stopped[:, None] if cfg.reject_truncated else rollout.mask
    rewards = per_token_rewards(rollout.logprobs, rollout.ref_logprobs, scores, mask, beta)

    # 3. Advantages, whitened over the whole batch (every process's share).
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    advantages = whiten(advantages, mask, lambda t: accelerator.reduce(t, "sum"))

    residual = masked_variance(returns - values, mask)
    metrics["reward"] = rewards.sum(1).mean().item()
    metrics["explained_variance"] = (
        1 - (residual / masked_variance(returns, mask).clamp(min=1e-8)).item()
    )
    rollout.mask, rollout.values = mask, values * mask  # the update trains on ``mask``'s tokens
    rollout.advantages, rollout.returns = advantages, returns
    clock.lap("forward")
    return rollout, metrics


def sample_responses(models, cfg, prompts, n, seed, accelerator, clock: Stopwatch) -> Rollout:
    """``n`` responses per prompt (seeded, ``cfg``'s length and temperature), with their
    log π_old (from the engine), the reward model's scores and log π_SFT."""
    prompt_ids = [encode_prompt(models.tokenizer, p.messages) for p in prompts]
    params = SamplingParams(cfg.response_length, cfg.temperature, n=n, seed=seed)
    completions = models.engine.generate(prompt_ids, params)
    clock.lap("generate")
    texts, stopped = completion_texts(completions)
    scores = models.reward.score([prompts[c.prompt_index].messages for c in completions], texts)
    clock.lap("score")
    pad_id = models.tokenizer.pad_token_id
    rollout = rollout_from_completions(
        completions, prompt_ids, scores, stopped, pad_id, accelerator
    )
    with accelerator.autocast():
        rollout.ref_logprobs = reference_logprobs(models, rollout)
    clock.lap("forward")
    return rollout


def rollout_seed(seed: int, step: int, accelerator) -> int:
    """The sampling seed of update ``step`` on this process: one of its own for each process,
    and a function of the run's seed, the step and the process alone, so that a resumed run
    samples what an uninterrupted one would (and runs with other seeds never share one)."""
    return (seed * 1_000_003 + step) * accelerator.num_processes + accelerator.process_index


# ---------------------------------------------------------------- 2. rewards


def per_token_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """InstructGPT eq. 2's first term as per-token rewards.

    r_t = −β (log π_old(y_t) − log π_SFT(y_t)) for every response token (the k1 estimate of the
    KL to the SFT model), plus the reward model's score on the response's last token.
    """
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores * (mask.sum(1) > 0)
    return rewards


# ---------------------------------------------------------------- 3. advantages


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16); returns A and R.

    δ_t = r_t + γ V(s_{t+1}) − V(s_t),   A_t = Σ_l (γλ)^l δ_{t+l},   R_t = A_t + V(s_t).
    The episode ends after a response's last token: the value beyond it is 0.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def whiten(
    x: torch.Tensor, mask: torch.Tensor, all_reduce_sum: Callable | None = None
) -> torch.Tensor:
    """(x − mean) / std over the masked entries of the whole batch (every process's share)."""

    def total(t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t) if all_reduce_sum else t

    count = total((mask.sum()).float())
    mean = total((x * mask).sum()) / count
    var = total((((x - mean) * mask) ** 2).sum()) / count
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


# ---------------------------------------------------------------- 4. losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate (Schulman et al. 2017, eq. 7) as a loss to minimise.

    L = −E_t[min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t)],   ρ_t = π_φ(y_t) / π_old(y_t).
    """
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            # k3 estimate of KL(π_old ‖ π_φ): how far this update moved the policy.
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ½ E_t[max((V − R)², (clip(V, V_old ± ε_v) − R)²)]; and the share
    of tokens where the clipped term won."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    return loss, masked_mean((clipped_loss > unclipped_loss).float(), mask).detach()


def ptx_loss(policy: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PPO-ptx, eq. 2's second term as a loss: −E[log π_φ(x)], the policy's next-token
    cross-entropy on the tokens ``labels`` marks (its weight γ_ptx is the caller's)."""
    hidden = policy.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = policy.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep])


# ---------------------------------------------------------------- the update


def ppo_update(
    actor_critic: nn.Module,
    optimizers: list,
    schedulers: list,
    rollout: Rollout,
    cfg: PPOConfig,
    accelerator,
    seed: int,
    ptx_rows: list[Encoded] | None = None,
    pad_id: int = 0,
) -> dict[str, float]:
    """Step 4: ``num_ppo_epochs`` passes over the rollout in ``num_mini_batches`` mini-batches,
    one optimiser step each on the policy loss + vf_coef · value loss (+ γ_ptx · LM loss);
    ``seed`` is the rollout's.

    Under DDP each process shuffles its own share of the rollout, and a mini-batch is every
    process's m-th chunk; the policy and value losses are token means over all of them."""
    # The PPO-ptx forward bypasses the DDP wrapper: DDP all-reduces a parameter's gradient once
    # backward has summed every path to it, this one's included.
    policy = accelerator.unwrap_model(actor_critic).policy
    base = update_seed(seed)
    stats: dict[str, list[float]] = {}
    size = rollout.tokens.size(0)
    for epoch in range(cfg.num_ppo_epochs):
        order = torch.randperm(size, generator=torch.Generator().manual_seed(base + epoch))
        for m, rows in enumerate(order.chunk(cfg.num_mini_batches)):
            mb = rollout.rows(rows.to(rollout.tokens.device))
            ptx = None
            if ptx_rows:
                mb_seed = ptx_seed(base, epoch, m, cfg.num_mini_batches)
                ptx = ptx_batch(ptx_rows, cfg.ptx_batch_size, mb_seed, pad_id, mb.tokens.device)
            with train_autocast(accelerator, mb.input_ids):
                logits, values = actor_critic(mb.input_ids, mb.index)
                lm_loss = ptx_loss(policy, *ptx) if ptx else None
            # Eq. 2's first term, by the clipped surrogate on the rollout's advantages; the
            # critic's loss beside it; and the second term, PPO-ptx's language-model loss.
            logprobs = token_logprobs(logits, mb.tokens)
            pg_loss, pg_stats = policy_loss(
                logprobs, mb.logprobs, mb.advantages, mb.mask, cfg.cliprange
            )
            vf_loss, vf_clip_frac = value_loss(
                values, mb.values, mb.returns, mb.mask, cfg.cliprange_value
            )
            loss = (pg_loss + cfg.vf_coef * vf_loss) * token_share(mb.mask, accelerator)
            if lm_loss is not None:
                loss = loss + cfg.ptx_coef * lm_loss
            accelerator.backward(loss)

            # Policy and critic clipped apart: the critic's large early gradients (its head
            # starts as a sequence scorer) must not shrink the policy's step.
            grad_norm, value_grad_norm = (
                accelerator.clip_grad_norm_(
                    [p for group in o.param_groups for p in group["params"]], cfg.max_grad_norm
                )
                for o in optimizers
            )
            for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            with torch.no_grad():
                step_stats = {
                    "policy_loss": pg_loss,
                    "value_loss": vf_loss,
                    "value_clip_frac": vf_clip_frac,
                    "entropy": masked_mean(entropy(logits), mb.mask),
                    "grad_norm": grad_norm,
                    "value_grad_norm": value_grad_norm,
                    **pg_stats,
                }
                if lm_loss is not None:
                    step_stats["ptx_loss"] = lm_loss
            for key, value in step_stats.items():
                stats.setdefault(key, []).append(float(value.detach()))
    return {key: sum(v) / len(v) for key, v in stats.items()}


def token_share(mask: torch.Tensor, accelerator) -> torch.Tensor:
    """This process's weight on its token-mean losses: its share of the mini-batch's tokens ×
    processes. DDP averages the processes' gradients; so weighed, that is the mean over every
    token of the mini-batch, as one process would take it."""
    tokens = mask.sum()
    return tokens * accelerator.num_processes / accelerator.reduce(tokens, "sum").clamp(min=1)


def update_seed(rollout_seed: int) -> int:
    """The seed of an update's shuffles (``seed + epoch``) and PPO-ptx batches (``ptx_seed``):
    its rollout's, so a resumed run repeats them, spread so that updates of different steps and
    processes share none while num_ppo_epochs × num_mini_batches < 31."""
    return rollout_seed * 31


def ptx_seed(seed: int, epoch: int, mini_batch: int, num_mini_batches: int) -> int:
    """The seed of one mini-batch's PPO-ptx batch in the update whose seed is ``seed``: each
    optimiser step learns from a batch of its own."""
    return seed + 1 + epoch * num_mini_batches + mini_batch


# ---------------------------------------------------------------- 5. KL control


@dataclass
class KLController:
    """β of the KL penalty: fixed, or adaptive (Ziegler et al. 2019, §2.2):

    e_t = clip(KL_t / KL_target − 1, −0.2, 0.2),   β_{t+1} = β_t (1 + K_β e_t),  K_β = n / horizon

    with n the responses in the batch: β rises while the policy drifts beyond the target KL and
    falls while it stays within.
    """

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n / self.horizon


# ---------------------------------------------------------------- metrics


def response_metrics(rollout: Rollout) -> dict[str, float]:
    """RM score, KL to the SFT model (k1 and k3), length and share stopped of the responses."""
    kl, kl_k3 = kl_per_response(rollout.logprobs, rollout.ref_logprobs, rollout.mask)
    return {
        "rm_score": rollout.scores.mean().item(),
        "kl": kl.mean().item(),
        "kl_k3": kl_k3.mean().item(),
        "response_length": rollout.mask.sum(1).mean().item(),
        "stopped": rollout.stopped.float().mean().item(),
    }


def caller_metrics(rollout: Rollout, prompts: list[Prompt], rollout_metrics) -> dict[str, float]:
    """What ``train_ppo``'s caller measures of the responses (none without ``rollout_metrics``)."""
    if rollout_metrics is None:
        return {}
    texts, stopped = completion_texts(rollout.completions)
    metas = [prompts[c.prompt_index].meta for c in rollout.completions]
    return rollout_metrics(metas, texts, stopped)


def held_out_metrics(models, cfg, prompts, accelerator, rollout_metrics) -> dict[str, float]:
    """RM score, KL to the SFT model and the caller's metrics on held-out prompts, as eval_*
    (one sample each, same seed every time, so they differ by the policy alone)."""
    totals: dict[str, float] = {}
    for start in range(0, len(prompts), cfg.rollout_batch_size):
        chunk = prompts[start : start + cfg.rollout_batch_size]
        rollout = sample_responses(
            models, cfg, chunk, 1, cfg.seed + start, accelerator, Stopwatch()
        )
        metrics = {**response_metrics(rollout), **caller_metrics(rollout, chunk, rollout_metrics)}
        for key, value in metrics.items():
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
    """The progress bar's line: RM score, KL, the caller's metrics, share stopped, speed."""
    info = f"rm {metrics['rm_score']:+.3f}  kl {metrics['kl']:.2f}  "
    info += "".join(f"{name} {metrics[name]:.3f}  " for name in caller)
    return info + f"stop {metrics['stopped']:.0%}  {metrics['samples_per_s']:.1f} samples/s"


# ---------------------------------------------------------------- forward passes


class ActorCritic(nn.Module):
    """The trained pair: the policy π_φ and the value function V(s_t).

    The critic is a separate model started from the reward model (InstructGPT), or — to save
    memory — a linear value head on the policy's last hidden state. One module, so that one
    forward goes through the DDP wrapper that syncs both models' gradients.
    """

    def __init__(self, policy: nn.Module, critic: nn.Module | None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_head = nn.Linear(policy.config.hidden_size, 1) if critic is None else None

    def values(self, input_ids, index) -> torch.Tensor:
        """V(s_t) for every response token t: the state is the prompt and the tokens before t."""
        if self.critic is None:
            return self.value_head(response_states(self.policy, input_ids, index)).squeeze(-1)
        return self.critic.score(response_states(self.critic, input_ids, index)).squeeze(-1)

    def forward(self, input_ids, index) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy logits and values at the response positions."""
        states = response_states(self.policy, input_ids, index)
        logits = self.policy.get_output_embeddings()(states).float()
        if self.critic is None:  # the head reads the policy's states: one forward serves both
            return logits, self.value_head(states).squeeze(-1).float()
        return logits, self.values(input_ids, index).float()


def response_states(model: nn.Module, input_ids: torch.Tensor, index: torch.Tensor):
    """The decoder's hidden states at the positions that predict each response token.

    Rows are prompt + response from position 0, right-padded, with no attention mask: attention
    is causal, so real tokens never see the padding after them (and SDPA keeps its fast path).
    ``index[b, t]`` is the position whose output predicts response token t of row b.
    """
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.size(-1)))


@torch.no_grad()
def policy_logprobs(model, input_ids, index, tokens) -> torch.Tensor:
    """log π(y_t) of every response token under a causal LM (the reference model)."""
    states = response_states(model, input_ids, index)
    return token_logprobs(model.get_output_embeddings()(states).float(), tokens)


def reference_logprobs(models: Models, rollout: Rollout) -> torch.Tensor:
    """log π_SFT(y_t): the frozen SFT model, or with LoRA the policy with adapters off."""
    sequences = rollout.input_ids, rollout.index, rollout.tokens
    if models.reference is not None:
        return policy_logprobs(models.reference, *sequences)
    with models.actor_critic.policy.disable_adapter():
        return policy_logprobs(models.actor_critic.policy, *sequences)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token], without materialising the whole log-softmax."""
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - logits.logsumexp(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each categorical distribution given by ``logits``."""
    return logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_variance(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


# ---------------------------------------------------------------- loading: models and data


@dataclass
class Models:
    """Everything a rollout touches; the policy is updated in place by training."""

    actor_critic: ActorCritic  # unwrapped (no DDP): rollouts need no gradients
    reference: nn.Module | None  # None with LoRA: the policy with its adapters disabled
    reward: RewardScorer
    tokenizer: Any
    engine: Engine


def refuse_fsdp(accelerator) -> None:
    """PPO runs on one process or DDP."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserError(
            "ppo does not run under FSDP (rollouts sample from the whole policy on every "
            "process); launch it with DDP, with --use-peft and --value-head to save memory"
        )


def check_batch_shape(cfg: PPOConfig, num_processes: int) -> int:
    """Prompts per update, after checking that the batch splits evenly."""
    if cfg.rollout_batch_size % cfg.samples_per_prompt:
        raise UserError(
            f"rollout_batch_size={cfg.rollout_batch_size} is not a multiple of "
            f"samples_per_prompt={cfg.samples_per_prompt}"
        )
    per_update = cfg.rollout_batch_size // cfg.samples_per_prompt
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


def load_actor_critic(cfg: PPOConfig, accelerator) -> tuple[ActorCritic, nn.Module | None, Any]:
    """The policy (LoRA adapters on it if asked) and its critic; the frozen reference (None
    with LoRA: the policy with its adapters off); the tokenizer."""
    policy, tokenizer = load_causal_lm(cfg.policy)
    reference = None
    if cfg.use_peft:
        policy = add_lora(policy, cfg)
    else:
        reference, _ = load_causal_lm(cfg.policy)
        reference.requires_grad_(False)
        reference.to(accelerator.device).eval()
    critic = load_critic(cfg, tokenizer)
    for model in (policy, critic):
        if model is not None:
            disable_dropout(model)
    return ActorCritic(policy, critic), reference, tokenizer


def load_critic(cfg: PPOConfig, tokenizer) -> nn.Module | None:
    """The value model, started from the reward model (or --value-model); None for a head."""
    if cfg.value_head:
        if cfg.value_model is not None:
            raise UserError("value_head and value_model exclude each other: choose one critic")
        return None
    critic, critic_tokenizer = load_reward_model(cfg.value_model or cfg.reward)
    if critic_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"{cfg.value_model or cfg.reward}: the critic reads the policy's tokens, but its "
            "tokenizer differs from the policy's; pass --value-head to use a value head instead"
        )
    return critic


def prepare_training(cfg: PPOConfig, accelerator, actor_critic: ActorCritic, schedule: list):
    """The actor-critic ready to train (DDP-wrapped on several processes), and an optimiser
    and learning-rate schedule each for the policy and the critic, over the ``schedule``."""
    critic = actor_critic.critic
    value_params = critic if critic is not None else actor_critic.value_head
    updates = len(schedule) * cfg.num_ppo_epochs * cfg.num_mini_batches
    optimizers = [
        make_optimizer(actor_critic.policy, cfg.learning_rate, cfg.weight_decay),
        make_optimizer(value_params, cfg.value_learning_rate, cfg.weight_decay),
    ]
    schedulers = [make_scheduler(o, updates, cfg.warmup_ratio) for o in optimizers]
    prepared, *optimizers = accelerator.prepare(actor_critic, *optimizers)
    for scheduler in schedulers:
        accelerator.register_for_checkpointing(scheduler)
    return prepared, optimizers, schedulers


def update_schedule(cfg: PPOConfig, num_prompts: int, per_update: int) -> list[list[int]]:
    """The prompts of every update, ``per_update`` each, at most ``max_steps`` updates."""
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


def rollout_from_completions(completions, prompt_ids, scores, stopped, pad_id, accelerator):
    """The engine's completions, scored, as a rollout's tensors (no log π_SFT yet)."""
    rows = [prompt_ids[c.prompt_index] + c.token_ids for c in completions]
    input_ids = pad_rows(rows, pad_id)
    tokens = pad_rows([c.token_ids for c in completions], pad_id)
    lengths = torch.tensor([len(c.token_ids) for c in completions])
    starts = torch.tensor([len(prompt_ids[c.prompt_index]) for c in completions])
    steps = torch.arange(tokens.size(1))
    mask = (steps < lengths[:, None]).float()
    index = (starts[:, None] - 1 + steps).clamp(max=input_ids.size(1) - 1)
    logprobs = torch.zeros(tokens.shape)
    for b, c in enumerate(completions):
        logprobs[b, : len(c.token_ids)] = c.model_logprobs
    tensors = (input_ids, index, tokens, mask, logprobs, scores, torch.tensor(stopped))
    return Rollout(completions, *(t.to(accelerator.device) for t in tensors))


def pad_rows(rows: list[list[int]], fill: int) -> torch.Tensor:
    """Right-pad lists of ints into a [len(rows), longest] tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows])


def load_ptx_rows(path: str, tokenizer, max_length: int) -> list[Encoded]:
    """PPO-ptx data: SFT conversations (assistant tokens are targets) or text (every token)."""
    is_text = Path(path).suffix == ".txt" or "text" in next(read_jsonl(path))[1]
    if is_text:
        rows = [r for t in load_text(path) for r in encode_text(tokenizer, t, max_length)]
    else:
        rows = [encode_conversation(tokenizer, m, max_length) for m in load_conversations(path)]
    rows = [r for r in rows if any(label != IGNORE_INDEX for label in r.labels[1:])]
    if not rows:
        raise UserError(f"{path}: no row has a token to learn from within {max_length} tokens")
    return rows


def ptx_batch(rows: list[Encoded], size: int, seed: int, pad_id: int, device):
    """A random batch of PPO-ptx rows: input ids and labels, right-padded."""
    g = torch.Generator().manual_seed(seed)
    picked = [rows[i] for i in torch.randint(len(rows), (size,), generator=g).tolist()]
    return (
        pad_rows([r.input_ids for r in picked], pad_id).to(device),
        pad_rows([r.labels for r in picked], IGNORE_INDEX).to(device),
    )
