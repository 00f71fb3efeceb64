"""``chatrl rm``: train the reward model on rankings (InstructGPT step 2).

A ranking of K responses to one prompt implies K(K-1)/2 (better, worse) pairs. As in
InstructGPT, all pairs of one prompt are one batch element: the K responses go through the
model once (one row, the prompt computed once: ``reward_model.pack_groups``), and the
element's loss is the mean over its pairs of -log σ(r_w - r_l - margin·d) (d: how many places
apart the two responses are ranked). The update's loss is the mean over its rankings, so it
does not depend on how the batch is split into micro-batches or processes. Pairwise data
(TRL, HH-RLHF) is the case K = 2.

Over-long rankings: the prompt loses tokens from its start (``reward_model.fit_to_length``);
a ranking whose response does not fit even with the whole prompt gone is skipped. Both are
counted and named by file and line.

After training, the model is normalised (``reward_model.normalise``) over SFT samples for the
training prompts (``--prompts``; or, without it, every response in the training rankings).
Loading, scoring and normalisation live in ``chatrl.reward_model``; this module is the trainer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chatrl.config import RMConfig
from chatrl.data import Message, Ranking, load_prompts, load_rankings, write_json
from chatrl.engine import SamplingParams, load_engine
from chatrl.errors import UserError
from chatrl.evaluate import pairwise_report, print_report
from chatrl.models import save_model
from chatrl.reward_model import (
    LastTokenReward,
    encode_responses,
    fit_to_length,
    load_reward,
    normalise,
    pack_groups,
    score_groups,
    to_device,
)
from chatrl.train.loop import add_lora, batch_schedule, process_sum, start_run, train_autocast

logger = logging.getLogger(__name__)

LISTED = 10  # over-long examples named one by one in a warning; the rest are counted


# ---------------------------------------------------------------- encoding


@dataclass
class Group:
    """One ranking, tokenised: its K sequences and its (winner, loser, rank distance) pairs."""

    sequences: list[list[int]]
    pairs: list[tuple[int, int, int]]
    meta: dict[str, Any]
    source: str | None


def _named(sources: list[str]) -> str:
    more = f", and {len(sources) - LISTED} more" if len(sources) > LISTED else ""
    return ", ".join(sources[:LISTED]) + more


def build_groups(
    tokenizer, rankings: list[Ranking], max_length: int | None
) -> tuple[list[Group], dict[str, int]]:
    """Tokenise rankings by the over-length rule (module docstring); warn about every cut.

    Returns the groups and the counts ``{"rankings", "pairs", "truncated", "skipped"}``.
    """
    groups, truncated, skipped = [], [], []
    for ranking in rankings:
        encoded = encode_responses(tokenizer, ranking.prompt, ranking.responses)
        sequences = fit_to_length(encoded, max_length)
        where = ranking.source or "(rankings)"
        if sequences is None:
            skipped.append(where)
            continue
        if sequences[0] != encoded[0].ids:
            truncated.append(f"{where} (-{len(encoded[0].ids) - len(sequences[0])})")
        position = {response: place for place, response in enumerate(ranking.ranking)}
        pairs = [(w, lo, position[lo] - position[w]) for w, lo in ranking.pairs()]
        groups.append(Group(sequences, pairs, ranking.meta, ranking.source))
    if truncated:
        logger.warning(
            "%d ranking(s) longer than max_length=%s: prompt cut from the left by the tokens "
            "shown: %s",
            len(truncated),
            max_length,
            _named(truncated),
        )
    if skipped:
        logger.warning(
            "%d ranking(s) skipped: a response alone is longer than max_length=%s: %s",
            len(skipped),
            max_length,
            _named(skipped),
        )
    if rankings and not groups:
        raise UserError(f"no ranking fits in max_length={max_length} tokens")
    counts = {
        "rankings": len(groups),
        "pairs": sum(len(g.pairs) for g in groups),
        "truncated": len(truncated),
        "skipped": len(skipped),
    }
    return groups, counts


# ---------------------------------------------------------------- model


def collate_groups(groups: list[Group], pad_id: int, pools_last_token: bool = True) -> dict:
    """A micro-batch of rankings: model inputs (``pack_groups``) and the pairs as reward
    indices."""
    batch = pack_groups([g.sequences for g in groups], pad_id, pools_last_token)
    winners, losers, distance, pair_group = [], [], [], []
    offset = 0
    for index, group in enumerate(groups):
        for w, lo, d in group.pairs:
            winners.append(offset + w)
            losers.append(offset + lo)
            distance.append(d)
            pair_group.append(index)
        offset += len(group.sequences)
    return {
        "inputs": batch,
        "winners": torch.tensor(winners),
        "losers": torch.tensor(losers),
        "distance": torch.tensor(distance, dtype=torch.float32),
        "pair_group": torch.tensor(pair_group),
    }


def ranking_loss(
    rewards: torch.Tensor,
    batch: dict,
    margin: float = 0.0,
    center_rewards_coefficient: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over the batch's rankings of each ranking's mean pair loss; and the pairs ordered right.

    Pair loss: -log σ(r_w - r_l - margin·d), plus ``center_rewards_coefficient``·(r_w + r_l)²
    (TRL's centring penalty; with K = 2 the mean over rankings equals TRL's loss).
    """
    chosen, rejected = rewards[batch["winners"]], rewards[batch["losers"]]
    pair_loss = -F.logsigmoid(chosen - rejected - margin * batch["distance"])
    if center_rewards_coefficient:
        pair_loss = pair_loss + center_rewards_coefficient * (chosen + rejected) ** 2
    group = batch["pair_group"]
    pairs_per_group = torch.bincount(group)
    return (pair_loss / pairs_per_group[group]).sum(), (chosen > rejected).sum()


# ---------------------------------------------------------------- evaluation


def held_out_accuracy(
    module: LastTokenReward, groups: list[Group], pad_id: int, batch_size: int, bf16: bool
) -> dict[str, Any]:
    """``pairwise_report`` of the reward model being trained on tokenised held-out rankings."""
    module.eval()
    rewards = score_groups(module, [g.sequences for g in groups], pad_id, batch_size, bf16)
    module.train()
    scored, offset = [], 0
    for g in groups:
        k = len(g.sequences)
        pairs = [(w, lo) for w, lo, _ in g.pairs]
        scored.append((pairs, rewards[offset : offset + k].tolist(), g.meta))
        offset += k
    return pairwise_report(scored)


# ---------------------------------------------------------------- normalisation


def normalisation_pairs(
    cfg: RMConfig,
    rankings: list[Ranking],
    prompts: list[list[Message]] | None,
) -> tuple[list[list[Message]], list[str], str]:
    """The (prompt, response) pairs rewards are normalised over, and a description of them.

    With ``prompts`` (read from ``cfg.prompts``): one SFT sample per prompt, generated by
    ``cfg.model`` (the SFT model the reward model starts from). Without: every response of
    the training rankings.
    """
    if prompts is None:
        prompts = [r.prompt for r in rankings for _ in r.responses]
        responses = [response for r in rankings for response in r.responses]
        return prompts, responses, f"the {len(responses)} responses in {cfg.data}"
    try:
        engine = load_engine(cfg.model)
    except ValueError:
        raise UserError(
            f"{cfg.model} is not a causal LM, so it cannot sample responses for --prompts; "
            "leave --prompts out to normalise over the training responses"
        ) from None
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed
    )
    completions = engine.generate_chat(prompts, params)
    responses = [c.text for c in completions]
    return prompts, responses, f"{len(responses)} samples of {cfg.model} for {cfg.prompts}"


# ---------------------------------------------------------------- training


def build_reward_model(cfg: RMConfig):
    """``load_reward(cfg.model)``, the model under LoRA adapters if asked."""
    model, tokenizer, context = load_reward(cfg.model)
    if cfg.use_peft:
        model = add_lora(model, cfg, task_type="SEQ_CLS")
    return model, tokenizer, context


def train_reward(cfg: RMConfig) -> Path:
    """Train a reward model on rankings, normalise it, save it to ``cfg.out``; return the path."""
    run = start_run(cfg, "rm")  # the same new head (and adapters) on every process
    cfg, accelerator = run.cfg, run.accelerator
    model, tokenizer, context = build_reward_model(cfg)
    run.seed_process()
    if cfg.max_length and context and cfg.max_length > context:
        raise UserError(f"max_length={cfg.max_length} exceeds the model's context ({context})")
    max_length = cfg.max_length or context
    rankings = load_rankings(cfg.data)
    # Read now, so that a bad prompts file fails before training rather than after.
    norm_prompts = [p.messages for p in load_prompts(cfg.prompts)] if cfg.prompts else None
    groups, counts = build_groups(tokenizer, rankings, max_length)
    eval_groups, eval_counts = (
        build_groups(tokenizer, load_rankings(cfg.eval_data), max_length)
        if cfg.eval_data
        else ([], {})
    )
    schedule = batch_schedule(cfg, len(groups))
    module = LastTokenReward(model)
    pools_last_token = module.pools_last_token
    module, optimizer, scheduler = run.prepare(module, len(schedule))
    start = run.begin()

    pad_id = tokenizer.pad_token_id
    batch_size = cfg.per_device_train_batch_size

    def run_eval() -> dict[str, Any]:
        return held_out_accuracy(module, eval_groups, pad_id, batch_size * 2, cfg.bf16)

    module.train()
    pairs_seen, started = 0, time.perf_counter()
    with run.progress(len(schedule)) as show:
        for step in range(start, len(schedule)):
            # Each process divides by the update's global ranking count; DDP averages
            # gradients over processes, so scale back up by their number.
            scale = accelerator.num_processes / len(schedule[step])
            loss_total, correct, pairs, reward_sum, responses = 0.0, 0, 0, 0.0, 0
            for micro, weight in run.accumulate(module, schedule[step]):
                batch = collate_groups([groups[i] for i in micro], pad_id, pools_last_token)
                batch = to_device(batch, accelerator.device)
                with train_autocast(accelerator, batch["inputs"]["input_ids"]):
                    rewards = module(**batch["inputs"])
                loss_sum, right = ranking_loss(
                    rewards, batch, cfg.margin, cfg.center_rewards_coefficient
                )
                accelerator.backward(loss_sum * scale * weight)
                loss_total += loss_sum.item() * scale * weight / accelerator.num_processes
                correct += right.item() * weight
                pairs += len(batch["winners"]) * weight
                reward_sum += rewards.sum().item() * weight
                responses += len(rewards) * weight
            done = step + 1
            grad_norm = run.optimizer_step(module, optimizer, scheduler, done)
            loss_total, correct, pairs, reward_sum, responses = process_sum(
                accelerator, loss_total, correct, pairs, reward_sum, responses
            )

            pairs_seen += pairs
            pairs_per_s = pairs_seen / (time.perf_counter() - started)
            accuracy = correct / pairs
            show(done, f"loss {loss_total:.3f}  acc {accuracy:.2f}  {pairs_per_s:,.1f} pairs/s")
            if done % cfg.logging_steps == 0 or done == len(schedule):
                run.log.log(
                    done,
                    loss=loss_total,
                    accuracy=accuracy,
                    reward_mean=reward_sum / responses,
                    grad_norm=float(grad_norm),
                    learning_rate=scheduler.get_last_lr()[0],
                    pairs_per_s=pairs_per_s,
                )
            if eval_groups and cfg.eval_steps and done % cfg.eval_steps == 0:
                report = run_eval()["all"]
                run.log.log(done, eval_accuracy=report["accuracy"], eval_loss=report["loss"])
            run.maybe_checkpoint(done, len(schedule))

    held_out = run_eval() if eval_groups else None
    if held_out:
        run.log.log(len(schedule), eval_accuracy=held_out["all"]["accuracy"])

    def save(trained: LastTokenReward) -> None:
        model = trained.model
        if hasattr(model, "merge_and_unload"):  # LoRA
            model = model.merge_and_unload()
        pairs = normalisation_pairs(cfg, rankings, norm_prompts)
        normalisation = normalise(model, tokenizer, *pairs, max_length)
        save_model(model, tokenizer, run.out)
        report = {
            "data": {"train": counts, **({"eval": eval_counts} if eval_counts else {})},
            "normalization": normalisation,
            "eval": held_out,
        }
        write_json(run.out / "eval.json", report)
        print(
            f"reward normalisation: mean {normalisation['mean']:.4f}, "
            f"std {normalisation['std']:.4f} over {normalisation['over']}"
        )
        if held_out:
            print_report(f"held-out {cfg.eval_data}", held_out)

    return run.finish(module, save, rebuild=lambda: LastTokenReward(build_reward_model(cfg)[0]))
