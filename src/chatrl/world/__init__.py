"""The bundled assistant world: prompts whose best answer is known exactly, a gold labeler,
simulated annotators, flawed demonstrations for SFT and plain text for pretraining.

Stages never import it (they meet the world in files); ``chatrl world``, ``chatrl eval``,
``chatrl ppo`` (for the gold score of world prompts) and the pipeline do; trainers meet its
``gold_reward`` only by name (``--reward-fn chatrl.world:gold_reward``). See docs/world.md.
"""

from chatrl.world.judge import Judgement, gold_reward, gold_score, judge, rollout_gold_score
from chatrl.world.tasks import (
    DEMO_MIX,
    FAMILIES,
    SPLITS,
    is_world_prompt,
    make_prompts,
    perfect_response,
    pretrain_text,
    sft_conversations,
)

__all__ = [
    "DEMO_MIX",
    "FAMILIES",
    "SPLITS",
    "Judgement",
    "gold_reward",
    "gold_score",
    "is_world_prompt",
    "judge",
    "make_prompts",
    "perfect_response",
    "pretrain_text",
    "rollout_gold_score",
    "sft_conversations",
]
