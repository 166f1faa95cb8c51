"""Built-in tasks with a known true reward: the offline demo and verifiable constraints. Pure text functions."""

from __future__ import annotations

from align.rewards.constraints import constraint_reward, shaped_constraint_reward

# The demo language's vocabulary: a reward word set, a penalty word set and neutral words.
GOOD_WORDS = ["sun", "gold", "joy", "calm", "kind", "bright", "warm", "free"]
BAD_WORDS = ["rain", "mud", "fear", "cold", "grim", "dull", "lost", "rust"]
NEUTRAL_WORDS = [
    "the", "a", "cat", "dog", "tree", "road", "house", "river", "hill", "bird", "boat", "town",
    "walks", "sees", "finds", "makes", "runs", "sits", "and", "with", "near", "over", "under", "by",
    "one", "two", "old", "new", "big", "small", "red", "blue",
]


def sentiment_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """(#good words − #bad words) / #words of each completion, in [−1, 1]; 0 for an empty one."""
    good, bad = set(GOOD_WORDS), set(BAD_WORDS)
    rewards = []
    for text in completions:
        words = text.split()
        rewards.append((sum(w in good for w in words) - sum(w in bad for w in words)) / max(len(words), 1))
    return rewards


TASK_REWARDS = {"demo": sentiment_reward, "constraints": constraint_reward,
                "constraints_shaped": shaped_constraint_reward}
