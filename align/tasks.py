"""Built-in tasks with a known reward: ``dataset: builtin:<name>`` trains on their prompts (online) or on
preference pairs sampled from the base policy and labelled by the reward (offline), and the end of a run
evaluates the trained model on held-out prompts under the same reward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from align import demo
from align.errors import ConfigError
from align.rewards import RewardFunction
from align.rewards.tasks import sentiment_reward

PREFIX = "builtin:"


@dataclass(frozen=True)
class Task:
    """``prompts(split, n, seed)`` gives ``n`` prompts (text or chat messages) of the ``train`` or ``heldout``
    split; ``preference_pairs(model, tokenizer, prompts, seed=, max_new_tokens=)`` labels base-policy
    samples; ``reward`` is the task's true reward; ``base_model`` the model the task comes with, if any."""

    name: str
    reward: RewardFunction
    prompts: Callable[[str, int, int], list]
    preference_pairs: Callable[..., list[dict]]
    base_model: Callable[[], str] | None = None


def _demo_prompts(split: str, n: int, seed: int) -> list[str]:
    # held-out prompts come from another stream of the same language
    return demo.MarkovLanguage(demo.DemoSpec()).prompts(n, seed=seed if split == "train" else seed + 10_000)


TASKS = {
    "demo": Task("demo", sentiment_reward, _demo_prompts, demo.preference_pairs,
                 base_model=lambda: str(demo.base_model_path())),
}


def is_task(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX) and name.removeprefix(PREFIX) in TASKS


def get_task(name: str) -> Task:
    """The task ``builtin:<name>``."""
    key = name.removeprefix(PREFIX)
    if not name.startswith(PREFIX) or key not in TASKS:
        raise ConfigError(f"unknown built-in task {name!r}; known: {', '.join(PREFIX + t for t in TASKS)}")
    return TASKS[key]
