"""Contrastive search (Su et al., NeurIPS 2022, "A Contrastive Framework for Neural Text Generation").

Each step picks, among the top-k tokens V^(k) of the model,

    x_t = argmax_{v ∈ V^(k)} (1 - α)·p(v | x_<t) - α·max_{j<t} cos(h_v, h_{x_j})        (paper Eq. 5; notes B1)

with p the full-vocabulary softmax, h the last-layer hidden state, and the context x_<t including the prompt
(padding excluded). h_v needs a forward pass of every candidate. The k candidates of a row run as k query positions
of that row over its one copy of the key/value cache, under a mask that lets each of them see the context and itself
but not its siblings: the prefix is never re-encoded nor copied k times, and attention reads the cache once per row
rather than once per candidate. The LM head runs only on the chosen candidates. The tokens are those of
transformers 4.x's built-in contrastive search (≤ 4.55, removed from transformers in 4.56) in fp32.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from align.hf_utils import custom_mask_attention


def degeneration_penalty(
    candidate_hidden: torch.Tensor, context_hidden: torch.Tensor, context_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``max_j cos(h_v, h_{x_j})`` of paper Eq. 5 for each candidate, over the unmasked context tokens.

    Args:
        candidate_hidden: ``(B, k, E)`` last-layer hidden states of the k candidates of each row.
        context_hidden: ``(B, T, E)`` last-layer hidden states of the context (prompt and generated tokens).
        context_mask: ``(B, T)``, true (or 1) where the context token counts; padding is 0. Every row needs one.

    Returns:
        ``(B, k)`` penalties in [-1, 1].
    """
    if context_mask is None:
        context_mask = torch.ones(context_hidden.shape[:2], dtype=torch.bool, device=context_hidden.device)
    return _max_cosine(_unit(candidate_hidden), _unit(context_hidden), context_mask.bool())


def _unit(hidden: torch.Tensor) -> torch.Tensor:
    # fp32 so that the cosines of a bf16 model do not saturate near 1; a no-op (bit for bit) on fp32 models.
    hidden = hidden.float()
    return hidden / hidden.norm(dim=-1, keepdim=True)


def _max_cosine(candidates: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
    cosine = torch.bmm(candidates, context.transpose(1, 2))  # (B, k, T)
    # masked_fill rather than adding finfo.min: the states of padding positions may be inf/NaN in some models.
    cosine = cosine.masked_fill(~context_mask[:, None, :], float("-inf"))
    return cosine.amax(dim=-1)


def _check_arguments(input_ids, attention_mask, penalty_alpha, top_k, max_new_tokens):
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, prompt_length >= 1), got {tuple(input_ids.shape)}")
    if not 0.0 <= penalty_alpha <= 1.0:
        raise ValueError(f"penalty_alpha must lie in [0, 1], got {penalty_alpha}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("contrastive_search needs left padding: the last prompt token of every row must be real")


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        raise ValueError("eos_token_id must not be empty")
    return torch.tensor(ids, dtype=torch.long, device=device)


def _accepts(module: nn.Module, argument: str) -> bool:
    # A peft wrapper's forward takes **kwargs and hands them to the model it wraps.
    inner = module.get_base_model() if hasattr(module, "get_base_model") else module
    return argument in inspect.signature(inner.forward).parameters


def _takes_candidates_as_positions(model: nn.Module, cache) -> bool:
    """Whether the k candidates can run as k positions over one cache per row (``_SharedPrefixCandidates``): every
    layer keeps its full past (no sliding window), the attention takes a custom mask, and positions come from
    ``position_ids`` alone. ALiBi models do not qualify: they derive positions from the 2D mask (Bloom, Falcon with
    ``alibi``) or from the key index (MPT), so they would see the k candidates at k different positions."""
    layers = getattr(cache, "layers", None)
    return (
        custom_mask_attention(model)
        and _accepts(model, "position_ids")
        and bool(layers)
        and all(type(layer) is DynamicLayer for layer in layers)
    )


class _Runner:
    """Runs the model on one new token per row over the cache; returns last-layer hidden states and logits.

    When ``lm_head(last hidden state)`` reproduces the model's logits bit for bit (checked on the prompt), the
    candidates go through the decoder alone and the LM head runs only on the k-times fewer chosen rows, without the
    tuple of every layer's hidden states. Models that post-process their logits (e.g. Gemma-2's soft-capping) use the
    full forward pass instead.
    """

    def __init__(self, model: nn.Module, last_hidden: torch.Tensor, last_logits: torch.Tensor):
        """``last_hidden`` (B, 1, E) and ``last_logits`` (B, 1, V): the model's output at the last prompt position."""
        self.model = model
        self.head = model.get_output_embeddings()
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        headless = decoder is not None and self.head is not None and all(m is not self.head for m in decoder.modules())
        # Same input view as the model's own head call, so that equal means bit for bit.
        self.decoder = decoder if headless and torch.equal(self.head(last_hidden).float(), last_logits) else None

    def __call__(self, token_ids, attention_mask, position_ids, cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(N, Q, E)`` hidden states of the ``(N, Q)`` new tokens and their ``(N, Q, V)`` fp32 logits, or None if
        ``logits()`` will compute them."""
        inputs = dict(
            input_ids=token_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        if self.decoder is not None:
            return self.decoder(**inputs).last_hidden_state, None
        out = self.model(**inputs, output_hidden_states=True)
        return out.hidden_states[-1], out.logits.float()

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        return self.head(hidden).float() if logits is None else logits


class _GrowInPlaceLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers allocated once for the final length.

    ``DynamicLayer.update`` re-copies the whole cache with ``torch.cat`` at every step, which on B·k rows took a third
    of the decoding time; here a step writes its one new entry in place.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.key_buffer = keys.new_empty(*keys.shape[:2], capacity, keys.shape[3])
        self.value_buffer = values.new_empty(*values.shape[:2], capacity, values.shape[3])
        self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
        self.update(keys, values)

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        # crop() slices these views, so the next update writes over the cropped entries.
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values


def _prepare_cache(cache, repeats: int, capacity: int) -> list:
    """Repeats each row ``repeats`` times and makes full-attention layers grow in place; returns the layers."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        raise ValueError(
            f"contrastive_search needs a transformers key/value Cache (e.g. DynamicCache), got {type(cache).__name__}"
        )
    for index, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            keys, values = layer.keys.repeat_interleave(repeats, 0), layer.values.repeat_interleave(repeats, 0)
            layers[index] = _GrowInPlaceLayer(keys, values, capacity)
        elif repeats > 1:  # e.g. sliding-window layers, which keep a bounded window anyway
            layer.batch_repeat_interleave(repeats)
    return layers


class _SharedPrefixCandidates:
    """All k candidates of every row in one forward pass, as k query positions of the row over its one cache.

    A step appends the k candidates' keys and values to the row's cache at positions L, ..., L+k-1, all with the
    position id of token L; an additive attention mask lets candidate i see the context and its own entry L+i but not
    its siblings, so each one's states are those it would have alone. Moving the chosen candidate's entry to L and
    dropping the others leaves the cache as if the chosen token alone had been fed. The cache is never copied, and
    attention reads it once per row instead of once per candidate (transformers 4.x repeats the whole cache k times
    and re-selects it at every step).
    """

    def __init__(self, runner, cache, attention_mask, next_position, k, max_new_tokens, dtype):
        self.runner, self.cache, self.k = runner, cache, k
        rows, prompt_length = attention_mask.shape
        capacity = prompt_length + max_new_tokens + k - 1
        self.layers = _prepare_cache(cache, 1, capacity)
        blocked = torch.finfo(dtype).min
        # (B, 1, k, capacity): padding is blocked for good; a generated column opens once its token is kept.
        self.mask = torch.zeros(rows, 1, k, capacity, dtype=dtype, device=attention_mask.device)
        self.mask[..., :prompt_length].masked_fill_((attention_mask == 0)[:, None, None, :], blocked)
        self.siblings = torch.full((k, k), blocked, dtype=dtype, device=attention_mask.device).fill_diagonal_(0)
        self.length = prompt_length
        self.next_position = next_position
        self.row_index = torch.arange(rows, device=attention_mask.device)

    def __call__(self, candidate_ids: torch.Tensor, step: int) -> torch.Tensor:
        mask = self.mask[..., : self.length + self.k]
        mask[..., self.length :] = self.siblings
        positions = (self.next_position + step)[:, None].expand(-1, self.k)
        hidden, self.candidate_logits = self.runner(candidate_ids, mask, positions, self.cache)
        return hidden

    def keep(self, chosen: torch.Tensor, chosen_hidden: torch.Tensor) -> torch.Tensor:
        """Reduces the cache to the chosen candidates and returns their next-token logits."""
        source = self.length + chosen
        for layer in self.layers:
            layer.keys[:, :, self.length] = layer.keys[self.row_index, :, source]
            layer.values[:, :, self.length] = layer.values[self.row_index, :, source]
            layer.crop(-(self.k - 1))
        self.mask[..., self.length] = 0
        self.length += 1
        logits = None if self.candidate_logits is None else self.candidate_logits[self.row_index, chosen]
        return self.runner.logits(chosen_hidden, logits)


class _BatchedCandidates:
    """All k candidates of every row in one forward pass of B·k rows, for caches whose layers cannot take the k
    candidates as extra positions (e.g. sliding-window layers) or attention that takes no custom mask.

    The cache is expanded to k copies of each row once, after the prompt. A step appends the k candidates' keys and
    values at the same position; copying the chosen candidate's entry over its k-1 siblings reduces the cache to the
    chosen token while keeping it expanded for the next step, so the cache is never copied whole (transformers 4.x
    repeats and re-selects the full cache every step).
    """

    def __init__(self, runner, cache, attention_mask, next_position, k, max_new_tokens):
        self.runner, self.cache, self.k = runner, cache, k
        rows, prompt_length = attention_mask.shape
        self.layers = _prepare_cache(cache, k, prompt_length + max_new_tokens)
        self.mask = attention_mask.new_ones(rows * k, prompt_length + max_new_tokens)
        self.mask[:, :prompt_length] = attention_mask.repeat_interleave(k, dim=0)
        self.prompt_length = prompt_length
        self.next_position = next_position.repeat_interleave(k)
        self.row_offset = torch.arange(rows, device=attention_mask.device) * k

    def __call__(self, candidate_ids: torch.Tensor, step: int) -> torch.Tensor:
        rows = candidate_ids.shape[0]
        hidden, logits = self.runner(
            candidate_ids.reshape(-1, 1),
            self.mask[:, : self.prompt_length + step + 1],
            (self.next_position + step)[:, None],
            self.cache,
        )
        self.candidate_logits = None if logits is None else logits[:, -1]
        return hidden.view(rows, self.k, -1)

    def keep(self, chosen: torch.Tensor, chosen_hidden: torch.Tensor) -> torch.Tensor:
        """Reduces the cache to the chosen candidates and returns their next-token logits."""
        source = (self.row_offset + chosen).repeat_interleave(self.k)
        for layer in self.layers:
            layer.keys[:, :, -1] = layer.keys[source, :, -1]
            layer.values[:, :, -1] = layer.values[source, :, -1]
        logits = None if self.candidate_logits is None else self.candidate_logits[self.row_offset + chosen]
        return self.runner.logits(chosen_hidden, logits)


class _SequentialCandidates:
    """``low_memory``: the k candidates one after another over the unexpanded cache (B rows per forward pass).

    Each candidate's cache entry is kept aside and cropped from the cache; the chosen ones are appended afterwards,
    which saves the extra forward pass transformers 4.x spends to rebuild them.
    """

    def __init__(self, runner, cache, attention_mask, next_position, k, max_new_tokens):
        self.runner, self.cache, self.k = runner, cache, k
        rows, prompt_length = attention_mask.shape
        self.layers = _prepare_cache(cache, 1, prompt_length + max_new_tokens)
        cache.activate_past_recording()  # sliding-window layers may only be cropped back if they keep their past
        self.mask = attention_mask.new_ones(rows, prompt_length + max_new_tokens)
        self.mask[:, :prompt_length] = attention_mask
        self.prompt_length = prompt_length
        self.next_position = next_position
        self.row_index = torch.arange(rows, device=attention_mask.device)

    def __call__(self, candidate_ids: torch.Tensor, step: int) -> torch.Tensor:
        hidden, logits, self.entries = [], [], []
        for i in range(self.k):
            h, lg = self.runner(
                candidate_ids[:, i : i + 1],
                self.mask[:, : self.prompt_length + step + 1],
                (self.next_position + step)[:, None],
                self.cache,
            )
            hidden.append(h[:, -1])
            logits.append(None if lg is None else lg[:, -1])
            # Cloned: the next candidate overwrites this slot of the cache in place.
            self.entries.append([(lay.keys[:, :, -1:].clone(), lay.values[:, :, -1:].clone()) for lay in self.layers])
            self.cache.crop(-1)
        self.candidate_logits = None if logits[0] is None else torch.stack(logits, dim=1)
        return torch.stack(hidden, dim=1)

    def keep(self, chosen: torch.Tensor, chosen_hidden: torch.Tensor) -> torch.Tensor:
        for layer_idx in range(len(self.layers)):
            keys = torch.stack([entry[layer_idx][0] for entry in self.entries], dim=1)  # (B, k, H, 1, D)
            values = torch.stack([entry[layer_idx][1] for entry in self.entries], dim=1)
            self.cache.update(keys[self.row_index, chosen], values[self.row_index, chosen], layer_idx)
        logits = None if self.candidate_logits is None else self.candidate_logits[self.row_index, chosen]
        return self.runner.logits(chosen_hidden, logits)


# no_grad rather than inference_mode: the returned ids may feed a training step, which inference tensors cannot.
@torch.no_grad()
def contrastive_search(
    model: nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    penalty_alpha: float,
    top_k: int,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    low_memory: bool = False,
) -> torch.LongTensor:
    """Decodes with contrastive search (paper Eq. 5) and returns prompt + generated ids, as ``model.generate`` does.

    Args:
        model: a Hugging Face causal LM with a key/value cache, or a peft wrapper of one (LoRA-style adapters).
        input_ids: ``(B, S)`` prompts, left-padded.
        attention_mask: ``(B, S)``, 0 on padding; padding is left out of the degeneration penalty.
        penalty_alpha: α ∈ [0, 1]. α = 0 is greedy search.
        top_k: k ≥ 1 candidates per step. k = 1 is greedy search.
        max_new_tokens: number of steps at most; decoding stops earlier once every row has emitted an EOS.
        eos_token_id: one id or several; a row that emits one is finished and then emits ``pad_token_id``.
        pad_token_id: defaults to the (first) EOS id.
        low_memory: score the k candidates one after another, B rows per forward pass (same tokens, slower): about
            1/k of the activation memory, and of the cache memory on models whose cache otherwise holds k copies
            of each row (sliding-window layers).

    Returns:
        ``(B, S + n)`` ids, n ≤ max_new_tokens the number of steps run.
    """
    _check_arguments(input_ids, attention_mask, penalty_alpha, top_k, max_new_tokens)
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        raise ValueError("contrastive_search does not support peft prompt-learning adapters (they rewrite the cache)")
    device = input_ids.device
    eos = _eos_tensor(eos_token_id, device)
    pad = int(eos[0]) if pad_token_id is None and eos is not None else pad_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.long()
    # α = 0 reduces the score to p, whose argmax over the top k is the top 1: greedy search, as in transformers.
    k = 1 if penalty_alpha == 0 else top_k
    batch, prompt_length = input_ids.shape

    # Positions count real tokens only, so a left-padded row sees the positions it would see unpadded.
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        output_hidden_states=True,
        **extra,
    )
    prompt_hidden = out.hidden_states[-1]
    logits = out.logits[:, -1].float()
    runner = _Runner(model, prompt_hidden[:, -1:], out.logits[:, -1:].float())

    # Unit-norm context states in a buffer of the final length; the mask hides padding and not-yet-written slots.
    context = torch.zeros(batch, prompt_length + max_new_tokens, prompt_hidden.shape[-1], device=device)
    context[:, :prompt_length] = _unit(prompt_hidden)
    context_mask = torch.zeros(context.shape[:2], dtype=torch.bool, device=device)
    context_mask[:, :prompt_length] = attention_mask.bool()

    cache, next_position = out.past_key_values, attention_mask.sum(-1)
    if low_memory and k > 1:
        candidates = _SequentialCandidates(runner, cache, attention_mask, next_position, k, max_new_tokens)
    elif _takes_candidates_as_positions(model, cache):
        candidates = _SharedPrefixCandidates(
            runner, cache, attention_mask, next_position, k, max_new_tokens, prompt_hidden.dtype
        )
    else:
        candidates = _BatchedCandidates(runner, cache, attention_mask, next_position, k, max_new_tokens)
    del out  # the prompt's logits and per-layer states are not needed any more

    rows = torch.arange(batch, device=device)
    generated = input_ids.new_empty(batch, max_new_tokens)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if k == 1:
            candidate_ids = logits.argmax(dim=-1, keepdim=True)
        else:
            top_probs, candidate_ids = logits.softmax(dim=-1).topk(k, dim=-1)
        hidden = candidates(candidate_ids, step)  # (B, k, E)
        if k == 1:
            chosen = torch.zeros(batch, dtype=torch.long, device=device)
        else:
            length = prompt_length + step
            penalty = _max_cosine(_unit(hidden), context[:, :length], context_mask[:, :length])
            chosen = ((1.0 - penalty_alpha) * top_probs - penalty_alpha * penalty).argmax(dim=-1)
        chosen_hidden = hidden[rows, chosen]
        context[:, prompt_length + step] = _unit(chosen_hidden)
        context_mask[:, prompt_length + step] = True
        logits = candidates.keep(chosen, chosen_hidden)

        tokens = candidate_ids[rows, chosen]
        if eos is None:
            generated[:, step] = tokens
            continue
        generated[:, step] = torch.where(unfinished, tokens, pad)
        unfinished &= ~torch.isin(tokens, eos)
        if not bool(unfinished.any()):
            return torch.cat([input_ids, generated[:, : step + 1]], dim=1)
    return torch.cat([input_ids, generated], dim=1)
