"""On-policy sampling behind one interface: Hugging Face ``generate`` or vLLM."""

from align.sampling.base import Completions, Sampler, SamplingParams, derive_seed
from align.sampling.hf import HFSampler
from align.sampling.vllm import VLLMSampler  # importing it does not import vLLM

__all__ = ["Completions", "HFSampler", "Sampler", "SamplingParams", "VLLMSampler", "derive_seed"]
