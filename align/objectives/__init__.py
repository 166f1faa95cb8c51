"""Pure loss functions of log-probabilities, rewards and masks. They depend on torch alone."""

from align.objectives.preference import copg_loss, cpl_loss, cpl_ranked_loss, dpo_loss, ipo_loss
from align.objectives.reward import (
    bradley_terry_loss,
    difference_views,
    flip_mask,
    metarm_difference,
    preference_strength,
    simcse_loss,
)

__all__ = [
    "bradley_terry_loss",
    "copg_loss",
    "cpl_loss",
    "cpl_ranked_loss",
    "difference_views",
    "dpo_loss",
    "flip_mask",
    "ipo_loss",
    "metarm_difference",
    "preference_strength",
    "simcse_loss",
]
