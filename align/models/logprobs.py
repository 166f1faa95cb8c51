"""The one place where sequence log-probabilities are computed, for every trainer and evaluator."""

from __future__ import annotations

import torch
from trl.trainer.utils import use_adapter


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Per-token log-probs (N, T-1) of the completion tokens, 0 elsewhere, in fp32.

    One forward over the whole (concatenated) batch through TRL's fused LM head: only completion
    positions are projected onto the vocabulary, in tiles, so (N, T, V) logits never exist.
    Rows are right-padded ``prompt + completion`` (``completion_mask`` 1 on completion tokens).
    """
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    return out.log_probs.float()


def reference_completion_logps(model: torch.nn.Module, **batch: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs under the reference policy: the same model with its adapter disabled."""
    with torch.no_grad(), use_adapter(model, None):
        return completion_logps(model, **batch)


def sequence_logps(token_logps: torch.Tensor, completion_mask: torch.Tensor, *, length_normalize: bool = False):
    """Sum (or mean, with ``length_normalize``) of per-token log-probs over each completion -> (N,)."""
    summed = token_logps.sum(dim=-1)
    if not length_normalize:
        return summed
    return summed / completion_mask[:, 1:].sum(dim=-1).clamp(min=1)
