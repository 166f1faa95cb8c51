"""``align eval decoding``: degeneration metrics of each decoding strategy on the same prompts."""

from __future__ import annotations

import dataclasses

import torch

from align.decoding.generate import GenerationSettings, generate
from align.eval.decoding_metrics import diversity, isotropy, rep_n


@torch.no_grad()
def last_hidden_states(model, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """Final-layer hidden states of each text (for isotropy)."""
    states = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]], device=next(model.parameters()).device)
        states.append(model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].float().cpu())
    return states


def compare_strategies(model, tokenizer, prompts: list[str], strategies: list[str], base: GenerationSettings) -> dict:
    """rep-2/3/4, diversity, isotropy of the continuations' hidden states, and mean length per strategy."""
    table = {}
    for strategy in strategies:
        texts = generate(model, tokenizer, prompts, dataclasses.replace(base, strategy=strategy))
        full = [p + " " + t for p, t in zip(prompts, texts)]
        table[strategy] = {
            **{f"rep-{n}": rep_n(texts, n) for n in (2, 3, 4)},
            "diversity": diversity(texts),
            "isotropy": isotropy(last_hidden_states(model, tokenizer, full)),
            "mean_words": sum(len(t.split()) for t in texts) / max(len(texts), 1),
        }
    return table


def markdown_table(table: dict) -> str:
    columns = list(next(iter(table.values())))
    lines = ["| strategy | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |" for name, row in table.items()]
    return "\n".join(lines)
