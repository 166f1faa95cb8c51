"""CPL trainer: Contrastive Preference Learning (Hejna et al. 2023) on a LoRA policy, no reward model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback, get_scheduler

from align.config import require
from align.models import freeze_reference
from align.objectives import cpl_loss, cpl_ranked_loss
from align.trainers.base import LogProbs, PolicyTrainer
from align.trainers.config import AlignConfig
from align.trainers.metrics import pair_metrics


@dataclass
class CPLConfig(AlignConfig):
    """The paper's recipe options. Defaults: plain CPL (λ = 1), no BC, summed log-probs (as the paper)."""

    alpha: float = field(default=0.1, metadata={"help": "Temperature α of the MaxEnt advantage, S = α·Σ log π."})
    lam: float = field(default=1.0, metadata={"help": "Conservative bias λ ∈ (0, 1] on the rejected segment (paper Eq. 6)."})
    bc_weight: float = field(default=0.0, metadata={"help": "CPL-BC: weight of the mean token NLL on all responses."})
    bc_warmup_steps: int = field(default=0, metadata={"help": "Steps of BC only (on all responses) before CPL starts."})
    bc_restart: bool = field(default=True, metadata={"help": "After the BC warm-up, restart the optimizer (fresh Adam moments) and the learning-rate schedule (its warm-up included) as the official CPL code does; false: one optimizer and schedule throughout."})
    use_reference: bool = field(default=False, metadata={"help": "CPL-KL: scores α·(log π − log π_ref); λ=1 gives DPO(β=α). After a BC warm-up the reference is the policy at its end."})

    def __post_init__(self):
        super().__post_init__()
        require(self.alpha > 0, "alpha", self.alpha, "> 0")
        require(0 < self.lam <= 1, "lam", self.lam, "in (0, 1]")
        require(self.bc_weight >= 0, "bc_weight", self.bc_weight, ">= 0")
        require(self.bc_warmup_steps >= 0, "bc_warmup_steps", self.bc_warmup_steps, ">= 0")


class ContrastivePhase(TrainerCallback):
    """When the contrastive phase begins after the BC warm-up: a fresh optimizer (Adam moments cleared) with
    ``bc_restart``, and with ``use_reference`` (CPL-KL) the policy as it is now becomes the frozen reference,
    as in the official CPL code."""

    def __init__(self, trainer: "CPLTrainer"):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step != args.bc_warmup_steps:
            return
        if args.bc_restart:
            self.trainer.optimizer.state.clear()
        if args.use_reference:
            freeze_reference(self.trainer.model)


class CPLTrainer(PolicyTrainer):
    """Scored batches (groups with rewards, online samples) use the ranked ``cpl_ranked_loss``, which drops
    exact ties and equals ``cpl_loss`` on an ordered pair; plain preference pairs (chosen first) use
    ``cpl_loss``. With ``bc_warmup_steps`` the first steps train BC alone."""

    config_class = CPLConfig
    data_kinds = ("pairs", "groups")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.bc_warmup_steps:
            self.add_callback(ContrastivePhase(self))

    @classmethod
    def requires_scores(cls, config: CPLConfig, kind: str) -> bool:
        return kind == "groups"  # a group has no order without rewards

    @property
    def uses_reference(self) -> bool:
        return self.args.use_reference

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """With ``bc_restart`` the schedule runs twice: over the BC warm-up, then again from its start (its
        warm-up included) over the contrastive steps."""
        warmup = self.args.bc_warmup_steps
        if not (warmup and self.args.bc_restart) or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer or self.optimizer
        a = self.args

        def schedule(steps: int):  # the configured schedule over `steps` steps, as a function of the step
            dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            return get_scheduler(a.lr_scheduler_type, dummy, num_warmup_steps=min(a.get_warmup_steps(steps), steps),
                                 num_training_steps=steps, scheduler_specific_kwargs=a.lr_scheduler_kwargs).lr_lambdas[0]

        bc, contrastive = schedule(warmup), schedule(max(num_training_steps - warmup, 1))
        self.lr_scheduler = LambdaLR(optimizer, lambda step: bc(step) if step < warmup else contrastive(step - warmup))
        return self.lr_scheduler

    def objective(self, logps: LogProbs, ref_logps: torch.Tensor | None, batch: dict):
        a = self.args
        seq = logps.sequence
        scores = batch.get("scores")
        if scores is not None:
            losses, implicit = cpl_ranked_loss(seq, scores, alpha=a.alpha, lam=a.lam, ref_logps=ref_logps,
                                               return_rewards=True)
            chosen, rejected = scores.argmax(dim=1), scores.argmin(dim=1)
            decided = scores.max(dim=1).values > scores.min(dim=1).values
        else:  # preference pairs: chosen first
            ref_chosen, ref_rejected = (None, None) if ref_logps is None else (ref_logps[:, 0], ref_logps[:, 1])
            losses, chosen_scores, rejected_scores = cpl_loss(seq[:, 0], seq[:, 1], alpha=a.alpha, lam=a.lam,
                                                              ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
                                                              return_rewards=True)
            implicit = torch.stack([chosen_scores, rejected_scores], dim=1)
            chosen, rejected = torch.zeros_like(seq[:, 0], dtype=torch.long), torch.ones_like(seq[:, 0], dtype=torch.long)
            decided = torch.ones_like(seq[:, 0], dtype=torch.bool)

        def pick(x, column):
            return x.gather(1, column[:, None])[:, 0][decided]

        metrics = pair_metrics(pick(implicit, chosen), pick(implicit, rejected), pick(seq, chosen), pick(seq, rejected))
        if ref_logps is not None:
            metrics |= self.log_ratio_metrics(logps, ref_logps)
        if a.bc_weight > 0 or self.state.global_step < a.bc_warmup_steps:
            # BC on all responses: mean token NLL of each prompt's completions (official code, bc_data="all")
            bc = -logps.token.view(seq.shape[0], -1).sum(-1) / logps.n_tokens.sum(-1).clamp(min=1)
            metrics["bc_loss"] = bc.detach().mean()
            losses = bc if self.state.global_step < a.bc_warmup_steps else losses + a.bc_weight * bc
        return losses, metrics
