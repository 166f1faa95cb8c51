"""Built-in tasks with a known reward: ``dataset: builtin:<name>`` trains on their prompts (online) or on
preference pairs sampled from the base policy and labelled by the reward (offline), and the end of a run
evaluates the trained model on held-out prompts under the same reward.

* ``builtin:demo``: the offline demo's synthetic language and its sentiment reward (``align.demo``).
* ``builtin:constraints``: instructions with verifiable constraints on real text (``align.rewards.constraints``);
  the reward is the strict verifier, the evaluation reports success before/after (sampled and greedy) and per kind.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from align import demo
from align.data import prompt_token_ids
from align.errors import ConfigError
from align.eval.policy import evaluate_against_reference
from align.rewards import RewardFunction
from align.rewards.constraints import constraint_prompts, constraint_reward, shaped_constraint_reward, success_by_kind
from align.rewards.tasks import sentiment_reward
from align.sampling import HFSampler, SamplingParams

PREFIX = "builtin:"


@dataclass(frozen=True)
class Task:
    """``prompts(split, n, seed)`` gives ``n`` prompts (text or chat messages) of the ``train`` or ``heldout``
    split; ``preference_pairs(model, tokenizer, prompts, seed=, max_new_tokens=)`` labels base-policy
    samples; ``reward`` is the task's true reward; ``evaluate(model, tokenizer, prompts, max_new_tokens=,
    seed=)`` the held-out figures of a policy against its reference; ``base_model`` the model the task
    comes with, if any."""

    name: str
    reward: RewardFunction
    prompts: Callable[[str, int, int], list]
    preference_pairs: Callable[..., list[dict]]
    evaluate: Callable[..., dict]
    base_model: Callable[[], str] | None = None


# --- builtin:demo ------------------------------------------------------------------------------------------
def _demo_prompts(split: str, n: int, seed: int) -> list[str]:
    # held-out prompts come from another stream of the same language
    return demo.MarkovLanguage(demo.DemoSpec()).prompts(n, seed=seed if split == "train" else seed + 10_000)


def _demo_evaluate(model, tokenizer, prompts: list, *, max_new_tokens: int, seed: int) -> dict:
    return evaluate_against_reference(model, tokenizer, prompts, sentiment_reward, max_new_tokens=max_new_tokens,
                                      seed=seed, n=4)


# --- builtin:constraints -------------------------------------------------------------------------------------
SAMPLES_PER_PROMPT = 4  # offline pairs: samples of the base policy per prompt
EVAL_SAMPLES = 2  # held-out evaluation: samples per prompt at temperature 1 (and one greedy completion)


def _constraint_prompts(split: str, n: int, seed: int) -> list[list[dict]]:
    return [row["prompt"] for row in constraint_prompts(split, n, seed)]


def constraint_pairs(model, tokenizer, prompts: list, *, seed: int, max_new_tokens: int) -> list[dict]:
    """``SAMPLES_PER_PROMPT`` base-policy samples per prompt (temperature 1), ranked by the strict verifier and
    then the shaped reward; the best is chosen, the worst rejected, and a prompt whose samples all score the
    same gives no pair. Rows carry the shaped rewards (``chosen_reward``/``rejected_reward``) for CoPG."""
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    k = SAMPLES_PER_PROMPT
    samples = HFSampler(model, tokenizer).sample(prompt_ids, SamplingParams(n=k, max_new_tokens=max_new_tokens, seed=seed))
    seen = [p for p in tokenizer.batch_decode(prompt_ids, skip_special_tokens=False) for _ in range(k)]
    finished = [bool(ids) and ids[-1] == tokenizer.eos_token_id for ids in samples.completion_ids]
    strict = constraint_reward(seen, samples.texts, finished)
    shaped = shaped_constraint_reward(seen, samples.texts, finished)
    rng, rows = random.Random(seed), []
    for g, prompt in enumerate(prompts):
        group = [(strict[i], shaped[i], rng.random(), samples.texts[i].strip()) for i in range(g * k, (g + 1) * k)]
        best, worst = max(group), min(group)
        if best[:2] == worst[:2] or not best[3] or not worst[3] or best[3] == worst[3]:
            continue
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": best[3]}],
                     "rejected": [{"role": "assistant", "content": worst[3]}],
                     "chosen_reward": best[1], "rejected_reward": worst[1]})
    return rows


def _constraints_evaluate(model, tokenizer, prompts: list, *, max_new_tokens: int, seed: int) -> dict:
    """Strict success of the policy and its reference on held-out prompts, sampled at temperature 1 and greedy,
    overall and per constraint kind; win rate and KL from the sampled completions."""
    out = {}
    for mode, temperature, n in (("", 1.0, EVAL_SAMPLES), ("_greedy", 0.0, 1)):
        figures = evaluate_against_reference(model, tokenizer, prompts, constraint_reward, max_new_tokens=max_new_tokens,
                                             seed=seed, n=n, temperature=temperature, breakdown=success_by_kind)
        out[f"constraint_success{mode}_before"] = figures["true_reward_before"]
        out[f"constraint_success{mode}_after"] = figures["true_reward_after"]
        before, after = figures["breakdown_before"], figures["breakdown_after"]
        out[f"constraint_success{mode}_by_kind"] = {k: {"before": before[k], "after": after[k]} for k in before if k != "all"}
        if not mode:
            out |= {key: figures[key] for key in ("win_rate_vs_reference", "kl_to_reference", "eval_samples")}
    return out


TASKS = {
    "demo": Task("demo", sentiment_reward, _demo_prompts, demo.preference_pairs, _demo_evaluate,
                 base_model=lambda: str(demo.base_model_path())),
    "constraints": Task("constraints", constraint_reward, _constraint_prompts, constraint_pairs, _constraints_evaluate),
}


def is_task(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX) and name.removeprefix(PREFIX) in TASKS


def get_task(name: str) -> Task:
    """The task ``builtin:<name>``."""
    key = name.removeprefix(PREFIX)
    if not name.startswith(PREFIX) or key not in TASKS:
        raise ConfigError(f"unknown built-in task {name!r}; known: {', '.join(PREFIX + t for t in TASKS)}")
    return TASKS[key]
