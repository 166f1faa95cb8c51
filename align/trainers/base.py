"""The run infrastructure every align trainer shares (``AlignTrainer``: the non-finite guard, crash-safe
checkpoints, metrics, one ``loss(model, batch)`` hook), and policy training on top of it
(``PolicyTrainer``: the concatenated log-prob forward, the reference policy, on-policy rollouts).

A policy trainer subclass declares its config class and data kinds and implements ``objective``; the
reward-model trainer implements ``loss`` directly. ``align.api`` and ``align.cli`` read the declarations
(``TRAINERS`` in ``align.trainers``) and hold no trainer names.
"""

from __future__ import annotations

import logging
import math
import pickle
import shutil
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from accelerate.utils import gather_object
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from align import checkpoints
from align.data import ExampleDataset, GroupCollator, LengthGroupedSampler, padded_length
from align.errors import ConfigError, NonFiniteError, Preempted
from align.hf_utils import custom_mask_attention, layout_exact, varlen_attention
from align.models import REFERENCE_FILE, base_weights_modified, freeze_reference, completion_logps, disable_dropout, load_policy, reference_snapshot, reference_completion_logps, sequence_logps
from align.rewards import RewardFunction
from align.sampling import Sampler, SamplingParams, derive_seed
from align.tasks import Task, is_task
from align.trainers.config import AlignConfig
from align.trainers.evaluation import PolicyEvaluation
from align.trainers.preemption import PreemptionCallback
from align.trainers.reference import cached_reference_logps
from align.trainers.rollout import rollout

logger = logging.getLogger(__name__)


def scored_offline(dataset) -> bool:
    """Whether ``dataset`` holds completions (pairs, groups) rather than prompts alone: only then has it a loss."""
    return dataset is not None and len(dataset) > 0 and bool(dataset[0].get("completion_ids"))


class LogProbs:
    """Policy log-probs of one batch: per completion (B, K) and per token (B·K, T-1)."""

    def __init__(self, token_logps: torch.Tensor, completion_mask: torch.Tensor, group_size: int, length_normalize: bool):
        self.token = token_logps
        self.n_tokens = completion_mask[:, 1:].sum(-1).view(-1, group_size).float()
        self.sequence = sequence_logps(token_logps, completion_mask, length_normalize=length_normalize).view(-1, group_size)


def nonfinite_stop(what: str, step: int) -> NonFiniteError:
    return NonFiniteError(f"non-finite {what} at step {step} (on_nonfinite=stop); set on_nonfinite: skip to "
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
    ``sync_every``). Also restarts the count of rollouts within a step (their sampling seeds)."""

    def __init__(self, trainer: "PolicyTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.sampler.push_weights()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.rollouts_this_step = 0
        self.trainer.sampler.sync_weights()


class AlignTrainer(Trainer):
    """``transformers.Trainer`` (accelerate, mixed precision, accumulation, checkpoints, logging) with
    align's run infrastructure. Batches are group-major rows of one prompt and K completions (see
    ``GroupCollator``). A subclass declares what it is and implements ``loss``."""

    config_class: ClassVar[type[AlignConfig]] = AlignConfig
    data_kinds: ClassVar[tuple[str, ...]] = ("pairs",)  # offline dataset kinds it trains on

    def __init__(self, model, args: AlignConfig, train_dataset, processing_class: PreTrainedTokenizerBase,
                 eval_dataset=None, callbacks=None):
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=GroupCollator(processing_class.pad_token_id),
                         callbacks=callbacks)
        self.add_callback(NonFiniteGuard(self))
        self.preemption = PreemptionCallback(self)
        self.add_callback(self.preemption)
        self.nonfinite_steps = 0
        self.nonfinite_loss = False  # set by compute_loss, read by NonFiniteGuard before the optimizer step
        self._layout: str | None = None  # how batches run (forward_rows), decided at the first forward (see layout)
        self._staging: str | None = None  # where the checkpoint being saved is written (see _save_checkpoint)
        self._length_sampler: LengthGroupedSampler | None = None  # the training order (group_by_length)
        self._resume_epoch_seed: int | None = None  # its seed for the epoch a resumed run continues
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    # --- what a trainer declares ------------------------------------------------------------------
    @classmethod
    def requires_scores(cls, config: AlignConfig, kind: str) -> bool:
        """Whether offline rows of ``kind`` must carry rewards (rows without are scored with ``reward``)."""
        return False

    @classmethod
    def load_model(cls, config: AlignConfig, model_path: str, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
        """The model this trainer trains, built from ``config`` (nothing trained yet)."""
        raise NotImplementedError

    def evaluate_task(self, task: Task, prompts: list) -> dict:
        """Held-out figures of the trained model on a built-in task's held-out ``prompts``."""
        raise NotImplementedError

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        if self.args.online:  # a prompt's length says little about its batch's (sampled) length
            return torch.utils.data.RandomSampler(dataset)
        a = self.args
        self._length_sampler = LengthGroupedSampler([padded_length(dataset[i]) for i in range(len(dataset))],
                                                    a.per_device_train_batch_size * a.world_size * a.gradient_accumulation_steps,
                                                    resume_seed=self._resume_epoch_seed)
        return self._length_sampler

    def _get_eval_sampler(self, eval_dataset):
        """In order: transformers' length grouping reads ``input_ids``, which align's examples do not have
        (and the order of an evaluation changes nothing)."""
        return torch.utils.data.SequentialSampler(eval_dataset)

    # --- the loss -----------------------------------------------------------------------------------
    def layout(self, model) -> str:
        """How batches run (``align.hf_utils.forward_rows``): ``packed`` (``padding_free``), ``shared_prefix``
        (``prefix_sharing``) or ``padded``, each only where ``model`` computes it exactly. Auto (null): packed
        with varlen flash attention; else prompts shared with attention that takes a 4D mask (README)."""
        if self._layout is None:
            a = self.args
            packed = varlen_attention(model) if a.padding_free is None else a.padding_free
            shared = (not packed and custom_mask_attention(model)) if a.prefix_sharing is None else a.prefix_sharing
            wanted = [layout for layout, on in (("packed", packed), ("shared_prefix", shared)) if on]
            self._layout = next((layout for layout in wanted if layout_exact(model, layout)), "padded")
            logger.info("batches: %s (padding_free=%s, prefix_sharing=%s)", self._layout, a.padding_free,
                        a.prefix_sharing)
        return self._layout

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """Per-prompt losses (B,) and a dict of scalar metrics for one batch."""
        raise NotImplementedError

    def prepare_batch(self, inputs: dict) -> dict | None:
        """The batch ``loss`` sees (policy trainers sample it online); None: nothing to train on."""
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = self.prepare_batch(inputs)
        if batch is None:
            return self._zero_loss(model)
        losses, metrics = self.loss(model, batch)
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

    # --- checkpoints (see align.checkpoints) ---------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """``resume_from_checkpoint``: a checkpoint directory (strict), or True: the newest checkpoint of
        ``output_dir`` that verifies, or a fresh start when there is none. Raises ``Preempted`` after a
        SIGTERM/SIGINT stopped training at a step end and saved its checkpoint (``PreemptionCallback``)."""
        if resume_from_checkpoint is True:  # the newest checkpoint that verifies, not merely the newest
            found = checkpoints.newest_good_checkpoint(self.args.output_dir)
            if found is None:
                logger.info("--resume: no checkpoint in %s yet, starting a fresh run", self.args.output_dir)
            else:
                logger.info("--resume: resuming from %s", found)
            resume_from_checkpoint = found and str(found)
        if resume_from_checkpoint:
            self._restore(resume_from_checkpoint)
        try:
            result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except pickle.UnpicklingError:  # transformers' torch.load(weights_only=True) refused a file
            raise checkpoints.CheckpointError(
                f"{resume_from_checkpoint}: a file holds objects other than tensors and was not loaded; such a "
                "file can run code when unpickled: resume only from checkpoints you trust") from None
        finally:
            self.preemption.uninstall()
        step = self.preemption.stopped_at
        if step is not None:
            checkpoint = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            raise Preempted(f"stopped on a signal after step {step} of {self.state.max_steps}, checkpoint saved in "
                            f"{checkpoint}: run the same command with --resume to continue", str(checkpoint), step)
        return result

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
        snapshot = reference_snapshot(self.model)
        if snapshot is not None:  # a frozen reference adapter (adapter_path, CPL-KL after its warm-up)
            save_file({k: v.contiguous() for k, v in snapshot.items()}, staged / REFERENCE_FILE)
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
        super().save_model(str(staged), _internal_call=True)  # no push yet: align.api pushes once the card is written
        if self.args.should_save:
            checkpoints.publish(staged, final)

    def create_model_card(self, *args, **kwargs) -> None:
        """Keeps align's card (``align.trainers.card``, written before ``push_to_hub``) rather than transformers'."""
        if not (Path(self.args.output_dir) / "README.md").exists():
            super().create_model_card(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:  # transformers pickles the arguments; JSON needs no unpickling to read
            directory = Path(output_dir or self.args.output_dir)
            (directory / TRAINING_ARGS_NAME).unlink(missing_ok=True)
            (directory / "training_args.json").write_text(self.args.to_json_string())

    def _resume_state(self) -> dict:
        """What resuming needs beyond transformers' files: align's counters, and what fixes the data
        order and the on-policy sampling seeds (the seeds and the training data; in the middle of an epoch,
        the seed of its length-grouped order, which a resumed run cannot draw again)."""
        mid_epoch = (self.state.epoch or 0) % 1 != 0
        sampler = self._length_sampler
        return {"nonfinite_steps": self.nonfinite_steps, "seed": self.args.seed, "data_seed": self.args.data_seed,
                "train_data": checkpoints.data_fingerprint(self.train_dataset),
                "epoch_seed": sampler.seed if sampler is not None and mid_epoch else None}

    def _restore(self, checkpoint: str) -> dict:
        """Verify ``checkpoint`` against its manifest and this run, and take back align's counters
        (transformers restores the rest); returns the saved state."""
        saved, current = checkpoints.verify(checkpoint), self._resume_state()
        for key in ("seed", "data_seed", "train_data"):
            if saved.get(key) != current[key]:
                what = "training data" if key == "train_data" else f"{key} ({saved.get(key)!r}, now {current[key]!r})"
                raise checkpoints.CheckpointError(f"{checkpoint} was trained with another {what}: resuming would not "
                                                  "continue the same run; use the original settings and data, or a "
                                                  "new output_dir")
        self.nonfinite_steps = saved["nonfinite_steps"]
        self._resume_epoch_seed = saved.get("epoch_seed")
        if (Path(checkpoint) / REFERENCE_FILE).exists():
            freeze_reference(self.model, load_file(Path(checkpoint) / REFERENCE_FILE))
        return saved

    # --- metrics ------------------------------------------------------------------------------
    def _record(self, metrics: dict) -> None:
        mode = "train" if self.model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][key].append(float(value))

    def _counters(self) -> dict:
        """Run-long counts logged with every training log."""
        return {"nonfinite_skipped": self.nonfinite_steps}

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
            logs |= self._counters()
        self._metrics[mode].clear()
        super().log(logs, start_time)


class PolicyTrainer(AlignTrainer):
    """Trains a LoRA policy (the reference is the same model, adapter disabled). A subclass sets
    ``needs_reference`` and ``online_pairs`` and implements ``objective``."""

    needs_reference: ClassVar[bool] = False
    online_pairs: ClassVar[bool] = False  # online: reduce each sampled group to (best, worst) for a pair loss
    token_reference: ClassVar[bool] = False  # the objective reads per-token reference log-probs (batch["ref_token_logps"])

    def __init__(self, model, args: AlignConfig, train_dataset, processing_class: PreTrainedTokenizerBase,
                 eval_dataset=None, reward_fn: RewardFunction | None = None, sampler: Sampler | None = None,
                 eval_prompt_ids: list[list[int]] | None = None, eval_reward_fn: RewardFunction | None = None,
                 callbacks=None):
        eval_reward_fn = eval_reward_fn or reward_fn
        if (args.online and reward_fn is None) or (eval_prompt_ids and eval_reward_fn is None) or (
                (args.online or eval_prompt_ids) and sampler is None):
            raise ValueError("online training and evaluation while training need a reward function and a sampler")
        if eval_prompt_ids and eval_dataset is None:  # transformers evaluates only with an eval_dataset
            eval_dataset = ExampleDataset([{"prompt_ids": ids} for ids in eval_prompt_ids])
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks)
        if base_weights_modified(model) and reference_snapshot(model) is None and (self.uses_reference or is_task(args.dataset)):
            raise ConfigError(f"lora_init={args.lora_init} (or the init of adapter_path) subtracts the adapter's starting "
                              "value from the base weights, so the adapter-disabled model is not the base model and "
                              f"cannot be the reference policy that {type(self).__name__} (or a built-in task's evaluation) uses; use "
                              "lora_init=default or gaussian, or a trainer without a reference (cpl, use_reference=false)")
        self.reward_fn, self.sampler = reward_fn, sampler
        self.skipped_groups = 0  # online groups dropped: a failed reward, or (pair losses) all rewards equal
        self.rollouts_this_step = 0
        self.policy_evaluation = None
        if eval_prompt_ids:
            self.policy_evaluation = PolicyEvaluation(
                eval_prompt_ids, eval_reward_fn, SamplingParams(n=args.eval_num_generations, max_new_tokens=args.max_new_tokens,
                                                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k),
                {"on_error": args.reward_on_error, "retries": args.reward_retries, "timeout": args.reward_timeout})
        if sampler is not None:
            self.add_callback(SyncSamplerCallback(self))
        if args.precompute_ref_logps and self.uses_reference:
            self.train_dataset = self._with_reference_logps(self.train_dataset)
            if scored_offline(self.eval_dataset):
                self.eval_dataset = self._with_reference_logps(self.eval_dataset)

    @property
    def uses_reference(self) -> bool:
        return self.needs_reference

    @classmethod
    def load_model(cls, config: AlignConfig, model_path: str, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
        model = load_policy(model_path, adapter_path=config.adapter_path, dtype=config.dtype,
                           trust_remote_code=config.trust_remote_code, r=config.lora_r, alpha=config.lora_alpha,
                           dropout=config.lora_dropout, target_modules=config.lora_target_modules or "all-linear",
                           use_dora=config.use_dora, use_rslora=config.use_rslora, init=config.lora_init)
        if config.disable_dropout:
            disable_dropout(model)
        return model

    def evaluate_task(self, task: Task, prompts: list) -> dict:
        """The policy against its reference on the same prompts and seeds, under the task's reward."""
        return task.evaluate(self.accelerator.unwrap_model(self.model), self.processing_class, prompts,
                             max_new_tokens=self.args.max_new_tokens, seed=self.args.seed + 1)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The loss on an offline eval set (pairs or scored groups), and the policy's samples against the
        reference's (``align.trainers.evaluation``). A set of prompts alone has no loss to evaluate: online,
        the loss of fresh samples would only repeat the sampled figures."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        metrics = {}
        if scored_offline(dataset):
            metrics = super().evaluate(dataset, ignore_keys, metric_key_prefix)
        if self.policy_evaluation is not None:
            figures = self.policy_evaluation(self)
            self.log(dict(figures))
            metrics |= figures
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, figures)
        return metrics

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
                                               length_normalize=self.args.length_normalize,
                                               layout=self.layout(self.model))
        finally:
            self.model.train(was_training)
        examples = [{**dataset[i], "ref_logps": row} for i, row in enumerate(logps.tolist())]
        return ExampleDataset(examples, dataset.stats)

    # --- the algorithm ------------------------------------------------------------------------
    def objective(self, logps: LogProbs, ref_logps: torch.Tensor | None, batch: dict) -> tuple[torch.Tensor, dict]:
        """Per-prompt losses (B,) and a dict of scalar metrics."""
        raise NotImplementedError

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        k = batch["group_size"]
        forward = {key: batch[key] for key in ("input_ids", "attention_mask", "completion_mask")}
        ref_logps = None
        if self.uses_reference:
            ref_logps = batch.get("ref_logps")
            if ref_logps is None:
                ref_token = reference_completion_logps(self.accelerator.unwrap_model(model), **forward,
                                                       layout=self.layout(model), group_size=k)
                ref_logps = sequence_logps(ref_token, batch["completion_mask"],
                                           length_normalize=self.args.length_normalize).view(-1, k)
                if self.token_reference:
                    batch["ref_token_logps"] = ref_token
        # the policy forward after the reference's: a frozen reference adapter is swapped in and out of the
        # weights, which must not change while the policy's graph is alive
        token_logps = completion_logps(model, **forward, layout=self.layout(model), group_size=k)
        logps = LogProbs(token_logps, batch["completion_mask"], k, self.args.length_normalize)
        return self.objective(logps, ref_logps, batch)

    def log_ratio_metrics(self, logps: LogProbs, ref_logps: torch.Tensor) -> dict:
        """log π(y|x) − log π_ref(y|x) per completion (summed over tokens). Its mean estimates KL(π‖π_ref) only
        on the policy's own samples drawn at temperature 1 without truncation; there it is logged as ``kl``
        (the k1 estimator) beside ``kl_k3`` = mean of (r − 1) − log r, r = π_ref/π, unbiased and lower in
        variance (Schulman 2020, "Approximating KL divergence"). Elsewhere (offline data, best/worst pairs,
        tempered or truncated sampling) only ``log_ratio/mean`` is logged."""
        log_ratio = (logps.sequence - ref_logps).detach()
        if self.args.length_normalize:  # per-token means back to sums
            log_ratio = log_ratio * logps.n_tokens
        metrics = {"log_ratio/mean": log_ratio.mean()}
        a = self.args
        if a.online and not self.online_pairs and a.samples_from_policy:
            metrics |= {"kl": log_ratio.mean(), "kl_k3": (torch.expm1(-log_ratio) + log_ratio).mean()}
        return metrics

    def prepare_batch(self, inputs: dict) -> dict | None:
        if "prompt_ids" not in inputs:
            return inputs
        a = self.args
        # Seeds differ for every (run seed, step, micro-batch, rank, training or evaluation) and are a function
        # of them alone, so a resumed run samples exactly what it would have; the sampler derives each
        # prompt's and sample's seed from this one.
        seed = derive_seed(a.seed, self.state.global_step, self.rollouts_this_step, self.accelerator.process_index,
                           int(self.model.training))
        self.rollouts_this_step += 1
        params = SamplingParams(n=a.num_generations, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                top_p=a.top_p, top_k=a.top_k, seed=seed)
        batch, metrics = rollout(inputs["prompt_ids"], self.sampler, self.reward_fn, params, self.processing_class,
                                 pairs=self.online_pairs, on_error=a.reward_on_error, retries=a.reward_retries,
                                 timeout=a.reward_timeout)
        self.skipped_groups += metrics.pop("skipped_groups")
        self._record(metrics)
        return None if batch is None else {key: v.to(a.device) if torch.is_tensor(v) else v for key, v in batch.items()}

    def _counters(self) -> dict:
        return super()._counters() | ({"skipped_groups": self.skipped_groups} if self.args.online else {})

    def _resume_state(self) -> dict:
        return super()._resume_state() | {"skipped_groups": self.skipped_groups}

    def _restore(self, checkpoint: str) -> dict:
        saved = super()._restore(checkpoint)
        self.skipped_groups = saved["skipped_groups"]
        return saved
