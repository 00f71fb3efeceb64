"""RLOO and GRPO (train/rloo.py, train/grpo.py on train/rollout.py): their equations by hand,
training runs on a synthetic reward, resume after SIGKILL."""

import json
import math

import pytest
import torch
from conftest import check_resume_after_sigkill, check_reward_rises, tiny_sft, write_prompts

from chatrl.config import GRPOConfig, RLOOConfig
from chatrl.evaluate import kl_k3
from chatrl.models import load_causal_lm, load_reward_model, save_model
from chatrl.train.grpo import group_advantages, grpo_loss, train_grpo
from chatrl.train.rloo import leave_one_out, rloo_advantages, rloo_loss, train_rloo
from chatrl.train.rollout import Rollout


def hand_made_rollout(**tensors) -> Rollout:
    """A rollout of len(scores) responses with only the tensors an equation reads."""
    n = len(tensors["scores"])
    fields = dict(
        completions=[None] * n, input_ids=None, prompt_lengths=None, tokens=None, terms={},
        stopped=torch.ones(n, dtype=torch.bool),
    )  # fmt: skip
    return Rollout(**(fields | tensors))


class OneProcess:
    num_processes = 1

    def reduce(self, tensor, reduction):
        return tensor


# ---------------------------------------------------------------- the math, by hand


def test_leave_one_out_baseline_is_the_mean_of_the_other_rewards():
    advantages = leave_one_out(torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 1.0, 1.0]), 4)
    # Group 1: baselines (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3.
    # Group 2: (5+1+1)/3 = 7/3 twice, (5+5+1)/3 = 11/3 twice.
    expected = [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0, 5 - 7 / 3, 5 - 7 / 3, 1 - 11 / 3, 1 - 11 / 3]
    assert advantages.tolist() == pytest.approx(expected)


def test_rloo_puts_the_sequence_kl_in_the_reward():
    rollout = hand_made_rollout(
        scores=torch.tensor([1.0, 0.0]),
        logprobs=torch.tensor([[-1.0, -1.0], [-2.0, 0.0]]),
        ref_logprobs=torch.tensor([[-2.0, -1.5], [-1.0, -9.0]]),  # -9: past the end, ignored
        mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
    )
    cfg = RLOOConfig(policy="p", reward="r", prompts="x", out="o", num_generations=2, beta=0.1)
    metrics = rloo_advantages(rollout, cfg, OneProcess())
    # KL (k1, per response): 1 + 0.5 = 1.5 and −1; rewards 1 − 0.15 = 0.85 and 0 + 0.1 = 0.1.
    assert metrics["reward"] == pytest.approx((0.85 + 0.1) / 2)
    assert rollout.advantages.tolist() == pytest.approx([0.75, -0.75])


def test_rloo_loss_is_reinforce_on_whole_responses():
    old = torch.tensor([[-1.0, -1.0], [-2.0, 0.0]])
    logprobs = old.clone().requires_grad_()
    mb = hand_made_rollout(
        scores=torch.zeros(2), logprobs=old, mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
        advantages=torch.tensor([0.75, -0.75]),
    )  # fmt: skip
    cfg = RLOOConfig(policy="p", reward="r", prompts="x", out="o", epsilon=0.2)
    loss, stats = rloo_loss(logprobs, mb, cfg, OneProcess())
    loss.backward()
    # ρ = 1: loss −mean(A) = 0 and ∂/∂log π(y_t) = −A_i / 2 on each of response i's tokens.
    assert loss.item() == pytest.approx(0.0) and stats["ratio"].item() == pytest.approx(1.0)
    assert logprobs.grad.flatten().tolist() == pytest.approx([-0.375, -0.375, 0.375, 0.0])
    # A response whose probability rose by e^0.5 with A > 0 is clipped at 1 + ε: no gradient.
    moved = (old + torch.tensor([[0.25, 0.25], [0.0, 0.0]])).requires_grad_()
    loss, stats = rloo_loss(moved, mb, cfg, OneProcess())
    loss.backward()
    assert loss.item() == pytest.approx((-0.75 * 1.2 + 0.75) / 2)
    assert moved.grad[0].tolist() == [0.0, 0.0] and stats["clip_frac"].item() == 0.5


def test_grpo_advantages_are_normalised_within_each_group():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # group 1: mean 3, unbiased std
    group = group_advantages(scores, 4, "group")
    assert group.tolist() == pytest.approx([-2 / std, -1 / std, 0, 3 / std, 0, 0, 0, 0], abs=1e-4)
    # Dr. GRPO: centred only; a group of equal rewards still gets 0.
    assert group_advantages(scores, 4, "none").tolist() == [-2, -1, 0, 3, 0, 0, 0, 0]
    # The batch's std: of all eight rewards (mean 4, squares 9+4+1+4+1+1+1+1 = 22, / 7).
    batch = group_advantages(scores, 4, "batch")
    expected = [x / math.sqrt(22 / 7) for x in [-2, -1, 0, 3]] + [0] * 4
    assert batch.tolist() == pytest.approx(expected, rel=1e-3)
    # ... over every process's share: two processes holding these rewards each.
    doubled = group_advantages(scores, 4, "batch", all_reduce_sum=lambda t: 2 * t)
    expected = [x / math.sqrt(44 / 15) for x in [-2, -1, 0, 3]] + [0] * 4
    assert doubled.tolist() == pytest.approx(expected, rel=1e-3)


def test_k3_is_never_negative_and_zero_on_padding():
    logprobs = torch.tensor([[-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.0 + math.log(2), -200.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # ρ = π_ref / π = 2 at token 1: 2 − 1 − log 2.
    assert kl_k3(logprobs, ref, mask)[0].tolist() == pytest.approx([0.0, 1 - math.log(2), 0.0])
    # The other way round, ρ = 1/2: 1/2 − 1 + log 2; and the padding's ρ = e^200 is never taken.
    swapped = kl_k3(ref, logprobs, mask)
    assert swapped[0].tolist() == pytest.approx([0.0, 0.5 - 1 + math.log(2), 0.0])


@pytest.mark.parametrize(
    ("loss_type", "value"),
    [
        # Per-token losses: row 0 (A = 1) −1 and −1 + 0.1 k3, k3 = 1 − log 2; row 1 (A = −1) +1.
        ("grpo", ((-2 + 0.1 * (1 - math.log(2))) / 2 + 1) / 2),  # token mean, then mean
        ("dr_grpo", (-2 + 0.1 * (1 - math.log(2)) + 1) / (2 * 4)),  # sum / (G · length 4)
        ("dapo", (-2 + 0.1 * (1 - math.log(2)) + 1) / 3),  # sum / 3 tokens
    ],
)
def test_grpo_loss_matches_hand_computed_values(loss_type, value):
    old = torch.tensor([[-1.0, -1.0], [-2.0, 0.0]])
    logprobs = old.clone().requires_grad_()
    mb = hand_made_rollout(
        scores=torch.zeros(2), logprobs=old, mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
        ref_logprobs=torch.tensor([[-1.0, -1.0 + math.log(2)], [-2.0, 0.0]]),
        advantages=torch.tensor([1.0, -1.0]),
    )  # fmt: skip
    cfg = GRPOConfig(
        policy="p", reward="r", prompts="x", out="o", beta=0.1, loss_type=loss_type,
        response_length=4,
    )  # fmt: skip
    loss, stats = grpo_loss(logprobs, mb, cfg, OneProcess())
    assert loss.item() == pytest.approx(value)
    assert stats["kl_loss"].item() == pytest.approx((1 - math.log(2)) / 3)
    if loss_type == "grpo":
        loss.backward()
        # ∂/∂log π: −A ρ for the surrogate; β (1 − π_SFT/π) = 0.1 · (1 − 2) for the KL term;
        # each row's token mean (÷ 2 and ÷ 1), the mean over rows (÷ 2).
        assert logprobs.grad.flatten().tolist() == pytest.approx([-0.25, -0.275, 0.5, 0.0])


def test_grpo_without_beta_has_no_kl_term():
    mb = hand_made_rollout(
        scores=torch.zeros(1), logprobs=torch.tensor([[-1.0]]), mask=torch.ones(1, 1),
        ref_logprobs=torch.tensor([[-5.0]]), advantages=torch.tensor([2.0]),
    )  # fmt: skip
    cfg = GRPOConfig(policy="p", reward="r", prompts="x", out="o", beta=0.0)
    loss, stats = grpo_loss(torch.tensor([[-1.0]]), mb, cfg, OneProcess())
    assert loss.item() == pytest.approx(-2.0) and stats["kl_loss"].item() > 1  # logged only


# ---------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def sft_and_prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("critic_free")
    sft = tiny_sft(root)
    return {"policy": str(sft), "prompts": str(write_prompts(root / "prompts.jsonl", 256))}


def metrics_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("train", "cls", "extra"),
    [
        (train_rloo, RLOOConfig, {}),
        (train_grpo, GRPOConfig, {}),
        (train_grpo, GRPOConfig, {"loss_type": "dr_grpo", "scale_rewards": "none", "beta": 0.0}),
    ],
    ids=["rloo", "grpo", "dr_grpo"],
)
def test_method_raises_a_synthetic_reward_with_bounded_kl(
    sft_and_prompts, tmp_path, train, cls, extra
):
    """+1 for responses that contain the word "is" (a --reward-fn from a test module). Without
    the missing-EOS penalty: with it, RLOO first learns to stop (half the SFT model's responses
    run to the cap), which is the reward it was given but not what this test measures."""
    cfg = cls(
        **sft_and_prompts, reward_fn="reward_fns:says_is", out=str(tmp_path / "out"),
        rollout_batch_size=32, num_generations=4, response_length=12, learning_rate=1e-3,
        max_steps=20, missing_eos_penalty=0.0, **extra,
    )  # fmt: skip
    check_reward_rises(train(cfg))
    config = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert config["reward_fn"] == "reward_fns:says_is" and config["reward"] is None


@pytest.fixture(scope="module")
def micro_setup(micro_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("critic_free_micro")
    rm, tok = load_reward_model(micro_model)
    save_model(rm, tok, root / "rm")
    prompts = write_prompts(root / "prompts.jsonl", 64)
    return {"policy": str(micro_model), "reward": str(root / "rm"), "prompts": str(prompts)}


def test_lora_run_with_a_reward_model_and_a_function_logs_both(micro_setup, tmp_path):
    seen = []

    def hook(meta, responses, stopped):
        seen.append(len(responses))
        return {"meta_id": sum(m["id"] for m in meta) / len(meta)}

    cfg = GRPOConfig(
        **micro_setup, reward_fn="reward_fns:with_meta", reward_fn_weight=0.5, use_peft=True,
        rollout_batch_size=8, num_generations=4, response_length=8, max_steps=2,
        learning_rate=5e-3, out=str(tmp_path / "out"),
    )  # fmt: skip
    log = metrics_of(train_grpo(cfg, rollout_metrics=hook))
    assert [r["step"] for r in log] == [1, 2] and seen == [8, 8]
    for r in log:
        total = r["rm_score"] + 0.5 * r["reward_fn_score"]
        assert r["score"] == pytest.approx(total, abs=1e-5)
        for key in ("kl", "kl_k3", "loss", "clip_frac", "entropy", "grad_norm", "meta_id"):
            assert math.isfinite(r[key]), key
    trained, _ = load_causal_lm(tmp_path / "out")  # LoRA merged into a plain model directory
    sft, _ = load_causal_lm(micro_setup["policy"])
    moved = max(
        (a - b).abs().max() for a, b in zip(trained.parameters(), sft.parameters(), strict=True)
    )
    assert moved > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_resume_after_sigkill_matches_an_uninterrupted_run(micro_setup, tmp_path, method):
    args = [method, "--policy", micro_setup["policy"], "--reward", micro_setup["reward"]]
    args += ["--prompts", micro_setup["prompts"], "--rollout-batch-size", 8]
    args += ["--response-length", 8, "--num-mini-batches", 2, "--num-iterations", 2]
    check_resume_after_sigkill(args, tmp_path, steps=6)
