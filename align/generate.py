"""``align generate`` and ``align eval decoding``: text generation with greedy, sampling, beam or
contrastive search, from a base model or a LoRA-adapted one, and degeneration metrics per strategy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from trl.trainer.utils import pad

from align.data import DataError, load_records
from align.decoding import contrastive_search
from align.eval import diversity, isotropy, rep_n
from align.models import load_causal_lm, load_tokenizer

STRATEGIES = ("greedy", "sample", "beam", "contrastive")


@dataclass
class GenerationSettings:
    strategy: str = "contrastive"
    max_new_tokens: int = 64
    batch_size: int = 8
    penalty_alpha: float = 0.6  # contrastive: the papers' usual α with k = 4-5
    top_k: int = 4              # contrastive candidates; sampling top-k when strategy=sample (0 = off)
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.num_beams < 1:
            raise ValueError("max_new_tokens, batch_size and num_beams must be >= 1")


def read_prompts(path: str) -> list[str]:
    """Prompts from a .txt file (one per line) or a .jsonl/.json/.csv/.parquet file with a `prompt` field."""
    if Path(path).suffix == ".txt":
        if not Path(path).is_file():
            raise DataError(path, None, None, "file does not exist")
        return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = []
    for i, row in enumerate(load_records(path), start=1):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DataError(path, i, "prompt", "missing, empty or not a string")
        prompts.append(row["prompt"])
    return prompts


def load_generator(model: str, adapter: str | None = None, *, trust_remote_code: bool = False):
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    lm = load_causal_lm(model, trust_remote_code=trust_remote_code)
    if adapter is not None:
        lm = PeftModel.from_pretrained(lm, adapter)
    return lm.eval(), tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings, progress: bool = True) -> list[str]:
    """Completions (text, special tokens removed) for ``prompts``, batched with left padding."""
    s = settings
    device = next(model.parameters()).device
    out: list[str] = []
    torch.manual_seed(s.seed)
    for start in tqdm(range(0, len(prompts), s.batch_size), disable=not progress, desc=s.strategy):
        rows = [torch.tensor(tokenizer(p)["input_ids"]) for p in prompts[start : start + s.batch_size]]
        input_ids = pad(rows, padding_value=tokenizer.pad_token_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(r) for r in rows], padding_value=0, padding_side="left").to(device)
        common = dict(max_new_tokens=s.max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        if s.strategy == "contrastive":
            ids = contrastive_search(model, input_ids, attention_mask, penalty_alpha=s.penalty_alpha, top_k=s.top_k, **common)
        else:
            kwargs = {"greedy": dict(do_sample=False), "beam": dict(do_sample=False, num_beams=s.num_beams),
                      "sample": dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)}[s.strategy]
            ids = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs, **common)
        out += tokenizer.batch_decode(ids[:, input_ids.shape[1] :], skip_special_tokens=True)
    return out


def write_jsonl(path: str, prompts: list[str], completions: list[str], strategy: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p, c in zip(prompts, completions):
            f.write(json.dumps({"prompt": p, "completion": c, "strategy": strategy}) + "\n")


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
        settings = GenerationSettings(**{**base.__dict__, "strategy": strategy})
        texts = generate(model, tokenizer, prompts, settings)
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
