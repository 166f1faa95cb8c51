"""Evaluation while training (``eval_steps``): the current policy against its reference on a fixed prompt set.

Every evaluation samples ``eval_num_generations`` completions per prompt from the policy with the training
sampler (HF or vLLM), scores them with the run's reward and logs ``eval/reward_mean``,
``eval/win_rate_vs_reference`` (against the reference's samples on the same prompts and seeds, ties ½),
``eval/kl`` (``eval/log_ratio_mean`` where the samples are tempered or truncated, so not from π itself) and
``eval/completion_length``. The reference's samples do not change during a run: they are drawn once (HF
``generate`` with the adapter disabled, or the frozen reference adapter swapped in) and kept, and drawn again
only if the reference itself changes (CPL-KL freezes it after its warm-up).

Seeds are the same at every evaluation and tagged as evaluation seeds (``derive_seed``'s last part: 0, where
training rollouts have 1), and every sampler runs under a forked RNG, so the training randomness, and a
resumed run's bit-exactness, are those of a run without evaluation.

The completions (prompt, completion, reward, reference completion) go to ``OUTPUT_DIR/completions/step_N.jsonl``
(written atomically) and, as a table, to TensorBoard (markdown text) and Weights & Biases (``wandb.Table``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch
from accelerate.utils import gather_object

from align import checkpoints
from align.eval.policy import Scored, sample_scored, sequence_kl, win_rate
from align.models import reference_policy, reference_snapshot
from align.rewards import RewardFunction
from align.sampling import HFSampler, SamplingParams, derive_seed

TABLE_TAG = "eval/completions"
COLUMNS = ("prompt", "completion", "reward", "reference_completion", "reference_reward")


@dataclass
class PolicyEvaluation:
    """The evaluation of one run: its prompts (token ids), reward, sampling settings and the cached reference."""

    prompt_ids: list[list[int]]
    reward: RewardFunction
    params: SamplingParams
    score_options: dict
    _reference: Scored | None = None
    _reference_of: object = None  # the reference snapshot the cached samples come from (None: adapter disabled)

    def __call__(self, trainer) -> dict[str, float]:
        """Evaluate now: metrics under ``eval_`` names (``eval/`` in TensorBoard and W&B); the table is written."""
        rows = gather_object(self._rows(trainer)) if trainer.accelerator.num_processes > 1 else self._rows(trainer)
        metrics = self.metrics(rows, kl_name="kl" if trainer.args.samples_from_policy else "log_ratio_mean")
        if trainer.is_world_process_zero():
            write_table(trainer, rows)
        return metrics

    def _rows(self, trainer) -> list[dict]:
        """This rank's share of the prompts: one row per policy sample, beside the reference's sample of the
        same prompt and seed."""
        accelerator, tokenizer = trainer.accelerator, trainer.processing_class
        model = accelerator.unwrap_model(trainer.model)
        prompt_ids = self.prompt_ids[accelerator.process_index :: accelerator.num_processes]
        # no step (-1): the same seeds at every evaluation; last part 0: evaluation (training rollouts have 1)
        params = replace(self.params, seed=derive_seed(trainer.args.seed, -1, 0, accelerator.process_index, 0))
        was_training = model.training
        model.eval()
        try:
            policy = sample_scored(trainer.sampler, tokenizer, prompt_ids, self.reward, params, **self.score_options)
            snapshot = reference_snapshot(model)
            if self._reference is None or self._reference_of is not snapshot:
                with reference_policy(model):
                    self._reference = sample_scored(HFSampler(model, tokenizer), tokenizer, prompt_ids, self.reward,
                                                    params, **self.score_options)
                self._reference_of = snapshot
            log_ratio = sequence_kl(model, [p for p in prompt_ids for _ in range(params.n)], policy.completion_ids,
                                    tokenizer.pad_token_id)
        finally:
            model.train(was_training)
        reference = self._reference
        return [{"prompt": policy.prompts[i], "completion": policy.texts[i], "reward": policy.rewards[i].item(),
                 "reference_completion": reference.texts[i], "reference_reward": reference.rewards[i].item(),
                 "log_ratio": log_ratio[i].item(), "length": len(policy.completion_ids[i])}
                for i in range(len(policy.texts))]

    @staticmethod
    def metrics(rows: list[dict], kl_name: str = "kl") -> dict[str, float]:
        """``kl_name`` is ``kl`` where the samples come from π itself (temperature 1, no truncation): the mean
        log-ratio then estimates KL(π‖π_ref) (k1, beside k3); elsewhere it is only the mean log-ratio."""
        rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
        reference = torch.tensor([r["reference_reward"] for r in rows], dtype=torch.float64)
        log_ratio = torch.tensor([r["log_ratio"] for r in rows], dtype=torch.float64)
        metrics = {
            "eval_reward_mean": rewards.nanmean().item(),  # failed (NaN) rewards left out
            "eval_reference_reward_mean": reference.nanmean().item(),
            "eval_win_rate_vs_reference": win_rate(rewards, reference),
            f"eval_{kl_name}": log_ratio.mean().item(),
            "eval_completion_length": sum(r["length"] for r in rows) / len(rows),
        }
        if kl_name == "kl":  # k3 = (r − 1) − log r, r = π_ref/π: unbiased, never negative, lower variance
            metrics["eval_kl_k3"] = (torch.expm1(-log_ratio) + log_ratio).mean().item()
        return metrics


def markdown_table(rows: list[dict]) -> str:
    """The completions as a markdown table (TensorBoard renders text summaries as markdown)."""

    def cell(value) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows])


def write_table(trainer, rows: list[dict]) -> None:
    """``OUTPUT_DIR/completions/step_N.jsonl`` always, and the table to every ``report_to`` target that takes one."""
    from transformers.integrations import TensorBoardCallback, WandbCallback

    step = trainer.state.global_step
    directory = checkpoints.output_path(trainer.args.output_dir, "completions")
    directory.mkdir(parents=True, exist_ok=True)
    checkpoints.write_atomic(checkpoints.output_path(directory, f"step_{step}.jsonl"),
                             "".join(json.dumps({c: row[c] for c in COLUMNS}) + "\n" for row in rows))
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            callback.tb_writer.add_text(TABLE_TAG, markdown_table(rows), step)
            callback.tb_writer.flush()
        elif isinstance(callback, WandbCallback) and getattr(callback, "_wandb", None) is not None and callback._wandb.run:
            table = callback._wandb.Table(columns=list(COLUMNS), data=[[row[c] for c in COLUMNS] for row in rows])
            callback._wandb.log({TABLE_TAG: table})
