"""On-policy sampling behind one interface: Hugging Face ``generate`` or vLLM."""

from align.sampling.base import Completions, Sampler, SamplingParams
from align.sampling.hf import HFSampler

__all__ = ["Completions", "HFSampler", "Sampler", "SamplingParams"]
