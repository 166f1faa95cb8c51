"""align: train LLMs from preferences and rewards with contrastive objectives (CPL, CoPG, contrastive
reward modelling), with contrastive-search decoding. See README.md."""

__version__ = "0.1.0"
