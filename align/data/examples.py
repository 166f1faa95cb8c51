"""Validate raw rows and turn them into tokenized examples: one prompt, K completions, optional scores.

Accepted formats (TRL's, plus scored groups), plain text or conversational (lists of
``{"role", "content"}`` messages, rendered with the tokenizer's chat template):

* ``pairs``   — ``prompt``/``chosen``/``rejected``, or implicit prompt (``chosen``/``rejected`` sharing
  a prefix, split with TRL's ``maybe_extract_prompt``); optional ``chosen_reward``/``rejected_reward``
  (then the pair is scored, e.g. for offline CoPG) and ``strength_mean``/``strength_std``.
* ``groups``  — ``prompt``/``completions`` (list of K ≥ 2) with optional ``rewards`` (list of K numbers).
* ``prompts`` — ``prompt`` only (online training).

Tokenization (``align.hf_utils.encode_prompt``/``encode_completion``): the prompt gets the tokenizer's
special tokens unless its rendered text already starts with BOS (no doubled BOS); a completion gets none in
front and ends with exactly one EOS (plain text gets it appended; a chat template's end-of-turn EOS is kept
and whatever the template writes after it dropped). This is exactly what an on-policy sampler produces, so
offline and online examples look the same to the trainers.
Truncation rule: a prompt longer than ``max_prompt_length`` keeps its *last* tokens; a completion is
cut at its end so that prompt + completion ≤ ``max_length``. Both are counted in the stats.
Columns not listed above are ignored (their names are logged once).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase
from trl import is_conversational, maybe_apply_chat_template, maybe_extract_prompt

from align.errors import DataError
from align.hf_utils import encode_completion, encode_prompt

logger = logging.getLogger(__name__)

KINDS = ("pairs", "groups", "prompts")
KNOWN_FIELDS = {
    "prompt", "chosen", "rejected", "completions", "rewards", "chosen_reward", "rejected_reward",
    "strength_mean", "strength_std",
}


@dataclass
class DataStats:
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    truncated_prompts: int = 0
    truncated_completions: int = 0
    ignored_fields: set = field(default_factory=set)

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.rows} rows kept"]
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{n} {why}" for why, n in self.skipped.items()))
        parts.append(f"{self.truncated_prompts} prompts and {self.truncated_completions} completions truncated")
        return "; ".join(parts)


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict], stats: DataStats | None = None):
        self.examples, self.stats = examples, stats or DataStats(rows=len(examples), kept=len(examples))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def detect_kind(row: dict) -> str:
    if "completions" in row:
        return "groups"
    if "chosen" in row or "rejected" in row:
        return "pairs"
    return "prompts"


def _check_text(value, source: str, row: int, name: str):
    if isinstance(value, str):
        if not value.strip():
            raise DataError(source, row, name, "empty text", "drop the row or fill the field")
        return value
    if isinstance(value, list) and value:
        for i, msg in enumerate(value):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
                raise DataError(source, row, name, f"message {i} is not a {{'role': str, 'content': str}} dict")
        if not any(m["content"].strip() for m in value):
            raise DataError(source, row, name, "all messages are empty")
        return value
    if value is None:
        raise DataError(source, row, name, "missing or null")
    raise DataError(source, row, name, f"expected a string or a list of messages, got {type(value).__name__}"
                    + (" (empty list)" if isinstance(value, list) else ""))


def _check_number(value, source: str, row: int, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(source, row, name, f"expected a number, got {type(value).__name__} {value!r:.40}")
    if not math.isfinite(value):
        raise DataError(source, row, name, f"not a finite number ({value})", "drop or fix the row")
    return float(value)


def validate_row(row: dict, kind: str, source: str, index: int) -> dict:
    """Check one raw row; return ``{"prompt", "completions", "scores", ...}`` or raise DataError."""
    if not isinstance(row, dict):
        raise DataError(source, index, None, f"expected a mapping, got {type(row).__name__}")
    if kind == "pairs":
        for key in ("chosen", "rejected"):
            if key not in row:
                raise DataError(source, index, key, "missing field", "pairs need 'chosen' and 'rejected'")
            _check_text(row[key], source, index, key)
        if "prompt" in row and row["prompt"] is not None:
            _check_text(row["prompt"], source, index, "prompt")
        else:
            row = maybe_extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]}) | {
                k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
            if not (isinstance(row["prompt"], str) and row["prompt"].strip()) and not isinstance(row["prompt"], list):
                raise DataError(source, index, "prompt", "no prompt field and chosen/rejected share no prefix",
                                "add a 'prompt' field")
        if row["chosen"] == row["rejected"]:
            raise DataError(source, index, "rejected", "chosen and rejected are identical", "drop the row")
        out = {"prompt": row["prompt"], "completions": [row["chosen"], row["rejected"]], "scores": None}
        has = [k in row and row[k] is not None for k in ("chosen_reward", "rejected_reward")]
        if any(has) and not all(has):
            missing = "rejected_reward" if has[0] else "chosen_reward"
            raise DataError(source, index, missing, "missing while the other reward is given")
        if all(has):
            out["scores"] = [_check_number(row[k], source, index, k) for k in ("chosen_reward", "rejected_reward")]
        for key in ("strength_mean", "strength_std"):
            if key in row and row[key] is not None:
                out[key] = _check_number(row[key], source, index, key)
        return out
    if "prompt" not in row:
        raise DataError(source, index, "prompt", "missing field")
    prompt = _check_text(row["prompt"], source, index, "prompt")
    if kind == "prompts":
        return {"prompt": prompt, "completions": [], "scores": None}
    completions = row.get("completions")
    if not isinstance(completions, list) or len(completions) < 2:
        raise DataError(source, index, "completions", "expected a list of at least 2 completions",
                        f"got {type(completions).__name__}" + (f" of length {len(completions)}" if isinstance(completions, list) else ""))
    completions = [_check_text(c, source, index, f"completions[{i}]") for i, c in enumerate(completions)]
    scores = None
    if row.get("rewards") is not None:
        rewards = row["rewards"]
        if not isinstance(rewards, list) or len(rewards) != len(completions):
            n = len(rewards) if isinstance(rewards, list) else type(rewards).__name__
            raise DataError(source, index, "rewards", f"expected a list of {len(completions)} numbers (one per completion), got {n}")
        scores = [_check_number(r, source, index, f"rewards[{i}]") for i, r in enumerate(rewards)]
    return {"prompt": prompt, "completions": completions, "scores": scores}


def _render(tokenizer: PreTrainedTokenizerBase, prompt, completion=None) -> tuple[str, str | None]:
    example = {"prompt": prompt} if completion is None else {"prompt": prompt, "completion": completion}
    if is_conversational(example) and tokenizer.chat_template is None:
        raise ValueError("conversational data needs a tokenizer with a chat template")
    rendered = maybe_apply_chat_template(example, tokenizer)
    return rendered["prompt"], rendered.get("completion")


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt, text or chat messages (rendered with the chat template, the assistant's turn
    opened), exactly as training sees it."""
    return encode_prompt(tokenizer, _render(tokenizer, prompt)[0])


def tokenize_example(example: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int,
                     stats: DataStats) -> dict:
    prompt_ids = prompt_token_ids(tokenizer, example["prompt"])
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        stats.truncated_prompts += 1
    completion_ids = []
    for completion in example["completions"]:
        _, text = _render(tokenizer, example["prompt"], completion)
        ids = encode_completion(tokenizer, text)
        room = max_length - len(prompt_ids)
        if len(ids) > room:
            ids = ids[:room]
            stats.truncated_completions += 1
        completion_ids.append(ids)
    out = {"prompt_ids": prompt_ids, "completion_ids": completion_ids}
    if example["scores"] is not None:
        out["scores"] = example["scores"]
    for key in ("strength_mean", "strength_std"):
        if key in example:
            out[key] = example[key]
    return out


def build_dataset(
    rows: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str,
    kinds: tuple[str, ...] = KINDS,
    max_length: int = 1024,
    max_prompt_length: int = 512,
    on_bad_row: str = "error",
) -> ExampleDataset:
    """Validate and tokenize ``rows``. ``on_bad_row="skip"`` drops bad rows and counts them by reason.

    All rows must be of one kind among ``kinds`` and, for groups, have the same number of completions.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    stats = DataStats(rows=len(rows))
    if not rows:
        raise DataError(source, None, None, "the dataset has no rows")
    kind = detect_kind(rows[0]) if isinstance(rows[0], dict) else None
    if kind not in kinds:
        raise DataError(source, 1, None, f"rows look like {kind!r} but this trainer takes {' or '.join(kinds)}",
                        "see the dataset formats in the README")
    examples, group_size = [], None
    for index, row in enumerate(rows, start=1):
        try:
            if isinstance(row, dict):
                stats.ignored_fields |= set(row) - KNOWN_FIELDS
            example = validate_row(row, kind, source, index)
            if kind != "prompts":
                group_size = group_size or len(example["completions"])
                if len(example["completions"]) != group_size:
                    raise DataError(source, index, "completions",
                                    f"{len(example['completions'])} completions where earlier rows have {group_size}",
                                    "give every prompt the same number of completions")
            try:
                examples.append(tokenize_example(example, tokenizer, max_length, max_prompt_length, stats))
            except (ValueError, TypeError) as err:
                raise DataError(source, index, None, f"could not tokenize: {err}") from None
        except DataError as err:
            if on_bad_row == "error":
                raise
            stats.skipped[err.problem.split(" (")[0]] += 1
    stats.kept = len(examples)
    if stats.ignored_fields:
        logger.info("%s: ignored fields %s", source, sorted(stats.ignored_fields))
    if not examples:
        raise DataError(source, None, None, f"no usable rows ({stats.summary()})")
    logger.info("%s: %s", source, stats.summary())
    return ExampleDataset(examples, stats)
