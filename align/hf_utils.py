"""Small Hugging Face / torch facts that several packages need, written once: dtype names, the pad-token
fallback, unwrapping a model from its DDP and peft wrappers, and left-padded generation batches.
This module imports nothing from align, so every package can use it."""

from __future__ import annotations

import logging

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import PreTrainedTokenizerBase
from trl.trainer.utils import pad

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    """A tokenizer without a pad token gets its EOS token as pad (logged); returns ``tokenizer``.
    Raises ValueError when it has neither."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name!r} has neither a pad nor an EOS token; add one "
                             "(tokenizer.add_special_tokens({'pad_token': ...})) and save it")
        logger.info("tokenizer %s has no pad token; using EOS %r as pad", name, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside DDP/DataParallel (``.module``) and peft wrappers."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP/DataParallel wrappers, keeping a peft wrapper."""
    return extract_model_from_parallel(model)


def left_pad(rows: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of token rows padded on the left, as generation needs them
    (every row's next token then sits in the last column)."""
    tensors = [torch.tensor(r, dtype=torch.long) for r in rows]
    input_ids = pad(tensors, padding_value=pad_token_id, padding_side="left")
    attention_mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left")
    return input_ids.to(device), attention_mask.to(device)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt text. The tokenizer adds its special tokens (BOS) unless the text already
    begins with BOS, as the text of a chat template that emits one does: never a doubled BOS."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def encode_completion(tokenizer: PreTrainedTokenizerBase, text: str, *, finished: bool = True) -> list[int]:
    """Token ids of a completion text exactly as a sampler produces them: no special tokens in front, the
    ids end at the first EOS (kept; a chat template's text after its end-of-turn token is dropped), and a
    finished completion ends with EOS while one cut at the token limit (``finished=False``) does not."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is None:
        return ids
    if eos in ids:
        return ids[: ids.index(eos) + 1] if finished else ids[: ids.index(eos)]
    return ids + [eos] if finished else ids


def varlen_attention(model: torch.nn.Module) -> bool:
    """Whether the model attends with flash attention, whose varlen kernel attends within each packed sequence
    (sdpa and eager compute the whole L x L block-diagonal mask of a packed row)."""
    return "flash" in str(getattr(unwrap_model(model).config, "_attn_implementation", ""))


def forward_rows(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 packed: bool) -> tuple[dict, torch.Tensor]:
    """The model inputs of a batch of (N, T) rows, and where each row's token (r, t) sits in the flattened
    (batch x sequence) output: ``hidden.flatten(0, 1)[index[r, t]]``.

    ``packed`` (padding-free): the real tokens of every row, concatenated into one row of L = sum of lengths,
    with ``position_ids`` restarting at 0 for each sequence and no attention mask, from which transformers
    builds a block-diagonal causal mask (sdpa, eager) or runs varlen flash attention, given the sequence
    boundaries ``cu_seq_lens`` (as TRL's padding-free SFT collator passes them). No pad token is computed.
    Exact only where the model supports it (``packing_exact``). ``use_cache=False``: with a cache,
    transformers ignores the position ids and would attend across sequences.
    """
    mask = attention_mask.bool()
    if not packed:
        index = torch.arange(mask.numel(), device=mask.device).view(mask.shape)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}, index
    index = mask.flatten().cumsum(0).view(mask.shape) - 1
    inputs = {"input_ids": input_ids[mask].unsqueeze(0), "position_ids": (mask.cumsum(-1) - 1)[mask].unsqueeze(0),
              "use_cache": False}
    if varlen_attention(model):
        lengths = mask.sum(-1)
        cu_seq_lens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        inputs |= {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
                   "max_length_q": int(lengths.max()), "max_length_k": int(lengths.max())}
    return inputs, index


# Largest relative difference between the packed and the padded forward that the probe accepts: rounding (fp32
# differences are ~1e-7; 16-bit ones ~1e-2 over many layers) is far below what attention across sequences or
# wrong positions give (order 1).
PACKING_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
PACKING_TOLERANCE_16BIT = 5e-2


@torch.no_grad()
def packing_exact(model: torch.nn.Module) -> bool:
    """Whether ``model`` computes a packed row exactly as the padded rows (probed once per model, logged).

    Two short sequences, padded and packed (``forward_rows``), through the model in eval mode; their last
    hidden states must agree. Fails where the model ignores ``position_ids`` or builds its own mask (ALiBi
    models: BLOOM, Falcon with alibi; remote code), so those fall back to padded batches.
    """
    base = unwrap_model(model)
    cached = getattr(base, "_align_packing_exact", None)
    if cached is not None:
        return cached
    net = unwrap_peft(model)
    vocab = base.config.get_text_config().vocab_size
    device = next(net.parameters()).device
    rows = [[(3 + i) % vocab for i in range(5)], [(11 + 3 * i) % vocab for i in range(3)]]
    input_ids = pad([torch.tensor(r) for r in rows], padding_value=0).to(device)
    attention_mask = pad([torch.ones(len(r), dtype=torch.long) for r in rows], padding_value=0).to(device)
    was_training = net.training
    net.eval()
    try:
        hidden = []
        for packed in (False, True):
            inputs, index = forward_rows(net, input_ids, attention_mask, packed=packed)
            out = net(**inputs, output_hidden_states=True).hidden_states[-1].float()
            hidden.append(out.flatten(0, 1)[index[attention_mask.bool()]])
        error = ((hidden[0] - hidden[1]).abs().max() / hidden[0].abs().max().clamp(min=1e-6)).item()
        exact = error <= PACKING_TOLERANCE.get(base.dtype, PACKING_TOLERANCE_16BIT)
    except (TypeError, ValueError, RuntimeError) as err:  # a forward that refuses position_ids or a missing mask
        error, exact = f"{type(err).__name__}: {err}", False
    finally:
        net.train(was_training)
    if exact:
        logger.info("padding-free batches: %s packs exactly (probe: relative difference %s)", type(base).__name__, error)
    else:
        logger.warning("padding-free batches: %s does not compute packed sequences as padded ones (probe: %s); "
                       "using padded batches", type(base).__name__, error)
    base._align_packing_exact = exact
    return exact
