"""The reward model r_θ: load it, score (prompt, response) pairs with it, normalise it.

The one way chatrl scores with a reward model: the RM trainer (its held-out accuracy and its
normalisation), PPO's rewards, Best-of-n, evaluation and ``chatrl rm score`` all go through
``RewardScorer`` (frozen, for inference) or ``LastTokenReward`` (the ``nn.Module`` the trainer
trains), so a reward is the same number wherever it is read.

A response's score is the head's output at the last token of the rendered conversation (the
prompt with the response as its final assistant turn): what plain transformers'
``AutoModelForSequenceClassification`` returns for that unpadded sequence. The K responses
to one prompt share one row: the prompt once, then each response, masked so that each sees
the prompt and itself only (``pack_groups``) — the prompt is computed once instead of K
times.

Over-long sequences lose prompt tokens from the start (oldest turns first), by the same
amount for all responses to one prompt, so they are compared in the same context
(``fit_to_length``).

Normalisation: ``chatrl rm`` stores the mean and standard deviation of the raw rewards on SFT
samples in the model's config (``chatrl_reward_mean``, ``chatrl_reward_std``);
``RewardScorer`` returns ``(raw - mean) / std``, so 0 is about the SFT model's mean reward.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_layers import GenericForSequenceClassification

from chatrl.chat_format import render
from chatrl.data import (
    Message,
    Ranking,
    load_conversations,
    load_rankings,
    load_tasks,
    read_jsonl,
    write_jsonl,
)
from chatrl.errors import UserError
from chatrl.models import context_length, disable_dropout, load_reward_model

logger = logging.getLogger(__name__)

LISTED = 10  # over-long rankings named one by one in a warning; the rest are counted
SHORT_ROW = 128  # rows up to this many tokens use the math attention kernel on a CPU
# Where `chatrl rm` stores the reward normalisation, in the reward model's config.
REWARD_MEAN, REWARD_STD = "chatrl_reward_mean", "chatrl_reward_std"


# ---------------------------------------------------------------- encoding


@dataclass
class ResponseIds:
    """Prompt + response tokens; ``ids[prompt_start:prompt_end]`` is the prompt.

    Tokens before ``prompt_start`` were added by the tokenizer (e.g. ``[CLS]``) and are never cut.
    """

    ids: list[int]
    prompt_start: int
    prompt_end: int


def encode_responses(tokenizer, prompt: list[Message], responses: list[str]) -> list[ResponseIds]:
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
        encoded.append(ResponseIds(list(ids), start, end))
    return encoded


def fit_to_length(encoded: list[ResponseIds], max_length: int | None) -> list[list[int]] | None:
    """Cut the shared prompt from its start until every sequence fits in ``max_length``.

    Returns None when that would take the whole prompt (a response alone does not fit).
    """
    cut = max(len(e.ids) for e in encoded) - (max_length or math.inf)
    if cut <= 0:
        return [e.ids for e in encoded]
    if any(cut >= e.prompt_end - e.prompt_start for e in encoded):
        return None
    return [e.ids[: e.prompt_start] + e.ids[e.prompt_start + cut :] for e in encoded]


def fit_or_keep_end(encoded: ResponseIds, max_length: int | None) -> list[int]:
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


# ---------------------------------------------------------------- rankings, tokenised


@dataclass
class Group:
    """One ranking, tokenised: its K sequences, where each one's response starts (after the
    prompt, once cut to length), and its (winner, loser, rank distance) pairs."""

    sequences: list[list[int]]
    response_starts: list[int]
    pairs: list[tuple[int, int, int]]
    meta: dict[str, Any]
    source: str | None


def _named(sources: list[str]) -> str:
    more = f", and {len(sources) - LISTED} more" if len(sources) > LISTED else ""
    return ", ".join(sources[:LISTED]) + more


def build_groups(
    tokenizer, rankings: list[Ranking], max_length: int | None
) -> tuple[list[Group], dict[str, int]]:
    """Tokenise rankings by the over-length rule (``fit_to_length``); warn about every cut.

    The reward-model and DPO trainers both read their rankings through this. Returns the
    groups and the counts ``{"rankings", "pairs", "truncated", "skipped"}``.
    """
    groups, truncated, skipped = [], [], []
    for ranking in rankings:
        encoded = encode_responses(tokenizer, ranking.prompt, ranking.responses)
        sequences = fit_to_length(encoded, max_length)
        where = ranking.source or "(rankings)"
        if sequences is None:
            skipped.append(where)
            continue
        cut = len(encoded[0].ids) - len(sequences[0])
        if cut:
            truncated.append(f"{where} (-{cut})")
        starts = [e.prompt_end - cut for e in encoded]
        position = {response: place for place, response in enumerate(ranking.ranking)}
        pairs = [(w, lo, position[lo] - position[w]) for w, lo in ranking.pairs()]
        groups.append(Group(sequences, starts, pairs, ranking.meta, ranking.source))
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


# ---------------------------------------------------------------- the model


def load_reward(path: str | Path):
    """The reward model to train, its tokenizer and context length; dropout off (as TRL)."""
    model, tokenizer = load_reward_model(path)
    disable_dropout(model)
    return model, tokenizer, context_length(model.config, tokenizer)


class LastTokenReward(nn.Module):
    """Scores sequences at their last token, laid out by ``pack_groups``.

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
        """One float32 reward per scored sequence, in ``pack_groups`` order."""
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


def pack_groups(
    groups: list[list[list[int]]],
    pad_id: int,
    pools_last_token: bool,
    response_starts: list[list[int]] | None = None,
) -> dict:
    """Model inputs scoring every sequence of every group once, in order.

    Decoders get one row per group: the group's common prefix (its prompt) once, then each
    sequence's remainder, with position ids restarting after the prefix and an attention mask
    that lets each remainder see the prefix and itself only — so every sequence gets exactly
    the states it would get alone, and the prompt is computed once instead of K times. When
    no group shares anything (all of size 1) there is no mask: rows are right-padded, padding
    sits right of every real token and attention is causal, so SDPA keeps its fast causal
    path. Encoders get one right-padded row per sequence and a padding mask.

    With ``response_starts`` (decoders only: where each sequence's response begins), the
    batch also says where every response token is predicted, for its log-probability:
    ``logprob_index`` (flattened row × width + position), ``target_ids`` (the token) and
    ``target_sequence`` (which sequence it belongs to, in ``score_index`` order).
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
    predicting, targets, owners = [], [], []  # (row, position) predicting each response token
    for g, group in enumerate(groups):
        p = shared_prefix(group) if len(group) > 1 else len(group[0])
        row, pos, seg = list(group[0][:p]), list(range(p)), [0] * p
        for i, sequence in enumerate(group, start=1):
            rest, offset = sequence[p:], len(row)
            row += rest
            pos += range(p, len(sequence))
            seg += [i] * len(rest)
            if response_starts is not None:
                for j in range(response_starts[g][i - 1], len(sequence)):
                    before = j - 1  # token j is predicted at token j - 1's place in the row
                    predicting.append((len(rows), before if before < p else offset + before - p))
                    targets.append(sequence[j])
                    owners.append(len(ends))
            ends.append((len(rows), len(row) - 1))
        rows.append(row)
        positions.append(pos)
        segments.append(seg)
    width = max(len(r) for r in rows)
    batch = {
        "input_ids": torch.tensor([r + [pad_id] * (width - len(r)) for r in rows]),
        "score_index": torch.tensor([row * width + end for row, end in ends]),
    }
    if response_starts is not None:
        batch["logprob_index"] = torch.tensor([row * width + at for row, at in predicting])
        batch["target_ids"] = torch.tensor(targets)
        batch["target_sequence"] = torch.tensor(owners)
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


def packed_tokens(inputs: dict) -> int:
    """The tokens a decoder reads in a ``pack_groups`` batch, padding left out: each row ends
    where its last sequence does."""
    width = inputs["input_ids"].shape[1]
    rows, ends = inputs["score_index"] // width, inputs["score_index"] % width
    lengths = torch.zeros(inputs["input_ids"].shape[0], dtype=torch.long)
    return int(lengths.scatter_reduce(0, rows.cpu(), ends.cpu() + 1, "amax").sum())


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: to_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()
    }


def collate_groups(
    groups: list[Group], pad_id: int, pools_last_token: bool = True, logprobs: bool = False
) -> dict:
    """A micro-batch of rankings: model inputs (``pack_groups``; with ``logprobs``, the
    response tokens' places too) and the pairs as indices into its sequences."""
    starts = [g.response_starts for g in groups] if logprobs else None
    batch = pack_groups([g.sequences for g in groups], pad_id, pools_last_token, starts)
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


def sum_of_ranking_means(pair_values: torch.Tensor, pair_group: torch.Tensor) -> torch.Tensor:
    """Σ over rankings of the mean of their pairs' values: each ranking weighs the same, however
    many pairs it implies (InstructGPT's K(K-1)/2 pairs as one batch element)."""
    pairs_per_group = torch.bincount(pair_group)
    return (pair_values / pairs_per_group[pair_group]).sum()


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
            inputs = pack_groups([groups[i] for i in chunk], pad_id, pools_last_token)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                scores = module(**to_device(inputs, device)).float().cpu()
            slots = [j for i in chunk for j in range(starts[i], starts[i + 1])]
            rewards[slots] = scores
            chunk = []
    return rewards


# ---------------------------------------------------------------- normalisation


def reward_normalisation(config) -> tuple[float, float]:
    """(mean, std) of a reward model's raw scores on SFT samples; (0, 1) when none is stored."""
    return float(getattr(config, REWARD_MEAN, 0.0)), float(getattr(config, REWARD_STD, 1.0))


def reward_statistics(rewards: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation; a spread of zero (or a single reward) leaves scale 1."""
    mean = rewards.mean().item()
    std = rewards.std(unbiased=False).item() if len(rewards) > 1 else 0.0
    if std < 1e-6:
        logger.warning("normalisation rewards have no spread; storing std 1")
        std = 1.0
    return mean, std


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


# ---------------------------------------------------------------- scoring


class RewardScorer:
    """A trained reward model, ready to score responses (Best-of-n, PPO, inspection).

    ``score`` returns normalised rewards (mean 0, std 1 on the SFT samples the model was
    normalised on; see the module docstring) unless ``raw=True``. A model without stored
    normalisation (any transformers reward model) scores raw.
    """

    def __init__(
        self, model_dir: str | Path, device: str | torch.device | None = None, bf16: bool = False
    ):
        model, self.tokenizer, self.max_length = load_reward(str(model_dir))
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
