"""Text generation for ``align generate`` and ``align eval``: greedy, sampling, beam or contrastive search
on any Hugging Face causal LM (LoRA-adapted or not), batched with left padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from align.decoding.contrastive import contrastive_search
from align.hf_utils import encode_prompt, left_pad

Strategy = Literal["greedy", "sample", "beam", "contrastive"]
STRATEGIES: tuple[str, ...] = Strategy.__args__


@dataclass
class GenerationSettings:
    """The settings of ``align generate``; its command-line defaults are these."""

    strategy: Strategy = "contrastive"
    max_new_tokens: int = 64
    batch_size: int = 8
    penalty_alpha: float = 0.6  # contrastive: the papers' usual α with k = 4-5
    top_k: int = 4              # contrastive candidates; sampling top-k when strategy=sample (0 = off)
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 4
    seed: int = 0
    chat_template: bool = True  # render each prompt as a user turn when the tokenizer has a chat template

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        for name in ("max_new_tokens", "batch_size", "num_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range: it must be >= 1")


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, chat_template: bool = True) -> list[int]:
    """Token ids of a plain-text prompt: a user turn of the tokenizer's chat template (the assistant's turn
    opened) when it has one and ``chat_template``, else the text itself."""
    if chat_template and tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    return encode_prompt(tokenizer, prompt)


@torch.no_grad()
def generate(model, tokenizer: PreTrainedTokenizerBase, prompts: list[str], settings: GenerationSettings,
             progress: bool = True) -> list[str]:
    """Completions (text, special tokens removed) for ``prompts``."""
    s = settings
    device = next(model.parameters()).device
    out: list[str] = []
    torch.manual_seed(s.seed)
    for start in tqdm(range(0, len(prompts), s.batch_size), disable=not progress, desc=s.strategy):
        rows = [prompt_ids(tokenizer, p, s.chat_template) for p in prompts[start : start + s.batch_size]]
        input_ids, attention_mask = left_pad(rows, tokenizer.pad_token_id, device)
        common = dict(max_new_tokens=s.max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        if s.strategy == "contrastive":
            ids = contrastive_search(model, input_ids, attention_mask, penalty_alpha=s.penalty_alpha, top_k=s.top_k, **common)
        else:
            kwargs = {"greedy": dict(do_sample=False), "beam": dict(do_sample=False, num_beams=s.num_beams),
                      "sample": dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)}[s.strategy]
            ids = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs, **common)
        out += tokenizer.batch_decode(ids[:, input_ids.shape[1] :], skip_special_tokens=True)
    return out
