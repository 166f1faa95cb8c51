"""DPO and IPO baselines on the same LoRA policy; the reference is the adapter-disabled model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from align.config import require
from align.objectives import dpo_loss, ipo_loss
from align.trainers.base import LogProbs, PolicyTrainer
from align.trainers.config import AlignConfig
from align.trainers.metrics import pair_metrics

LOSSES = {"sigmoid": dpo_loss, "ipo": ipo_loss}


@dataclass
class DPOConfig(AlignConfig):
    beta: float = field(default=0.1, metadata={"help": "β of DPO, τ of IPO."})
    loss_type: Literal["sigmoid", "ipo"] = field(default="sigmoid", metadata={"help": "sigmoid (DPO) or ipo. TRL's IPO also sets length_normalize."})

    def __post_init__(self):
        super().__post_init__()
        require(self.beta > 0, "beta", self.beta, "> 0")


class DPOTrainer(PolicyTrainer):
    """Offline on (chosen, rejected) pairs; online, each prompt's best and worst samples form the pair
    (groups whose rewards are all equal are dropped)."""

    config_class = DPOConfig
    needs_reference = True
    online_pairs = True

    def objective(self, logps: LogProbs, ref_logps: torch.Tensor, batch: dict):
        seq = logps.sequence
        out = LOSSES[self.args.loss_type](seq[:, 0], seq[:, 1], ref_logps[:, 0], ref_logps[:, 1], beta=self.args.beta,
                                          return_rewards=True)
        metrics = pair_metrics(out.chosen_rewards, out.rejected_rewards, seq[:, 0], seq[:, 1])
        return out.losses, metrics | self.log_ratio_metrics(logps, ref_logps)
