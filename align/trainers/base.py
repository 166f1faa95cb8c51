"""What every align trainer shares: the concatenated forward, reference log-probs, on-policy batches,
metrics, the non-finite guard and crash-safe checkpoints. A trainer subclass only defines ``objective``."""

from __future__ import annotations

import logging
import math
import pickle
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from align import checkpoints
from align.data import ExampleDataset, GroupCollator, LengthGroupedSampler, concat_rows, padded_length
from align.models import completion_logps, reference_completion_logps, sequence_logps
from align.rewards import RewardFunction, score
from align.sampling import Sampler, SamplingParams
from align.trainers.config import AlignConfig
from align.trainers.reference import cached_reference_logps

logger = logging.getLogger(__name__)


class LogProbs:
    """Policy log-probs of one batch: per completion (B, K) and per token (B·K, T-1)."""

    def __init__(self, token_logps: torch.Tensor, completion_mask: torch.Tensor, group_size: int, length_normalize: bool):
        self.token = token_logps
        self.n_tokens = completion_mask[:, 1:].sum(-1).view(-1, group_size).float()
        self.sequence = sequence_logps(token_logps, completion_mask, length_normalize=length_normalize).view(-1, group_size)


def nonfinite_stop(what: str, step: int) -> FloatingPointError:
    return FloatingPointError(f"non-finite {what} at step {step} (on_nonfinite=stop); set on_nonfinite: skip to "
                              "skip such steps, or lower the learning rate and resume from the last checkpoint")


class NonFiniteGuard(TrainerCallback):
    """Drops an optimizer step whose loss or gradient is NaN/inf (``on_nonfinite=skip``), or stops the run."""

    def __init__(self, trainer: "AlignTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        params = [p for p in trainer.model.parameters() if p.grad is not None]
        bad_loss, trainer.nonfinite_loss = trainer.nonfinite_loss, False
        if not bad_loss and all(torch.isfinite(p.grad).all() for p in params):
            return
        what = "loss" if bad_loss else "gradient"
        if args.on_nonfinite == "stop":
            raise nonfinite_stop(what, state.global_step + 1)
        # AdamW skips parameters without gradient: no update, no moment decay, no weight decay. (A zero
        # gradient would not do: the moments would still move the weights.)
        for p in params:
            p.grad = None
        trainer.nonfinite_steps += 1
        logger.warning("non-finite %s at step %d: step skipped (%d so far)", what, state.global_step + 1,
                       trainer.nonfinite_steps)


class SyncSamplerCallback(TrainerCallback):
    """Keeps the sampler on the current policy: a push when training starts (a resumed run has just
    loaded its adapter) and ``sync_weights`` after every optimizer step (the sampler applies its own
    ``sync_every``)."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def on_train_begin(self, args, state, control, **kwargs):
        self.sampler.push_weights()

    def on_step_end(self, args, state, control, **kwargs):
        self.sampler.sync_weights()


class AlignTrainer(Trainer):
    """``transformers.Trainer`` (accelerate, mixed precision, accumulation, checkpoints, logging) with
    align's batches: group-major rows of one prompt and K completions (see ``GroupCollator``).

    Subclasses set ``needs_reference`` and ``orders_by_reward`` and implement ``objective``.
    """

    needs_reference = False
    orders_by_reward = True  # online: put the best completion first and weight out ties (pair losses)

    def __init__(self, model, args: AlignConfig, train_dataset, processing_class: PreTrainedTokenizerBase,
                 eval_dataset=None, reward_fn: RewardFunction | None = None, sampler: Sampler | None = None,
                 callbacks=None):
        callbacks = list(callbacks or [])
        if args.online:
            if reward_fn is None or sampler is None:
                raise ValueError("online training needs a reward function and a sampler")
            callbacks.append(SyncSamplerCallback(sampler))
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=GroupCollator(processing_class.pad_token_id),
                         callbacks=callbacks)
        self.add_callback(NonFiniteGuard(self))
        self.reward_fn, self.sampler = reward_fn, sampler
        self.nonfinite_steps = 0
        self.nonfinite_loss = False  # set by compute_loss, read by NonFiniteGuard before the optimizer step
        self.skipped_groups = 0
        self._staging: str | None = None  # where the checkpoint being saved is written (see _save_checkpoint)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        if args.precompute_ref_logps and self.needs_reference:
            self.train_dataset = self._with_reference_logps(self.train_dataset)
            if self.eval_dataset is not None:
                self.eval_dataset = self._with_reference_logps(self.eval_dataset)

    def _with_reference_logps(self, dataset: ExampleDataset) -> ExampleDataset:
        """The examples with their reference log-probs (``ref_logps``, read by the collator), from the cache
        or one no-grad pass (rank 0 first; the other ranks then read its cache)."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError("precompute_ref_logps runs before the model is sharded, so not with FSDP or DeepSpeed; "
                             "leave it off there (the reference forward then runs every step)")
        was_training = self.model.training
        self.model.eval()
        try:
            with self.accelerator.main_process_first():
                logps = cached_reference_logps(self.model, dataset, self.processing_class.pad_token_id,
                                               batch_size=self.args.per_device_eval_batch_size,
                                               length_normalize=self.args.length_normalize)
        finally:
            self.model.train(was_training)
        examples = [{**dataset[i], "ref_logps": row} for i, row in enumerate(logps.tolist())]
        return ExampleDataset(examples, dataset.stats)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        if self.args.online:  # a prompt's length says little about its batch's (sampled) length
            return torch.utils.data.RandomSampler(dataset)
        a = self.args
        return LengthGroupedSampler([padded_length(dataset[i]) for i in range(len(dataset))],
                                    a.per_device_train_batch_size * a.world_size * a.gradient_accumulation_steps)

    # --- the algorithm ------------------------------------------------------------------------
    def objective(self, logps: LogProbs, ref_logps: torch.Tensor | None, batch: dict) -> tuple[torch.Tensor, dict]:
        """Per-prompt losses (B,) and a dict of scalar metrics."""
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = self.online_batch(inputs["prompt_ids"]) if "prompt_ids" in inputs else inputs
        if batch is None:  # every sampled group was dropped (failed reward): an empty step
            return self._zero_loss(model)
        k = batch["group_size"]
        forward = {key: batch[key] for key in ("input_ids", "attention_mask", "completion_mask")}
        logps = LogProbs(completion_logps(model, **forward), batch["completion_mask"], k, self.args.length_normalize)
        ref_logps = None
        if self.needs_reference:
            ref_logps = batch.get("ref_logps")
            if ref_logps is None:
                ref_token = reference_completion_logps(self.accelerator.unwrap_model(model), **forward)
                ref_logps = sequence_logps(ref_token, batch["completion_mask"],
                                           length_normalize=self.args.length_normalize).view(-1, k)
        losses, metrics = self.objective(logps, ref_logps, batch)
        weights = batch.get("weights")
        loss = losses.mean() if weights is None else (losses * weights).sum() / weights.sum().clamp(min=1)
        if not torch.isfinite(loss):
            return self._nonfinite_loss(model)
        self._record(metrics)
        return (loss, None) if return_outputs else loss

    def _nonfinite_loss(self, model) -> torch.Tensor:
        """For a NaN/inf loss: stop (``on_nonfinite=stop``), or a zero loss and a flag on which NonFiniteGuard
        drops the optimizer step and counts it."""
        if self.args.on_nonfinite == "stop":
            raise nonfinite_stop("loss", self.state.global_step + 1)
        self.nonfinite_loss = model.training
        return self._zero_loss(model)

    @staticmethod
    def _zero_loss(model) -> torch.Tensor:
        """A loss of 0 attached to the graph, so that backward runs (and every rank takes part in it)."""
        return sum(p.view(-1)[0] * 0.0 for p in model.parameters() if p.requires_grad)

    # --- on-policy batches ----------------------------------------------------------------------
    def online_batch(self, prompt_ids: list[list[int]]) -> dict | None:
        """Sample k completions per prompt from the current policy, score them, batch them."""
        args, tok = self.args, self.processing_class
        k = args.num_generations
        # The seed is a function of (seed, step, rank): a resumed run samples exactly what it would have.
        seed = (args.seed * 1_000_003 + self.state.global_step) * 64 + self.accelerator.process_index
        params = SamplingParams(n=k, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=seed)
        samples = self.sampler.sample(prompt_ids, params)
        prompts = tok.batch_decode(prompt_ids, skip_special_tokens=True)
        rewards = score(self.reward_fn, [p for p in prompts for _ in range(k)], samples.texts,
                        on_error=args.reward_on_error, retries=args.reward_retries, timeout=args.reward_timeout)
        rewards = torch.tensor(rewards, dtype=torch.float32).view(-1, k)
        keep = torch.isfinite(rewards).all(dim=1)
        self.skipped_groups += int((~keep).sum())
        if not keep.any():
            return None
        completions = [samples.completion_ids[g * k : (g + 1) * k] for g in range(len(prompt_ids))]
        if self.orders_by_reward:  # best first, so pair losses see (chosen, rejected)
            order = rewards.argsort(dim=1, descending=True, stable=True)
            rewards = rewards.gather(1, order)
            completions = [[c[j] for j in o] for c, o in zip(completions, order.tolist())]
        kept = keep.nonzero().flatten().tolist()
        rewards = rewards[keep]
        batch = concat_rows([prompt_ids[g] for g in kept for _ in range(k)],
                            [c for g in kept for c in completions[g]], tok.pad_token_id)
        batch = {key: v.to(self.args.device) for key, v in batch.items()}
        batch.update(group_size=k, scores=rewards.to(self.args.device))
        if self.orders_by_reward:  # a group whose rewards are all equal carries no preference
            batch["weights"] = (rewards[:, 0] > rewards[:, -1]).float().to(self.args.device)
        self._record({"reward/mean": rewards.mean(), "reward/std": rewards.std(unbiased=False),
                      "completion_length": torch.tensor([len(c) for c in samples.completion_ids]).float().mean()})
        return batch

    # --- checkpoints (see align.checkpoints) ---------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:  # the newest checkpoint that verifies, not merely the newest
            resume_from_checkpoint = str(checkpoints.last_good_checkpoint(self.args.output_dir))
        if resume_from_checkpoint:
            self._restore(resume_from_checkpoint)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except pickle.UnpicklingError:  # transformers' torch.load(weights_only=True) refused a file
            raise checkpoints.CheckpointError(
                f"{resume_from_checkpoint}: a file holds objects other than tensors and was not loaded; such a "
                "file can run code when unpickled: resume only from checkpoints you trust") from None

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint, written in ``.tmp-checkpoint-N`` and committed with one rename."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = checkpoints.output_path(run_dir, name)
        staging = run_dir / (checkpoints.TMP_PREFIX + name)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state into the staged directory
        if not self.args.should_save:
            return
        staged = staging / name
        if self.state.best_model_checkpoint == str(staged):
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
        checkpoints.write_manifest(staged, self._resume_state())
        checkpoints.commit(staged, final)
        checkpoints.remove_stale(run_dir)
        best = self.state.best_model_checkpoint
        checkpoints.rotate(run_dir, self.args.save_total_limit, {final} | ({Path(best)} if best else set()))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The final save is written beside ``output_dir`` and moved in file by file, so a crash leaves the
        earlier files whole (a checkpoint's save, ``_internal_call``, is in its staging directory already)."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        final = Path(output_dir or self.args.output_dir)
        staged = checkpoints.output_path(final, checkpoints.TMP_PREFIX + "final")
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # what a crashed save left
        self.accelerator.wait_for_everyone()
        super().save_model(str(staged), _internal_call)
        if self.args.should_save:
            checkpoints.publish(staged, final)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:  # transformers pickles the arguments; JSON needs no unpickling to read
            directory = Path(output_dir or self.args.output_dir)
            (directory / TRAINING_ARGS_NAME).unlink(missing_ok=True)
            (directory / "training_args.json").write_text(self.args.to_json_string())

    def _resume_state(self) -> dict:
        """What resuming needs beyond transformers' files: align's counters, and what fixes the data
        order and the on-policy sampling seeds (the seeds and the training data)."""
        return {"nonfinite_steps": self.nonfinite_steps, "skipped_groups": self.skipped_groups,
                "seed": self.args.seed, "data_seed": self.args.data_seed,
                "train_data": checkpoints.data_fingerprint(self.train_dataset)}

    def _restore(self, checkpoint: str) -> None:
        """Verify ``checkpoint`` against its manifest and this run, and take back align's counters
        (transformers restores the rest)."""
        saved, current = checkpoints.verify(checkpoint), self._resume_state()
        for key in ("seed", "data_seed", "train_data"):
            if saved.get(key) != current[key]:
                what = "training data" if key == "train_data" else f"{key} ({saved.get(key)!r}, now {current[key]!r})"
                raise checkpoints.CheckpointError(f"{checkpoint} was trained with another {what}: resuming would not "
                                                  "continue the same run; use the original settings and data, or a "
                                                  "new output_dir")
        self.nonfinite_steps, self.skipped_groups = saved["nonfinite_steps"], saved["skipped_groups"]

    # --- metrics ------------------------------------------------------------------------------
    def _record(self, metrics: dict) -> None:
        mode = "train" if self.model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][key].append(float(value))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        metrics = self._metrics[mode]
        if self.accelerator.num_processes > 1:  # each rank saw its own share of the batches: log them all
            metrics = defaultdict(list)
            for part in gather_object([dict(self._metrics[mode])]):
                for key, values in part.items():
                    metrics[key].extend(values)
        for key, values in metrics.items():
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                logs[prefix + key] = sum(finite) / len(finite)
        if mode == "train":
            logs["nonfinite_skipped"] = self.nonfinite_steps
            if self.args.online:
                logs["skipped_groups"] = self.skipped_groups
        self._metrics[mode].clear()
        super().log(logs, start_time)
