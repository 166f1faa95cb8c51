"""One on-policy rollout: sample → score → filter → order → batch."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from align.data import concat_rows
from align.rewards import RewardFunction, score
from align.sampling import Sampler, SamplingParams


def rollout(prompt_ids: list[list[int]], sampler: Sampler, reward: RewardFunction, params: SamplingParams,
            tokenizer: PreTrainedTokenizerBase, *, pairs: bool = False, **score_options) -> tuple[dict | None, dict]:
    """``params.n`` completions per prompt from the current policy, scored by ``reward``, as a training batch
    (group-major rows, ``scores`` (G, K)) and its metrics; the batch is None when no group is left.

    Groups with a failed (NaN) reward are dropped. With ``pairs`` each group becomes (best, worst) for a
    pair loss, and a group whose best and worst rewards are equal carries no preference and is dropped.
    ``score_options`` go to ``align.rewards.score`` (on_error, retries, timeout).
    """
    k = params.n
    samples = sampler.sample(prompt_ids, params)                                          # sample
    # Rewards see the prompt as the policy saw it (chat markup included), and whether each completion
    # ended by itself (EOS) or was cut at max_new_tokens.
    prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=False)
    finished = [bool(ids) and ids[-1] == tokenizer.eos_token_id for ids in samples.completion_ids]
    rewards = torch.tensor(score(reward, [p for p in prompts for _ in range(k)], samples.texts,  # score
                                 finished=finished, **score_options), dtype=torch.float32).view(-1, k)
    keep = torch.isfinite(rewards).all(dim=1)                                              # filter
    metrics = {"completion_length": sum(map(len, samples.completion_ids)) / len(samples.completion_ids)}
    if keep.any():
        metrics |= {"reward/mean": rewards[keep].mean().item(), "reward/std": rewards[keep].std(unbiased=False).item()}
    groups = [samples.completion_ids[g * k : (g + 1) * k] for g in range(len(prompt_ids))]
    if pairs:                                                                              # order
        best, worst = rewards.argmax(dim=1), rewards.argmin(dim=1)
        keep &= rewards.max(dim=1).values > rewards.min(dim=1).values
        groups = [[c[b], c[w]] for c, b, w in zip(groups, best.tolist(), worst.tolist())]
        rewards = torch.stack([rewards.max(dim=1).values, rewards.min(dim=1).values], dim=1)
    metrics["skipped_groups"] = int((~keep).sum())
    kept = keep.nonzero().flatten().tolist()
    if not kept:
        return None, metrics
    width = len(groups[0])
    batch = concat_rows([prompt_ids[g] for g in kept for _ in range(width)],                # batch
                        [c for g in kept for c in groups[g]], tokenizer.pad_token_id)
    batch.update(group_size=width, scores=rewards[kept])
    return batch, metrics
