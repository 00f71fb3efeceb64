"""``chatrl dpo``: direct preference optimisation on the rankings (Rafailov et al. 2023).

DPO trains the policy on preferences directly, with no reward model and no sampling. The
policy π_θ defines an implicit reward r(x, y) = β log(π_θ(y|x) / π_ref(y|x)); for a pair of
responses y_w ≻ y_l to a prompt x, with h = log(π_θ(y_w|x) / π_ref(y_w|x)) −
log(π_θ(y_l|x) / π_ref(y_l|x)):

    DPO (eq. 7):                −log σ(β h)
    conservative DPO:           −(1 − ε) log σ(β h) − ε log σ(−β h)     (ε = label_smoothing)
    IPO (Azar et al., eq. 17):  (h̄ − 1 / (2β))²    (h̄: h with per-token log-ratios, as TRL)

``train_dpo`` runs these steps, defined below in order:

1. reference (``reference_logprobs``): log π_ref(y|x) of every training response, once, before
   training: the SFT model as loaded, or with LoRA the policy with its adapters off;
2. policy (``SequenceLogProbs``): log π_θ(y|x), the sum over y's tokens, one forward per
   response: the K responses of a ranking share one row, their prompt computed once
   (``reward_model.pack_groups``, as the reward model);
3. loss (``preference_loss``, ``ranking_terms``): a ranking of K responses is its K(K−1)/2
   pairs; its loss is the mean over them and the update's the mean over its rankings, as the
   reward model's, so TRL pairs (K = 2) get TRL's loss;
4. implicit rewards (``ranking_terms``): rewards/chosen, rewards/rejected, rewards/accuracies
   and rewards/margins over the pairs, as TRL names them.

Rankings are read and cut to length as the reward model's (``reward_model.build_groups``), so
every format ``chatrl rm`` takes trains here. The result is a plain causal-LM directory.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chatrl.config import DPOConfig
from chatrl.data import load_rankings, write_json
from chatrl.errors import UserError
from chatrl.models import context_length, disable_dropout, load_causal_lm, save_model
from chatrl.reward_model import (
    Group,
    build_groups,
    collate_groups,
    packed_tokens,
    sum_of_ranking_means,
    to_device,
)
from chatrl.train.loop import (
    add_lora,
    batch_schedule,
    process_micro_batches,
    process_sum,
    start_run,
    train_autocast,
)

# Summed over a batch's pairs (rankings for the loss), then divided for the log.
PAIR_SUMS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
LOGP_SUMS = ("logps/chosen", "logps/rejected")


# ---------------------------------------------------------------- the training run


def train_dpo(cfg: DPOConfig) -> Path:
    """Train the policy with DPO (or IPO) on rankings; write it to ``cfg.out``; return the path."""
    run = start_run(cfg, "dpo")  # LoRA adapters start alike on every process
    cfg, accelerator = run.cfg, run.accelerator
    policy, tokenizer = build_policy(cfg)
    run.seed_process()
    context = context_length(policy.config, tokenizer)
    if cfg.max_length and context and cfg.max_length > context:
        raise UserError(f"max_length={cfg.max_length} exceeds the model's context ({context})")
    max_length = cfg.max_length or context
    groups, counts = build_groups(tokenizer, load_rankings(cfg.data), max_length)
    eval_groups, eval_counts = (
        build_groups(tokenizer, load_rankings(cfg.eval_data), max_length)
        if cfg.eval_data
        else ([], {})
    )
    schedule = batch_schedule(cfg, len(groups))
    module, optimizer, scheduler = run.prepare(SequenceLogProbs(policy), len(schedule))
    pad_id, size = tokenizer.pad_token_id, cfg.per_device_train_batch_size

    # 1. Reference log-probs, before a resumed run loads its trained weights.
    ref = reference_logprobs(module, groups, pad_id, size * 2, accelerator)
    eval_ref = reference_logprobs(module, eval_groups, pad_id, size * 2, accelerator)
    start = run.begin()

    def run_eval() -> dict[str, float]:
        module.eval()
        logps = all_logprobs(module, eval_groups, pad_id, size * 2, accelerator)
        module.train()
        return held_out_metrics(logps, eval_ref, eval_groups, cfg)

    module.train()
    pairs_seen, tokens, started = 0, 0, time.perf_counter()
    with run.progress(len(schedule)) as show:
        for step in range(start, len(schedule)):
            # Each process divides by the update's global ranking count; DDP averages
            # gradients over processes, so scale back up by their number.
            scale = accelerator.num_processes / len(schedule[step])
            loss_total, sums, pairs = 0.0, dict.fromkeys(PAIR_SUMS + LOGP_SUMS, 0.0), 0
            for micro, weight in run.accumulate(module, schedule[step]):
                batch = collate_groups([groups[i] for i in micro], pad_id, logprobs=True)
                tokens += packed_tokens(batch["inputs"]) * weight
                batch = to_device(batch, accelerator.device)
                reference = torch.cat([ref[i] for i in micro]).to(accelerator.device)
                # 2. Policy log-probs: one forward, every response of every ranking once.
                with train_autocast(accelerator, batch["inputs"]["input_ids"]):
                    logps = module(**batch["inputs"])
                # 3–4. Loss and implicit rewards.
                loss_sum, pair_sums = ranking_terms(logps, reference, batch, cfg)
                accelerator.backward(loss_sum * scale * weight)
                loss_total += loss_sum.item() * scale * weight / accelerator.num_processes
                for key, value in pair_sums.items():
                    sums[key] += value * weight
                pairs += len(batch["winners"]) * weight
            done = step + 1
            grad_norm = run.optimizer_step(module, optimizer, scheduler, done)
            loss_total, pairs, *totals = process_sum(accelerator, loss_total, pairs, *sums.values())
            metrics = {key: total / pairs for key, total in zip(sums, totals, strict=True)}

            pairs_seen += pairs
            pairs_per_s = pairs_seen / (time.perf_counter() - started)
            show(
                done,
                f"loss {loss_total:.3f}  acc {metrics['rewards/accuracies']:.2f}  "
                f"margin {metrics['rewards/margins']:.3f}  {pairs_per_s:,.1f} pairs/s",
            )
            if done % cfg.logging_steps == 0 or done == len(schedule):
                run.log.log(
                    done,
                    loss=loss_total,
                    **metrics,
                    grad_norm=float(grad_norm),
                    learning_rate=scheduler.get_last_lr()[0],
                    pairs_per_s=pairs_per_s,
                    tokens=int(process_sum(accelerator, tokens)[0]),  # since the last record
                )
                tokens = 0
            if eval_groups and cfg.eval_steps and done % cfg.eval_steps == 0:
                run.log.log(done, **{f"eval_{k}": v for k, v in run_eval().items()})
            run.maybe_checkpoint(done, len(schedule))

    held_out = run_eval() if eval_groups else None
    if held_out:
        run.log.log(len(schedule), **{f"eval_{k}": v for k, v in held_out.items()})

    def save(trained: SequenceLogProbs) -> None:
        save_model(trained.model, tokenizer, run.out)  # LoRA adapters merged
        data = {"train": counts, **({"eval": eval_counts} if eval_counts else {})}
        write_json(run.out / "eval.json", {"data": data, "eval": held_out})
        if held_out:
            print(
                f"held-out {cfg.eval_data}: loss {held_out['loss']:.4f}, implicit reward "
                f"accuracy {held_out['rewards/accuracies']:.3f}, "
                f"margin {held_out['rewards/margins']:.3f}"
            )

    return run.finish(module, save, rebuild=lambda: SequenceLogProbs(build_policy(cfg)[0]))


# ---------------------------------------------------------------- 1. reference log-probs


def reference_logprobs(
    module: nn.Module, groups: list[Group], pad_id: int, batch_size: int, accelerator
) -> list[torch.Tensor]:
    """log π_ref(y|x) of every response of every ranking (``all_logprobs``) under the reference:
    the model as it is now (before training), or with LoRA with its adapters off."""
    policy = accelerator.unwrap_model(module).model
    lora = hasattr(policy, "disable_adapter")
    with policy.disable_adapter() if lora else contextlib.nullcontext():
        return all_logprobs(module, groups, pad_id, batch_size, accelerator)


@torch.inference_mode()
def all_logprobs(
    module: nn.Module, groups: list[Group], pad_id: int, batch_size: int, accelerator
) -> list[torch.Tensor]:
    """log π(y|x) of every response of every ranking (float32, CPU, a tensor per ranking).

    The processes split the rankings, sorted by length so that a forward pads little, and
    add up their shares; each runs as many forwards (under FSDP every forward gathers
    weights on all of them), a short share repeating a ranking with its result dropped.
    """
    if not groups:
        return []
    by_length = sorted(range(len(groups)), key=lambda i: sum(map(len, groups[i].sequences)))
    sizes = [len(g.sequences) for g in groups]
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    flat = torch.zeros(offsets[-1], dtype=torch.float64, device=accelerator.device)
    for micro in process_micro_batches(by_length, batch_size, accelerator):
        chosen = micro or by_length[:1]
        batch = to_device(
            collate_groups([groups[i] for i in chosen], pad_id, logprobs=True), accelerator.device
        )
        with train_autocast(accelerator, batch["inputs"]["input_ids"]):
            logps = module(**batch["inputs"]).double()
        if micro:
            slots = [j for i in micro for j in range(offsets[i], offsets[i + 1])]
            flat[torch.tensor(slots, device=flat.device)] = logps
    if accelerator.num_processes > 1:
        flat = accelerator.reduce(flat, "sum")
    flat = flat.float().cpu()
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(groups))]


# ---------------------------------------------------------------- 2. policy log-probs


class SequenceLogProbs(nn.Module):
    """log π(y|x) of sequences laid out by ``pack_groups`` with their response starts.

    The output head runs on the positions that predict a response token only (the prompt's
    are not needed), and each response's token log-probs are summed. Wrapping the model
    keeps DDP/FSDP hooks on the forward that runs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        score_index: torch.Tensor,
        logprob_index: torch.Tensor,
        target_ids: torch.Tensor,
        target_sequence: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One float32 summed log-prob per sequence, in ``score_index`` order."""
        hidden = self.model.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden.flatten(0, 1)[logprob_index]).float()
        token_logps = logits.gather(-1, target_ids[:, None]).squeeze(-1) - logits.logsumexp(-1)
        sums = token_logps.new_zeros(len(score_index))
        return sums.index_add(0, target_sequence, token_logps)


# ---------------------------------------------------------------- 3–4. loss and implicit rewards


def preference_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each pair's loss from its log-ratios log(π_θ(y|x) / π_ref(y|x)) (module docstring).

    IPO divides each log-ratio by its response's token count (``chosen_tokens``,
    ``rejected_tokens``), as TRL does.
    """
    if loss_type == "ipo":
        h = chosen_logratios / chosen_tokens - rejected_logratios / rejected_tokens
        return (h - 1 / (2 * beta)) ** 2
    h = chosen_logratios - rejected_logratios
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
        -beta * h
    )


def ranking_terms(
    logps: torch.Tensor, ref_logps: torch.Tensor, batch: dict, cfg: DPOConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's loss (Σ over rankings of their mean pair loss) and its pairs' sums of the
    implicit rewards β·log-ratio (chosen, rejected, margin, right order) and log-probs."""
    logratios = logps - ref_logps
    winners, losers = batch["winners"], batch["losers"]
    tokens = torch.bincount(batch["inputs"]["target_sequence"], minlength=len(logps)).clamp(min=1)
    pair_loss = preference_loss(
        logratios[winners],
        logratios[losers],
        cfg.beta,
        cfg.loss_type,
        cfg.label_smoothing,
        tokens[winners],
        tokens[losers],
    )
    chosen, rejected = cfg.beta * logratios[winners].detach(), cfg.beta * logratios[losers].detach()
    sums = {
        "rewards/chosen": chosen.sum().item(),
        "rewards/rejected": rejected.sum().item(),
        "rewards/accuracies": (chosen > rejected).sum().item(),
        "rewards/margins": (chosen - rejected).sum().item(),
        "logps/chosen": logps[winners].detach().sum().item(),
        "logps/rejected": logps[losers].detach().sum().item(),
    }
    return sum_of_ranking_means(pair_loss, batch["pair_group"]), sums


def held_out_metrics(
    logps: list[torch.Tensor], ref_logps: list[torch.Tensor], groups: list[Group], cfg: DPOConfig
) -> dict[str, Any]:
    """Loss (mean over rankings) and implicit-reward means over the pairs of held-out rankings."""
    loss, sums, pairs = 0.0, dict.fromkeys(PAIR_SUMS + LOGP_SUMS, 0.0), 0
    for group, policy, reference in zip(groups, logps, ref_logps, strict=True):
        batch = collate_groups([group], pad_id=0, logprobs=True)
        group_loss, group_sums = ranking_terms(policy, reference, batch, cfg)
        loss += group_loss.item()
        pairs += len(group.pairs)
        for key, value in group_sums.items():
            sums[key] += value
    return {"loss": loss / len(groups), **{key: value / pairs for key, value in sums.items()}}


# ---------------------------------------------------------------- loading


def build_policy(cfg: DPOConfig):
    """The SFT model to train (dropout off, as TRL) and its tokenizer; under LoRA adapters if
    asked, which the reference then switches off."""
    model, tokenizer = load_causal_lm(cfg.model)
    disable_dropout(model)
    return (add_lora(model, cfg) if cfg.use_peft else model), tokenizer
