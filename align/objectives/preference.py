"""Pairwise and ranked preference objectives on sequence log-probabilities.

Every function is a pure function of tensors and returns per-example losses of shape (B,)
(callers choose the reduction). Log-probabilities are summed over completion tokens with
padding masked out (``align.models.logprobs.completion_logps``), in fp32.
Notation: ``lp(y)`` and ``ref(y)`` are a completion's summed log-probs under the policy and the
reference, ``lr(y) = lp(y) - ref(y)``, and for a pair ``h = lr(w) - lr(l)``.

With ``return_rewards=True`` each loss also returns the implicit rewards it scores completions with
(detached, so trainers log them without re-deriving them): pair losses a ``PairLossOutput``, group
losses a ``GroupLossOutput``. The default return value is the (B,) loss tensor alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PairLossOutput(NamedTuple):
    """A pair loss with its implicit rewards: ``losses`` (B,); ``chosen_rewards``, ``rejected_rewards`` (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class GroupLossOutput(NamedTuple):
    """A group loss with its per-completion implicit rewards: ``losses`` (B,), ``rewards`` (B, K)."""

    losses: torch.Tensor
    rewards: torch.Tensor


def _pair_output(
    losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, return_rewards: bool
) -> torch.Tensor | PairLossOutput:
    return PairLossOutput(losses, chosen.detach(), rejected.detach()) if return_rewards else losses


def _log_ratio(logps: torch.Tensor, ref_logps: torch.Tensor | None) -> torch.Tensor:
    return logps if ref_logps is None else logps - ref_logps


def _check_same_shape(name: str, **tensors: torch.Tensor | None) -> None:
    # Mismatched shapes would broadcast silently, e.g. (B,) against (B, 1) gives a (B, B) loss.
    shapes = {key: tuple(t.shape) for key, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{name}: inputs must share one shape, got {shapes}")


def _log_ratio_margin(
    name: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """``h = lr(w) - lr(l)``, after checking that the four inputs share one shape."""
    _check_same_shape(
        name,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    return (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)


def cpl_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    alpha: float = 0.1,
    lam: float = 1.0,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    return_rewards: bool = False,
) -> torch.Tensor | PairLossOutput:
    """Contrastive Preference Learning (Hejna et al. 2023), conservative form CPL(λ), paper Eq. 6.

    ``L = -log σ(α·lp(w) - λ·α·lp(l)) = softplus(-(S⁺ - λ S⁻))`` with segment score
    ``S = α Σ_t log π(a_t|s_t)`` (γ = 1, the official code's flat sum). λ ∈ (0, 1] down-weights the
    rejected segment; λ = 1 is the plain CPL loss of Eq. 5. With reference log-probs the scores are
    ``α·(lp - ref)`` (CPL-KL, ``research/algs/cpl_kl.py``), which for λ = 1 is DPO with β = α.
    ``return_rewards=True``: ``PairLossOutput(losses, S⁺, S⁻)`` (λ weighs S⁻ inside the loss only).
    """
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"cpl_loss: lam must lie in (0, 1], got {lam}")
    if alpha <= 0:
        raise ValueError(f"cpl_loss: alpha must be > 0, got {alpha}")
    _check_same_shape(
        "cpl_loss",
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    chosen_scores = alpha * _log_ratio(chosen_logps, ref_chosen_logps)
    rejected_scores = alpha * _log_ratio(rejected_logps, ref_rejected_logps)
    losses = F.softplus(-(chosen_scores - lam * rejected_scores))
    return _pair_output(losses, chosen_scores, rejected_scores, return_rewards)


def cpl_ranked_loss(
    logps: torch.Tensor,
    scores: torch.Tensor,
    *,
    alpha: float = 0.1,
    lam: float = 1.0,
    ref_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    return_rewards: bool = False,
) -> torch.Tensor | GroupLossOutput:
    """CPL for K ≥ 2 ranked responses per prompt: the official code's ``biased_bce_with_scores``.

    ``logps``, ``scores``: (B, K). For every ordered pair (i, j) with ``scores[j] > scores[i]``
    the λ-biased pairwise loss ``softplus(-(a_j - λ a_i))``, ``a = α·lp`` (or α·(lp - ref)), is
    averaged over the pairs of the prompt (Bradley-Terry decomposition of the ranking).
    Responses with equal scores form no pair (the code orders ties arbitrarily; dropping them is the
    order-independent choice). ``mask`` (B, K) marks valid responses. Returns (B,); a prompt with no
    valid pair gets loss 0. With K = 2 this equals ``cpl_loss``.
    ``return_rewards=True``: ``GroupLossOutput(losses, a)``, ``a`` (B, K) with masked slots 0.
    """
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"cpl_ranked_loss: lam must lie in (0, 1], got {lam}")
    if alpha <= 0:
        raise ValueError(f"cpl_ranked_loss: alpha must be > 0, got {alpha}")
    _check_same_shape("cpl_ranked_loss", logps=logps, scores=scores, ref_logps=ref_logps, mask=mask)
    if logps.dim() != 2:
        raise ValueError(f"cpl_ranked_loss: expected (B, K) inputs, got {tuple(logps.shape)}")
    adv = alpha * _log_ratio(logps, ref_logps)  # (B, K)
    if mask is not None:
        # Zero padded responses first: inf - inf in a masked slot would make NaN gradients.
        adv = torch.where(mask.bool(), adv, torch.zeros_like(adv))
    # logits[b, i, j] = a_j - λ a_i, used where response j outranks response i.
    logits = adv.unsqueeze(1) - lam * adv.unsqueeze(2)
    better = scores.unsqueeze(1) > scores.unsqueeze(2)  # [b, i, j]: scores[j] > scores[i]
    if mask is not None:
        better = better & mask.unsqueeze(1).bool() & mask.unsqueeze(2).bool()
    pair_losses = torch.where(better, F.softplus(-logits), torch.zeros_like(logits))
    n_pairs = better.sum(dim=(1, 2))
    losses = pair_losses.sum(dim=(1, 2)) / n_pairs.clamp(min=1)
    return GroupLossOutput(losses, adv.detach()) if return_rewards else losses


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    return_rewards: bool = False,
) -> torch.Tensor | PairLossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7): ``-log σ(β h)``, ``h = lr(w) - lr(l)``, ``lr = lp - ref``.

    ``return_rewards=True``: ``PairLossOutput(losses, β·lr(w), β·lr(l))``, the implicit reward
    ``β log π/π_ref`` of Sec. 4.
    """
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    h = _log_ratio_margin(
        "dpo_loss", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = F.softplus(-beta * h)
    return _pair_output(losses, beta * (chosen_logps - ref_chosen_logps),
                        beta * (rejected_logps - ref_rejected_logps), return_rewards)


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    return_rewards: bool = False,
) -> torch.Tensor | PairLossOutput:
    """IPO (Azar et al. 2023, sampled loss Eq. 17): ``(h - 1/(2τ))²`` with τ = ``beta``.

    Acts on whatever log-probs it is given: summed (the paper, and CoPG's identity) or
    length-normalised (TRL's ``loss_type="ipo"``); the trainer's ``length_normalize`` chooses.
    ``return_rewards=True``: ``PairLossOutput(losses, τ·lr(w), τ·lr(l))``, DPO's convention (as TRL's).
    """
    if beta <= 0:
        raise ValueError(f"ipo_loss: beta must be > 0, got {beta}")
    h = _log_ratio_margin(
        "ipo_loss", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return _pair_output(losses, beta * (chosen_logps - ref_chosen_logps),
                        beta * (rejected_logps - ref_rejected_logps), return_rewards)


def copg_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float,
    mask: torch.Tensor | None = None,
    return_rewards: bool = False,
) -> torch.Tensor | GroupLossOutput:
    """Contrastive Policy Gradient (Flet-Berliac et al. 2024), negated so that it is minimised.

    Inputs (B, k), k ≥ 2 completions of the same prompt, summed token log-probs. For k = 2 this is
    ``-ℓ_CoPG`` of paper Eq. 7-9:
    ``ℓ = (R_{β/2}(y) - R_{β/2}(y'))·lr(y) + (R_{β/2}(y') - R_{β/2}(y))·lr(y')`` with the regularised
    reward ``R_{β/2}(y) = R(y) - (β/2)·lr(y)``. For k > 2 it is the leave-one-out form
    ``ℓ_k = 1/(k-1) Σ_{i<j} ℓ_CoPG(y_i, y_j)`` (the pairwise form used online and offline by Cohere's
    Command A report, 2025), whose gradient is RLOO's on the regularised reward ``R_β`` (Eq. 1-2), up to
    the factor k (``rloo_loss``). The regularised reward is deliberately *not* detached: the gradient of
    Eq. 18-19 needs the full β, and a detached β/2 would move the fixed point to temperature β/2.
    ``mask`` (B, k) drops invalid completions (k counted per prompt; a prompt with fewer than 2 valid
    completions gets loss 0). ``return_rewards=True``: ``GroupLossOutput(losses, R_β)`` with the
    regularised reward ``R_β = R - β·lr`` (B, k), equal across a group at CoPG's optimum; masked slots 0.
    """
    if beta <= 0:
        raise ValueError(f"copg_loss: beta must be > 0, got {beta}")
    _check_same_shape(
        "copg_loss", policy_logps=policy_logps, ref_logps=ref_logps, rewards=rewards, mask=mask
    )
    if policy_logps.dim() != 2:
        raise ValueError(f"copg_loss: expected (B, k) inputs, got {tuple(policy_logps.shape)}")
    valid = torch.ones_like(policy_logps, dtype=torch.bool) if mask is None else mask.bool()
    zeros = torch.zeros_like(policy_logps)
    # torch.where rather than multiplying by the mask: padded slots may hold -inf or NaN.
    log_ratio = torch.where(valid, policy_logps - ref_logps.detach(), zeros)
    # R^π_{β/2}, not detached.
    reg_reward = torch.where(valid, rewards - 0.5 * beta * log_ratio, zeros)
    k = valid.sum(dim=1, keepdim=True).to(policy_logps.dtype)
    loo_mean = (reg_reward.sum(dim=1, keepdim=True) - reg_reward) / (k - 1).clamp(min=1)
    ell = ((reg_reward - loo_mean) * log_ratio).sum(dim=1)
    losses = torch.where(k.squeeze(1) >= 2, -ell, torch.zeros_like(ell))
    if not return_rewards:
        return losses
    return GroupLossOutput(losses, torch.where(valid, rewards - beta * log_ratio, zeros).detach())
