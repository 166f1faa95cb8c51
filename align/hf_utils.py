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
