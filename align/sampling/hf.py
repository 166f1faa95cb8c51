"""Portable sampling backend: Hugging Face ``generate`` on the policy itself (always in sync)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from align.hf_utils import left_pad, unwrap_model
from align.sampling.base import Completions, SamplingParams


class SampledLogProbs(LogitsProcessor):
    """Records the log-prob of each sampled token under the sampling distribution (after temperature,
    top-k, top-p: ``sampling_processors`` puts it after them). The token sampled from step t's scores appears
    in ``input_ids`` at step t + 1, so only one step's (batch, vocabulary) log-probs are ever kept, not the
    (batch, steps, vocabulary) scores ``output_scores`` would hold."""

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.collect(input_ids[:, -1])
        self.previous = scores.float().log_softmax(-1)
        return scores

    def collect(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.logps.append(self.previous.gather(-1, tokens[:, None])[:, 0])
            self.previous = None


def sampling_processors(params: SamplingParams, recorder: SampledLogProbs) -> LogitsProcessorList:
    """Temperature, top-k and top-p (in ``generate``'s own order), then ``recorder``. ``generate`` runs a
    caller's processors before its own warpers, so the warpers are given here and ``generate``'s are left
    off (temperature 1, no top-k/top-p)."""
    processors = [TemperatureLogitsWarper(params.temperature)] if params.temperature not in (0.0, 1.0) else []
    if params.top_k:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    return LogitsProcessorList([*processors, recorder])


@contextmanager
def plain_generation_config(model: torch.nn.Module, eos_token_id: int, pad_token_id: int):
    """Sampling from π itself: the checkpoint's ``generation_config.json`` extras (repetition penalty,
    no-repeat n-grams, top-k, ...) would otherwise fill every setting the caller leaves unset."""
    inner = unwrap_model(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id, eos_token_id=eos_token_id,
                                               pad_token_id=pad_token_id)
    try:
        yield
    finally:
        inner.generation_config = saved


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
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        completion_ids: list[list[int]] = []
        logprobs: list[list[float]] = []
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        try:
            with torch.random.fork_rng(devices=[]), plain_generation_config(self.model, eos, pad):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                for start in range(0, len(rows), self.batch_size):
                    input_ids, attention_mask = left_pad(rows[start : start + self.batch_size], pad, device)
                    recorder = SampledLogProbs()
                    out = self.model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, do_sample=params.temperature > 0, temperature=1.0,
                        top_k=0, top_p=1.0, max_new_tokens=params.max_new_tokens, eos_token_id=eos,
                        pad_token_id=pad, logits_processor=sampling_processors(params, recorder),
                    )
                    new_tokens = out[:, input_ids.shape[1] :]
                    recorder.collect(new_tokens[:, -1])
                    token_logps = torch.stack(recorder.logps, dim=1)
                    for ids, lps in zip(new_tokens.tolist(), token_logps.tolist()):
                        length = ids.index(eos) + 1 if eos in ids else len(ids)
                        completion_ids.append(ids[:length])
                        logprobs.append(lps[:length])
        finally:
            self.model.train(was_training)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Completions(prompt_ids=list(prompt_ids), completion_ids=completion_ids, logprobs=logprobs,
                           texts=texts, n=params.n)
