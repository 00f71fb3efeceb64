"""The reward model: a one-output sequence classifier trained on rankings (InstructGPT step 2).

A ranking of K responses to one prompt implies K(K-1)/2 (better, worse) pairs. As in
InstructGPT, all pairs of one prompt are one batch element: the K responses go through the
model once, and the element's loss is the mean over its pairs of -log σ(r_w - r_l - margin·d)
(d: how many places apart the two responses are ranked). The update's loss is the mean over
its rankings, so it does not depend on how the batch is split into micro-batches or
processes. Pairwise data (TRL, HH-RLHF) is the case K = 2. The K responses even share one
row: the prompt once, then each response, masked so that each sees the prompt and itself
only (``layout``) — the prompt is computed once instead of K times.

A response's score is the head's output at the last token of the rendered conversation
(the prompt with the response as its final assistant turn): what plain transformers'
``AutoModelForSequenceClassification`` returns for that unpadded sequence.

Over-long rankings: the prompt loses tokens from its start (oldest turns first), by the same
amount for all K responses so they are compared in the same context; a ranking whose
response does not fit even with the whole prompt gone is skipped. Both are counted and named
by file and line.

Normalisation: after training, the mean and standard deviation of the raw rewards on SFT
samples for the training prompts (``--prompts``; or, without it, on every response in the
training rankings) are stored in the model's config as ``chatrl_reward_mean`` and
``chatrl_reward_std``. ``RewardScorer`` returns ``(raw - mean) / std``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_layers import GenericForSequenceClassification

from chatrl.chat_format import CHATML_TEMPLATE, render
from chatrl.config import RMConfig
from chatrl.data import (
    Message,
    Ranking,
    load_conversations,
    load_prompts,
    load_rankings,
    load_tasks,
    read_jsonl,
    write_json,
    write_jsonl,
)
from chatrl.errors import UserError
from chatrl.models import (
    REWARD_MEAN,
    REWARD_STD,
    context_length,
    load_causal_lm,
    load_reward_model,
    reward_normalisation,
    save_model,
)
from chatrl.train.loop import (
    MetricsLog,
    TrainerState,
    accumulate,
    add_lora,
    check_replicas,
    decide_precision,
    global_batches,
    load_checkpoint,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    prepare,
    process_micro_batches,
    process_sum,
    progress_bar,
    refuse_unfinished_run,
    remove_checkpoint,
    save_checkpoint,
    seed_everything,
    train_autocast,
    trained_module,
    write_train_config,
)

logger = logging.getLogger(__name__)

LISTED = 10  # over-long examples named one by one in a warning; the rest are counted
SHORT_ROW = 128  # rows up to this many tokens use the math attention kernel on a CPU


# ---------------------------------------------------------------- encoding


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template (an encoder checkpoint) ChatML.

    The template is saved with the reward model's tokenizer, so scoring renders the same way.
    """
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE


@dataclass
class Encoded:
    """Prompt + response tokens; ``ids[prompt_start:prompt_end]`` is the prompt.

    Tokens before ``prompt_start`` were added by the tokenizer (e.g. ``[CLS]``) and are never cut.
    """

    ids: list[int]
    prompt_start: int
    prompt_end: int


def encode_responses(tokenizer, prompt: list[Message], responses: list[str]) -> list[Encoded]:
    """Tokenise each response as the final assistant turn after ``prompt``."""
    prompt_text = render(tokenizer, prompt, add_generation_prompt=True)
    texts = []
    for response in responses:
        text = render(tokenizer, [*prompt, {"role": "assistant", "content": response}])
        if not text.startswith(prompt_text):
            raise UserError(
                "the chat template renders the prompt differently once a reply follows it; "
                "chatrl cannot tell the prompt from the response"
            )
        texts.append(text)
    batch = tokenizer(texts, return_offsets_mapping=True)
    encoded = []
    for ids, offsets in zip(batch["input_ids"], batch["offset_mapping"], strict=True):
        start = 0
        while start < len(ids) and offsets[start][0] == offsets[start][1]:
            start += 1
        end = start
        while end < len(ids) and offsets[end][1] <= len(prompt_text):
            end += 1
        encoded.append(Encoded(list(ids), start, end))
    return encoded


def fit_to_length(encoded: list[Encoded], max_length: int | None) -> list[list[int]] | None:
    """Cut the shared prompt from its start until every sequence fits in ``max_length``.

    Returns None when that would take the whole prompt (a response alone does not fit).
    """
    cut = max(len(e.ids) for e in encoded) - (max_length or math.inf)
    if cut <= 0:
        return [e.ids for e in encoded]
    if any(cut >= e.prompt_end - e.prompt_start for e in encoded):
        return None
    return [e.ids[: e.prompt_start] + e.ids[e.prompt_start + cut :] for e in encoded]


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


class LastTokenReward(nn.Module):
    """Scores sequences at their last token, laid out by ``layout``.

    Decoder classifiers (Llama, Qwen, Mistral…: transformers' generic sequence classifiers)
    run their base model and apply the score head to the scored positions only. Other models
    (encoders) run whole and pool their own way. Wrapping the model (rather than calling its
    parts from the loop) keeps DDP/FSDP hooks on the forward that runs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.pools_last_token = isinstance(self.classifier(), GenericForSequenceClassification)

    def classifier(self) -> nn.Module:
        """The transformers model inside (under LoRA adapters, if any)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(
        self,
        input_ids: torch.Tensor,
        score_index: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One float32 reward per scored sequence, in layout order."""
        if not self.pools_last_token:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            return out.logits.squeeze(-1).float()
        classifier = self.classifier()
        decoder = getattr(classifier, classifier.base_model_prefix)
        # On a CPU, SDPA's flash kernel costs more than the plain math kernel on short rows
        # (its backward above all): a quarter of a reward-model step on 50-80-token rows.
        # From about 128 tokens on, flash is as fast or faster.
        short = input_ids.device.type == "cpu" and input_ids.shape[1] <= SHORT_ROW
        with sdpa_kernel(SDPBackend.MATH) if short else contextlib.nullcontext():
            hidden = decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            ).last_hidden_state
        return classifier.score(hidden.flatten(0, 1)[score_index]).squeeze(-1).float()


def shared_prefix(sequences: list[list[int]]) -> int:
    """Length of the sequences' common prefix, short of every sequence's last token."""
    limit, first = min(len(s) for s in sequences) - 1, sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


def layout(groups: list[list[list[int]]], pad_id: int, pools_last_token: bool) -> dict:
    """Model inputs scoring every sequence of every group once, in order.

    Decoders get one row per group: the group's common prefix (its prompt) once, then each
    sequence's remainder, with position ids restarting after the prefix and an attention mask
    that lets each remainder see the prefix and itself only — so every sequence gets exactly
    the states it would get alone, and the prompt is computed once instead of K times. When
    no group shares anything (all of size 1) there is no mask: rows are right-padded, padding
    sits right of every real token and attention is causal, so SDPA keeps its fast causal
    path. Encoders get one right-padded row per sequence and a padding mask.
    """
    if not pools_last_token:
        sequences = [s for g in groups for s in g]
        width = max(len(s) for s in sequences)
        return {
            "input_ids": torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences]),
            "attention_mask": torch.tensor(
                [[1] * len(s) + [0] * (width - len(s)) for s in sequences]
            ),
        }
    rows, positions, segments, ends = [], [], [], []
    for group in groups:
        p = shared_prefix(group) if len(group) > 1 else len(group[0])
        row, pos, seg = list(group[0][:p]), list(range(p)), [0] * p
        for i, sequence in enumerate(group, start=1):
            rest = sequence[p:]
            row += rest
            pos += range(p, len(sequence))
            seg += [i] * len(rest)
            ends.append((len(rows), len(row) - 1))
        rows.append(row)
        positions.append(pos)
        segments.append(seg)
    width = max(len(r) for r in rows)
    batch = {
        "input_ids": torch.tensor([r + [pad_id] * (width - len(r)) for r in rows]),
        "score_index": torch.tensor([row * width + end for row, end in ends]),
    }
    if all(len(g) == 1 for g in groups):
        return batch
    # Padding gets segment -1: it sees the prefix and earlier padding (never an empty row,
    # which would make NaNs), and no real token sees it.
    seg = torch.tensor([s + [-1] * (width - len(s)) for s in segments])
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
    batch["attention_mask"] = (causal & visible)[:, None]
    batch["position_ids"] = torch.tensor([p + [0] * (width - len(p)) for p in positions])
    return batch


def collate_groups(groups: list[Group], pad_id: int, pools_last_token: bool = True) -> dict:
    """A micro-batch of rankings: model inputs (``layout``) and the pairs as reward indices."""
    batch = layout([g.sequences for g in groups], pad_id, pools_last_token)
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


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: to_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()
    }


@torch.inference_mode()
def score_groups(
    module: LastTokenReward,
    groups: list[list[list[int]]],
    pad_id: int,
    batch_size: int = 32,
    bf16: bool = False,
) -> torch.Tensor:
    """Raw rewards of every sequence of every group (float32, CPU, in order).

    Groups of similar length are batched together, about ``batch_size`` sequences a forward.
    """
    device = next(module.parameters()).device
    pools_last_token = getattr(module, "module", module).pools_last_token  # DDP wraps it
    starts = [0]
    for group in groups:
        starts.append(starts[-1] + len(group))
    order = sorted(range(len(groups)), key=lambda i: sum(len(s) for s in groups[i]))
    rewards = torch.empty(starts[-1])
    chunk: list[int] = []
    for position, index in enumerate(order):
        chunk.append(index)
        size = sum(len(groups[i]) for i in chunk)
        if size >= batch_size or position == len(order) - 1:
            inputs = layout([groups[i] for i in chunk], pad_id, pools_last_token)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                scores = module(**to_device(inputs, device)).float().cpu()
            slots = [j for i in chunk for j in range(starts[i], starts[i + 1])]
            rewards[slots] = scores
            chunk = []
    return rewards


# ---------------------------------------------------------------- evaluation


Scored = tuple[list[tuple[int, int]], list[float], dict[str, Any]]  # pairs, rewards, meta


def pairwise_report(scored: list[Scored]) -> dict[str, Any]:
    """Pairwise accuracy (ties count half) overall, by K, and by ``meta["family"]`` if present.

    Each item is one ranking: its (better, worse) index pairs, the rewards of its responses
    and its meta. Also reports the mean pair loss per ranking and the share of rankings whose
    whole order the rewards reproduce.
    """
    totals: dict[str, dict[str, float]] = {}
    for pairs, rewards, meta in scored:
        diffs = torch.tensor([rewards[w] - rewards[lo] for w, lo in pairs])
        correct = ((diffs > 0).float() + 0.5 * (diffs == 0).float()).sum().item()
        keys = ["all", f"K={len(rewards)}"]
        if "family" in meta:
            keys.append(f"family={meta['family']}")
        for key in keys:
            t = totals.setdefault(
                key, dict.fromkeys(("rankings", "pairs", "correct", "loss", "exact"), 0)
            )
            t["rankings"] += 1
            t["pairs"] += len(pairs)
            t["correct"] += correct
            t["loss"] += -F.logsigmoid(diffs).mean().item()
            t["exact"] += int(correct == len(pairs))
    return {
        key: {
            "rankings": int(t["rankings"]),
            "pairs": int(t["pairs"]),
            "accuracy": t["correct"] / t["pairs"],
            "loss": t["loss"] / t["rankings"],
            "exact_order": t["exact"] / t["rankings"],
        }
        for key, t in totals.items()
    }


def evaluate(
    module: LastTokenReward, groups: list[Group], pad_id: int, batch_size: int, bf16: bool
) -> dict[str, Any]:
    """Pairwise accuracy of a reward model on tokenised rankings."""
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


def print_report(title: str, report: dict[str, Any], file: TextIO | None = None) -> None:
    """A ``pairwise_report`` as one line per breakdown."""
    print(f"{title}:", file=file)
    for key, row in report.items():
        print(
            f"  {key:<24} accuracy {row['accuracy']:.3f}  ({row['pairs']} pairs, "
            f"{row['rankings']} rankings, exact order {row['exact_order']:.3f}, "
            f"loss {row['loss']:.3f})",
            file=file,
        )


# ---------------------------------------------------------------- normalisation


def normalisation_pairs(
    cfg: RMConfig,
    rankings: list[Ranking],
    prompts: list[list[Message]] | None,
    device: torch.device,
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
    from chatrl.engine import Engine, SamplingParams

    try:
        policy, tokenizer = load_causal_lm(cfg.model)
    except ValueError:
        raise UserError(
            f"{cfg.model} is not a causal LM, so it cannot sample responses for --prompts; "
            "leave --prompts out to normalise over the training responses"
        ) from None
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed
    )
    completions = Engine(policy.to(device), tokenizer).generate_chat(prompts, params)
    responses = [c.text for c in completions]
    return prompts, responses, f"{len(responses)} samples of {cfg.model} for {cfg.prompts}"


def reward_statistics(rewards: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation; a spread of zero (or a single reward) leaves scale 1."""
    mean = rewards.mean().item()
    std = rewards.std(unbiased=False).item() if len(rewards) > 1 else 0.0
    if std < 1e-6:
        logger.warning("normalisation rewards have no spread; storing std 1")
        std = 1.0
    return mean, std


# ---------------------------------------------------------------- training


def prepare_model(path: str):
    """The reward model to train, its tokenizer and context length; dropout off (as TRL)."""
    model, tokenizer = load_reward_model(path)
    ensure_chat_template(tokenizer)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model, tokenizer, context_length(model.config, tokenizer)


def build_reward_model(cfg: RMConfig):
    """``prepare_model(cfg.model)``, the model under LoRA adapters if asked."""
    model, tokenizer, context = prepare_model(cfg.model)
    if cfg.use_peft:
        model = add_lora(model, cfg, task_type="SEQ_CLS")
    return model, tokenizer, context


def train_reward(cfg: RMConfig) -> Path:
    """Train a reward model on rankings, normalise it, save it to ``cfg.out``; return the path."""
    out = Path(cfg.out)
    refuse_unfinished_run(out, cfg.resume)
    cfg = decide_precision(cfg, "rm")
    accelerator = make_accelerator(cfg.bf16, cfg.fsdp)
    seed_everything(cfg.seed)  # the same new head (and adapters) on every process
    model, tokenizer, context = build_reward_model(cfg)
    seed_everything(cfg.seed, accelerator.process_index)
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

    # The global batch is the same however many processes share it (docs/scaling.md).
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    schedule = global_batches(len(groups), global_batch, cfg.seed, cfg.num_train_epochs)
    if cfg.max_steps is not None:
        schedule = schedule[: cfg.max_steps]
    module = LastTokenReward(model)
    pools_last_token = module.pools_last_token
    optimizer = make_optimizer(module, cfg.learning_rate, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, len(schedule), cfg.warmup_ratio)
    module, optimizer = prepare(accelerator, module, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    log = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)
    state = (load_checkpoint(accelerator, out) if cfg.resume else None) or TrainerState()
    log.truncate_after(state.step)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_train_config(out, "rm", cfg)

    pad_id = tokenizer.pad_token_id
    batch_size = cfg.per_device_train_batch_size

    def run_eval() -> dict[str, Any]:
        return evaluate(module, eval_groups, pad_id, batch_size * 2, cfg.bf16)

    module.train()
    pairs_seen, started = 0, time.perf_counter()
    with progress_bar(accelerator.is_main_process) as bar:
        task = bar.add_task("rm", total=len(schedule), completed=state.step, info="")
        for step in range(state.step, len(schedule)):
            # Each process divides by the update's global ranking count; DDP averages
            # gradients over processes, so scale back up by their number.
            scale = accelerator.num_processes / len(schedule[step])
            loss_total, correct, pairs, reward_sum, responses = 0.0, 0, 0, 0.0, 0
            pieces = process_micro_batches(schedule[step], batch_size, accelerator)
            for micro, weight in accumulate(accelerator, module, pieces, schedule[step][:1]):
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
            grad_norm = accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            check_replicas(accelerator, module, step + 1)
            loss_total, correct, pairs, reward_sum, responses = process_sum(
                accelerator, loss_total, correct, pairs, reward_sum, responses
            )

            done = step + 1
            pairs_seen += pairs
            pairs_per_s = pairs_seen / (time.perf_counter() - started)
            accuracy = correct / pairs
            bar.update(
                task,
                completed=done,
                info=f"loss {loss_total:.3f}  acc {accuracy:.2f}  {pairs_per_s:,.1f} pairs/s",
            )
            if done % cfg.logging_steps == 0 or done == len(schedule):
                log.log(
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
                log.log(done, eval_accuracy=report["accuracy"], eval_loss=report["loss"])
            if done % cfg.save_steps == 0 and done < len(schedule):
                save_checkpoint(accelerator, out, TrainerState(done), accelerator.num_processes)

    held_out = run_eval() if eval_groups else None
    if held_out:
        log.log(len(schedule), eval_accuracy=held_out["all"]["accuracy"])
    accelerator.wait_for_everyone()
    trained = trained_module(
        accelerator, module, lambda: LastTokenReward(build_reward_model(cfg)[0])
    )
    if accelerator.is_main_process:
        model = trained.model
        if hasattr(model, "merge_and_unload"):  # LoRA
            model = model.merge_and_unload()
        pairs = normalisation_pairs(cfg, rankings, norm_prompts, accelerator.device)
        normalisation = normalise(model, tokenizer, *pairs, max_length)
        save_model(model, tokenizer, out)
        report = {
            "data": {"train": counts, **({"eval": eval_counts} if eval_counts else {})},
            "normalization": normalisation,
            "eval": held_out,
        }
        write_json(out / "eval.json", report)
        print(
            f"reward normalisation: mean {normalisation['mean']:.4f}, "
            f"std {normalisation['std']:.4f} over {normalisation['over']}"
        )
        if held_out:
            print_report(f"held-out {cfg.eval_data}", held_out)
        remove_checkpoint(out)
    accelerator.wait_for_everyone()
    return out


def normalise(
    model,
    tokenizer,
    prompts: list[list[Message]],
    responses: list[str],
    described: str,
    max_length: int | None,
) -> dict[str, Any]:
    """Store the mean and std of the model's raw rewards on these pairs in its config."""
    groups = encode_scored(tokenizer, prompts, responses, max_length)
    # In float32, as RewardScorer scores by default.
    raw = score_groups(LastTokenReward(model).eval(), groups, tokenizer.pad_token_id, 64)
    mean, std = reward_statistics(raw)
    setattr(model.config, REWARD_MEAN, mean)
    setattr(model.config, REWARD_STD, std)
    return {"mean": mean, "std": std, "over": described}


def fit_or_keep_end(encoded: Encoded, max_length: int | None) -> list[int]:
    """One sequence by the over-length rule; one that cannot fit keeps its last tokens.

    Scoring cannot skip a response, and the last token is the one scored.
    """
    fitted = fit_to_length([encoded], max_length)
    return fitted[0] if fitted is not None else encoded.ids[-max_length:]


def encode_scored(
    tokenizer, prompts: list[list[Message]], responses: list[str], max_length: int | None
) -> list[list[list[int]]]:
    """Token ids of each (prompt, response), grouped by runs of one prompt.

    ``score_groups`` computes a group's shared prompt once (Best-of-n, several samples per
    prompt); the flattened groups are in input order.
    """
    groups, start = [], 0
    while start < len(prompts):
        end = start + 1
        while end < len(prompts) and prompts[end] == prompts[start]:
            end += 1
        encoded = encode_responses(tokenizer, prompts[start], responses[start:end])
        groups.append([fit_or_keep_end(e, max_length) for e in encoded])
        start = end
    return groups


# ---------------------------------------------------------------- scoring


class RewardScorer:
    """A trained reward model, ready to score responses (Best-of-n, PPO, inspection).

    ``score`` returns normalised rewards (mean 0, std 1 on the SFT samples the model was
    normalised on; see the module docstring) unless ``raw=True``. A model without stored
    normalisation (any transformers reward model) scores raw.
    """

    def __init__(self, model_dir: str | Path, device: str | None = None, bf16: bool = False):
        model, self.tokenizer, self.max_length = prepare_model(str(model_dir))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.module = LastTokenReward(model.to(self.device)).eval()
        self.bf16 = bf16
        self.mean, self.std = reward_normalisation(model.config)

    def score(
        self,
        prompts: list[list[Message]],
        responses: list[str],
        batch_size: int = 32,
        raw: bool = False,
    ) -> torch.Tensor:
        """One reward per (prompt, response), float32 on the CPU."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        groups = encode_scored(self.tokenizer, prompts, responses, self.max_length)
        rewards = score_groups(
            self.module, groups, self.tokenizer.pad_token_id, batch_size, self.bf16
        )
        return rewards if raw else (rewards - self.mean) / self.std


def load_scoring_file(path: str | Path) -> list[dict[str, Any]]:
    """Conversations (the last assistant turn is scored), tasks, rankings or preference pairs.

    Every record becomes ``{"prompt": [...], "responses": [...]}`` (plus ``ranking`` where
    the file ranks them).
    """
    _, first = next(read_jsonl(path))
    if "messages" in first:
        records = []
        for messages in load_conversations(path):
            if messages[-1]["role"] != "assistant":
                raise UserError(f"{path}: every conversation must end with the assistant turn")
            records.append({"prompt": messages[:-1], "responses": [messages[-1]["content"]]})
        return records
    if "ranking" in first or "chosen" in first:
        return [
            {"prompt": r.prompt, "responses": r.responses, "ranking": r.ranking, "meta": r.meta}
            for r in load_rankings(path)
        ]
    return [{"prompt": t.prompt, "responses": t.responses} for t in load_tasks(path)]


def score_file(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    batch_size: int = 32,
    raw: bool = False,
    bf16: bool = False,
) -> list[dict[str, Any]]:
    """Score every response in ``data``; each record gains ``rewards`` and ``best`` (an index).

    Records are written as JSONL to ``out`` when given, and returned.
    """
    scorer = RewardScorer(model_dir, bf16=bf16)
    records = load_scoring_file(data)
    prompts = [rec["prompt"] for rec in records for _ in rec["responses"]]
    responses = [response for rec in records for response in rec["responses"]]
    rewards = scorer.score(prompts, responses, batch_size=batch_size, raw=raw).tolist()
    offset = 0
    for rec in records:
        rec["rewards"] = rewards[offset : offset + len(rec["responses"])]
        rec["best"] = max(range(len(rec["rewards"])), key=rec["rewards"].__getitem__)
        offset += len(rec["responses"])
    if out is not None:
        write_jsonl(out, records)
    return records


def ranked_records_report(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``pairwise_report`` of scored records that carry a ranking (None when none does)."""
    scored = [
        (
            Ranking(rec["prompt"], rec["responses"], rec["ranking"]).pairs(),
            rec["rewards"],
            rec["meta"],
        )
        for rec in records
        if "ranking" in rec
    ]
    return pairwise_report(scored) if scored else None
