"""Portable sampling backend: Hugging Face ``generate`` on the policy itself (always in sync)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase
from trl.trainer.utils import pad

from align.sampling.base import Completions, SamplingParams


class HFSampler:
    """Batched sampling with the KV cache and left padding; each row stops at its own EOS.

    Sampling runs in eval mode (no dropout) under a forked RNG seeded from ``params.seed``, so the
    training RNG stream is untouched and the same seed gives the same completions.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def sync_weights(self) -> None:
        """Nothing to do: ``generate`` runs on the trained model itself."""

    push_weights = sync_weights

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], params: SamplingParams) -> Completions:
        rows = [p for p in prompt_ids for _ in range(params.n)]
        eos = self.tokenizer.eos_token_id
        completion_ids: list[list[int]] = []
        logprobs: list[list[float]] = []
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        try:
            with torch.random.fork_rng(devices=[]):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                for start in range(0, len(rows), self.batch_size):
                    chunk = [torch.tensor(r) for r in rows[start : start + self.batch_size]]
                    input_ids = pad(chunk, padding_value=self.tokenizer.pad_token_id, padding_side="left").to(device)
                    attention_mask = pad([torch.ones_like(r) for r in chunk], padding_value=0, padding_side="left").to(device)
                    out = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        do_sample=True,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        top_k=params.top_k,
                        max_new_tokens=params.max_new_tokens,
                        eos_token_id=eos,
                        pad_token_id=self.tokenizer.pad_token_id,
                        return_dict_in_generate=True,
                        output_scores=True,
                    )
                    new_tokens = out.sequences[:, input_ids.shape[1] :]
                    # processed scores: logits after temperature / top-k / top-p, as vLLM's processed_logprobs
                    step_logps = torch.stack(out.scores, dim=1).float().log_softmax(-1)
                    token_logps = step_logps.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
                    for ids, lps in zip(new_tokens.tolist(), token_logps.tolist()):
                        length = ids.index(eos) + 1 if eos in ids else len(ids)
                        completion_ids.append(ids[:length])
                        logprobs.append(lps[:length])
        finally:
            self.model.train(was_training)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Completions(prompt_ids=list(prompt_ids), completion_ids=completion_ids, logprobs=logprobs,
                           texts=texts, n=params.n)
