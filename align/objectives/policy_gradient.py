"""On-policy policy-gradient baselines for groups of K samples per prompt: RLOO and GRPO.

Like the preference objectives these are pure functions of tensors returning per-prompt losses (B,);
groups are laid out (B, K) per completion and (B, K, T) per token.
"""

from __future__ import annotations

from typing import Literal

import torch

from align.objectives.kl import kl_estimates
from align.objectives.preference import GroupLossOutput, _check_same_shape

# Added to the group's standard deviation before dividing, as TRL's GRPOTrainer does (1e-4).
GRPO_STD_EPS = 1e-4
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def _check_groups(name: str, tensor: torch.Tensor, dims: int) -> None:
    if tensor.dim() != dims:
        raise ValueError(f"{name}: expected {dims}-d inputs, got {tuple(tensor.shape)}")
    if tensor.shape[1] < 2:
        raise ValueError(f"{name}: needs K >= 2 samples per prompt, got K = {tensor.shape[1]}")


def rloo_loss(
    logps: torch.Tensor,
    rewards: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    return_rewards: bool = False,
) -> torch.Tensor | GroupLossOutput:
    """REINFORCE leave-one-out (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!";
    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization ...", the RLOO estimator).

    ``logps``, ``rewards``: (B, K), K ≥ 2 samples y_i of each prompt, summed token log-probs. With
    ``beta > 0`` the reward is KL-shaped, ``r_i - β·(log π(y_i) - log π_ref(y_i))``, the log-ratio
    detached as in the paper. Advantage ``A_i = r_i - 1/(K-1) Σ_{j≠i} r_j`` (detached), loss per prompt
    ``-(1/K) Σ_i A_i · log π(y_i)``, so ``∂loss/∂log π(y_i) = -A_i / K``: the paper's gradient estimator
    ``1/K Σ_i (r_i - 1/(K-1) Σ_{j≠i} r_j) ∇log π(y_i)``, negated. Unbiased on samples of π.

    Relation to CoPG: ``copg_loss(logps, ref_logps, rewards, beta=β)`` has exactly K times this loss's
    gradient with the same β (its β/2-regularised reward, not detached, gives the full β in the gradient);
    the values differ.

    ``return_rewards=True`` returns ``GroupLossOutput(losses, rewards)`` with the (shaped) rewards (B, K).
    """
    _check_same_shape("rloo_loss", logps=logps, rewards=rewards, ref_logps=ref_logps)
    _check_groups("rloo_loss", logps, dims=2)
    if beta < 0:
        raise ValueError(f"rloo_loss: beta must be >= 0, got {beta}")
    if beta > 0 and ref_logps is None:
        raise ValueError("rloo_loss: beta > 0 needs ref_logps")
    shaped = rewards if beta == 0 else rewards - beta * (logps - ref_logps)
    shaped = shaped.detach()
    k = logps.shape[1]
    advantages = shaped - (shaped.sum(dim=1, keepdim=True) - shaped) / (k - 1)
    losses = -(advantages * logps).mean(dim=1)
    return GroupLossOutput(losses, shaped) if return_rewards else losses


def constant_reward_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(B,) bool: groups whose K rewards are all equal. Their GRPO advantages are 0: no policy signal."""
    return (rewards == rewards[:, :1]).all(dim=1)


def grpo_advantages(
    rewards: torch.Tensor, *, scale_rewards: bool = True, eps: float = GRPO_STD_EPS
) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2, outcome supervision).

    ``Â_i = (r_i - mean(r)) / (std(r) + eps)`` over the K rewards of each prompt (B, K). ``std`` is the
    sample standard deviation (Bessel-corrected), ``eps = 1e-4``, both as TRL's GRPOTrainer.
    ``scale_rewards=False`` keeps ``r_i - mean(r)`` (Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like
    Training: A Critical Perspective", which shows the std division over-weights too easy and too hard prompts).
    Groups of equal rewards get exactly 0 (not a rounding residue of the mean).
    """
    _check_groups("grpo_advantages", rewards, dims=2)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_rewards:
        centred = centred / (rewards.std(dim=1, keepdim=True) + eps)
    return torch.where(constant_reward_groups(rewards).unsqueeze(1), torch.zeros_like(centred), centred)


def grpo_loss(
    token_logps: torch.Tensor,
    old_token_logps: torch.Tensor | None,
    ref_token_logps: torch.Tensor | None,
    rewards: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.04,
    scale_rewards: bool = True,
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo",
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath, Eq. 3), negated so that it is minimised; (B,) per prompt.

    Shapes: ``token_logps``, ``old_token_logps``, ``ref_token_logps``, ``completion_mask`` (B, K, T): the
    log-probs of the sampled tokens o_{i,t} under π_θ, the sampler π_θold and π_ref, mask 1 on the tokens
    of o_i (masked positions are ignored everywhere, whatever they hold); ``rewards`` (B, K). Per token

        ``ℓ_{i,t} = -min(ρ_{i,t} Â_i, clip(ρ_{i,t}, 1 - ε, 1 + ε_high) Â_i) + β·D_KL,t``

    with ``ρ = π_θ/π_θold`` (π_θold detached), ``Â = grpo_advantages(rewards, scale_rewards=...)`` and
    the k3 estimator ``D_KL,t = π_ref/π_θ - log(π_ref/π_θ) - 1`` (Eq. 4, π_ref detached).
    ``old_token_logps=None`` means the sampler is the current policy (one gradient step per batch):
    ρ = 1 in value, ∇ρ = ∇log π. ``ref_token_logps`` may be None when ``beta == 0``.

    Reduction over the group (``loss_type``):
    * ``"grpo"``: ``1/K Σ_i 1/|o_i| Σ_t ℓ_{i,t}`` (Eq. 3);
    * ``"dr_grpo"``: ``1/(K·L) Σ_i Σ_t ℓ_{i,t}``, L = ``max_completion_length`` (default T), the constant
      of Dr. GRPO (Liu et al. 2025), whose recipe also sets ``scale_rewards=False``;
    * ``"dapo"``: ``1/Σ_i |o_i| Σ_i Σ_t ℓ_{i,t}``, token-level over the group (the DAPO objective, Yu et al.
      2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale").
      DAPO's asymmetric clipping is ``epsilon_high`` (paper: ε = 0.2, ε_high = 0.28).
    TRL's "dapo" normalises by the tokens of the whole batch instead of each group's.
    """
    if old_token_logps is None:
        old_token_logps = token_logps.detach()
    _check_same_shape(
        "grpo_loss",
        token_logps=token_logps,
        old_token_logps=old_token_logps,
        ref_token_logps=ref_token_logps,
        completion_mask=completion_mask,
    )
    _check_groups("grpo_loss", token_logps, dims=3)
    if tuple(rewards.shape) != tuple(token_logps.shape[:2]):
        raise ValueError(
            f"grpo_loss: rewards must be (B, K) = {tuple(token_logps.shape[:2])}, got {tuple(rewards.shape)}"
        )
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if not (0 <= epsilon < 1 and epsilon_high >= 0):
        raise ValueError(f"grpo_loss: need 0 <= epsilon < 1 and epsilon_high >= 0, got {epsilon}, {epsilon_high}")
    if beta < 0:
        raise ValueError(f"grpo_loss: beta must be >= 0, got {beta}")
    if beta > 0 and ref_token_logps is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_token_logps")
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_loss: loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")

    keep = completion_mask.bool()
    zeros = torch.zeros_like(token_logps)
    # Sanitise padded slots before exp(): a NaN or inf there would leak NaN into the masked gradient.
    logps = torch.where(keep, token_logps, zeros)
    old_logps = torch.where(keep, old_token_logps.detach(), zeros)
    advantages = grpo_advantages(rewards, scale_rewards=scale_rewards).detach().unsqueeze(-1)  # (B, K, 1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    if beta > 0:
        per_token = per_token + beta * kl_estimates(logps, ref_token_logps.detach(), keep, per_token=True).k3
    per_token = torch.where(keep, per_token, zeros)

    lengths = keep.sum(dim=-1).to(per_token.dtype)  # |o_i|, (B, K)
    if loss_type == "grpo":
        return (per_token.sum(dim=-1) / lengths.clamp(min=1)).mean(dim=1)
    if loss_type == "dapo":
        return per_token.sum(dim=(1, 2)) / lengths.sum(dim=1).clamp(min=1)
    length = token_logps.shape[-1] if max_completion_length is None else max_completion_length
    return per_token.sum(dim=(1, 2)) / (token_logps.shape[1] * length)
