"""``align eval logprobs``: the log-probs a model gives a dataset's completions (chosen, rejected, or every
completion of a scored group), to see on one's own data what training did to them (e.g. why chosen
log-probs fall during DPO)."""

from __future__ import annotations

import torch

from align.data import ExampleDataset, GroupCollator
from align.models import completion_logps


@torch.no_grad()
def dataset_logprobs(model, dataset: ExampleDataset, pad_token_id: int, *, batch_size: int = 16) -> list[dict]:
    """One record per example: each completion's summed and per-token-mean log-prob and token count, and
    which completion is ``chosen`` / ``rejected``: with rewards the highest and the lowest (None when all
    are equal), else a pair's first and second (a group without rewards: None)."""
    collate, device = GroupCollator(pad_token_id), next(model.parameters()).device
    records = []
    for start in range(0, len(dataset), batch_size):
        examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate(examples)
        forward = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "completion_mask")}
        token = completion_logps(model, **forward).cpu()
        tokens = batch["completion_mask"][:, 1:].sum(-1)
        summed = token.sum(-1).view(len(examples), -1)
        counts = tokens.view(len(examples), -1)
        for ex, row_sum, row_count in zip(examples, summed.tolist(), counts.tolist()):
            scores = ex.get("scores")
            if scores is not None:
                decided = max(scores) > min(scores)
                chosen, rejected = (scores.index(max(scores)), scores.index(min(scores))) if decided else (None, None)
            else:
                chosen, rejected = (0, 1) if len(row_sum) == 2 else (None, None)
            records.append({"completions": [{"logps_sum": s, "logps_mean": s / max(n, 1), "tokens": n}
                                            for s, n in zip(row_sum, row_count)],
                            "chosen": chosen, "rejected": rejected})
    return records


def summarize(records: list[dict]) -> dict:
    """Means over the examples that have a chosen and a rejected completion: their summed log-probs, the
    margin (chosen − rejected) and the accuracy (margin > 0)."""
    pairs = [(r["completions"][r["chosen"]]["logps_sum"], r["completions"][r["rejected"]]["logps_sum"])
             for r in records if r["chosen"] is not None]
    if not pairs:
        return {"examples": len(records), "pairs": 0}
    chosen, rejected = torch.tensor(pairs, dtype=torch.float64).T
    return {"examples": len(records), "pairs": len(pairs), "chosen_logps_mean": chosen.mean().item(),
            "rejected_logps_mean": rejected.mean().item(), "margin_mean": (chosen - rejected).mean().item(),
            "accuracy": (chosen > rejected).double().mean().item()}
