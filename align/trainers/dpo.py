"""DPO and IPO baselines on the same LoRA policy; the reference is the adapter-disabled model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from align.objectives import dpo_loss, ipo_loss
from align.trainers.base import AlignTrainer, LogProbs
from align.trainers.config import AlignConfig
from align.trainers.metrics import pair_metrics

LOSSES = {"sigmoid": dpo_loss, "ipo": ipo_loss}


@dataclass
class DPOConfig(AlignConfig):
    beta: float = field(default=0.1, metadata={"help": "β of DPO, τ of IPO."})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) or ipo. TRL's IPO also sets length_normalize."})

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta!r} must be > 0")
        if self.loss_type not in LOSSES:
            raise ValueError(f"loss_type={self.loss_type!r}: choose one of {', '.join(LOSSES)}")


class DPOTrainer(AlignTrainer):
    needs_reference = True

    def objective(self, logps: LogProbs, ref_logps: torch.Tensor, batch: dict):
        seq, beta = logps.sequence, self.args.beta
        losses = LOSSES[self.args.loss_type](seq[:, 0], seq[:, 1], ref_logps[:, 0], ref_logps[:, 1], beta=beta)
        rewards = beta * (seq - ref_logps)
        return losses, pair_metrics(rewards[:, 0], rewards[:, 1], seq[:, 0], seq[:, 1])
