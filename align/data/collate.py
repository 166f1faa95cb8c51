"""Batch tokenized groups (one prompt, K completions) into one concatenated forward batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices
from trl.trainer.utils import pad


def concat_rows(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int) -> dict:
    """Right-padded ``prompt + completion`` rows with attention and completion masks (row r uses
    ``prompt_ids[r]``)."""
    seqs = [torch.tensor(p + c, dtype=torch.long) for p, c in zip(prompt_ids, completion_ids)]
    comp = [torch.tensor([0] * len(p) + [1] * len(c), dtype=torch.long) for p, c in zip(prompt_ids, completion_ids)]
    return {
        "input_ids": pad(seqs, padding_value=pad_token_id),
        "attention_mask": pad([torch.ones_like(s) for s in seqs], padding_value=0),
        "completion_mask": pad(comp, padding_value=0),
    }


@dataclass
class GroupCollator:
    """Rows are group-major: completion j of prompt b is row ``b * K + j`` (for pairs: chosen, rejected).

    Returns the forward batch plus ``scores`` (B, K) and the optional per-prompt columns
    (``strength_mean``, ``strength_std``, ``ref_logps``) when every example has them. Prompt-only
    examples (online training) come back as ``{"prompt_ids": list[list[int]]}``.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        prompt_ids = [ex["prompt_ids"] for ex in examples]
        group_size = len(examples[0]["completion_ids"])
        if group_size == 0:
            return {"prompt_ids": prompt_ids}
        batch = concat_rows(
            [p for p in prompt_ids for _ in range(group_size)],
            [c for ex in examples for c in ex["completion_ids"]],
            self.pad_token_id,
        )
        batch["group_size"] = group_size
        for key in ("scores", "ref_logps", "strength_mean", "strength_std"):
            if all(key in ex for ex in examples):
                batch[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.float32)
        return batch


def padded_length(example: dict) -> int:
    """Tokens of an example's longest row, what its batch is padded to (online: its prompt alone)."""
    return len(example["prompt_ids"]) + max(map(len, example["completion_ids"]), default=0)


class LengthGroupedSampler(torch.utils.data.Sampler):
    """A random order in which every run of ``batch_size`` indices has similar lengths, so batches carry
    little padding: a random permutation, cut into mega-batches of up to 50 batches, each sorted by
    length (transformers' ``get_length_grouped_indices``). ``batch_size`` is the global batch (every
    process, every accumulation step): N processes x batch b then train on the rows of 1 x batch N*b.
    Like ``RandomSampler``, each epoch draws its seed from the global torch RNG (seeded runs repeat the same
    order). A run resumed in the middle of an epoch cannot draw that seed again (the RNG then is not what it was
    when the epoch began), so it passes the seed the checkpoint recorded (``seed``, the current epoch's) as
    ``resume_seed``, used for the first epoch only."""

    def __init__(self, lengths: list[int], batch_size: int, resume_seed: int | None = None):
        self.lengths, self.batch_size = lengths, batch_size
        self.seed, self._resume_seed = None, resume_seed

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        self.seed = int(torch.empty((), dtype=torch.int64).random_().item()) if self._resume_seed is None \
            else self._resume_seed
        self._resume_seed = None
        generator = torch.Generator().manual_seed(self.seed)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
