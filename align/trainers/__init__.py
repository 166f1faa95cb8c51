"""Thin trainers around the objectives; each declares its config class (beside it) and its data kinds.

``TRAINERS`` maps the config's ``trainer:`` name to the class; ``align.api`` and ``align.cli`` read it.
"""

from align.trainers.base import AlignTrainer, PolicyTrainer
from align.trainers.config import AlignConfig
from align.trainers.copg import CoPGConfig, CoPGTrainer
from align.trainers.cpl import CPLConfig, CPLTrainer
from align.trainers.dpo import DPOConfig, DPOTrainer
from align.trainers.policy_gradient import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from align.trainers.reward import RewardConfig, RewardTrainer

TRAINERS: dict[str, type[AlignTrainer]] = {
    "cpl": CPLTrainer,
    "dpo": DPOTrainer,
    "copg": CoPGTrainer,
    "reward": RewardTrainer,
    "grpo": GRPOTrainer,
    "rloo": RLOOTrainer,
}

__all__ = ["TRAINERS", "AlignConfig", "AlignTrainer", "CPLConfig", "CPLTrainer", "CoPGConfig", "CoPGTrainer",
           "DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer", "PolicyTrainer", "RLOOConfig", "RLOOTrainer", "RewardConfig",
           "RewardTrainer"]
