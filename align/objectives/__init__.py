"""Pure loss functions of log-probabilities, rewards and masks. They depend on torch alone."""

from align.objectives.kl import KLEstimates, kl_estimates
from align.objectives.policy_gradient import (
    GRPO_LOSS_TYPES,
    constant_reward_groups,
    grpo_advantages,
    grpo_loss,
    rloo_loss,
)
from align.objectives.preference import (
    GroupLossOutput,
    PairLossOutput,
    copg_loss,
    cpl_loss,
    cpl_ranked_loss,
    dpo_loss,
    ipo_loss,
)
from align.objectives.reward import (
    bradley_terry_loss,
    difference_views,
    flip_mask,
    metarm_difference,
    preference_strength,
    simcse_loss,
)

__all__ = [
    "GRPO_LOSS_TYPES",
    "GroupLossOutput",
    "KLEstimates",
    "PairLossOutput",
    "bradley_terry_loss",
    "constant_reward_groups",
    "copg_loss",
    "cpl_loss",
    "cpl_ranked_loss",
    "difference_views",
    "dpo_loss",
    "flip_mask",
    "grpo_advantages",
    "grpo_loss",
    "ipo_loss",
    "kl_estimates",
    "metarm_difference",
    "preference_strength",
    "rloo_loss",
    "simcse_loss",
]
