"""``align rm strength``: preference strength from an ensemble of reward models ("Secrets of RLHF in Large
Language Models Part II: Reward Modeling", Wang et al. 2024, §2.2, Eq. 4).

M plain Bradley-Terry reward models are trained on the same pairs, each from its own seed, as M LoRA adapters
(each with its own score head) on one frozen backbone; a pair's strength is the mean and the standard
deviation of their reward differences. The pairs are written back with ``strength_mean``/``strength_std``,
which the reward trainer's flipping, margin and smoothing options read.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from align import api
from align.data import build_dataset
from align.data.examples import validate_row
from align.errors import ConfigError, DataError
from align.models import load_tokenizer
from align.objectives import preference_strength
from align.rewards.model import head_name
from align.trainers.reward import PLAIN_BT, RewardConfig, RewardTrainer, pair_rewards

logger = logging.getLogger(__name__)


def ensemble_memory(model: PeftModel, adapters: list[str]) -> dict:
    """Parameter bytes of one frozen base with these adapters vs as many full copies of the model."""
    per_adapter = dict.fromkeys(adapters, 0)
    base = 0
    for name, p in model.named_parameters():
        owner = next((a for a in adapters if f".{a}." in name), None)
        if owner is None:
            base += p.numel() * p.element_size()
        else:
            per_adapter[owner] += p.numel() * p.element_size()
    shared = base + sum(per_adapter.values())
    return {"base_bytes": base, "adapter_bytes": max(per_adapter.values()), "ensemble_bytes": shared,
            "full_copies_bytes": len(adapters) * base, "saving": len(adapters) * base / shared}


def strength_ensemble(config: RewardConfig, model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset,
                      num_models: int) -> dict:
    """Train ``num_models`` plain Bradley-Terry reward models on the same pairs, each with its own seed
    (adapter and head initialisation, data order), as LoRA adapters with their own heads on ``model``'s
    one frozen base; return the reward differences ``diffs`` (M, N) and their ``mean``/``std`` (Eq. 4,
    population std)."""
    if num_models < 2:
        raise ValueError(f"the strength ensemble needs at least 2 models, got {num_models}")
    lora_config, head = model.peft_config["default"], head_name(model)
    init_std = getattr(model.config, "initializer_range", 0.02)
    names, diffs = [], []
    for m in range(num_models):
        name = "default" if m == 0 else f"member{m}"  # member 0 is the adapter `load_model` made
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + m)
            if m > 0:
                model.add_adapter(name, copy.deepcopy(lora_config))
                torch.nn.init.normal_(getattr(model.get_base_model(), head).modules_to_save[name].weight, std=init_std)
        model.set_adapter(name)
        args = dataclasses.replace(config, **PLAIN_BT, seed=config.seed + m, save_strategy="no", eval_strategy="no",
                                   output_dir=str(Path(config.output_dir) / "strength" / f"member{m}"))
        start = time.perf_counter()
        RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()
        rewards = pair_rewards(model, dataset, tokenizer.pad_token_id, batch_size=config.per_device_eval_batch_size)
        diffs.append(rewards[:, 0] - rewards[:, 1])
        names.append(name)
        logger.info("strength ensemble: model %d/%d trained in %.1fs, train accuracy %.3f", m + 1, num_models,
                    time.perf_counter() - start, (diffs[-1] > 0).float().mean().item())
    diffs = torch.stack(diffs)
    mean, std = preference_strength(diffs)
    return {"diffs": diffs, "mean": mean, "std": std, "memory": ensemble_memory(model, names)}


def strength_main(config_path: str, overrides: dict, num_models: int, out_path: str) -> dict:
    """``align rm strength``: train the ensemble of ``num_models`` reward models described by a ``trainer:
    reward`` config (its denoising/contrastive/MetaRM options are ignored: the ensemble is plain BT) and
    write its pairs with ``strength_mean``/``strength_std`` added as JSON lines to ``out_path``."""
    config = api.load_config(config_path, {**overrides, **PLAIN_BT})
    if not isinstance(config, RewardConfig):
        raise ConfigError(f"{config_path}: align rm strength needs `trainer: reward`")
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    start = time.perf_counter()
    model_path = api.model_path(config)
    tokenizer = load_tokenizer(model_path, trust_remote_code=config.trust_remote_code)
    model = RewardTrainer.load_model(config, model_path, tokenizer)
    rows = api.dataset_rows(config, config.dataset, model, tokenizer)
    kept = []
    for index, row in enumerate(rows, start=1):  # the pairs build_dataset keeps, so rows and examples align
        try:
            validate_row(row, "pairs", config.dataset, index)
        except DataError:
            if config.on_bad_row == "error":
                raise
            continue
        kept.append(row)
    dataset = build_dataset(kept, tokenizer, source=config.dataset, kinds=("pairs",), max_length=config.max_length,
                            max_prompt_length=config.max_prompt_length)
    result = strength_ensemble(config, model, tokenizer, dataset, num_models)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row, mean, std in zip(kept, result["mean"].tolist(), result["std"].tolist()):
            f.write(json.dumps({**row, "strength_mean": mean, "strength_std": std}) + "\n")
    mean = result["mean"]
    return {"pairs": len(kept), "skipped_rows": len(rows) - len(kept), "num_models": num_models, "output": str(out),
            "strength_mean_avg": mean.mean().item(), "negative_fraction": (mean < 0).float().mean().item(),
            "memory": result["memory"], "seconds": time.perf_counter() - start}
