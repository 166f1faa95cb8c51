"""Thin trainers around the objectives; each declares its config class (beside it) and its data kinds.

``TRAINERS`` maps the config's ``trainer:`` name to the class; ``align.api`` and ``align.cli`` read it.
"""

from align.trainers.base import AlignTrainer, PolicyTrainer
from align.trainers.config import AlignConfig
from align.trainers.copg import CoPGConfig, CoPGTrainer
from align.trainers.cpl import CPLConfig, CPLTrainer
from align.trainers.dpo import DPOConfig, DPOTrainer
from align.trainers.reward import RewardConfig, RewardTrainer

TRAINERS: dict[str, type[AlignTrainer]] = {
    "cpl": CPLTrainer,
    "dpo": DPOTrainer,
    "copg": CoPGTrainer,
    "reward": RewardTrainer,
}

__all__ = ["TRAINERS", "AlignConfig", "AlignTrainer", "CPLConfig", "CPLTrainer", "CoPGConfig", "CoPGTrainer",
           "DPOConfig", "DPOTrainer", "PolicyTrainer", "RewardConfig", "RewardTrainer"]
