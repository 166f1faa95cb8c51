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


# Attention implementations that apply a given 4D additive mask as it is (transformers' masking utilities pass a 4D
# mask on untouched); flash kernels take none.
CUSTOM_MASK_ATTENTION = ("sdpa", "eager")


def custom_mask_attention(model: torch.nn.Module) -> bool:
    """Whether ``model`` attends with a 4D mask given to it (sdpa, eager) over every past position: not with
    sliding-window layers (a custom mask replaces the window) nor ALiBi (positions read from the 2D mask)."""
    config = unwrap_model(model).config
    text = config.get_text_config()
    sliding = "sliding_attention" in (getattr(text, "layer_types", None) or ()) or (
        getattr(text, "layer_types", None) is None and getattr(text, "sliding_window", None) is not None
        and getattr(text, "use_sliding_window", True))
    return (getattr(config, "_attn_implementation", None) in CUSTOM_MASK_ATTENTION and not sliding
            and not getattr(text, "alibi", False))


LAYOUTS = ("padded", "packed", "shared_prefix")


def forward_rows(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 layout: str = "padded", group_size: int = 1) -> tuple[dict, torch.Tensor]:
    """The model inputs of a batch of right-padded (N, T) rows, and where each row's token (r, t) sits in the
    flattened (batch x sequence) output: ``hidden.flatten(0, 1)[index[r, t]]``. Three layouts, one result:

    * ``padded``: the rows as they are.
    * ``packed`` (padding-free): the real tokens of every row, concatenated into one row of L = sum of lengths,
      with ``position_ids`` restarting at 0 for each sequence and no attention mask, from which transformers
      builds a block-diagonal causal mask (sdpa, eager) or runs varlen flash attention, given the sequence
      boundaries ``cu_seq_lens`` (as TRL's padding-free SFT collator passes them). No pad token is computed.
    * ``shared_prefix``: the rows come in groups of ``group_size`` consecutive rows (one prompt's completions,
      ``align.data.GroupCollator``); each group runs as one row that holds the tokens the group's rows share at
      their start (the prompt, at least) once, then each row's remaining tokens, with their own positions and a
      4D mask by which each row's tokens see the shared prefix and their own row only (prefix sharing, as in
      Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing"). A token's hidden
      state depends on the tokens before it alone, so the rows sharing it have the same one there: the prefix
      is computed once per group instead of once per row (a pair with a prompt as long as a completion: 3
      sequence lengths of tokens instead of 4). A group's row attends over all its completions, so many long
      completions of a short prompt would cost more attention than the prompt saves: a batch runs shared only
      where its estimated FLOPs are fewer (``shared_prefix_pays``), else padded.

    Each layout other than ``padded`` is exact only where the model supports it (``layout_exact``).
    ``use_cache=False``: with a cache, transformers ignores the position ids.
    """
    mask = attention_mask.bool()
    if layout == "padded" or (layout == "shared_prefix" and group_size == 1):
        index = torch.arange(mask.numel(), device=mask.device).view(mask.shape)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}, index
    if layout == "shared_prefix":
        shared = _shared_prefix_rows(model, input_ids, mask, group_size)
        return shared or forward_rows(model, input_ids, attention_mask)
    if layout != "packed":
        raise ValueError(f"layout={layout!r}: choose one of {', '.join(LAYOUTS)}")
    index = mask.flatten().cumsum(0).view(mask.shape) - 1
    inputs = {"input_ids": input_ids[mask].unsqueeze(0), "position_ids": (mask.cumsum(-1) - 1)[mask].unsqueeze(0),
              "use_cache": False}
    if varlen_attention(model):
        lengths = mask.sum(-1)
        cu_seq_lens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        inputs |= {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
                   "max_length_q": int(lengths.max()), "max_length_k": int(lengths.max())}
    return inputs, index


def shared_prefix_pays(model: torch.nn.Module, rows: int, length: int, groups: int, shared_length: int) -> bool:
    """Whether ``groups`` shared rows of ``shared_length`` tokens cost fewer FLOPs than ``rows`` padded rows of
    ``length``: per token, 2 FLOPs per weight of a layer (4 d² attention projections, 3 d·ffn MLP); per (query,
    key) pair, 4 d (scores and weighted values, computed for masked pairs too)."""
    text = unwrap_model(model).config.get_text_config()
    d = text.hidden_size
    per_token, per_pair = 2 * (4 * d * d + 3 * d * (getattr(text, "intermediate_size", None) or 4 * d)), 4 * d
    padded = rows * (length * per_token + length**2 * per_pair)
    return groups * (shared_length * per_token + shared_length**2 * per_pair) < padded


def _shared_prefix_rows(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor,
                        group_size: int) -> tuple[dict, torch.Tensor] | None:
    """``forward_rows``'s ``shared_prefix`` layout (see there), or None where it does not pay."""
    n, t = mask.shape
    if n % group_size:
        raise ValueError(f"{n} rows are not groups of {group_size}")
    groups, device = n // group_size, mask.device
    ids, real = input_ids.view(groups, group_size, t), mask.view(groups, group_size, t)
    # the group's common prefix: the longest run of leading tokens every row has, equal to its first row's
    same = (ids == ids[:, :1]) & real & real[:, :1]
    prefix = same.long().cumprod(-1).sum(-1).min(-1).values  # (groups,)
    column = torch.arange(t, device=device)
    # slots of the group's row: the first row whole, then every other row's tokens after the prefix
    own = real & ((column >= prefix[:, None, None]) | (torch.arange(group_size, device=device)[:, None] == 0))
    slot = own.flatten(1).cumsum(-1).view(groups, group_size, t) - 1
    length = int(own.flatten(1).sum(-1).max())
    if not shared_prefix_pays(model, n, t, groups, length):
        return None
    # a token of the prefix (column < prefix) sits in the first row's slot of its column: the column itself
    slot = torch.where(own, slot, column.expand_as(slot))
    index = (slot + torch.arange(groups, device=device)[:, None, None] * length).view(n, t)
    rows = torch.arange(groups, device=device)[:, None, None].expand_as(own)[own]
    # segments: -1 the shared prefix, j the rest of row j, -2 the pads (a segment of their own)
    segment = torch.full((groups, length), -2, device=device)
    row_segment = torch.where(column < prefix[:, None, None], -1, torch.arange(group_size, device=device)[:, None])
    segment[rows, slot[own]] = row_segment[own]
    packed_ids = input_ids.new_zeros(groups, length)
    packed_ids[rows, slot[own]] = ids[own]
    position_ids = torch.zeros(groups, length, dtype=torch.long, device=device)
    position_ids[rows, slot[own]] = column.expand_as(own)[own]
    # query q sees key k <= q of the prefix or of its own segment (pads see the prefix and pads: never an empty row)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    visible = causal & ((segment[:, None, :] == -1) | (segment[:, None, :] == segment[:, :, None]))
    dtype = next(unwrap_peft(model).parameters()).dtype
    additive = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, torch.finfo(dtype).min)
    return {"input_ids": packed_ids, "attention_mask": additive[:, None], "position_ids": position_ids,
            "use_cache": False}, index


# Largest relative difference between the packed and the padded forward that the probe accepts: rounding (fp32
# differences are ~1e-7; 16-bit ones ~1e-2 over many layers) is far below what attention across sequences or
# wrong positions give (order 1).
LAYOUT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
LAYOUT_TOLERANCE_16BIT = 5e-2


@torch.no_grad()
def layout_exact(model: torch.nn.Module, layout: str) -> bool:
    """Whether ``model`` computes the rows of ``layout`` (``forward_rows``) exactly as padded rows (probed once
    per model and layout, logged).

    A group of two sequences with a common prefix, padded and in ``layout``, through the model in eval mode;
    their last hidden states must agree. Fails where the model ignores ``position_ids`` or builds its own mask
    (ALiBi models: BLOOM, Falcon with alibi; remote code), so those fall back to padded batches.
    """
    if layout == "padded":
        return True
    base = unwrap_model(model)
    if layout == "shared_prefix" and not custom_mask_attention(model):
        logger.warning("shared_prefix batches: %s attends with %s%s, which takes no custom 4D mask over every past "
                       "position; using padded batches", type(base).__name__, base.config._attn_implementation,
                       " and a sliding window" if base.config._attn_implementation in CUSTOM_MASK_ATTENTION else "")
        return False
    probed = base.__dict__.setdefault("_align_layout_exact", {})
    if layout in probed:
        return probed[layout]
    net = unwrap_peft(model)
    vocab = base.config.get_text_config().vocab_size
    device = next(net.parameters()).device
    # two sequences sharing their first two tokens: one group for shared_prefix, two sequences for packed
    rows = [[(3 + i) % vocab for i in range(5)], [3 % vocab, 4 % vocab, 11 % vocab, 14 % vocab]]
    input_ids = pad([torch.tensor(r) for r in rows], padding_value=0).to(device)
    attention_mask = pad([torch.ones(len(r), dtype=torch.long) for r in rows], padding_value=0).to(device)
    was_training = net.training
    net.eval()
    try:
        hidden = []
        for each in ("padded", layout):
            inputs, index = forward_rows(net, input_ids, attention_mask, layout=each, group_size=2)
            out = net(**inputs, output_hidden_states=True).hidden_states[-1].float()
            hidden.append(out.flatten(0, 1)[index[attention_mask.bool()]])
        error = ((hidden[0] - hidden[1]).abs().max() / hidden[0].abs().max().clamp(min=1e-6)).item()
        exact = error <= LAYOUT_TOLERANCE.get(base.dtype, LAYOUT_TOLERANCE_16BIT)
    except (TypeError, ValueError, RuntimeError) as err:  # a forward that refuses position_ids or a 4D mask
        error, exact = f"{type(err).__name__}: {err}", False
    finally:
        net.train(was_training)
    if exact:
        logger.info("%s batches: %s computes them exactly (probe: relative difference %s)", layout,
                    type(base).__name__, error)
    else:
        logger.warning("%s batches: %s does not compute them as padded ones (probe: %s); using padded batches",
                       layout, type(base).__name__, error)
    probed[layout] = exact
    return exact
