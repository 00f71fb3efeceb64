"""PPO (stage 3): fine-tune the SFT policy against the reward, as InstructGPT does.

The objective (Ouyang et al. 2022, eq. 2), maximised over the policy π_φ:

    objective(φ) = E_{(x,y) ~ π_φ} [ r_θ(x, y) − β log(π_φ(y|x) / π_SFT(y|x)) ]
                 + γ_ptx E_{x ~ D_pretrain} [ log π_φ(x) ]

with r_θ the reward model's score, a reward function's (``--reward-fn``), or a weighted sum.
``train_ppo`` repeats one update (the loop is ``rollout.run_updates``, shared with RLOO and
GRPO); this module defines its steps in order, after the set-up:

1. rollout (``collect_rollout``; ``rollout.sample_responses``): sample responses y to a batch
   of prompts x with the generation engine, which also returns log π_old(y_t) of every sampled
   token; score (x, y), and get log π_SFT(y_t) from the reference and V(s_t) from the critic;
2. rewards (``per_token_rewards``): each response token gets −β (log π_old(y_t) − log π_SFT(y_t)),
   the last one also gets the score — the first term of eq. 2, spread over tokens;
3. advantages (``gae``, ``whiten``): generalised advantage estimation with the critic's values;
4. losses (``policy_loss``, ``value_loss``, ``ptx_loss``): the clipped surrogate, the clipped
   value loss and, with PPO-ptx, the language-model loss (the second term of eq. 2), which the
   update (``ppo_update``) minimises in epochs over mini-batches of the rollout;
5. KL control (``KLController``): β fixed, or adapted towards a target KL.

Then the plumbing: the critic (``ActorCritic``), loading. One file on purpose, as CleanRL's
``ppo.py``: every PPO detail can be read in one pass, top to bottom.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from chatrl.chat_format import IGNORE_INDEX, Encoded, encode_conversation, encode_text
from chatrl.config import PPOConfig
from chatrl.data import load_conversations, load_text, read_jsonl
from chatrl.errors import UserError
from chatrl.models import disable_dropout, load_reward_model, save_model
from chatrl.train.loop import make_optimizer, make_scheduler, start_run, train_autocast
from chatrl.train.rollout import (
    Models,
    Rollout,
    RolloutMetrics,
    clipped_surrogate,
    entropy,
    load_policy,
    masked_mean,
    mini_batches,
    pad_rows,
    plan_rollouts,
    response_metrics,
    response_states,
    run_updates,
    sample_responses,
    token_logprobs,
    token_share,
    training_scores,
    update_seed,
)

# ---------------------------------------------------------------- the training run


def train_ppo(cfg: PPOConfig, rollout_metrics: RolloutMetrics | None = None) -> Path:
    """Train the policy with PPO against the reward; write it to ``cfg.out``.

    ``rollout_metrics`` (optional) is called on every rollout and evaluation with the prompts'
    ``meta``, the response texts and whether each stopped; its numbers are logged beside the
    reward (e.g. a gold score, to see reward-model over-optimisation).
    """
    # Set-up: models, prompts, the schedule of updates, optimisers, and the checkpoint if resuming.
    run = start_run(cfg, "ppo")
    cfg, accelerator = run.cfg, run.accelerator
    rollouts = plan_rollouts(run, "samples_per_prompt", rollout_metrics)
    run.seed_process()
    policy, reference, tokenizer = load_policy(cfg, accelerator)
    actor_critic = ActorCritic(policy, load_critic(cfg, tokenizer))
    ptx_rows = load_ptx_rows(cfg.ptx_data, tokenizer, cfg.ptx_max_length) if cfg.ptx_data else None
    prepared, optimizers, schedulers = prepare_training(
        cfg, accelerator, actor_critic, len(rollouts.schedule)
    )
    run.begin()
    beta = KLController(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon)
    beta.value = run.extra.get("kl_coef", beta.value)  # adaptive β resumes as it was
    unwrapped = accelerator.unwrap_model(prepared)
    rollouts.start(unwrapped.policy, reference, tokenizer)

    def collect(prompts, seed, clock):
        # 1–3. Rollout: sample and score responses, per-token rewards, advantages.
        return collect_rollout(
            rollouts.models, unwrapped, cfg, prompts, beta.value, seed, accelerator, clock
        )

    def update(rollout, seed, metrics):
        # 4. Losses: epochs of clipped-surrogate, value and PPO-ptx steps on the rollout.
        stats = ppo_update(
            prepared, optimizers, schedulers, rollout, cfg, accelerator, seed, ptx_rows,
            tokenizer.pad_token_id,
        )  # fmt: skip
        # 5. KL control: β of the next rollout.
        stats["kl_coef"] = beta.value
        beta.update(metrics["kl"], cfg.rollout_batch_size)
        return stats | {"learning_rate": schedulers[0].get_last_lr()[0]}

    run_updates(rollouts, collect, update, prepared, lambda: {"kl_coef": beta.value})
    return run.finish(prepared, lambda trained: save_model(trained.policy, tokenizer, run.out))


# ---------------------------------------------------------------- 1. rollout


@dataclass
class PPORollout(Rollout):
    """A rollout with what PPO's update adds: the critic's values and GAE's returns."""

    values: torch.Tensor | None = None  # V_old(s_t)
    returns: torch.Tensor | None = None  # GAE targets of the value function


def collect_rollout(
    models: Models, actor_critic, cfg, prompts, beta, seed, accelerator, clock
) -> tuple[PPORollout, dict]:
    """Steps 1–3 of an update: sample, reward, and estimate advantages. Returns the rollout
    and its metrics."""
    sampled = sample_responses(
        models, cfg, prompts, cfg.samples_per_prompt, seed, accelerator, clock
    )
    rollout = PPORollout(**vars(sampled))
    metrics = response_metrics(rollout)
    with torch.no_grad(), accelerator.autocast():
        values = actor_critic.values(**rollout.packed()).float()

    # 2. Rewards: the score (less missing_eos_penalty for responses that never stop) on the
    # last token, the KL penalty on every token.
    scores, mask = training_scores(rollout, cfg)
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
    losses, clipped = clipped_surrogate(log_ratio, advantages, cliprange)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(clipped.float(), mask),
            # k3 estimate of KL(π_old ‖ π_φ): how far this update moved the policy.
            "approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, mask),
            "ratio": masked_mean(log_ratio.exp(), mask),
        }
    return masked_mean(losses, mask), stats


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
    rollout: PPORollout,
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
    stats: dict[str, list[float]] = {}
    batches = mini_batches(rollout, cfg.num_ppo_epochs, cfg.num_mini_batches, seed)
    for epoch, m, mb in batches:
        ptx = None
        if ptx_rows:
            mb_seed = ptx_seed(update_seed(seed), epoch, m, cfg.num_mini_batches)
            ptx = ptx_batch(ptx_rows, cfg.ptx_batch_size, mb_seed, pad_id, mb.tokens.device)
        inputs = mb.packed()
        with train_autocast(accelerator, inputs["input_ids"]):
            logits, values = actor_critic(**inputs)
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


# ---------------------------------------------------------------- the critic


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

    def values(self, **inputs: torch.Tensor) -> torch.Tensor:
        """V(s_t) for every response token t of ``Rollout.packed`` inputs: the state is the
        prompt and the tokens before t."""
        if self.critic is None:
            return self.value_head(response_states(self.policy, **inputs)).squeeze(-1)
        return self.critic.score(response_states(self.critic, **inputs)).squeeze(-1)

    def forward(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy logits and values at the response positions."""
        states = response_states(self.policy, **inputs)
        logits = self.policy.get_output_embeddings()(states).float()
        if self.critic is None:  # the head reads the policy's states: one forward serves both
            return logits, self.value_head(states).squeeze(-1).float()
        return logits, self.values(**inputs).float()


def masked_variance(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


# ---------------------------------------------------------------- loading: models and data


def load_critic(cfg: PPOConfig, tokenizer) -> nn.Module | None:
    """The value model, started from the reward model (or --value-model), dropout off; None
    for a head."""
    if cfg.value_head:
        if cfg.value_model is not None:
            raise UserError("value_head and value_model exclude each other: choose one critic")
        return None
    start = cfg.value_model or cfg.reward
    if start is None:
        raise UserError(
            "the critic starts from the reward model, and there is none (reward_fn only): "
            "pass --value-head, or --value-model DIR"
        )
    critic, critic_tokenizer = load_reward_model(start)
    if critic_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"{start}: the critic reads the policy's tokens, but its tokenizer differs from "
            "the policy's; pass --value-head to use a value head instead"
        )
    disable_dropout(critic)
    return critic


def prepare_training(cfg: PPOConfig, accelerator, actor_critic: ActorCritic, num_updates: int):
    """The actor-critic ready to train (DDP-wrapped on several processes), and an optimiser
    and learning-rate schedule each for the policy and the critic, over ``num_updates``."""
    critic = actor_critic.critic
    value_params = critic if critic is not None else actor_critic.value_head
    steps = num_updates * cfg.num_ppo_epochs * cfg.num_mini_batches
    optimizers = [
        make_optimizer(actor_critic.policy, cfg.learning_rate, cfg.weight_decay),
        make_optimizer(value_params, cfg.value_learning_rate, cfg.weight_decay),
    ]
    schedulers = [make_scheduler(o, steps, cfg.warmup_ratio) for o in optimizers]
    prepared, *optimizers = accelerator.prepare(actor_critic, *optimizers)
    for scheduler in schedulers:
        accelerator.register_for_checkpointing(scheduler)
    return prepared, optimizers, schedulers


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
