"""Rewards: built-in task rewards, ``module:function`` Python rewards and reward models."""

from __future__ import annotations

from align.rewards.base import RewardError, RewardFunction, import_function, score
from align.rewards.tasks import TASK_REWARDS


def load_reward(spec: str) -> RewardFunction:
    """``builtin:<task>`` (``builtin:demo``; ``builtin:constraints`` and ``builtin:constraints_shaped``, see
    ``align.rewards.constraints``), ``rm:<reward model dir>[?normalize=true&...]``,
    ``sandbox:module:function`` (``function(prompt, completion)`` returns a ``CodeTask``: a program and
    (input, expected output) cases, judged outside the sandbox; see ``align.rewards.sandbox``) or
    ``module:function``."""
    if spec.startswith("rm:"):
        from align.rewards.model import RewardModelReward  # loads transformers/peft only when used

        return RewardModelReward.from_spec(spec.removeprefix("rm:"))
    if spec.startswith("sandbox:"):
        from align.rewards.sandbox import SandboxReward

        return SandboxReward(import_function(spec.removeprefix("sandbox:")))
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in TASK_REWARDS:
            raise RewardError(f"unknown built-in reward {name!r}; known: {sorted(TASK_REWARDS)}")
        return TASK_REWARDS[name]
    return import_function(spec)


__all__ = ["RewardError", "RewardFunction", "TASK_REWARDS", "import_function", "load_reward", "score"]
