"""GRPO (Shao et al. 2024, DeepSeekMath §4): PPO without a critic, the group of responses to
one prompt its own baseline, and the KL to the SFT model a loss term instead of a reward.

For each prompt x, a group of G = ``num_generations`` responses y_1 … y_G is sampled from
π_old (``rollout.sample_responses``) and scored r_1 … r_G (reward model and/or function; less
``missing_eos_penalty`` for responses that never stop). Then:

1. advantages (``grpo_advantages``): outcome supervision, every token of y_i gets
   Â_i = (r_i − mean(r)) / std(r) over the group (§4.1.2); ``scale_rewards="batch"`` divides
   by the std over the whole batch, ``"none"`` not at all (Dr. GRPO, Liu et al. 2025: the
   division weighs easy and hard prompts unevenly);
2. loss (``grpo_loss``), eq. 3 as a loss, per token:

       −[min(ρ_t Â_i, clip(ρ_t, 1 − ε, 1 + ε) Â_i) − β D_KL,t],   ρ_t = π_φ(y_t) / π_old(y_t)

   with D_KL,t = π_SFT/π_φ − log(π_SFT/π_φ) − 1 (eq. 4, the k3 estimator; β = 0 drops it),
   summed over tokens and normalised by ``loss_type``: ``"grpo"`` 1/G Σ_i 1/|y_i| Σ_t
   (eq. 3), ``"dr_grpo"`` Σ_i Σ_t / (G · response_length) (Dr. GRPO: no length bias),
   ``"dapo"`` Σ_i Σ_t / Σ_i |y_i| (the mini-batch's token mean, TRL's default).

``rollout.train_group_method`` runs the updates: ``num_iterations`` (μ) passes over each
rollout in ``num_mini_batches`` optimiser steps. Names as TRL's ``GRPOConfig``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatrl.config import GRPOConfig
from chatrl.evaluate import kl_k3
from chatrl.train.rollout import (
    Rollout,
    RolloutMetrics,
    clipped_surrogate,
    masked_mean,
    token_share,
    train_group_method,
    training_scores,
)


def train_grpo(cfg: GRPOConfig, rollout_metrics: RolloutMetrics | None = None) -> Path:
    """Train the policy with GRPO against the reward; write it to ``cfg.out``.
    ``rollout_metrics`` as ``train_ppo``'s."""
    return train_group_method(cfg, "grpo", grpo_advantages, grpo_loss, rollout_metrics)


# ---------------------------------------------------------------- 1. advantages


def grpo_advantages(rollout: Rollout, cfg: GRPOConfig, accelerator) -> dict[str, float]:
    """Step 1: the group-normalised advantage of each response (set on the rollout)."""
    scores, rollout.mask = training_scores(rollout, cfg)
    rollout.advantages = group_advantages(
        scores, cfg.num_generations, cfg.scale_rewards, lambda t: accelerator.reduce(t, "sum")
    )
    groups = scores.view(-1, cfg.num_generations)
    return {"frac_reward_zero_std": (groups.std(1) == 0).float().mean().item()}


def group_advantages(
    scores: torch.Tensor, group_size: int, scale_rewards: str, all_reduce_sum=None
) -> torch.Tensor:
    """Â_i = r_i − mean of its group, divided by the group's std (``"group"``), the whole
    batch's (``"batch"``, every process's share: ``all_reduce_sum``) or 1 (``"none"``).
    ``scores`` [B] are prompt-major: a group is ``group_size`` consecutive responses."""
    groups = scores.view(-1, group_size)
    centred = (groups - groups.mean(1, keepdim=True)).flatten()
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = groups.std(1, keepdim=True).expand_as(groups).flatten()
    else:
        total = all_reduce_sum or (lambda t: t)
        count, mean = total(torch.tensor(float(len(scores)))), total(scores.sum())
        mean = mean / count
        std = (total(((scores - mean) ** 2).sum()) / (count - 1)).sqrt()
    return centred / (std + 1e-4)  # TRL's ε: a group of equal rewards gets advantage 0


# ---------------------------------------------------------------- 2. loss


def grpo_loss(
    logprobs: torch.Tensor, mb: Rollout, cfg: GRPOConfig, accelerator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 2: eq. 3 as a loss on a mini-batch, from the policy's log π_φ(y_t) of its tokens."""
    log_ratio = logprobs - mb.logprobs
    per_token, clipped = clipped_surrogate(log_ratio, mb.advantages[:, None], cfg.epsilon)
    kl = kl_k3(logprobs, mb.ref_logprobs, mb.mask)  # eq. 4
    if cfg.beta:
        per_token = per_token + cfg.beta * kl
    per_token = per_token * mb.mask
    if cfg.loss_type == "grpo":
        loss = (per_token.sum(1) / mb.mask.sum(1).clamp(min=1)).mean()
    elif cfg.loss_type == "dr_grpo":
        loss = per_token.sum() / (mb.mask.size(0) * cfg.response_length)
    else:  # dapo: the token mean over every process's share of the mini-batch
        loss = per_token.sum() / mb.mask.sum().clamp(min=1) * token_share(mb.mask, accelerator)
    with torch.no_grad():
        stats = {
            "kl_loss": masked_mean(kl, mb.mask),
            "clip_frac": masked_mean(clipped.float(), mb.mask),
            "ratio": masked_mean(log_ratio.exp(), mb.mask),
        }
    return loss, stats
