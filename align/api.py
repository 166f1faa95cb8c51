"""The Python API behind ``align train``: config -> policy, data, trainer -> adapter + summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import set_seed

from align import checkpoints, demo
from align.config import ConfigError, build_config, load_yaml
from align.data import DataError, ExampleDataset, build_dataset, load_records
from align.models import base_weights_modified, check_vocab, load_causal_lm, load_policy, load_tokenizer
from align.rewards import load_reward, score
from align.sampling import HFSampler
from align.trainers import TRAINERS, AlignConfig

logger = logging.getLogger(__name__)
DEMO = "builtin:demo"


def make_config(values: dict, source: str = "config") -> AlignConfig:
    """``values`` must hold ``trainer`` (cpl, dpo, copg, ...) and the keys of that trainer's config."""
    values = dict(values)
    name = values.pop("trainer", None)
    if name not in TRAINERS:
        raise ConfigError(f"{source}: key 'trainer' must be one of {', '.join(TRAINERS)}, got {name!r}")
    return build_config(TRAINERS[name][0], values, source)


def load_config(path: str, overrides: dict | None = None) -> AlignConfig:
    values = load_yaml(path)
    values.update(overrides or {})
    return make_config(values, source=str(path) + (" + command line" if overrides else ""))


def trainer_name(config: AlignConfig) -> str:
    return next(name for name, (cls, _, _) in TRAINERS.items() if type(config) is cls)


def _model_path(config: AlignConfig) -> str:
    return str(demo.base_model_path()) if config.model == DEMO else config.model


def _rows(config: AlignConfig, source: str, model, tokenizer) -> list[dict]:
    """Raw rows of ``source``; builtin:demo prompts (online) or base-policy preference pairs (offline)."""
    if source != DEMO:
        rows = load_records(source, split=config.dataset_split)
        # online training needs only the prompts of a preference or scored dataset
        return [{"prompt": r["prompt"]} if isinstance(r, dict) and "prompt" in r else r for r in rows] if config.online else rows
    language = demo.MarkovLanguage(demo.DemoSpec())
    prompts = language.prompts(config.demo_train_prompts, seed=config.seed)
    if config.online:
        return [{"prompt": p} for p in prompts]
    if not model.can_generate():  # a reward model: the pairs come from the base policy
        model = load_causal_lm(_model_path(config), dtype=config.dtype)
    return demo.preference_pairs(model, tokenizer, prompts, seed=config.seed, max_new_tokens=config.max_new_tokens)


def _score_missing(rows: list[dict], config: AlignConfig, source: str) -> list[dict]:
    """Offline scored trainers: rows without rewards are scored once with ``config.reward``."""
    needs = [r for r in rows if isinstance(r, dict) and "rewards" not in r and "chosen_reward" not in r]
    if not needs or config.reward is None:
        return rows
    reward = load_reward(config.reward)
    logger.info("%s: scoring %d rows with %s", source, len(needs), config.reward)
    policy = {"on_error": config.reward_on_error, "retries": config.reward_retries, "timeout": config.reward_timeout}
    for row in needs:  # a skipped (NaN) reward is then a bad row, handled by `on_bad_row`
        if "completions" in row:
            row["rewards"] = score(reward, [str(row.get("prompt"))] * len(row["completions"]),
                                   [str(c) for c in row["completions"]], **policy)
        elif "chosen" in row and "rejected" in row:
            prompt = str(row.get("prompt", ""))
            row["chosen_reward"], row["rejected_reward"] = score(reward, [prompt, prompt],
                                                                 [str(row["chosen"]), str(row["rejected"])], **policy)
    return rows


def build_trainer(config: AlignConfig):
    """Policy, tokenizer, datasets and the trainer for ``config`` (nothing is trained yet)."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    set_seed(config.seed)
    name = trainer_name(config)
    _, trainer_cls, kinds = TRAINERS[name]
    model_path = _model_path(config)
    tokenizer = load_tokenizer(model_path, trust_remote_code=config.trust_remote_code)
    if hasattr(trainer_cls, "load_model"):  # e.g. reward models: not a causal-LM policy
        model = trainer_cls.load_model(config, model_path, tokenizer)
    else:
        model = load_policy(
            model_path, adapter_path=config.adapter_path, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
            r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
            target_modules=config.lora_target_modules or "all-linear",
            use_dora=config.use_dora, use_rslora=config.use_rslora, init=config.lora_init,
        )
    check_vocab(model, tokenizer, model_path)
    if base_weights_modified(model) and _uses_reference(trainer_cls, config):
        raise ConfigError(f"lora_init={config.lora_init} (or the init of adapter_path) subtracts the adapter's "
                          "starting value from the base weights, so the adapter-disabled model is not the base model "
                          f"and cannot be the reference policy that trainer {name!r} (or the builtin:demo evaluation) "
                          "uses; use lora_init=default or gaussian, or a trainer without a reference (cpl with "
                          "use_reference=false)")

    def dataset(source: str) -> ExampleDataset:
        rows = _rows(config, source, model, tokenizer)
        if name == "copg" and not config.online:
            rows = _score_missing(rows, config, source)
        built = build_dataset(rows, tokenizer, source=source, kinds=("prompts",) if config.online else kinds,
                              max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                              on_bad_row=config.on_bad_row)
        unscored = sum("scores" not in ex for ex in built.examples)
        if name == "copg" and not config.online and unscored:  # found now, not at the first batch
            raise DataError(source, None, "rewards", f"{unscored} of {len(built)} rows have no rewards; CoPG needs them",
                            "give `rewards` (or chosen_reward/rejected_reward), or set `reward` to compute them")
        return built

    train_dataset = dataset(config.dataset)
    eval_dataset = dataset(config.eval_dataset) if config.eval_dataset else None
    reward_fn = sampler = None
    if config.online:
        reward_fn = load_reward(config.reward)
        sampler = make_sampler(config, model, tokenizer)
    return trainer_cls(model=model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
                       processing_class=tokenizer, reward_fn=reward_fn, sampler=sampler)


def _uses_reference(trainer_cls, config: AlignConfig) -> bool:
    """Whether the run uses the reference policy (the adapter-disabled model): in the trainer's objective, or in
    the builtin:demo evaluation."""
    needs = trainer_cls.needs_reference
    if isinstance(needs, property):  # e.g. CPL: only with use_reference
        needs = needs.fget(SimpleNamespace(args=config))
    return needs or (config.model == DEMO and config.dataset == DEMO)


def make_sampler(config: AlignConfig, model, tokenizer):
    if config.sampler == "hf":
        return HFSampler(model, tokenizer)
    from urllib.parse import urlparse

    from align.sampling.vllm import VLLMSampler  # imports vLLM (an optional extra) only when it starts

    url = urlparse(config.vllm_server_url)
    return VLLMSampler(model, tokenizer, mode=config.vllm_mode, sync=config.vllm_sync, sync_every=config.vllm_sync_every,
                       host=url.hostname or "127.0.0.1", port=url.port or 8000,
                       tensor_parallel_size=config.vllm_tensor_parallel_size,
                       gpu_memory_utilization=config.vllm_gpu_memory_utilization, dtype=config.dtype, seed=config.seed,
                       api_key=config.vllm_api_key)


def train(config: AlignConfig, resume_from_checkpoint: str | bool | None = None) -> dict:
    """Train, save the adapter (peft format, safetensors) and, for the built-in demo, evaluate it
    against the reference policy. Returns the summary (also written to OUTPUT_DIR/summary.json)."""
    output_dir = Path(config.output_dir)
    # Checked before training: a link out of output_dir would otherwise fail the run at its very end.
    summary_path, plot_path, merged_dir = (checkpoints.output_path(output_dir, name)
                                           for name in ("summary.json", "training.png", "merged"))
    trainer = build_trainer(config)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    finally:  # a vLLM engine or server connection is released even when training fails
        getattr(trainer.sampler, "close", lambda: None)()
    trainer.save_model(str(output_dir))
    summary = {"trainer": trainer_name(config), "train_loss": result.training_loss, "steps": trainer.state.global_step,
               "nonfinite_skipped": trainer.nonfinite_steps, "data": trainer.train_dataset.stats.summary()}
    model = trainer.accelerator.unwrap_model(trainer.model)
    if config.model == DEMO and config.dataset == DEMO and trainer.is_world_process_zero():
        from align.eval.policy import evaluate_against_reference

        prompts = demo.MarkovLanguage(demo.DemoSpec()).prompts(config.demo_eval_prompts, seed=config.seed + 10_000)
        if hasattr(trainer, "evaluate_demo"):  # reward models: held-out accuracy against the true reward
            summary |= trainer.evaluate_demo(prompts)
        else:
            summary |= evaluate_against_reference(model, trainer.processing_class, prompts, load_reward("builtin:demo"),
                                                  max_new_tokens=config.max_new_tokens, seed=config.seed + 1, n=4)
    if trainer.is_world_process_zero():
        if config.merge_on_save:
            model.merge_and_unload().save_pretrained(merged_dir)
            trainer.processing_class.save_pretrained(merged_dir)
        checkpoints.write_atomic(summary_path, json.dumps(summary, indent=2))
        plot_training(trainer.state.log_history, summary, plot_path)
    return summary


def plot_training(log_history: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins", "reward/mean", "kl") if any(k in h for h in log_history)]
    panels = len(keys) + ("true_reward_after" in summary)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(4 * max(panels, 1), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(h["step"], h[key]) for h in log_history if key in h]
        ax.plot(*zip(*pts), marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    if "true_reward_after" in summary:
        ax = axes[0][-1]
        ax.bar(["reference", "aligned"], [summary["true_reward_before"], summary["true_reward_after"]], color=["grey", "tab:green"])
        ax.set_title(f"true reward (win rate {summary['win_rate_vs_reference']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
