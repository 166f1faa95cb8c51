"""Evaluation metrics."""

from align.eval.decoding_metrics import diversity, isotropy, rep_n

__all__ = ["diversity", "isotropy", "rep_n"]
