"""The Python API behind ``align train``: config -> model, data, trainer -> adapter + summary."""

from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

from align import checkpoints, tasks
from align.config import build_config, load_yaml
from align.data import ExampleDataset, build_dataset, detect_kind, load_records
from align.errors import ConfigError, DataError
from align.models import check_vocab, load_causal_lm, load_tokenizer, resolve_model
from align.rewards import load_reward, score
from align.sampling import HFSampler
from align.trainers import TRAINERS, AlignConfig, PolicyTrainer
from align.trainers.card import model_card, write_card

logger = logging.getLogger(__name__)


def make_config(values: dict, source: str = "config") -> AlignConfig:
    """``values`` must hold ``trainer`` (one of ``TRAINERS``) and the keys of that trainer's config."""
    values = dict(values)
    name = values.pop("trainer", None)
    if name not in TRAINERS:
        raise ConfigError(f"{source}: key 'trainer' must be one of {', '.join(TRAINERS)}, got {name!r}")
    if values.get("eval_steps") and "eval_strategy" not in values:  # eval_steps alone asks for evaluation
        values["eval_strategy"] = "steps"
    return build_config(TRAINERS[name].config_class, values, source)


def load_config(path: str, overrides: dict | None = None) -> AlignConfig:
    values = load_yaml(path)
    values.update(overrides or {})
    return make_config(values, source=str(path) + (" + command line" if overrides else ""))


def trainer_name(config: AlignConfig) -> str:
    return next(name for name, cls in TRAINERS.items() if type(config) is cls.config_class)


def model_path(config: AlignConfig) -> str:
    """The model directory (or hub id) that ``config.model`` names: a built-in task's own base model, a
    ``.gguf`` file or ``builtin:<model>`` converted once (``resolve_model``), or the name itself."""
    if tasks.is_task(config.model) and tasks.get_task(config.model).base_model:
        return tasks.get_task(config.model).base_model()
    return resolve_model(config.model)


def file_rows(config: AlignConfig, source: str) -> list[dict]:
    """Raw rows of a dataset file, directory or hub id; online training keeps only the prompts."""
    rows = load_records(source, split=config.dataset_split)
    return [{"prompt": r["prompt"]} if isinstance(r, dict) and "prompt" in r else r for r in rows] if config.online else rows


def task_rows(config: AlignConfig, source: str, model, tokenizer) -> list[dict]:
    """Rows of a built-in task: its prompts (online) or preference pairs sampled from the base policy and
    labelled by its reward (offline)."""
    task = tasks.get_task(source)
    prompts = task.prompts("train", config.task_train_prompts, config.seed)
    if config.online:
        return [{"prompt": p} for p in prompts]
    if not model.can_generate():  # a reward model: the pairs come from the base policy
        model = load_causal_lm(model_path(config), dtype=config.dtype)
    return task.preference_pairs(model, tokenizer, prompts, seed=config.seed, max_new_tokens=config.max_new_tokens)


def dataset_rows(config: AlignConfig, source: str, model, tokenizer) -> list[dict]:
    """Raw rows of ``source``: a built-in task's (see ``task_rows``) or a file's."""
    return task_rows(config, source, model, tokenizer) if tasks.is_task(source) else file_rows(config, source)


def _check_scores(rows: list[dict], config: AlignConfig, trainer_cls, source: str) -> list[dict]:
    """Offline trainers that need rewards: rows without them are scored once with ``config.reward``, or the
    run stops here, before anything trains, naming what to give."""
    kind = detect_kind(rows[0]) if rows and isinstance(rows[0], dict) else None
    if config.online or kind is None or not trainer_cls.requires_scores(config, kind):
        return rows
    needs = [r for r in rows if isinstance(r, dict) and "rewards" not in r and "chosen_reward" not in r]
    if needs and config.reward is None:
        raise DataError(source, None, "rewards", f"{len(needs)} of {len(rows)} rows have no rewards; "
                        f"`trainer: {trainer_name(config)}` needs them on {kind}",
                        "give `rewards` (or chosen_reward/rejected_reward), or set `reward` to compute them")
    if needs:
        reward = load_reward(config.reward)
        logger.info("%s: scoring %d rows with %s", source, len(needs), config.reward)
        policy = {"on_error": config.reward_on_error, "retries": config.reward_retries, "timeout": config.reward_timeout}
        for row in needs:  # a skipped (NaN) reward is then a bad row, handled by `on_bad_row`
            if "completions" in row:
                row["rewards"] = score(reward, [str(row.get("prompt"))] * len(row["completions"]),
                                       [str(c) for c in row["completions"]], **policy)
            elif "chosen" in row and "rejected" in row:
                prompt = str(row.get("prompt", ""))
                row["chosen_reward"], row["rejected_reward"] = score(
                    reward, [prompt, prompt], [str(row["chosen"]), str(row["rejected"])], **policy)
    return rows


def build_trainer(config: AlignConfig):
    """Model, tokenizer, datasets and the trainer for ``config`` (nothing is trained yet)."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    set_seed(config.seed)
    trainer_cls = TRAINERS[trainer_name(config)]
    # A file's rows are read and checked before the model loads: a bad dataset stops the run at once.
    sources = [s for s in (config.dataset, config.eval_dataset) if s]
    rows = {s: _check_scores(file_rows(config, s), config, trainer_cls, s) for s in sources if not tasks.is_task(s)}
    path = model_path(config)
    tokenizer = load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    model = trainer_cls.load_model(config, path, tokenizer)
    check_vocab(model, tokenizer, path)

    def dataset(source: str, raw: list[dict] | None = None, kinds: tuple[str, ...] | None = None) -> ExampleDataset:
        if raw is None:
            raw = rows[source] if source in rows else _check_scores(task_rows(config, source, model, tokenizer), config,
                                                                     trainer_cls, source)
        return build_dataset(raw, tokenizer, source=source,
                             kinds=kinds or (("prompts",) if config.online else trainer_cls.data_kinds),
                             max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                             on_bad_row=config.on_bad_row)

    train_dataset = dataset(config.dataset)
    eval_dataset = dataset(config.eval_dataset) if config.eval_dataset else None
    extra = {}
    evaluating = config.eval_strategy != "no"
    if evaluating and issubclass(trainer_cls, PolicyTrainer):
        extra = _policy_evaluation(config, eval_dataset, dataset)
    elif evaluating and eval_dataset is None:
        raise ConfigError(f"eval_steps/eval_strategy: `trainer: {trainer_name(config)}` evaluates on an `eval_dataset`; "
                          "give one, or set eval_strategy: no")
    if config.online or extra:
        extra |= {"reward_fn": load_reward(config.reward) if config.reward else extra.get("eval_reward_fn"),
                  "sampler": make_sampler(config, model, tokenizer)}
    return trainer_cls(model=model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
                       processing_class=tokenizer, **extra)


def _policy_evaluation(config: AlignConfig, eval_dataset: ExampleDataset | None, dataset) -> dict:
    """The prompts (token ids) and reward of the evaluation while training (``align.trainers.evaluation``):
    ``eval_prompts`` (a built-in task's held-out split, or the prompts of a file), else ``eval_dataset``'s
    prompts, else the held-out split of a built-in ``dataset``; the reward is ``eval_reward``, else ``reward``,
    else the task's."""
    source = config.eval_prompts or config.eval_dataset or (config.dataset if tasks.is_task(config.dataset) else None)
    task_source = next((s for s in (config.eval_prompts, config.dataset) if tasks.is_task(s)), None)
    if source is None:
        raise ConfigError("eval_steps/eval_strategy: evaluation needs prompts: set `eval_prompts` (a file or "
                          "builtin:<task>) or `eval_dataset`, or train on a built-in task")
    if config.eval_reward is None and config.reward is None and task_source is None:
        raise ConfigError(f"eval_steps/eval_strategy: evaluating the policy on {source} needs a reward to score its "
                          "samples: set `reward` (builtin:<task>, module:function, rm:<dir> or sandbox:module:function)")
    if tasks.is_task(source):
        held_out = tasks.get_task(source).prompts("heldout", config.eval_num_prompts, config.seed)
        examples = dataset(source, [{"prompt": p} for p in held_out], ("prompts",))
    elif source == config.eval_dataset and eval_dataset is not None:
        examples = eval_dataset
    else:
        examples = dataset(source, load_records(source, split=config.dataset_split), ("prompts", "pairs", "groups"))
    prompt_ids = list(dict.fromkeys(tuple(e["prompt_ids"]) for e in examples))[: config.eval_num_prompts]
    named = config.eval_reward or config.reward
    reward = load_reward(named) if named else tasks.get_task(task_source).reward
    return {"eval_prompt_ids": [list(ids) for ids in prompt_ids], "eval_reward_fn": reward}


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


def api_command(config: AlignConfig) -> str:
    """The Python call that reproduces a run started from the API: its trainer and the keys that differ from
    their defaults."""
    values = {"trainer": trainer_name(config)}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.init and f.repr and value != default and isinstance(value, (str, int, float, bool, list, type(None))):
            values[f.name] = value
    return f"from align.api import make_config, train\ntrain(make_config({values!r}))"


class UnfinishedRun(TrainerCallback):
    """Removes an earlier run's summary when training starts (every check passed, a checkpoint loaded): the
    run in output_dir has not finished until its own summary is written, and ``--resume`` reads a summary as
    "finished"."""

    def __init__(self, summary_path: Path):
        self.summary_path = summary_path

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save:
            self.summary_path.unlink(missing_ok=True)


def train(config: AlignConfig, resume_from_checkpoint: str | bool | None = None, command: str | None = None) -> dict:
    """Train, save the adapter (peft format, safetensors) and, on a built-in task, evaluate it on held-out
    prompts. Returns the summary (also written to OUTPUT_DIR/summary.json, last: its presence marks a finished
    run). ``resume_from_checkpoint``: a checkpoint directory, or True: the newest good checkpoint of
    ``output_dir`` if there is one, else a fresh start; a finished run is not trained again (its summary is
    returned). Writes the model card (OUTPUT_DIR/README.md) with ``command``, the command line that started
    the run (default: this call); ``push_to_hub`` then uploads the output directory. Raises ``Preempted``
    when a SIGTERM/SIGINT stopped training after saving a checkpoint. Holds the output directory's lock
    (``checkpoints.OutputLock``, rank 0) throughout."""
    output_dir = Path(config.output_dir)
    # Checked before training: a link out of output_dir would otherwise fail the run at its very end.
    summary_path, plot_path, merged_dir = (checkpoints.output_path(output_dir, name)
                                           for name in ("summary.json", "training.png", "merged"))
    with checkpoints.OutputLock(output_dir) if config.should_save else nullcontext():
        if resume_from_checkpoint is True and summary_path.is_file():
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            logger.info("--resume: %s holds a finished run (%s steps; %s): not training again", output_dir,
                        summary.get("steps"), summary_path.name)
            return summary
        return _train(config, resume_from_checkpoint, output_dir, summary_path, plot_path, merged_dir,
                      command or api_command(config))


def _train(config: AlignConfig, resume_from_checkpoint, output_dir: Path, summary_path: Path, plot_path: Path,
           merged_dir: Path, command: str) -> dict:
    trainer = build_trainer(config)
    trainer.add_callback(UnfinishedRun(summary_path))
    try:
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    finally:  # a vLLM engine or server connection is released even when training fails or is preempted
        getattr(getattr(trainer, "sampler", None), "close", lambda: None)()
    trainer.save_model(str(output_dir))
    summary = {"trainer": trainer_name(config), "train_loss": result.training_loss, "steps": trainer.state.global_step,
               "nonfinite_skipped": trainer.nonfinite_steps, "data": trainer.train_dataset.stats.summary()}
    evals = [h for h in trainer.state.log_history if "eval_reward_mean" in h]
    if evals:  # the last evaluation while training
        summary |= {key: value for key, value in evals[-1].items() if key.startswith("eval_")}
    if tasks.is_task(config.dataset) and trainer.is_world_process_zero():
        task = tasks.get_task(config.dataset)
        summary |= trainer.evaluate_task(task, task.prompts("heldout", config.task_eval_prompts, config.seed))
    if trainer.is_world_process_zero():
        if config.merge_on_save:
            model = trainer.accelerator.unwrap_model(trainer.model)
            model.merge_and_unload().save_pretrained(merged_dir)
            trainer.processing_class.save_pretrained(merged_dir)
        plot_training(trainer.state.log_history, summary, plot_path)
        write_card(output_dir, model_card(config, trainer=trainer_name(config), base_model=model_path(config),
                                          stats=trainer.train_dataset.stats, summary=summary, command=command))
        checkpoints.write_atomic(summary_path, json.dumps(summary, indent=2))  # last: marks a finished run
    if config.push_to_hub:  # transformers uploads OUTPUT_DIR (the card and summary included) to hub_model_id
        trainer.push_to_hub(commit_message=f"align {trainer_name(config)}: {trainer.state.global_step} steps")
    return summary


def plot_training(log_history: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins", "reward/mean", "kl", "eval_reward_mean") if any(k in h for h in log_history)]
    evals = [h for h in log_history if "eval_reward_mean" in h]
    panels = len(keys) + bool(evals) + ("true_reward_after" in summary)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(4 * max(panels, 1), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(h["step"], h[key]) for h in log_history if key in h]
        ax.plot(*zip(*pts), marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    if evals:  # evaluation while training: the reward bought per nat of divergence from the reference
        ax = axes[0][len(keys)]
        kl = "eval_kl" if "eval_kl" in evals[0] else "eval_log_ratio_mean"
        ax.plot([0.0] + [h[kl] for h in evals], [evals[0]["eval_reference_reward_mean"]] + [h["eval_reward_mean"] for h in evals],
                marker=".")
        for h in evals:
            ax.annotate(str(h["step"]), (h[kl], h["eval_reward_mean"]), fontsize=7)
        ax.set_title(f"eval reward vs {'KL' if kl == 'eval_kl' else 'log-ratio'} (step)")
        ax.set_xlabel("KL(π‖π_ref)" if kl == "eval_kl" else "mean log π/π_ref")
    if "true_reward_after" in summary:
        ax = axes[0][-1]
        ax.bar(["reference", "aligned"], [summary["true_reward_before"], summary["true_reward_after"]], color=["grey", "tab:green"])
        ax.set_title(f"true reward (win rate {summary['win_rate_vs_reference']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
