"""The model card (README.md) of a run's output directory: what was trained, on what, how, with what result,
and the command that reproduces it; the card the Hugging Face hub shows when ``push_to_hub`` uploads the run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from align import checkpoints
from align.data import DataStats
from align.trainers.config import AlignConfig

CARD_NAME = "README.md"


def objective_parameters(config: AlignConfig) -> dict:
    """The keys a trainer's config adds to the shared ones: its objective's parameters (λ, β, ε, ...)."""
    shared = {f.name for f in dataclasses.fields(AlignConfig)}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init and f.name not in shared}


def model_card(config: AlignConfig, *, trainer: str, base_model: str, stats: DataStats, summary: dict,
               command: str) -> str:
    """The card's markdown. ``base_model`` is the model ``config.model`` resolved to (a directory or hub id)."""
    hub_base = "" if Path(base_model).exists() else f"base_model: {base_model}\n"
    lines = ["---", "library_name: peft", f"{hub_base}tags:", "- align", f"- {trainer}", "- lora", "---", "",
             f"# {Path(config.output_dir).name}", "",
             f"A LoRA adapter trained with align (`trainer: {trainer}`).", "",
             "## Base model", "", f"`{config.model}`" + (f" (`{base_model}`)" if base_model != config.model else ""), "",
             "## Objective", "", f"`{trainer}`" + (", online: samples of the current policy scored by "
                                                      f"`{config.reward}`" if config.online else ", offline data"), ""]
    lines += [f"- `{key}`: `{value}`" for key, value in objective_parameters(config).items()]
    lines += [f"- `{key}`: `{getattr(config, key)}`" for key in ("learning_rate", "lora_r", "lora_alpha",
                                                                  "per_device_train_batch_size", "seed")]
    skipped = ", ".join(f"{n} {why}" for why, n in stats.skipped.items()) or "none"
    lines += ["", "## Data", "", f"- dataset: `{config.dataset}`" + (f" (split `{config.dataset_split}`)" if not
                                                                        config.dataset.startswith("builtin:") else ""),
              f"- rows: {stats.rows} read, {stats.kept} kept, {stats.rows - stats.kept} dropped (skipped: {skipped})",
              f"- truncated: {stats.truncated_prompts} prompts, {stats.truncated_completions} completions", "",
              "## Final metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in summary.items() if isinstance(value, (int, float, str)) and key != "data"]
    lines += ["", "## Reproduce", "", "```bash", command, "```", "",
              "<details><summary>full configuration</summary>", "", "```json",
              json.dumps(config.to_dict(), indent=1, default=str), "```", "</details>", ""]
    return "\n".join(lines)


def write_card(output_dir: str | Path, text: str) -> Path:
    """``OUTPUT_DIR/README.md``, written atomically (it replaces peft's template card)."""
    path = checkpoints.output_path(output_dir, CARD_NAME)
    checkpoints.write_atomic(path, text)
    return path
