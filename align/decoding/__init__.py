"""Decoding algorithms that ``model.generate`` of transformers 5 no longer ships."""

from align.decoding.contrastive import contrastive_search, degeneration_penalty

__all__ = ["contrastive_search", "degeneration_penalty"]
