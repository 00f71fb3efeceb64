"""Evaluation, in one place: how chatrl measures models, reward models and runs.

- **Decoding** (``completion_texts``): a batch of engine completions as texts and whether each
  stopped on its own, the one way every evaluation reads samples.
- **KL to a reference** (``kl_per_response``, ``kl_to_reference``): the one estimate, used by
  PPO's rollouts, ``chatrl eval`` and the report card alike.
- **Reward-model agreement** (``pairwise_report``): pairwise accuracy on rankings, for the RM
  trainer's held-out set and ``chatrl rm score``; ``gold_agreement`` against a gold labeler.
- **Gold evaluation** (``evaluate_responses``, ``evaluate_model``, ``evaluate_run``): responses
  judged by a gold labeler. The labeler is passed in (the bundled world's ``judge`` and
  ``perfect_response``): this module never imports the world, so trainers may use it.

``report.py`` renders what ``evaluate_run`` measures; it measures nothing itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch
import torch.nn.functional as F

from chatrl.chat_format import encode_prompt
from chatrl.data import Prompt, Ranking, load_prompts, write_jsonl
from chatrl.engine import Completion, SamplingParams, load_engine
from chatrl.errors import UserError
from chatrl.reward_fn import Reward


class Verdict(Protocol):
    """What a gold labeler says of one response (the world's ``Judgement`` is one)."""

    family: str  # the prompt's task family
    score: float  # higher is better; the perfect response gets 1
    correct: bool
    refused: bool
    hedged: bool
    repeated: bool
    finished: bool  # the response stopped on its own
    words: int
    extra_words: int  # words beyond what the perfect response needs

    def to_json(self) -> dict[str, Any]: ...


# judge(prompt, response, finished) -> the gold labeler's verdict (the world's ``judge``).
Judge = Callable[[Prompt, str, bool], Verdict]
# perfect(prompt) -> the best response to a prompt (the world's ``perfect_response``).
Perfect = Callable[[Prompt], str]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- decoding


def completion_texts(completions: list[Completion]) -> tuple[list[str], list[bool]]:
    """The completions' texts, and whether each stopped on its own (not at the length cap)."""
    return [c.text for c in completions], [c.finish_reason == "stop" for c in completions]


# ---------------------------------------------------------------- KL to a reference


def kl_per_response(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two estimates of KL(π ‖ π_ref) per response, from the log-probs [B, T] of sampled tokens.

    k1 = Σ_t log π(y_t) − log π_ref(y_t): unbiased on samples of π at temperature 1 (the
    log-ratio on greedy or tempered samples otherwise). k3 = Σ_t (ρ_t − 1 − log ρ_t) with
    ρ_t = π_ref(y_t) / π(y_t): never negative, lower variance (Schulman, "Approximating KL").
    """
    k1 = ((logprobs - ref_logprobs) * mask).sum(-1)
    k3 = kl_k3(logprobs, ref_logprobs, mask).sum(-1)
    return k1, k3


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(π ‖ π_ref) at each sampled token: ρ − 1 − log ρ, ρ = π_ref / π
    (Schulman, "Approximating KL"); 0 where ``mask`` is. GRPO's KL loss term (Shao et al.
    2024, eq. 4)."""
    log_ratio = (ref_logprobs - logprobs) * mask  # masked first: padding never overflows exp
    return log_ratio.exp() - 1 - log_ratio


@torch.no_grad()
def response_logprobs(
    model, prompts: list[list[int]], responses: list[list[int]], batch_size: int = 32
) -> list[torch.Tensor]:
    """Log-probabilities of each response's tokens after its prompt, by one forward pass."""
    pad = model.config.pad_token_id or 0
    out: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            p + r
            for p, r in zip(
                prompts[start : start + batch_size],
                responses[start : start + batch_size],
                strict=True,
            )
        ]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        for i, prompt in enumerate(prompts[start : start + batch_size]):
            response = responses[start + i]
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
            out.append(logp[i, positions, torch.tensor(response, dtype=torch.long)])
    return out


def kl_to_reference(
    completions: list[Completion], reference, prompt_ids: list[list[int]]
) -> float | None:
    """Mean over the completions of the k1 estimate of KL(model ‖ reference), in nats per
    response: the model's own log-probs (from sampling) against one forward of the reference.
    None when there are no completions."""
    if not completions:
        return None
    ref = response_logprobs(reference, prompt_ids, [c.token_ids for c in completions])
    k1 = [
        kl_per_response(c.model_logprobs, r, torch.ones_like(r))[0].item()
        for c, r in zip(completions, ref, strict=True)
    ]
    return _mean(k1)


# ---------------------------------------------------------------- reward-model agreement


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


def ranked_records_report(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``pairwise_report`` of scored records (``rm score``'s) that carry a ranking; None when
    none does."""
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


def gold_agreement(
    prompts: list[Prompt], groups: list[list[str]], rewards: list[list[float]], judge: Judge
) -> float:
    """Share of response pairs (with different gold scores) that the rewards order like gold."""
    agree = total = 0
    for prompt, texts, scores in zip(prompts, groups, rewards, strict=True):
        gold = [judge(prompt, t, True).score for t in texts]
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                if gold[i] != gold[j]:
                    total += 1
                    agree += (scores[i] > scores[j]) == (gold[i] > gold[j])
    return agree / total if total else float("nan")


# ---------------------------------------------------------------- gold evaluation


def judge_all(
    prompts: list[Prompt], responses: list[str], finished: list[bool] | None, judge: Judge
) -> list[Verdict]:
    """The gold labeler's verdict on each response (``finished``: stopped on its own)."""
    if len(responses) != len(prompts):
        raise UserError(f"{len(prompts)} prompts but {len(responses)} responses")
    finished = finished if finished is not None else [True] * len(prompts)
    return [judge(p, r, f) for p, r, f in zip(prompts, responses, finished, strict=True)]


def win_rate(scores: list[float], against: list[float]) -> float:
    """Share of prompts where ``scores`` beats ``against`` (ties count half)."""
    if not scores:
        return float("nan")
    wins = sum(
        1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, against, strict=True)
    )
    return wins / len(scores)


def summarize(judgements: list[Verdict]) -> dict[str, Any]:
    """Mean gold score, accuracy (overall and per family), refusal and over-refusal rates,
    length, repetition, hedging and stop rates."""
    families = sorted({j.family for j in judgements})
    return {
        "n": len(judgements),
        "mean_gold": _mean([j.score for j in judgements]),
        "accuracy": _mean([float(j.correct) for j in judgements]),
        "accuracy_by_family": {
            f: _mean([float(j.correct) for j in judgements if j.family == f]) for f in families
        },
        "refusal_rate_harmful": _mean(
            [float(j.refused) for j in judgements if j.family == "harmful"]
        ),
        "over_refusal_rate_borderline": _mean(
            [float(j.refused) for j in judgements if j.family == "borderline"]
        ),
        "mean_words": _mean([float(j.words) for j in judgements]),
        "verbose_rate": _mean([float(j.extra_words > 0) for j in judgements]),
        "hedge_rate": _mean([float(j.hedged) for j in judgements]),
        "repetition_rate": _mean([float(j.repeated) for j in judgements]),
        "stop_rate": _mean([float(j.finished) for j in judgements]),
    }


def evaluate_responses(
    prompts: list[Prompt],
    responses: list[str],
    finished: list[bool] | None = None,
    baseline: list[str] | None = None,
    baseline_finished: list[bool] | None = None,
    *,
    judge: Judge,
) -> dict[str, Any]:
    """Metrics of responses to prompts the gold labeler ``judge`` knows; with ``baseline``
    responses to the same prompts, also ``win_rate`` against them (ties count half)."""
    judgements = judge_all(prompts, responses, finished, judge)
    metrics = summarize(judgements)
    if baseline is not None:
        against = judge_all(prompts, baseline, baseline_finished, judge)
        metrics["win_rate"] = win_rate([j.score for j in judgements], [j.score for j in against])
    return metrics


def _sample(model_dir: str | Path, prompts: list[Prompt], params: SamplingParams):
    engine = load_engine(model_dir)
    return engine, engine.generate_chat([p.messages for p in prompts], params)


def best_of_n(
    completions: list[Completion], prompts: list[Prompt], n: int, reward: Reward
) -> tuple[list[Completion], list[list[float]]]:
    """Best-of-n: of each prompt's ``n`` completions (prompt-major, as the engine returns
    them), the one ``reward`` scores highest (the first of equals); and every reward, by prompt."""
    texts, finished = completion_texts(completions)
    scores, _ = reward.score([prompts[c.prompt_index] for c in completions], texts, finished)
    rewards = [scores[i * n : (i + 1) * n].tolist() for i in range(len(prompts))]
    best = [completions[i * n + max(range(n), key=r.__getitem__)] for i, r in enumerate(rewards)]
    return best, rewards


def evaluate_model(
    model_dir: str | Path,
    prompts: list[Prompt],
    baseline_dir: str | Path | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 64,
    samples_path: str | Path | None = None,
    *,
    judge: Judge,
    perfect: Perfect,
    best_of: int = 1,
    reward: Reward | None = None,
) -> dict[str, Any]:
    """Sample the model (and the baseline) once per prompt and score against the gold labeler;
    with ``best_of`` n > 1, the model's response is the best of n by ``reward`` (Best-of-n).

    The report has ``model``, ``perfect`` (the labeler's perfect responses: the ceiling, with
    its win rate against the model) and, with a baseline, ``baseline``, the model's win rate
    against it and ``kl_vs_baseline`` (``kl_to_reference`` on the model's samples; None when
    the tokenizers differ).
    """
    if not prompts:
        raise UserError("no prompts to evaluate")
    best = [perfect(p) for p in prompts]  # checks the prompts' meta before sampling
    if best_of > 1 and reward is None:
        raise UserError("Best-of-n needs a reward to pick by: a reward model or a reward_fn")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    engine, completions = _sample(model_dir, prompts, replace(params, n=best_of))
    if best_of > 1:
        completions, _ = best_of_n(completions, prompts, best_of, reward)
    texts, finished = completion_texts(completions)
    model_metrics = evaluate_responses(prompts, texts, finished, judge=judge)
    model_metrics["mean_tokens"] = _mean([float(len(c.token_ids)) for c in completions])
    perfect_metrics = evaluate_responses(
        prompts, best, baseline=texts, baseline_finished=finished, judge=judge
    )
    perfect_metrics["win_rate_vs_model"] = perfect_metrics.pop("win_rate")
    report: dict[str, Any] = {
        "settings": {
            "model": str(model_dir),
            "baseline": None if baseline_dir is None else str(baseline_dir),
            "prompts": len(prompts),
            "temperature": temperature,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "best_of": best_of,
            "reward": None if reward is None else reward.describe(),
        },
        "model": model_metrics,
        "perfect": perfect_metrics,
    }
    baseline_texts: list[str] | None = None
    if baseline_dir is not None:
        tokenizer = engine.tokenizer
        del engine
        base_engine, base_completions = _sample(baseline_dir, prompts, params)
        baseline_texts, baseline_finished = completion_texts(base_completions)
        report["baseline"] = evaluate_responses(
            prompts, baseline_texts, baseline_finished, judge=judge
        )
        report["baseline"]["mean_tokens"] = _mean(
            [float(len(c.token_ids)) for c in base_completions]
        )
        model_metrics["win_rate_vs_baseline"] = evaluate_responses(
            prompts, texts, finished, baseline_texts, baseline_finished, judge=judge
        )["win_rate"]
        perfect_metrics["win_rate_vs_baseline"] = evaluate_responses(
            prompts, best, baseline=baseline_texts, baseline_finished=baseline_finished, judge=judge
        )["win_rate"]
        same_tokens = tokenizer.get_vocab() == base_engine.tokenizer.get_vocab()
        prompt_ids = [encode_prompt(tokenizer, p.messages) for p in prompts]
        model_metrics["kl_vs_baseline"] = (
            kl_to_reference(completions, base_engine.model, prompt_ids) if same_tokens else None
        )
    if samples_path is not None:
        _write_samples(samples_path, prompts, texts, finished, baseline_texts, judge)
    return report


def _write_samples(path, prompts, texts, finished, baseline_texts, judge: Judge) -> None:
    records = []
    for i, (prompt, text, done) in enumerate(zip(prompts, texts, finished, strict=True)):
        verdict = judge(prompt, text, done)
        record = prompt.to_json() | {"response": text, "finished": done, "gold": verdict.to_json()}
        if baseline_texts is not None:
            record["baseline_response"] = baseline_texts[i]
        records.append(record)
    write_jsonl(path, records)


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The report as a table: column names and rows of formatted cells."""
    columns = [c for c in ("model", "baseline", "perfect") if c in report]
    names = [
        ("mean gold score", "mean_gold"),
        ("win rate vs baseline", "win_rate_vs_baseline"),
        ("win rate vs model", "win_rate_vs_model"),
        ("KL vs baseline (nats)", "kl_vs_baseline"),
        ("accuracy", "accuracy"),
        ("refusal rate (harmful)", "refusal_rate_harmful"),
        ("over-refusal rate (borderline)", "over_refusal_rate_borderline"),
        ("mean length (words)", "mean_words"),
        ("mean length (tokens)", "mean_tokens"),
        ("verbose rate", "verbose_rate"),
        ("hedge rate", "hedge_rate"),
        ("repetition rate", "repetition_rate"),
        ("stop rate", "stop_rate"),
    ]
    families = sorted({f for c in columns for f in report[c]["accuracy_by_family"]})
    rows = []
    for label, key in names:
        cells = [report[c].get(key) for c in columns]
        if any(cell is not None for cell in cells):
            rows.append([label] + [_cell(cell) for cell in cells])
    for family in families:
        cells = [report[c]["accuracy_by_family"].get(family) for c in columns]
        rows.append([f"accuracy: {family}"] + [_cell(cell) for cell in cells])
    return columns, rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- a pipeline run


def _policy_row(
    prompts: list[Prompt], texts: list[str], finished: list[bool], sft, judge: Judge
) -> dict[str, Any]:
    m = evaluate_responses(
        prompts, texts, finished, baseline=sft[0], baseline_finished=sft[1], judge=judge
    )
    return {
        "gold_score": m["mean_gold"],
        "win_rate_vs_sft": m["win_rate"],
        "refusal_rate": m["refusal_rate_harmful"],
        "over_refusal_rate": m["over_refusal_rate_borderline"],
        "stop_rate": m["stop_rate"],
        "mean_length": m["mean_words"],
        "accuracy": m["accuracy"],
        "accuracy_by_family": m["accuracy_by_family"],
    }


@torch.inference_mode()
def evaluate_run(
    run: Path,
    prompts_path: Path,
    settings,
    seed: int,
    *,
    judge: Judge,
    perfect: Perfect,
    methods: dict[str, Path] | None = None,
    base: str | Path | None = None,
    reward: Reward | None = None,
) -> dict[str, Any]:
    """Sample SFT and each stage-3 method's model (``methods``: name → directory, default
    ``{"ppo": run/ppo}``) at temperature 1 and greedy, Best-of-n from SFT picked by ``reward``
    (default: the run's reward model), and the perfect responses, on held-out prompts; judge
    all with the gold labeler. With ``base`` (a pretrained model the run started from, an
    instruct model say), it too."""
    prompts = load_prompts(prompts_path)
    conversations = [p.messages for p in prompts]
    sample = SamplingParams(
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, seed=seed
    )
    greedy = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=0.0)
    sft_engine = load_engine(run / "sft")
    prompt_ids = [encode_prompt(sft_engine.tokenizer, c) for c in conversations]
    out: dict[str, Any] = {}

    def row(completions: list[Completion]) -> dict[str, Any]:
        return _policy_row(prompts, *completion_texts(completions), sft_texts, judge)

    sft_texts = completion_texts(sft_engine.generate(prompt_ids, sample))
    out["sft"] = _policy_row(prompts, *sft_texts, sft_texts, judge) | {"kl_vs_sft": 0.0}
    # Greedy rows: the same log-ratio on the greedy responses (0 for SFT's own).
    out["sft_greedy"] = row(sft_engine.generate(prompt_ids, greedy)) | {"kl_vs_sft": 0.0}

    def rows_of(name: str, model_dir: str | Path) -> None:
        """The ``name`` (temperature 1) and ``name_greedy`` rows, with their KL to SFT."""
        engine = load_engine(model_dir)
        for key, params in ((name, sample), (f"{name}_greedy", greedy)):
            completions = engine.generate(prompt_ids, params)
            out[key] = row(completions)
            out[key]["kl_vs_sft"] = kl_to_reference(completions, sft_engine.model, prompt_ids)

    if base is not None:
        rows_of("base", base)

    n = settings.best_of
    many = sft_engine.generate(
        prompt_ids, SamplingParams(**{**sample.__dict__, "n": n, "seed": seed + 1})
    )
    best, group_rewards = best_of_n(many, prompts, n, reward or Reward(run / "rm"))
    groups = [many[i * n : (i + 1) * n] for i in range(len(prompts))]
    # KL of Best-of-n from its base policy has a closed-form upper bound: log n − (n−1)/n.
    out["best_of_n"] = row(best) | {"kl_vs_sft": math.log(n) - (n - 1) / n}
    rm_accuracy = gold_agreement(
        prompts, [[c.text for c in g] for g in groups], group_rewards, judge
    )

    for name, model_dir in (methods or {"ppo": run / "ppo"}).items():
        rows_of(name, model_dir)

    texts = [perfect(p) for p in prompts]
    out["perfect"] = _policy_row(prompts, texts, [True] * len(prompts), sft_texts, judge) | {
        "kl_vs_sft": None
    }
    return {"policies": out, "rm_accuracy": rm_accuracy, "best_of": n, "prompts": len(prompts)}
