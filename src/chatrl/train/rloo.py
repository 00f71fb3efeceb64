"""RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
Learning from Human Feedback in LLMs"): REINFORCE on whole responses, the other responses to
the same prompt its baseline, the KL to the SFT model in the reward. No critic.

For each prompt x, k = ``num_generations`` responses y_1 … y_k are sampled from π_old
(``rollout.sample_responses``) and scored r(x, y_i) (reward model and/or function; less
``missing_eos_penalty`` for responses that never stop). Then:

1. advantages (``rloo_advantages``): the KL-penalised reward of each response (§3, the
   response is one action)

       R(x, y_i) = r(x, y_i) − β Σ_t log(π_old(y_i,t) / π_SFT(y_i,t))

   less the leave-one-out baseline, the mean of the other k − 1 rewards (§3.2):

       A_i = R(x, y_i) − 1/(k − 1) Σ_{j≠i} R(x, y_j);

2. loss (``rloo_loss``): the REINFORCE estimator −1/k Σ_i A_i log π_φ(y_i|x), taken as
   TRL's RLOOTrainer does through the response's ratio ρ_i = π_φ(y_i|x) / π_old(y_i|x),
   clipped at 1 ± ε: −min(ρ_i A_i, clip(ρ_i) A_i). On the rollout's first optimiser step
   ρ_i = 1 and its gradient is REINFORCE's exactly; the clip only bounds the later steps
   that ``num_iterations`` and ``num_mini_batches`` > 1 take on the same samples.

``rollout.train_group_method`` runs the updates. Names as TRL's ``RLOOConfig``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatrl.config import RLOOConfig
from chatrl.train.rollout import (
    Rollout,
    RolloutMetrics,
    clipped_surrogate,
    train_group_method,
    training_scores,
)


def train_rloo(cfg: RLOOConfig, rollout_metrics: RolloutMetrics | None = None) -> Path:
    """Train the policy with RLOO against the reward; write it to ``cfg.out``.
    ``rollout_metrics`` as ``train_ppo``'s."""
    return train_group_method(cfg, "rloo", rloo_advantages, rloo_loss, rollout_metrics)


# ---------------------------------------------------------------- 1. advantages


def rloo_advantages(rollout: Rollout, cfg: RLOOConfig, accelerator) -> dict[str, float]:
    """Step 1: each response's KL-penalised reward less its leave-one-out baseline (set on the
    rollout)."""
    scores, rollout.mask = training_scores(rollout, cfg)
    kl = ((rollout.logprobs - rollout.ref_logprobs) * rollout.mask).sum(1)
    rewards = scores - cfg.beta * kl
    rollout.advantages = leave_one_out(rewards, cfg.num_generations)
    return {"reward": rewards.mean().item()}


def leave_one_out(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = R_i − the mean of the other rewards in its group; ``rewards`` [B] are
    prompt-major: a group is ``group_size`` consecutive responses."""
    groups = rewards.view(-1, group_size)
    baseline = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).flatten()


# ---------------------------------------------------------------- 2. loss


def rloo_loss(
    logprobs: torch.Tensor, mb: Rollout, cfg: RLOOConfig, accelerator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 2: REINFORCE with the leave-one-out advantages, through the clipped ratio of each
    whole response, from the policy's log π_φ(y_t) of the mini-batch's tokens."""
    log_ratio = ((logprobs - mb.logprobs) * mb.mask).sum(1)  # log ρ_i, one per response
    losses, clipped = clipped_surrogate(log_ratio, mb.advantages, cfg.epsilon)
    stats = {"clip_frac": clipped.float().mean(), "ratio": log_ratio.exp().mean()}
    return losses.mean(), stats
