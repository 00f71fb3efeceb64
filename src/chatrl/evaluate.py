"""Evaluation against the bundled world's gold labeler.

``evaluate_responses`` turns responses (any source: a model, Best-of-n, the perfect answers)
into metrics; ``evaluate_model`` samples a model — and optionally a baseline — through the
generation engine, scores the world's perfect responses on the same prompts as the ceiling,
and measures the KL divergence of the model from the baseline on the model's own samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from chatrl.chat_format import encode_prompt
from chatrl.data import Prompt, write_jsonl
from chatrl.engine import Completion, Engine, SamplingParams
from chatrl.errors import UserError
from chatrl.models import load_causal_lm
from chatrl.world import perfect_response
from chatrl.world.judge import Judgement, judge


def judge_all(
    prompts: list[Prompt], responses: list[str], finished: list[bool] | None = None
) -> list[Judgement]:
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


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(judgements: list[Judgement]) -> dict[str, Any]:
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
) -> dict[str, Any]:
    """Metrics of responses to world prompts; with ``baseline`` responses to the same prompts,
    also ``win_rate`` against them (judged by the gold labeler, ties count half)."""
    judgements = judge_all(prompts, responses, finished)
    metrics = summarize(judgements)
    if baseline is not None:
        against = judge_all(prompts, baseline, baseline_finished)
        metrics["win_rate"] = win_rate([j.score for j in judgements], [j.score for j in against])
    return metrics


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


def _sample(model_dir: str | Path, prompts: list[Prompt], params: SamplingParams):
    model, tokenizer = load_causal_lm(model_dir)
    completions = Engine(model, tokenizer).generate_chat([p.messages for p in prompts], params)
    return model, tokenizer, completions


def _texts(completions: list[Completion]) -> tuple[list[str], list[bool]]:
    return [c.text for c in completions], [c.finish_reason == "stop" for c in completions]


def evaluate_model(
    model_dir: str | Path,
    prompts: list[Prompt],
    baseline_dir: str | Path | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 64,
    samples_path: str | Path | None = None,
) -> dict[str, Any]:
    """Sample the model (and the baseline) once per prompt and score against the gold labeler.

    The report has ``model``, ``perfect`` (the world's canonical responses: the ceiling, with
    its win rate against the model) and, with a baseline, ``baseline``, the model's win rate
    against it and ``kl_vs_baseline``: the mean over samples of the summed log-ratio
    log p_model − log p_baseline of the sampled tokens — an estimate of KL(model ‖ baseline)
    at temperature 1, the log-ratio on greedy or tempered samples otherwise.
    """
    if not prompts:
        raise UserError("no prompts to evaluate")
    perfect = [perfect_response(p) for p in prompts]  # checks the prompts' meta before sampling
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    model, tokenizer, completions = _sample(model_dir, prompts, params)
    texts, finished = _texts(completions)
    model_metrics = evaluate_responses(prompts, texts, finished)
    model_metrics["mean_tokens"] = _mean([float(len(c.token_ids)) for c in completions])
    perfect_metrics = evaluate_responses(
        prompts, perfect, baseline=texts, baseline_finished=finished
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
        },
        "model": model_metrics,
        "perfect": perfect_metrics,
    }
    baseline_texts: list[str] | None = None
    if baseline_dir is not None:
        del model
        base_model, base_tokenizer, base_completions = _sample(baseline_dir, prompts, params)
        baseline_texts, baseline_finished = _texts(base_completions)
        report["baseline"] = evaluate_responses(prompts, baseline_texts, baseline_finished)
        report["baseline"]["mean_tokens"] = _mean(
            [float(len(c.token_ids)) for c in base_completions]
        )
        model_metrics["win_rate_vs_baseline"] = evaluate_responses(
            prompts, texts, finished, baseline_texts, baseline_finished
        )["win_rate"]
        perfect_metrics["win_rate_vs_baseline"] = evaluate_responses(
            prompts, perfect, baseline=baseline_texts, baseline_finished=baseline_finished
        )["win_rate"]
        model_metrics["kl_vs_baseline"] = _kl(
            completions, prompts, tokenizer, base_model, base_tokenizer
        )
    if samples_path is not None:
        _write_samples(samples_path, prompts, texts, finished, baseline_texts)
    return report


def _kl(completions, prompts, tokenizer, base_model, base_tokenizer) -> float | None:
    """Mean summed log-ratio of the model's samples (None when the tokenizers differ)."""
    if tokenizer.get_vocab() != base_tokenizer.get_vocab():
        return None
    prompt_ids = [encode_prompt(tokenizer, p.messages) for p in prompts]
    base = response_logprobs(base_model, prompt_ids, [c.token_ids for c in completions])
    ratios = [float((c.model_logprobs - b).sum()) for c, b in zip(completions, base, strict=True)]
    return _mean(ratios)


def _write_samples(path, prompts, texts, finished, baseline_texts) -> None:
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
