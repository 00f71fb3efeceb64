import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import (
    check_resume_after_kill_between_renames,
    check_resume_after_sigkill,
    check_reward_rises,
    tiny_sft,
    write_prompts,
    write_sft,
)

from chatrl.config import PPOConfig
from chatrl.data import load_prompts
from chatrl.engine import Engine
from chatrl.models import load_causal_lm, load_reward_model, save_model
from chatrl.reward_fn import Reward
from chatrl.reward_model import RewardScorer
from chatrl.train import ppo, rollout
from chatrl.train.loop import add_lora
from chatrl.train.ppo import (
    ActorCritic,
    KLController,
    collect_rollout,
    gae,
    per_token_rewards,
    policy_loss,
    train_ppo,
    value_loss,
    whiten,
)
from chatrl.train.rollout import Models, reference_logprobs, sample_responses, token_logprobs


@pytest.fixture(scope="module")
def setup(micro_model, tmp_path_factory):
    """A micro policy, a reward model (and critic) started from it, and prompts."""
    root = tmp_path_factory.mktemp("ppo")
    rm, tok = load_reward_model(micro_model)
    rm.config.chatrl_reward_mean, rm.config.chatrl_reward_std = 0.25, 2.0
    save_model(rm, tok, root / "rm")
    return {
        "policy": str(micro_model),
        "reward": str(root / "rm"),
        "prompts": str(write_prompts(root / "prompts.jsonl", 64)),
    }


def build_models(setup, cfg: PPOConfig) -> tuple[Models, ActorCritic]:
    policy, tok = load_causal_lm(setup["policy"])
    reference = None
    if cfg.use_peft:
        policy = add_lora(policy, cfg)
    else:
        reference = load_causal_lm(setup["policy"])[0].eval()
    actor_critic = ActorCritic(policy, ppo.load_critic(cfg, tok))
    reward = Reward(setup["reward"], device="cpu")
    return Models(policy, reference, reward, tok, Engine(policy, tok)), actor_critic


def ppo_config(setup, tmp_path, **overrides) -> PPOConfig:
    values = dict(
        rollout_batch_size=8,
        num_mini_batches=2,
        num_ppo_epochs=2,
        response_length=12,
        max_steps=3,
        out=str(tmp_path / "out"),
    )
    return PPOConfig(**{**setup, **values, **overrides})


class NoAccelerate:
    """The two Accelerator methods rollouts use, for one CPU process."""

    device = torch.device("cpu")

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def reduce(self, tensor, reduction):
        return tensor


# ---------------------------------------------------------------- the math, by hand


def test_gae_matches_hand_computed_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [0.1, 0.3, 9.9]])  # 9.9: past the end, ignored
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 0: δ = (−0.3, 0.2, 0.6); A2 = 0.6, A1 = 0.2 + 0.95·0.6, A0 = −0.3 + 0.95·A1.
    # Row 1 ends after two tokens: δ = (0.2, 1.7); A1 = 1.7, A0 = 0.2 + 0.95·1.7.
    expected = torch.tensor([[0.4315, 0.77, 0.6], [1.815, 1.7, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[0.9315, 0.97, 1.0], [1.915, 2.0, 0.0]]))

    # γ < 1 discounts both the next value and the running sum.
    advantages, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.5)
    # δ = (0.9·0.2 − 0.5, 0.9·0.4 − 0.2, 1 − 0.4) = (−0.32, 0.16, 0.6); γλ = 0.45.
    assert torch.allclose(advantages, torch.tensor([[-0.1265, 0.43, 0.6]]), atol=1e-6)


def test_whitening_uses_only_response_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # Valid entries 1, 2, 3, 4: mean 2.5, variance 1.25.
    expected = torch.tensor([[-1.5, -0.5, 0.5], [1.5, 0.0, 0.0]]) / math.sqrt(1.25)
    assert torch.allclose(whiten(x, mask), expected, atol=1e-5)
    # Across processes: the statistics are of the whole batch, whatever each process holds.
    doubled = whiten(x, mask, all_reduce_sum=lambda t: 2 * t)
    assert torch.allclose(doubled, expected, atol=1e-5)


def test_rewards_are_the_kl_penalty_plus_the_score_on_the_last_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = per_token_rewards(logprobs, ref, torch.tensor([3.0, -1.0]), mask, kl_coef=0.1)
    # −0.1·(logπ − logπ_SFT) per token; score added at each row's last real token.
    expected = torch.tensor([[-0.05, 0.1, 3.0], [-0.1, -0.2 - 1.0, 0.0]])
    assert torch.allclose(rewards, expected, atol=1e-6)


def test_clipped_surrogate_and_value_losses_match_hand_computed_values():
    old = torch.zeros(1, 4)
    new = torch.tensor([[0.5, 0.5, -0.5, -0.5]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, stats = policy_loss(new, old, advantages, mask, cliprange=0.2)
    up, down = math.exp(0.5), math.exp(-0.5)
    # The pessimistic (larger-loss) term of each pair: clipped only where clipping lowers the
    # objective, i.e. ratio 1.649 with A > 0 (→ 1.2) and ratio 0.607 with A < 0 (→ 0.8).
    terms = [-1.2, up, -down, 0.8]
    assert loss.item() == pytest.approx(sum(terms) / 4, abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(0.5)

    values = torch.tensor([[1.0, 0.0]])
    old_values = torch.tensor([[0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.1]])
    vf, clip_frac = value_loss(values, old_values, returns, torch.ones(1, 2), cliprange_value=0.2)
    # Token 0: V moved 0.5 from V_old; clipped to 0.7 → (0.7 − 2)² = 1.69 beats (1 − 2)² = 1.
    assert vf.item() == pytest.approx(0.5 * (1.69 + 0.01) / 2, abs=1e-6)
    assert clip_frac.item() == pytest.approx(0.5)


def test_adaptive_kl_controller_follows_ziegler_et_al():
    ctl = KLController(0.1, target=6.0, horizon=10000)
    ctl.update(kl=12.0, n=64)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    ctl = KLController(0.1, target=6.0, horizon=10000)
    ctl.update(kl=6.6, n=64)  # error 0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 64 / 10000))
    ctl = KLController(0.1, target=6.0, horizon=10000)
    ctl.update(kl=0.0, n=64)  # error clipped to −0.2
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 64 / 10000))
    fixed = KLController(0.1)
    fixed.update(kl=100.0, n=64)
    assert fixed.value == 0.1


# ---------------------------------------------------------------- rollouts on a real model


def test_rollouts_are_scored_by_the_normalised_reward_model(setup):
    cfg = PPOConfig(**setup, out="unused", response_length=8)
    models, _ = build_models(setup, cfg)
    prompts = load_prompts(setup["prompts"])[:6]
    s = sample_responses(models, cfg, prompts, 1, 3, NoAccelerate(), rollout.Stopwatch())
    texts = [c.text for c in s.completions]
    raw = RewardScorer(setup["reward"], device="cpu").score(
        [p.messages for p in prompts], texts, raw=True
    )
    assert torch.allclose(s.scores, (raw - 0.25) / 2.0, atol=1e-5)  # the stored normalisation


def test_kl_penalty_is_zero_when_the_policy_is_the_reference(setup, tmp_path):
    cfg = ppo_config(setup, tmp_path)
    models, _ = build_models(setup, cfg)
    prompts = load_prompts(setup["prompts"])[:8]
    s = sample_responses(models, cfg, prompts, 1, 1, NoAccelerate(), rollout.Stopwatch())
    assert (s.logprobs - s.ref_logprobs).mul(s.mask).abs().max() < 1e-4
    rewards = per_token_rewards(s.logprobs, s.ref_logprobs, s.scores, s.mask, kl_coef=0.5)
    assert torch.allclose(rewards.sum(1), s.scores, atol=1e-4)
    metrics = rollout.response_metrics(s)
    assert abs(metrics["kl"]) < 1e-3 and abs(metrics["kl_k3"]) < 1e-6


def test_responses_to_one_prompt_share_a_row_and_keep_their_own_log_probs(setup, tmp_path):
    """The packed forward (each prompt once, its responses after it) gives every response
    the log-probs a forward of it alone gives."""
    cfg = ppo_config(setup, tmp_path)
    models, _ = build_models(setup, cfg)
    prompts = load_prompts(setup["prompts"])[:3]
    s = sample_responses(models, cfg, prompts, 4, 5, NoAccelerate(), rollout.Stopwatch())
    assert s.packed()["input_ids"].shape[0] == 3  # one row per prompt
    with torch.no_grad():
        packed = rollout.policy_logprobs(models.reference, s)
        for b, completion in enumerate(s.completions):
            start, length = int(s.prompt_lengths[b]), len(completion.token_ids)
            alone = s.input_ids[b, : start + length]
            logits = models.reference(input_ids=alone[None]).logits[0, start - 1 : -1]
            expected = token_logprobs(logits.float(), alone[start:])
            assert (packed[b, :length] - expected).abs().max() < 1e-5


def test_ratio_is_one_on_the_first_mini_batch(setup, tmp_path):
    """The engine's log-probs (KV-cached decoding) equal the training forward's."""
    cfg = ppo_config(setup, tmp_path, samples_per_prompt=2)
    models, actor_critic = build_models(setup, cfg)
    prompts = load_prompts(setup["prompts"])[:4]
    clock = rollout.Stopwatch()
    collected, _ = collect_rollout(
        models, actor_critic, cfg, prompts, 0.05, 3, NoAccelerate(), clock
    )
    first = collected.rows(torch.randperm(8)[:4])
    logits, values = actor_critic(**first.packed())
    log_ratio = (token_logprobs(logits, first.tokens) - first.logprobs) * first.mask
    assert log_ratio.abs().max() < 1e-5
    # ... and the critic's values are those the advantages were computed with.
    assert ((values - first.values) * first.mask).abs().max() < 1e-5


def test_ptx_loss_is_the_language_model_loss(setup, tmp_path):
    cfg = ppo_config(setup, tmp_path)
    models, _ = build_models(setup, cfg)
    data = write_sft(tmp_path / "sft.jsonl", 16)
    rows = ppo.load_ptx_rows(str(data), models.tokenizer, 64)
    ids, labels = ppo.ptx_batch(rows, 4, 0, models.tokenizer.pad_token_id, "cpu")
    ptx_loss = ppo.ptx_loss(models.policy, ids, labels)
    expected = models.policy(input_ids=ids, labels=labels).loss
    assert ptx_loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- training runs


def metrics_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_value_head_run_keeps_the_sft_model_as_reference(setup, tmp_path):
    cfg = ppo_config(
        setup, tmp_path, use_peft=True, value_head=True, learning_rate=5e-3, max_steps=2
    )
    seen = []

    def hook(meta, responses, stopped):
        seen.append(len(responses))
        return {"meta_id": sum(m["id"] for m in meta) / len(meta)}

    out = train_ppo(cfg, rollout_metrics=hook)
    log = metrics_of(out)
    assert [r["step"] for r in log] == [1, 2] and seen == [8, 8]
    for key in [
        "rm_score",
        "kl",
        "kl_k3",
        "policy_loss",
        "value_loss",
        "clip_frac",
        "approx_kl",
        "entropy",
        "explained_variance",
        "response_length",
        "stopped",
        "meta_id",
    ]:
        assert all(math.isfinite(r[key]) for r in log), key
    trained, _ = load_causal_lm(out)  # LoRA merged into a plain model directory
    sft, _ = load_causal_lm(setup["policy"])
    moved = max(
        (a - b).abs().max() for a, b in zip(trained.parameters(), sft.parameters(), strict=True)
    )
    assert moved > 0
    assert not (out / "checkpoint").exists()


def test_reference_with_lora_is_the_policy_with_adapters_off(setup, tmp_path):
    cfg = ppo_config(setup, tmp_path, use_peft=True, response_length=8)
    models, _ = build_models(setup, cfg)
    with torch.no_grad():
        for name, p in models.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters now change the policy
    prompts = load_prompts(setup["prompts"])[:4]
    s = sample_responses(models, cfg, prompts, 1, 1, NoAccelerate(), rollout.Stopwatch())
    sft, _ = load_causal_lm(setup["policy"])
    expected = rollout.policy_logprobs(sft, s)
    got = reference_logprobs(models, s)
    assert ((got - expected) * s.mask).abs().max() < 1e-5
    assert ((s.logprobs - expected) * s.mask).abs().max() > 1e-2


def test_kl_budget_stops_the_run(setup, tmp_path):
    cfg = ppo_config(setup, tmp_path, learning_rate=3e-3, kl_coef=0.0, kl_budget=0.5, max_steps=12)
    out = train_ppo(cfg)
    log = metrics_of(out)
    stop = [r for r in log if r.get("stopped_on_kl_budget")]
    assert len(stop) == 1 and stop[0]["kl"] > 0.5
    assert all(r["kl"] <= 0.5 for r in log if not r.get("stopped_on_kl_budget"))
    assert stop[0]["step"] < 12 and (out / "model.safetensors").exists()


def test_cli_errors_are_one_line(setup, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatrl",
            "ppo",
            "--policy",
            setup["policy"],
            "--reward",
            setup["reward"],
            "--prompts",
            setup["prompts"],
            "--out",
            str(tmp_path / "o"),
            "--rollout-batch-size",
            "6",
            "--samples-per-prompt",
            "4",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "not a multiple of samples_per_prompt=4" in run.stderr and "Traceback" not in run.stderr


def test_cli_logs_the_gold_score_of_world_prompts_only(setup, tmp_path):
    from chatrl.world import make_prompts

    train, held = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    for path, split, n in ((train, "train", 8), (held, "heldout", 4)):
        path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in make_prompts(n, 0, split)))

    def chatrl(prompts, out, *extra):
        args = ["--policy", setup["policy"], "--reward", setup["reward"], "--prompts", prompts]
        args += ["--out", out, "--rollout-batch-size", 8, "--response-length", 8, "--max-steps", 1]
        command = [sys.executable, "-m", "chatrl", "ppo", *map(str, args), *extra]
        return subprocess.run(command, capture_output=True, text=True, check=True)

    world = chatrl(train, tmp_path / "world", "--eval-prompts", str(held))
    assert "gold labeler" in world.stderr
    log = metrics_of(tmp_path / "world")
    assert all(-4 <= r["gold_score"] <= 1 for r in log if "rm_score" in r)
    assert any(-4 <= r.get("eval_gold_score", 9) <= 1 for r in log)
    own = chatrl(setup["prompts"], tmp_path / "own")  # no world meta: nothing to judge with
    assert "gold labeler" not in own.stderr
    assert not any("gold_score" in k for r in metrics_of(tmp_path / "own") for k in r)


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(setup, tmp_path):
    args = [
        "ppo",
        "--policy",
        setup["policy"],
        "--reward",
        setup["reward"],
        "--prompts",
        setup["prompts"],
        "--rollout-batch-size",
        8,
        "--response-length",
        12,
        "--adaptive-kl",
        "--kl-target",
        0.01,
    ]
    state, straight, resumed = check_resume_after_sigkill(args, tmp_path, steps=8)
    assert state["extra"]["kl_coef"] != 0.05  # the adaptive β is part of the checkpoint
    assert [r["kl_coef"] for r in resumed] == [r["kl_coef"] for r in straight]


def test_resume_after_a_kill_between_the_checkpoint_renames(setup, tmp_path, monkeypatch):
    def train(out, resume):
        cfg = ppo_config(
            setup, tmp_path, out=str(out), max_steps=6, save_steps=2, adaptive_kl=True,
            kl_target=0.01, resume=resume,
        )  # fmt: skip
        return train_ppo(cfg)

    check_resume_after_kill_between_renames(train, tmp_path, monkeypatch)


@pytest.mark.slow
def test_ppo_raises_a_synthetic_reward_with_bounded_kl(tmp_path):
    """+1 for responses that contain the word "is": PPO on the tiny preset learns to say it."""
    sft = tiny_sft(tmp_path)
    cfg = PPOConfig(
        policy=str(sft),
        reward_fn="reward_fns:says_is",
        value_head=True,
        prompts=str(write_prompts(tmp_path / "prompts.jsonl", 256)),
        out=str(tmp_path / "ppo"),
        rollout_batch_size=32,
        num_mini_batches=1,
        num_ppo_epochs=2,
        response_length=12,
        learning_rate=1e-3,
        num_train_epochs=4,
        max_steps=16,
    )
    check_reward_rises(train_ppo(cfg))
