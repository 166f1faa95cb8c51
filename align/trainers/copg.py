"""CoPG trainer: Contrastive Policy Gradient (Flet-Berliac et al. 2024) on any sequence-level reward,
from offline scored completions or from on-policy samples (``online: true``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from align.config import require
from align.objectives import copg_loss
from align.trainers.base import LogProbs, PolicyTrainer
from align.trainers.config import AlignConfig


@dataclass
class CoPGConfig(AlignConfig):
    beta: float = field(default=0.1, metadata={"help": "KL regularisation β, in reward units (paper's best on TL;DR: 0.06)."})

    def __post_init__(self):
        super().__post_init__()
        require(self.beta > 0, "beta", self.beta, "> 0")


class CoPGTrainer(PolicyTrainer):
    """Uses the rewards themselves, ties included: every batch must carry them."""

    config_class = CoPGConfig
    data_kinds = ("pairs", "groups")
    needs_reference = True

    @classmethod
    def requires_scores(cls, config: CoPGConfig, kind: str) -> bool:
        return True

    def objective(self, logps: LogProbs, ref_logps: torch.Tensor, batch: dict):
        rewards = batch["scores"]
        # R^π_β, the regularised reward, is equal across a group at CoPG's optimum
        losses, regularised = copg_loss(logps.sequence, ref_logps, rewards, beta=self.args.beta, return_rewards=True)
        metrics = {"reward/mean": rewards.mean(), "reward/std": rewards.std(unbiased=False),
                   "copg/reg_reward_gap": (regularised.max(1).values - regularised.min(1).values).mean()}
        return losses, metrics | self.log_ratio_metrics(logps, ref_logps)
