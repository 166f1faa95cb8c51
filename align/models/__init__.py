"""Policies (HF causal LMs with LoRA adapters), the shared log-prob computation, and model specs that
name GGUF files or built-in models (``resolve_model``)."""

from align.models.logprobs import completion_logps, reference_completion_logps, sequence_logps
from align.models.policy import (
    ModelLoadError,
    base_weights_modified,
    check_vocab,
    disable_dropout,
    load_causal_lm,
    load_generator,
    load_policy,
    load_tokenizer,
    wrap_lora,
)
from align.models.reference import REFERENCE_FILE, freeze_reference, reference_policy, reference_snapshot
from align.models.resolve import BUILTIN_MODELS, resolve_model

__all__ = [
    "REFERENCE_FILE", "freeze_reference", "reference_policy", "reference_snapshot", "disable_dropout",
    "BUILTIN_MODELS", "resolve_model", "ModelLoadError", "base_weights_modified", "check_vocab", "completion_logps", "load_causal_lm", "load_generator", "load_policy", "load_tokenizer",
    "reference_completion_logps", "sequence_logps", "wrap_lora",
]
