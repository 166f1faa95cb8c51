"""Monte-Carlo estimators of KL(π‖π_ref) from samples of π (Schulman 2020, "Approximating KL divergence")."""

from __future__ import annotations

from typing import NamedTuple

import torch

from align.objectives.preference import _check_same_shape


class KLEstimates(NamedTuple):
    """k1 and k3 estimates, per token or summed per sequence (see ``kl_estimates``)."""

    k1: torch.Tensor
    k3: torch.Tensor


def kl_estimates(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    per_token: bool = False,
) -> KLEstimates:
    """Schulman's (2020) estimators of KL(π‖π_ref) on tokens sampled from π, with ``r = π_ref/π``.

    * ``k1 = -log r = log π - log π_ref``: unbiased, high variance, can be negative.
    * ``k3 = (r - 1) - log r``: unbiased (E_π[r] = 1), always ≥ 0, low variance when π ≈ π_ref.
      Per token it is GRPO's ``D_KL,t`` (Shao et al. 2024, DeepSeekMath, Eq. 4).

    ``logps``, ``ref_logps``: per-token log-probs (..., T) of the sampled tokens, ``mask`` (..., T) 1 on real
    tokens. ``per_token=True`` returns (..., T) estimates with masked positions 0; otherwise their sums
    over the last axis (...,). The summed k1 is the sequence's own ``log π(y) - log π_ref(y)``; the summed
    k3 is a sum of per-token k3 (unbiased for the sequence KL by the chain rule, and ≥ 0), not k3 of the
    whole sequence's ratio (which overflows on long sequences). Given sequence log-probs and
    ``per_token=True`` the estimates are the sequence-level ones.

    Both estimate KL(π‖π_ref) only when the samples come from π itself: temperature 1, no top-p/top-k
    truncation, no repetition penalty. Nothing is detached; pass detached inputs to log them.
    """
    _check_same_shape("kl_estimates", logps=logps, ref_logps=ref_logps, mask=mask)
    if mask is not None:
        # Sanitise padded slots first: exp(±inf) there would turn the masked gradient into NaN.
        keep = mask.bool()
        logps = torch.where(keep, logps, torch.zeros_like(logps))
        ref_logps = torch.where(keep, ref_logps, torch.zeros_like(ref_logps))
    log_r = ref_logps - logps  # log(π_ref/π)
    k1 = -log_r
    k3 = torch.expm1(log_r) - log_r  # (r - 1) - log r; expm1 keeps it accurate when r ≈ 1
    if not per_token:
        return KLEstimates(k1.sum(-1), k3.sum(-1))
    return KLEstimates(k1, k3)
