"""Thin trainers around the objectives; each has a config dataclass beside it."""

from align.trainers.base import AlignTrainer
from align.trainers.config import AlignConfig
from align.trainers.copg import CoPGConfig, CoPGTrainer
from align.trainers.cpl import CPLConfig, CPLTrainer
from align.trainers.dpo import DPOConfig, DPOTrainer
from align.trainers.reward import RewardConfig, RewardTrainer

# name -> (config class, trainer class, dataset kinds it accepts offline)
TRAINERS = {
    "cpl": (CPLConfig, CPLTrainer, ("pairs", "groups")),
    "dpo": (DPOConfig, DPOTrainer, ("pairs",)),
    "copg": (CoPGConfig, CoPGTrainer, ("pairs", "groups")),
    "reward": (RewardConfig, RewardTrainer, ("pairs",)),
}

__all__ = ["TRAINERS", "AlignConfig", "AlignTrainer", "CPLConfig", "CPLTrainer", "CoPGConfig", "CoPGTrainer",
           "DPOConfig", "DPOTrainer", "RewardConfig", "RewardTrainer"]
