"""CPL trainer: Contrastive Preference Learning (Hejna et al. 2023) on a LoRA policy, no reward model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from align.objectives import cpl_loss, cpl_ranked_loss
from align.trainers.base import AlignTrainer, LogProbs
from align.trainers.config import AlignConfig
from align.trainers.metrics import pair_metrics


@dataclass
class CPLConfig(AlignConfig):
    """The paper's recipe options. Defaults: plain CPL (λ = 1), no BC, summed log-probs (as the paper)."""

    alpha: float = field(default=0.1, metadata={"help": "Temperature α of the MaxEnt advantage, S = α·Σ log π."})
    lam: float = field(default=1.0, metadata={"help": "Conservative bias λ ∈ (0, 1] on the rejected segment (paper Eq. 6)."})
    bc_weight: float = field(default=0.0, metadata={"help": "CPL-BC: weight of the mean token NLL on all responses."})
    bc_warmup_steps: int = field(default=0, metadata={"help": "Steps of BC only (on all responses) before CPL starts."})
    use_reference: bool = field(default=False, metadata={"help": "CPL-KL: scores α·(log π − log π_ref); λ=1 gives DPO(β=α)."})

    def __post_init__(self):
        super().__post_init__()
        if self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha!r} must be > 0")
        if not 0 < self.lam <= 1:
            raise ValueError(f"lam={self.lam!r} must lie in (0, 1]")
        if self.bc_weight < 0 or self.bc_warmup_steps < 0:
            raise ValueError("bc_weight and bc_warmup_steps must be >= 0")


class CPLTrainer(AlignTrainer):
    """Pairs use ``cpl_loss``; groups of K > 2 scored responses use the all-pairs ``cpl_ranked_loss``."""

    @property
    def needs_reference(self) -> bool:
        return self.args.use_reference

    def objective(self, logps: LogProbs, ref_logps: torch.Tensor | None, batch: dict):
        a = self.args
        seq = logps.sequence
        ref_chosen = ref_rejected = None
        if ref_logps is not None:
            ref_chosen, ref_rejected = ref_logps[:, 0], ref_logps[:, 1]
        if seq.shape[1] == 2:
            losses = cpl_loss(seq[:, 0], seq[:, 1], alpha=a.alpha, lam=a.lam,
                              ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
        else:
            losses = cpl_ranked_loss(seq, batch["scores"], alpha=a.alpha, lam=a.lam, ref_logps=ref_logps)
        scores = a.alpha * (seq if ref_logps is None else seq - ref_logps)
        metrics = pair_metrics(scores[:, 0], scores[:, -1], seq[:, 0], seq[:, -1])
        if a.bc_weight > 0 or self.state.global_step < a.bc_warmup_steps:
            # BC on all responses: mean token NLL of each prompt's completions (official code, bc_data="all")
            bc = -logps.token.view(seq.shape[0], -1).sum(-1) / logps.n_tokens.sum(-1).clamp(min=1)
            metrics["bc_loss"] = bc.detach().mean()
            losses = bc if self.state.global_step < a.bc_warmup_steps else losses + a.bc_weight * bc
        return losses, metrics
