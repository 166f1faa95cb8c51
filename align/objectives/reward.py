"""Reward-model objectives of "Secrets of RLHF in Large Language Models Part II: Reward Modeling"
(Wang et al. 2024, arXiv 2401.06080).

Pure functions of tensors. Losses are per example (callers choose the reduction); the MetaRM
difference J is per prompt and is *maximised*. Notation, section and equation numbers are the
paper's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    label_smoothing: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Bradley-Terry reward-model loss with optional adaptive margin and label smoothing, (B,).

    ``L = -[(1-ε)·log σ(z) + ε·log σ(-z)]``, ``z = r_c - r_r - m``.

    * ε = 0, m = 0: the vanilla loss ``-log σ(r_c - r_r)`` (Eq. 10).
    * ε > 0: label smoothing / soft labels (Eq. 5). ε may be a (B,) tensor so that a trainer can
      smooth only a slice of the data (the paper smooths the strongest 10%, or the pairs with a
      negative mean preference strength).
    * m: adaptive margin (Eq. 6). The paper prints ``log σ(r_c - r_r) - m``, which leaves the
      gradient unchanged; the margin goes inside σ as in Llama 2, which the paper follows.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            "bradley_terry_loss: chosen and rejected rewards must share one shape, got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    z = chosen_rewards - rejected_rewards
    if margin is not None:
        if margin.shape != z.shape:
            raise ValueError(
                f"bradley_terry_loss: margin shape {tuple(margin.shape)} != {tuple(z.shape)}"
            )
        z = z - margin
    if isinstance(label_smoothing, torch.Tensor):
        if label_smoothing.shape != z.shape:
            raise ValueError(
                "bradley_terry_loss: label_smoothing shape "
                f"{tuple(label_smoothing.shape)} != {tuple(z.shape)}"
            )
        out_of_range = bool(((label_smoothing < 0) | (label_smoothing > 1)).any())
    else:
        out_of_range = not 0.0 <= label_smoothing <= 1.0
    if out_of_range:
        raise ValueError("bradley_terry_loss: label_smoothing must lie in [0, 1]")
    return -((1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z))


def preference_strength(reward_diffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ensemble preference strength (Eq. 4): mean and *population* std (ddof = 0) over models.

    ``reward_diffs`` (M, N) holds ``r_m(x_i, y_c,i) - r_m(x_i, y_r,i)`` for M reward models and N
    pairs; returns ``(mean, std)``, each (N,).
    """
    if reward_diffs.dim() != 2:
        raise ValueError(
            "preference_strength: expected (M, N) reward differences, got "
            f"{tuple(reward_diffs.shape)}"
        )
    return reward_diffs.mean(dim=0), reward_diffs.std(dim=0, correction=0)


def flip_mask(
    strength_mean: torch.Tensor, fraction: float, *, threshold: float | None = 0.0
) -> torch.Tensor:
    """Boolean (N,) mask of the pairs whose chosen and rejected responses are swapped (§2.4.1).

    The paper flips the pairs the ensemble disagrees with, "the bottom 20%" (§2.4.1; "the lowest
    10%" in App. C.2): the candidates are the pairs with mean strength μ̂ < ``threshold`` (Eq. 4;
    0 by default, i.e. the ensemble prefers the labelled rejected response), and the lowest of them
    are taken, at most ``round(fraction·N)`` pairs. A pair the ensemble agrees with (μ̂ ≥ 0) is never
    flipped, however low it ranks. ``threshold=None`` drops the condition: exactly the
    ``round(fraction·N)`` lowest pairs, whatever their sign.

    ``round`` is Python's (halves go to the even count); ties in strength are broken by index (a
    stable sort), so the mask is deterministic.
    """
    if strength_mean.dim() != 1:
        raise ValueError(f"flip_mask: expected (N,) strengths, got {tuple(strength_mean.shape)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"flip_mask: fraction must lie in [0, 1], got {fraction}")
    n_flip = round(fraction * strength_mean.numel())
    if threshold is not None:
        n_flip = min(n_flip, int((strength_mean < threshold).sum()))
    order = torch.sort(strength_mean, stable=True).indices
    mask = torch.zeros_like(strength_mean, dtype=torch.bool)
    mask[order[:n_flip]] = True
    return mask


def simcse_loss(
    view_a: torch.Tensor, view_b: torch.Tensor, *, temperature: float = 0.05
) -> torch.Tensor:
    """SimCSE contrastive loss (Eq. 9), per instance (N',).

    ``ℓ_i = -log( exp(cos(a_i, b_i)/τ) / Σ_j exp(cos(a_i, b_j)/τ) )``: ``view_a`` and ``view_b``,
    (N', D), are two dropout views of the same N' instances. The positive of ``a_i`` is ``b_i``;
    the in-batch negatives are the other instances' second views (for the "-diff" set of
    ``difference_views`` these include the instance's own negation).
    """
    if view_a.shape != view_b.shape or view_a.dim() != 2:
        raise ValueError(
            "simcse_loss: expected two (N', D) views of one shape, got "
            f"{tuple(view_a.shape)} and {tuple(view_b.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"simcse_loss: temperature must be > 0, got {temperature}")
    similarities = F.normalize(view_a, dim=-1) @ F.normalize(view_b, dim=-1).T / temperature
    targets = torch.arange(view_a.shape[0], device=view_a.device)
    return F.cross_entropy(similarities, targets, reduction="none")


def difference_views(
    chosen_features: torch.Tensor, rejected_features: torch.Tensor
) -> torch.Tensor:
    """The "-diff" instance set of §3.1: ``cat([f_c - f_r, f_r - f_c])``, (2N, D) from (N, D).

    Each difference and its negation are separate instances, so each is the other's in-batch
    negative in ``simcse_loss``.
    """
    if chosen_features.shape != rejected_features.shape:
        raise ValueError(
            "difference_views: chosen and rejected features must share one shape, got "
            f"{tuple(chosen_features.shape)} and {tuple(rejected_features.shape)}"
        )
    diff = chosen_features - rejected_features
    return torch.cat([diff, -diff])


def metarm_difference(rewards: torch.Tensor) -> torch.Tensor:
    """MetaRM difference objective J (Eq. 11), per prompt (B,); to be *maximised*.

    ``J = (2/k²) Σ_{i<j} σ(|r_i - r_j|)`` over the rewards (B, k) of k responses sampled from the
    shifted policy for one prompt. It lies in [(k-1)/(2k), (k-1)/k), the lower end when all k
    rewards are equal.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(
            f"metarm_difference: expected (B, k) rewards with k >= 2, got {tuple(rewards.shape)}"
        )
    k = rewards.shape[1]
    gaps = (rewards.unsqueeze(2) - rewards.unsqueeze(1)).abs()  # (B, k, k)
    upper = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(diagonal=1)
    return torch.sigmoid(gaps[:, upper]).sum(dim=1) * (2.0 / k**2)
