"""Evaluate a LoRA policy against its reference (adapter disabled) under a known reward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from align.data import concat_rows, prompt_token_ids
from align.models import completion_logps, reference_completion_logps, reference_policy
from align.rewards import RewardFunction, score
from align.sampling import HFSampler, Sampler, SamplingParams


@torch.no_grad()
def sequence_kl(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int,
                batch_size: int = 64) -> torch.Tensor:
    """Per-sample log π(y|x) − log π_ref(y|x); its mean over policy samples estimates KL(π‖π_ref)."""
    out = []
    for s in range(0, len(completion_ids), batch_size):
        batch = concat_rows(prompt_ids[s : s + batch_size], completion_ids[s : s + batch_size], pad_token_id)
        batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
        policy = completion_logps(model, **batch).sum(-1)
        reference = reference_completion_logps(model, **batch).sum(-1)
        out.append((policy - reference).cpu())
    return torch.cat(out)


@dataclass
class Scored:
    """Samples of every prompt (prompt-major), the prompts as the policy saw them, and their rewards."""

    prompts: list[str]
    texts: list[str]
    completion_ids: list[list[int]]
    finished: list[bool]
    rewards: torch.Tensor


def sample_scored(sampler: Sampler, tokenizer, prompt_ids: list[list[int]], reward: RewardFunction,
                  params: SamplingParams, **score_options) -> Scored:
    """``params.n`` samples of every prompt from ``sampler``, scored by ``reward`` as the policy saw the prompt
    (``score_options`` go to ``align.rewards.score``)."""
    samples = sampler.sample(prompt_ids, params)
    prompts = [p for p in tokenizer.batch_decode(prompt_ids, skip_special_tokens=False) for _ in range(params.n)]
    finished = [bool(ids) and ids[-1] == tokenizer.eos_token_id for ids in samples.completion_ids]
    rewards = torch.tensor(score(reward, prompts, samples.texts, finished=finished, **score_options), dtype=torch.float64)
    return Scored(prompts, samples.texts, samples.completion_ids, finished, rewards)


def win_rate(policy_rewards: torch.Tensor, reference_rewards: torch.Tensor) -> float:
    """P(R(policy sample) > R(reference sample)) over paired samples (same prompt and seed), ties ½; pairs with
    a failed (NaN) reward are left out (NaN if none is left)."""
    ok = torch.isfinite(policy_rewards) & torch.isfinite(reference_rewards)
    p, r = policy_rewards[ok].double(), reference_rewards[ok].double()
    return ((p > r).double() + 0.5 * (p == r).double()).mean().item()


def evaluate_against_reference(model, tokenizer, prompts: list, reward: RewardFunction, *, max_new_tokens: int,
                               seed: int, n: int = 1, temperature: float = 1.0,
                               breakdown: Callable[[list[str], list[str], list[bool]], dict] | None = None) -> dict:
    """Sample from the policy and from the reference on the same prompts (text or chat messages) and seeds;
    ``temperature=0`` decodes greedily.

    ``win_rate_vs_reference``: P(R(policy sample) > R(reference sample)) on the same prompt, ties ½;
    ``kl_to_reference``: the mean of log π − log π_ref over the policy's samples (an estimate of
    KL(π‖π_ref) at temperature 1). ``breakdown(prompts, completions, finished)``, e.g. success per
    constraint kind, is reported for both as ``breakdown_before`` / ``breakdown_after``.
    """
    was_training = model.training
    model.eval()
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    sampler = HFSampler(model, tokenizer)
    policy = sample_scored(sampler, tokenizer, prompt_ids, reward, params)
    with reference_policy(model):
        reference = sample_scored(sampler, tokenizer, prompt_ids, reward, params)
    kl = sequence_kl(model, [p for p in prompt_ids for _ in range(n)], policy.completion_ids, tokenizer.pad_token_id)
    model.train(was_training)
    out = {
        "true_reward_before": reference.rewards.mean().item(),
        "true_reward_after": policy.rewards.mean().item(),
        "win_rate_vs_reference": win_rate(policy.rewards, reference.rewards),
        "kl_to_reference": kl.mean().item(),
        "eval_samples": len(policy.texts),
    }
    if breakdown is not None:
        out["breakdown_before"] = breakdown(reference.prompts, reference.texts, reference.finished)
        out["breakdown_after"] = breakdown(policy.prompts, policy.texts, policy.finished)
    return out
