"""Policies (HF causal LMs with LoRA adapters) and the shared log-prob computation."""

from align.models.logprobs import completion_logps, reference_completion_logps, sequence_logps
from align.models.policy import (
    ModelLoadError, base_weights_modified, check_vocab, load_causal_lm, load_policy, load_tokenizer, wrap_lora,
)

__all__ = [
    "ModelLoadError", "base_weights_modified", "check_vocab", "completion_logps", "load_causal_lm", "load_policy",
    "load_tokenizer", "reference_completion_logps", "sequence_logps", "wrap_lora",
]
