"""Decoding: contrastive search (which ``generate`` of transformers 5 no longer ships) and the generation
behind ``align generate``."""

from align.decoding.contrastive import contrastive_search, degeneration_penalty
from align.decoding.generate import STRATEGIES, GenerationSettings, generate, prompt_ids

__all__ = ["STRATEGIES", "GenerationSettings", "contrastive_search", "degeneration_penalty", "generate", "prompt_ids"]
