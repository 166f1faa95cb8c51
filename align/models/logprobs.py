"""The one place where sequence log-probabilities are computed, for every trainer and evaluator."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import trl.trainer.utils as trl_utils

from align.hf_utils import forward_rows, unwrap_model
from align.models.reference import reference_policy

# Vocabulary width of the fused head's tiles off CUDA. TRL projects [tokens, 32768] tiles; on CUDA its Triton
# kernel folds a tile in place, but the torch fallback keeps several fp32 copies of it: with 1024 completion
# tokens and a 16k vocabulary, ~600 MB, the whole logits several times over. 2048-wide tiles halved a step's
# tensor memory and made it 28% faster on a CPU (scripts/bench_train.py, align_cpl).
CPU_VOCAB_TILE = 2048


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    layout: str = "padded",
    group_size: int = 1,
) -> torch.Tensor:
    """Per-token log-probs (N, T-1) of the completion tokens, 0 elsewhere, in fp32.

    One forward over the whole (concatenated) batch through TRL's fused LM head, which projects onto
    the vocabulary in tiles, so (N, T, V) logits never exist. Only the positions that predict a
    completion token reach the head: a hook keeps just those hidden states, as one row scored with
    pre-shifted labels. (TRL's head compacts them itself on Triton devices only; on a CPU it would
    also project every prompt and pad position: ~1.7x the head's time and memory here.)
    Rows are right-padded ``prompt + completion`` (``completion_mask`` 1 on completion tokens), in groups of
    ``group_size`` rows of one prompt; ``layout`` (``align.hf_utils.forward_rows``: padded, packed or
    shared_prefix) changes how they run, not the log-probs.
    """
    scored = completion_mask[:, 1:].bool()  # position t predicts token t + 1
    inputs, index = forward_rows(model, input_ids, attention_mask, layout=layout, group_size=group_size)
    positions = index[:, :-1][scored]

    def keep_scored(module, args, output):
        output.last_hidden_state = output.last_hidden_state.flatten(0, 1)[positions].unsqueeze(0)
        return output

    hook = _backbone(model).register_forward_hook(keep_scored)
    try:
        with _vocab_tile(input_ids.device):
            out = model(**inputs, fused_lm_head=True, shift_labels=input_ids[:, 1:][scored].unsqueeze(0))
    finally:
        hook.remove()
    return torch.zeros(scored.shape, device=scored.device).masked_scatter(scored, out.log_probs[0].float())


@contextmanager
def _vocab_tile(device: torch.device):
    """TRL's vocabulary tile width (read when the head runs forward; backward reuses it) set to CPU_VOCAB_TILE
    off CUDA."""
    default = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = default if device.type == "cuda" else min(default, CPU_VOCAB_TILE)
    try:
        yield
    finally:
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = default


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output feeds the fused head (as TRL finds it), through DDP/DeepSpeed and PEFT wrappers."""
    return unwrap_model(model).base_model


def reference_completion_logps(model: torch.nn.Module, *, layout: str = "padded", group_size: int = 1,
                               **batch: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs under the reference policy (``align.models.reference``): the same model with its
    adapter disabled, or with a frozen adapter snapshot swapped in."""
    with torch.no_grad(), reference_policy(model):
        return completion_logps(model, **batch, layout=layout, group_size=group_size)


def sequence_logps(token_logps: torch.Tensor, completion_mask: torch.Tensor, *, length_normalize: bool = False):
    """Sum (or mean, with ``length_normalize``) of per-token log-probs over each completion -> (N,)."""
    summed = token_logps.sum(dim=-1)
    if not length_normalize:
        return summed
    return summed / completion_mask[:, 1:].sum(dim=-1).clamp(min=1)
