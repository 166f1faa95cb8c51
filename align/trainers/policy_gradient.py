"""GRPO and RLOO: on-policy policy-gradient baselines on the same loop as online CoPG (sampling, scoring,
reference and checkpoints are shared; only the objective differs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from align.config import require
from align.objectives import GRPO_LOSS_TYPES, constant_reward_groups, grpo_loss, rloo_loss
from align.trainers.base import LogProbs, PolicyTrainer
from align.trainers.config import AlignConfig


@dataclass
class OnlineConfig(AlignConfig):
    """GRPO and RLOO learn from samples of the current policy: ``online`` is on."""

    online: bool = True
    num_generations: int = 4

    def __post_init__(self):
        super().__post_init__()
        if not self.online:
            raise ValueError("this trainer learns from on-policy samples only: set online=true and a `reward`")


@dataclass
class GRPOConfig(OnlineConfig):
    beta: float = field(default=0.04, metadata={"help": "Weight of the per-token k3 KL to the reference (DeepSeekMath: 0.04; 0 drops the reference)."})
    epsilon: float = field(default=0.2, metadata={"help": "Clipping range ε of the ratio (lower side)."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping ε_high (DAPO's clip-higher: 0.28); None = epsilon."})
    scale_rewards: bool = field(default=True, metadata={"help": "Divide advantages by the group's reward std (false: Dr. GRPO)."})
    loss_type: Literal[GRPO_LOSS_TYPES] = field(default="grpo", metadata={"help": "grpo (per-sequence mean), dr_grpo (sum / (K·max_new_tokens)) or dapo (token mean over the group)."})

    def __post_init__(self):
        super().__post_init__()
        require(self.beta >= 0, "beta", self.beta, ">= 0")
        require(self.epsilon > 0, "epsilon", self.epsilon, "> 0")
        require(self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", self.epsilon_high, "> 0 or null")


@dataclass
class RLOOConfig(OnlineConfig):
    beta: float = field(default=0.05, metadata={"help": "KL shaping of the reward, r − β·(log π − log π_ref) (detached); 0 drops the reference."})

    def __post_init__(self):
        super().__post_init__()
        require(self.beta >= 0, "beta", self.beta, ">= 0")


class GRPOTrainer(PolicyTrainer):
    """GRPO (Shao et al. 2024) with one gradient step per sampled batch, so π_θold is the current policy
    (ratio 1 in value, gradient of log π), as TRL does with ``num_iterations=1``."""

    config_class = GRPOConfig
    data_kinds = ()
    token_reference = True

    @property
    def uses_reference(self) -> bool:
        return self.args.beta > 0

    def objective(self, logps: LogProbs, ref_logps: torch.Tensor | None, batch: dict):
        a, k = self.args, batch["group_size"]
        rewards = batch["scores"]
        mask = batch["completion_mask"][:, 1:].float()
        shape = (-1, k, mask.shape[-1])
        ref_token = batch.get("ref_token_logps")
        losses = grpo_loss(logps.token.view(shape), None, None if ref_token is None else ref_token.view(shape), rewards,
                           mask.view(shape), epsilon=a.epsilon, epsilon_high=a.epsilon_high, beta=a.beta,
                           scale_rewards=a.scale_rewards, loss_type=a.loss_type, max_completion_length=a.max_new_tokens)
        metrics = {"grpo/constant_reward_groups": constant_reward_groups(rewards).float().mean()}
        return losses, metrics | ({} if ref_logps is None else self.log_ratio_metrics(logps, ref_logps))


class RLOOTrainer(PolicyTrainer):
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): REINFORCE with the leave-one-out baseline."""

    config_class = RLOOConfig
    data_kinds = ()

    @property
    def uses_reference(self) -> bool:
        return self.args.beta > 0

    def objective(self, logps: LogProbs, ref_logps: torch.Tensor | None, batch: dict):
        losses = rloo_loss(logps.sequence, batch["scores"], ref_logps=ref_logps, beta=self.args.beta)
        return losses, {} if ref_logps is None else self.log_ratio_metrics(logps, ref_logps)
