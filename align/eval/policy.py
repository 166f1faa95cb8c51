"""Evaluate a LoRA policy against its reference (adapter disabled) under a known reward."""

from __future__ import annotations

import torch
from trl.trainer.utils import use_adapter

from align.data import concat_rows
from align.models import completion_logps
from align.rewards import RewardFunction
from align.sampling import HFSampler, SamplingParams


@torch.no_grad()
def sequence_kl(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int,
                batch_size: int = 64) -> torch.Tensor:
    """Per-sample log π(y|x) − log π_ref(y|x); its mean over policy samples estimates KL(π‖π_ref)."""
    out = []
    for s in range(0, len(completion_ids), batch_size):
        batch = concat_rows(prompt_ids[s : s + batch_size], completion_ids[s : s + batch_size], pad_token_id)
        batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
        policy = completion_logps(model, **batch).sum(-1)
        with use_adapter(model, None):
            reference = completion_logps(model, **batch).sum(-1)
        out.append((policy - reference).cpu())
    return torch.cat(out)


def evaluate_against_reference(model, tokenizer, prompts: list[str], reward: RewardFunction, *,
                               max_new_tokens: int, seed: int, n: int = 1, temperature: float = 1.0) -> dict:
    """Sample from the policy and from the reference on the same prompts and seeds.

    ``win_rate_vs_reference``: P(R(policy sample) > R(reference sample)) on the same prompt, ties ½.
    """
    was_training = model.training
    model.eval()
    sampler = HFSampler(model, tokenizer)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    policy = sampler.sample(prompt_ids, params)
    with use_adapter(model, None):
        reference = sampler.sample(prompt_ids, params)
    rows_prompts = [p for p in prompts for _ in range(n)]
    r_policy = torch.tensor(reward(rows_prompts, policy.texts), dtype=torch.float64)
    r_reference = torch.tensor(reward(rows_prompts, reference.texts), dtype=torch.float64)
    wins = (r_policy > r_reference).double() + 0.5 * (r_policy == r_reference).double()
    kl = sequence_kl(model, [p for p in prompt_ids for _ in range(n)], policy.completion_ids, tokenizer.pad_token_id)
    model.train(was_training)
    return {
        "true_reward_before": r_reference.mean().item(),
        "true_reward_after": r_policy.mean().item(),
        "win_rate_vs_reference": wins.mean().item(),
        "kl_to_reference": kl.mean().item(),
        "eval_samples": len(policy.texts),
    }
