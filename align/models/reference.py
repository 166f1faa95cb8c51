"""The reference policy of a LoRA policy: by default the same model with its adapter disabled (no second copy
in memory). When training starts from a saved adapter (``adapter_path``, e.g. an SFT LoRA), or when a recipe
freezes the policy at some step (CPL-KL after its BC warm-up), the reference is instead that adapter,
frozen: a snapshot of the LoRA weights that ``reference_policy`` swaps in for the duration of a no-grad
forward (a few MB copied, still no second model)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from trl.trainer.utils import use_adapter

from align.hf_utils import unwrap_peft

SNAPSHOT = "align_reference_snapshot"  # attribute of the peft model holding the frozen LoRA weights
REFERENCE_FILE = "reference_adapter.safetensors"  # the snapshot inside a checkpoint


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trainable adapter weights of ``model`` (a peft model, possibly DDP-wrapped)."""
    return {name: p.detach().clone() for name, p in unwrap_peft(model).named_parameters() if p.requires_grad}


def freeze_reference(model: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Make ``weights`` (default: the adapter as it is now) the reference policy of ``model``."""
    setattr(unwrap_peft(model), SNAPSHOT, lora_weights(model) if weights is None else weights)


def reference_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    return getattr(unwrap_peft(model), SNAPSHOT, None)


@contextmanager
def reference_policy(model: torch.nn.Module):
    """Run the block (under no_grad, before any policy forward whose graph is still alive) with the model as
    the reference policy: the adapter disabled, or the frozen snapshot swapped in and restored exactly."""
    snapshot = reference_snapshot(model)
    if snapshot is None:
        with use_adapter(model, None):
            yield
        return
    params = dict(unwrap_peft(model).named_parameters())
    current = {name: params[name].detach().clone() for name in snapshot}
    with torch.no_grad():
        for name, weight in snapshot.items():
            params[name].copy_(weight)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, weight in current.items():
                params[name].copy_(weight)
