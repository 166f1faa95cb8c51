"""Reward-model trainer of "Secrets of RLHF in Large Language Models Part II: Reward Modeling" (Wang et
al. 2024, arXiv 2401.06080), and the ensemble that measures preference strength.

A reward model is a sequence-classification model with one output (``align.rewards.model``) and a LoRA
adapter; the newly initialised score head is trained and saved with it (peft ``modules_to_save``). It is
trained with Bradley-Terry on the concatenated (chosen, rejected) batch, with the paper's options.
Formulas and section/equation numbers are the paper's (its typos are named where they matter). Where
the paper is silent, align chooses (and says so at the option):

* adaptive margin (Eq. 6, inside σ as in Llama 2; the printed equation puts it outside, a typo):
  ``m = margin_scale · max(μ̂, 0)``; a flipped pair has μ̂ negated first, so its margin is ``|μ̂|``.
* label smoothing (Eq. 5): α is not given; the slice is all pairs, the strongest fraction (§2.4, Fig. 6)
  or the pairs with μ̂ < 0 (the "Soft Label + Margin" method of §2.5).
* flipping (§2.4.1): the pairs of the *training set* the ensemble disagrees with (μ̂ < 0) are swapped
  once, before training, the lowest first, at most a ``flip_fraction`` of all pairs (the paper flips
  the bottom 10-20%, the pairs with μ̂ < 0).
* contrastive views (§3.1): the paper's augmentation is dropout 0.05, the same input passed twice.
  Decoder LLMs mostly have no dropout and a fresh LoRA adapter is zero (LoRA dropout changes nothing at
  step 0), so the views come from dropout p = ``contrastive_dropout`` on the token embeddings, over the
  batch repeated twice in one forward, as padded rows (a prompt shared by a pair's responses,
  ``prefix_sharing``, would share its dropout too). The features are the last-token hidden states that
  feed the head. The Bradley-Terry loss is averaged over the two views (L_rm "on all original samples and their
  augmentations"); SimCSE's τ is not given (default 0.05), β = 1 (App. B.2).
* MetaRM (§3.2, Alg. 1): η, α, m and k are not given (the paper's RM learning rate is 5e-6). The outer
  step α is the optimizer's ``learning_rate``. Alg. 1 writes both steps as SGD; align's outer step is
  AdamW, which moves every parameter by about α whatever the gradient's size, while an SGD inner step
  η∇J moves θ by η‖∇J‖, orders of magnitude less at η = α (the meta term vanished: MetaRM was BT).
  So the inner ascent is normalised by default (``meta_normalize``): ``θ' = θ + η·√n·∇J/‖∇J‖`` over
  the n trainable parameters, a step of root-mean-square η per parameter (η = α would be a full AdamW
  step, every parameter moving by α). η = ``meta_lr`` follows the learning-rate schedule as α does; its
  default is the RMS of an AdamW step once the gradient is mostly noise, ``α·√((1-β₁)/(1+β₁))`` (the
  momentum of i.i.d. gradients has variance (1-β₁)/(1+β₁) of theirs), ≈ α/4 at β₁ = 0.9, so that
  ‖θ' − θ‖ is about the outer step (both are logged: ``metarm/inner_step_norm``,
  ``metarm/outer_step_norm``; a full AdamW step, η = α, was 3-6 times the outer step and cost accuracy
  in ``scripts/rm_noise.py``). ``meta_normalize=false`` is Alg. 1 as printed (θ + η∇J). m =
  ``meta_batch_size`` prompts per step; k = the responses per prompt in ``meta_dataset``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from align import checkpoints
from align.data import DataError, ExampleDataset, GroupCollator, build_dataset, load_records
from align.models import load_causal_lm, wrap_lora
from align.objectives import (
    bradley_terry_loss,
    difference_views,
    flip_mask,
    metarm_difference,
    simcse_loss,
)
from align.rewards.model import INFO_FILE, head_name, load_reward_backbone, reward_forward
from align.tasks import Task
from align.trainers.base import AlignTrainer
from align.trainers.config import AlignConfig

logger = logging.getLogger(__name__)

SMOOTHING_SLICES = ("all", "strongest", "negative")
CONTRASTIVE = ("none", "simcse", "simcse_diff")


@dataclass
class RewardConfig(AlignConfig):
    """Defaults: vanilla Bradley-Terry (the official MOSS-RLHF loss, with log σ instead of log(σ + 1e-5))."""

    # --- denoising with the ensemble preference strength μ̂ (§2.4; data from `align rm strength`) ---
    flip_fraction: float = field(default=0.0, metadata={"help": "Swap chosen/rejected of the pairs with strength_mean < 0, the lowest first, at most this fraction of all training pairs (paper: 0.1-0.2)."})
    adaptive_margin: bool = field(default=False, metadata={"help": "Bradley-Terry with margin margin_scale*max(strength_mean, 0) inside the sigmoid (Eq. 6)."})
    margin_scale: float = field(default=1.0, metadata={"help": "Scale of the adaptive margin (not given in the paper)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing alpha of Eq. 5 (not given in the paper); 0 = off."})
    smoothing_slice: str = field(default="all", metadata={"help": "Pairs smoothed: all, strongest (top smoothing_fraction by strength_mean) or negative (strength_mean < 0)."})
    smoothing_fraction: float = field(default=0.1, metadata={"help": "smoothing_slice=strongest: the fraction smoothed (paper: the strongest 10%)."})
    strength_buckets: int = field(default=4, metadata={"help": "Report accuracy in this many quantile buckets of strength_mean."})
    # --- contrastive representation loss (§3.1) ------------------------------------------------
    contrastive: str = field(default="none", metadata={"help": "none, simcse (responses as instances) or simcse_diff (chosen-minus-rejected features)."})
    contrastive_weight: float = field(default=1.0, metadata={"help": "beta of L_rm + beta*L_cl (paper: 1 for SimCSE)."})
    contrastive_temperature: float = field(default=0.05, metadata={"help": "SimCSE temperature tau (not given in the paper)."})
    contrastive_dropout: float = field(default=0.05, metadata={"help": "Dropout on the token embeddings that makes the two views (paper: dropout 0.05)."})
    # --- MetaRM (§3.2) -----------------------------------------------------------------------
    meta_dataset: str | None = field(default=None, metadata={"help": "Unlabelled responses of the shifted policy: groups (prompt + completions) or pairs. Enables MetaRM."})
    meta_lr: float | None = field(default=None, metadata={"help": "MetaRM inner ascent step eta at the peak of the learning-rate schedule, which it follows (not given in the paper); None = learning_rate*sqrt((1-adam_beta1)/(1+adam_beta1)), the RMS of an AdamW step on noisy gradients. With meta_normalize: root-mean-square change per trainable parameter."})
    meta_normalize: bool = field(default=True, metadata={"help": "MetaRM inner step theta' = theta + eta*sqrt(n)*grad J/|grad J| over the n trainable parameters; false: plain SGD theta + eta*grad J (Alg. 1 as printed)."})
    meta_batch_size: int = field(default=4, metadata={"help": "MetaRM prompts per step (m; not given in the paper)."})
    # --- saving ------------------------------------------------------------------------------
    reward_stats_pairs: int = field(default=2048, metadata={"help": "Training pairs scored at the end for the saved reward mean/std (normalisation)."})

    learning_rate: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        if self.online:
            raise ValueError("reward models train offline on preference pairs; set online=false")
        checks = {
            "flip_fraction": 0 <= self.flip_fraction < 1, "margin_scale": self.margin_scale >= 0,
            "label_smoothing": 0 <= self.label_smoothing <= 1, "smoothing_fraction": 0 < self.smoothing_fraction <= 1,
            "strength_buckets": self.strength_buckets >= 1, "contrastive_weight": self.contrastive_weight >= 0,
            "contrastive_temperature": self.contrastive_temperature > 0,
            "contrastive_dropout": 0 <= self.contrastive_dropout < 1, "meta_lr": (self.meta_lr or 0) >= 0,
            "meta_batch_size": self.meta_batch_size >= 1, "reward_stats_pairs": self.reward_stats_pairs >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range")
        for name, allowed in (("smoothing_slice", SMOOTHING_SLICES), ("contrastive", CONTRASTIVE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")

    @property
    def uses_strength(self) -> bool:
        return (self.flip_fraction > 0 or self.adaptive_margin
                or (self.label_smoothing > 0 and self.smoothing_slice != "all"))


# Options that turn a config into the plain Bradley-Terry models of the strength ensemble (§2.2).
PLAIN_BT = {"flip_fraction": 0.0, "adaptive_margin": False, "label_smoothing": 0.0, "contrastive": "none",
            "meta_dataset": None}


def flip_pair(example: dict) -> dict:
    """The example with chosen and rejected swapped (and their true scores); μ̂ changes sign, σ̂ does not."""
    out = dict(example, completion_ids=example["completion_ids"][::-1])
    if "scores" in out:
        out["scores"] = out["scores"][::-1]
    if "strength_mean" in out:
        out["strength_mean"] = -out["strength_mean"]
    return out


@torch.no_grad()
def pair_rewards(model, dataset, pad_token_id: int, *, batch_size: int = 64) -> torch.Tensor:
    """Rewards (N, K) of every example's completions, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    collate = GroupCollator(pad_token_id)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        rewards, _ = reward_forward(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        out.append(rewards.view(-1, batch["group_size"]).cpu())
    model.train(was_training)
    return torch.cat(out)


def reward_metrics(rewards: torch.Tensor, batch: dict, strength_edges: torch.Tensor | None) -> dict:
    """Accuracy (a tie counts as wrong, as in MOSS-RLHF), margin, reward mean/std, agreement with true
    rewards when the data carry them (``scores``; true ties left out) and accuracy by strength bucket."""
    chosen, rejected = rewards[:, 0].detach(), rewards[:, 1].detach()
    diff = chosen - rejected
    metrics = {
        "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (diff > 0).float().mean(), "rewards/margins": diff.mean(),
        "reward/mean": rewards.detach().mean(), "reward/std": rewards.detach().std(correction=0),
    }
    if "scores" in batch:
        true = batch["scores"][:, 0] - batch["scores"][:, 1]
        metrics["rewards/true_accuracy"] = ((diff > 0) == (true > 0))[true != 0].float().mean()  # NaN: not logged
    if strength_edges is not None and "strength_mean" in batch:
        bucket = torch.bucketize(batch["strength_mean"], strength_edges.to(diff.device))
        for q in range(len(strength_edges) + 1):
            metrics[f"accuracy/strength_q{q + 1}"] = (diff[bucket == q] > 0).float().mean()
    return metrics


class RewardTrainer(AlignTrainer):
    """Bradley-Terry reward model on (chosen, rejected) pairs; see the module docstring for the options."""

    config_class = RewardConfig

    def __init__(self, model, args: RewardConfig, train_dataset, processing_class: PreTrainedTokenizerBase,
                 eval_dataset=None, callbacks=None):
        examples = [train_dataset[i] for i in range(len(train_dataset))]
        has_strength = all("strength_mean" in ex for ex in examples)
        if args.uses_strength and not has_strength:
            raise DataError(args.dataset, None, "strength_mean",
                            "flip_fraction, adaptive_margin and smoothing_slice need the ensemble preference strength",
                            "run `align rm strength --config ...` and train on the dataset it writes")
        self.flipped = torch.zeros(len(examples), dtype=torch.bool)
        self.strength_edges = None
        self.strongest_threshold = float("inf")
        if has_strength:
            strength = torch.tensor([ex["strength_mean"] for ex in examples])
            if args.flip_fraction > 0:
                self.flipped = flip_mask(strength, args.flip_fraction)
                examples = [flip_pair(ex) if f else ex for ex, f in zip(examples, self.flipped.tolist())]
                strength = torch.where(self.flipped, -strength, strength)
                train_dataset = ExampleDataset(examples, getattr(train_dataset, "stats", None))
            top = flip_mask(-strength, args.smoothing_fraction, threshold=None)  # the strongest slice
            if top.any():
                self.strongest_threshold = float(strength[top].min())
            if args.strength_buckets > 1:
                quantiles = torch.arange(1, args.strength_buckets) / args.strength_buckets
                self.strength_edges = torch.quantile(strength, quantiles)
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         eval_dataset=eval_dataset, callbacks=callbacks)
        if args.contrastive != "none":
            p = args.contrastive_dropout
            self.model.get_input_embeddings().register_forward_hook(
                lambda module, inputs, output: F.dropout(output, p, module.training))
        self.meta_batches = self._meta_batches() if args.meta_dataset else None
        self.meta_lr = args.meta_lr
        if self.meta_lr is None:  # the RMS of an AdamW step on noisy gradients (module docstring)
            self.meta_lr = args.learning_rate * ((1 - args.adam_beta1) / (1 + args.adam_beta1)) ** 0.5
        self.meta_previous_theta = None  # (global step, θ) of the last MetaRM step: the outer step's size

    # --- the model -----------------------------------------------------------------------------
    @classmethod
    def load_model(cls, config: RewardConfig, model_path: str, tokenizer: PreTrainedTokenizerBase) -> PeftModel:
        """The reward model ``align train`` builds: a one-output sequence-classification model with a
        new LoRA adapter whose saved modules include the newly initialised head (both drawn from
        ``config.seed``), or a saved adapter from ``adapter_path`` (trainable)."""
        model = load_reward_backbone(model_path, pad_token_id=tokenizer.pad_token_id, dtype=config.dtype,
                                     seed=config.seed, trust_remote_code=config.trust_remote_code)
        if config.adapter_path is not None:
            return PeftModel.from_pretrained(model, config.adapter_path, is_trainable=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return wrap_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                             target_modules=config.lora_target_modules or "all-linear",
                             modules_to_save=[head_name(model)], task_type="SEQ_CLS", use_dora=config.use_dora,
                             use_rslora=config.use_rslora, init=config.lora_init)

    # --- the loss ------------------------------------------------------------------------------
    def bt_losses(self, chosen: torch.Tensor, rejected: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per-pair Bradley-Terry losses with the configured margin and smoothing. Options that need
        ``strength_mean`` apply to batches that carry it (evaluation data usually does not)."""
        a, strength = self.args, batch.get("strength_mean")
        margin, smoothing = None, a.label_smoothing
        if strength is not None:
            if a.adaptive_margin:
                margin = a.margin_scale * strength.clamp(min=0)
            if a.smoothing_slice != "all":
                selected = strength >= self.strongest_threshold if a.smoothing_slice == "strongest" else strength < 0
                smoothing = a.label_smoothing * selected.to(chosen.dtype)
        elif a.smoothing_slice != "all":
            smoothing = 0.0
        return bradley_terry_loss(chosen, rejected, margin=margin, label_smoothing=smoothing)

    def contrastive_losses(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        """Per-pair SimCSE loss (Eq. 9) of the last-token features (2B, D) of two dropout views: each pair's
        two instances (its responses, or its difference and the negation) averaged."""
        tau = self.args.contrastive_temperature
        if self.args.contrastive == "simcse":
            return simcse_loss(view_a, view_b, temperature=tau).view(-1, 2).mean(1)
        diffs_a = difference_views(view_a[0::2], view_a[1::2])
        diffs_b = difference_views(view_b[0::2], view_b[1::2])
        return simcse_loss(diffs_a, diffs_b, temperature=tau).view(2, -1).mean(0)

    def loss(self, model, inputs: dict) -> tuple[torch.Tensor, dict]:
        if inputs.get("group_size") != 2:
            raise ValueError("reward models train on (chosen, rejected) pairs; got groups of "
                             f"{inputs.get('group_size', 0)} completions")
        contrast = self.args.contrastive != "none" and model.training
        n_views = 2 if contrast else 1  # both dropout views in one forward (DDP allows one per backward)
        layout = self.layout(model)
        if contrast and layout == "shared_prefix":  # each response's own dropout on its prompt, as in the paper
            layout = "padded"
        rewards, features = reward_forward(model, inputs["input_ids"].repeat(n_views, 1),
                                           inputs["attention_mask"].repeat(n_views, 1), features=contrast,
                                           layout=layout, group_size=2)
        rewards = rewards.view(n_views, -1, 2)
        losses = torch.stack([self.bt_losses(r[:, 0], r[:, 1], inputs) for r in rewards]).mean(0)
        metrics = reward_metrics(rewards[0], inputs, self.strength_edges)
        if contrast:
            cl = self.contrastive_losses(*features.chunk(2))
            losses = losses + self.args.contrastive_weight * cl
            metrics["contrastive_loss"] = cl.detach().mean()
        return losses, metrics

    # --- MetaRM (§3.2, Alg. 1) ------------------------------------------------------------------
    def _meta_batches(self):
        a = self.args
        rows = load_records(a.meta_dataset, split=a.dataset_split)
        data = build_dataset(rows, self.processing_class, source=a.meta_dataset, kinds=("groups", "pairs"),
                             max_length=a.max_length, max_prompt_length=a.max_prompt_length, on_bad_row=a.on_bad_row)
        collate, generator = GroupCollator(self.processing_class.pad_token_id), torch.Generator().manual_seed(a.seed)
        while True:
            for index in torch.randperm(len(data), generator=generator).split(a.meta_batch_size):
                yield collate([data[i] for i in index.tolist()])

    def training_step(self, model, inputs, num_items_in_batch=None):
        """With MetaRM: θ' = θ + η ∇J(X_s) (ascent on the difference of shifted-policy responses, Eq. 11;
        normalised to a step of RMS η per parameter unless ``meta_normalize`` is off; η follows the
        learning-rate schedule), then the Bradley-Terry gradient at θ' (the usual step accumulates it),
        then θ is restored, so the optimizer applies ∇L(θ') to θ: the first-order update of Alg. 1. Logs
        ‖θ' − θ‖ and the size ‖θ_t − θ_{t-1}‖ of the previous optimizer step."""
        if self.meta_batches is None:
            return super().training_step(model, inputs, num_items_in_batch)
        params = [p for p in model.parameters() if p.requires_grad]
        theta = [p.detach().clone() for p in params]  # restored exactly (θ + ηg - ηg is not θ in floats)
        metrics = {}
        step = self.state.global_step
        if self.meta_previous_theta is not None and self.meta_previous_theta[0] != step:
            metrics["metarm/outer_step_norm"] = self.parameter_distance(theta, self.meta_previous_theta[1])
        self.meta_previous_theta = (step, theta)
        batch = next(self.meta_batches)
        model.train()
        with self.compute_loss_context_manager():
            rewards, _ = reward_forward(self.accelerator.unwrap_model(model), batch["input_ids"].to(self.args.device),
                                        batch["attention_mask"].to(self.args.device), layout=self.layout(model),
                                        group_size=batch["group_size"])
        difference = metarm_difference(rewards.view(-1, batch["group_size"])).mean()
        grads = [(p, g) for p, g in zip(params, torch.autograd.grad(difference, params, allow_unused=True))
                 if g is not None]
        # η follows the schedule as the outer step does (no scheduler outside the training loop: the peak)
        scheduler = getattr(self, "lr_scheduler", None)
        scheduled = scheduler.get_last_lr()[0] / self.args.learning_rate if scheduler is not None else 1.0
        scale = self.meta_lr * scheduled
        if self.args.meta_normalize:
            grad_norm = sum(float(g.float().square().sum()) for _, g in grads) ** 0.5
            n = sum(p.numel() for p in params)
            scale = scale * n**0.5 / grad_norm if grad_norm > 0 else 0.0
        with torch.no_grad():
            for p, g in grads:
                p.add_(g, alpha=scale)
        metrics |= {"metarm/difference": difference.detach(),
                    "metarm/inner_step_norm": self.parameter_distance([p.detach() for p in params], theta)}
        self._record(metrics)
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            with torch.no_grad():
                for p, saved in zip(params, theta):
                    p.copy_(saved)

    @staticmethod
    def parameter_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        """Euclidean distance between two lists of tensors taken as one vector (float32 sums)."""
        return sum(float((x.float() - y.float()).square().sum()) for x, y in zip(a, b)) ** 0.5

    # --- saving and evaluation ----------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Also writes ``reward_model.json``: the tokenization limits and, at the end of training (not
        in checkpoints), the reward mean/std over up to ``reward_stats_pairs`` training pairs."""
        super().save_model(output_dir, _internal_call)
        if not self.is_world_process_zero():
            return
        a = self.args
        info = {"max_length": a.max_length, "max_prompt_length": a.max_prompt_length}
        if not _internal_call:
            n = min(a.reward_stats_pairs, len(self.train_dataset))
            subset = [self.train_dataset[i] for i in range(n)]
            rewards = pair_rewards(self.accelerator.unwrap_model(self.model), subset,
                                   self.processing_class.pad_token_id, batch_size=a.per_device_eval_batch_size)
            info |= {"reward_mean": rewards.mean().item(), "reward_std": rewards.std(correction=0).item(),
                     "stats_pairs": n}
        path = checkpoints.output_path(output_dir or a.output_dir, INFO_FILE)
        checkpoints.write_atomic(path, json.dumps(info, indent=2))

    def evaluate_task(self, task: Task, prompts: list) -> dict:
        """Accuracy on held-out pairs of the task (sampled from the base policy) against its true reward
        (true ties left out) and against their labels."""
        a, tokenizer = self.args, self.processing_class
        policy = load_causal_lm(task.base_model() if task.base_model else a.model, dtype=a.dtype)
        rows = task.preference_pairs(policy, tokenizer, prompts, seed=a.seed + 1, max_new_tokens=a.max_new_tokens)
        data = build_dataset(rows, tokenizer, source=f"builtin:{task.name} (held out)", kinds=("pairs",),
                             max_length=a.max_length, max_prompt_length=a.max_prompt_length)
        rewards = pair_rewards(self.accelerator.unwrap_model(self.model), data, tokenizer.pad_token_id)
        diff = rewards[:, 0] - rewards[:, 1]
        true = torch.tensor([ex["scores"][0] - ex["scores"][1] for ex in data.examples])
        decided = true != 0
        return {"heldout_pairs": len(data),
                "heldout_accuracy_true": ((diff > 0) == (true > 0))[decided].float().mean().item(),
                "heldout_accuracy_labels": (diff > 0).float().mean().item()}
