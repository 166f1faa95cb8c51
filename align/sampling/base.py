"""The sampling interface every on-policy trainer uses, whatever the backend (HF generate, vLLM)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a hash of ``parts``. Distinct tuples (step, micro-batch, rank, prompt, ...) give
    unrelated seeds, where sums such as ``base + rank + prompt * n`` collide across ranks and steps."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 = greedy (as vLLM)
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")


@dataclass
class Completions:
    """``n`` completions for each of ``P`` prompts, flattened prompt-major: row ``p * n + j``.

    ``completion_ids[r]`` ends with EOS when the model stopped by itself (EOS included, no padding);
    ``logprobs[r]`` holds one log-prob per completion token under the *sampling* distribution
    (after temperature/top-k/top-p), as vLLM's ``processed_logprobs`` does.
    """

    prompt_ids: list[list[int]]  # P prompts
    completion_ids: list[list[int]]  # P * n completions
    logprobs: list[list[float]]  # P * n, same lengths as completion_ids
    texts: list[str] = field(default_factory=list)  # decoded completions, P * n
    n: int = 1

    def grouped(self) -> list[list[int]]:
        """Indices of the completions of each prompt."""
        return [list(range(p * self.n, (p + 1) * self.n)) for p in range(len(self.prompt_ids))]


class Sampler(Protocol):
    """A sampling backend that follows the trained policy.

    ``sync_weights`` is called after every optimizer step (a backend may push only every N calls);
    ``push_weights`` pushes the current weights now (at the start of training or after a resume)."""

    def sample(self, prompt_ids: list[list[int]], params: SamplingParams) -> Completions: ...

    def sync_weights(self) -> None: ...

    def push_weights(self) -> None: ...
