"""CoPG trainer: Contrastive Policy Gradient (Flet-Berliac et al. 2024) on any sequence-level reward,
from offline scored completions or from on-policy samples (``online: true``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from align.objectives import copg_loss
from align.trainers.base import AlignTrainer, LogProbs
from align.trainers.config import AlignConfig


@dataclass
class CoPGConfig(AlignConfig):
    beta: float = field(default=0.1, metadata={"help": "KL regularisation β, in reward units (paper's best on TL;DR: 0.06)."})

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta!r} must be > 0")


class CoPGTrainer(AlignTrainer):
    needs_reference = True
    orders_by_reward = False  # CoPG uses the rewards themselves, ties included

    def objective(self, logps: LogProbs, ref_logps: torch.Tensor, batch: dict):
        if "scores" not in batch:
            raise ValueError("CoPG needs rewards: give `rewards` (or chosen_reward/rejected_reward) in the data, "
                             "or set `reward` so they are computed")
        rewards, beta = batch["scores"], self.args.beta
        losses = copg_loss(logps.sequence, ref_logps, rewards, beta=beta)
        log_ratio = (logps.sequence - ref_logps).detach()
        regularised = rewards - beta * log_ratio  # R^π_β; at CoPG's optimum it is equal across a group
        metrics = {
            "reward/mean": rewards.mean(),
            "reward/std": rewards.std(unbiased=False),
            "kl": log_ratio.mean(),  # Monte-Carlo KL(π‖π_ref) on on-policy samples
            "copg/reg_reward_gap": (regularised.max(1).values - regularised.min(1).values).mean(),
        }
        return losses, metrics
