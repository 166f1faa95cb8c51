"""Policies (HF causal LMs with LoRA adapters), the shared log-prob computation, and model specs that
name GGUF files or built-in models (``resolve_model``)."""

from align.models.logprobs import completion_logps, reference_completion_logps, sequence_logps
from align.models.policy import check_vocab, load_causal_lm, load_policy, load_tokenizer, wrap_lora
from align.models.resolve import BUILTIN_MODELS, ModelLoadError, resolve_model

__all__ = [
    "BUILTIN_MODELS", "ModelLoadError", "check_vocab", "completion_logps", "load_causal_lm", "load_policy",
    "load_tokenizer", "reference_completion_logps", "resolve_model", "sequence_logps", "wrap_lora",
]
