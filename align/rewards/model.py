"""Trained reward models (``align train`` with ``trainer: reward``) behind the reward interface.

A reward model is a Hugging Face sequence-classification model with one output: the reward of
``prompt + completion`` is the head's score at the last real (non-padding) token, as in the official
MOSS-RLHF code (Secrets of RLHF Part II, Wang et al. 2024). A saved reward-model directory holds either a LoRA adapter (with the
trained score head, peft ``modules_to_save``) over a base model, or full weights, plus
``reward_model.json`` (the tokenization limits and the reward mean/std on the training data).

``rm:<dir>`` specs (``load_reward``) accept options after ``?``: ``rm:runs/rm?normalize=true&batch_size=16``.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qsl

import torch
from peft import PeftModel
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from align.errors import RewardError
from align.hf_utils import DTYPES, encode_completion, encode_prompt, ensure_pad_token, forward_rows, unwrap_model

INFO_FILE = "reward_model.json"
HEAD_NAMES = ("score", "classifier")  # decoder LMs name the head `score`; encoders `classifier`


def head_name(model: torch.nn.Module) -> str:
    """Attribute name of the scalar head of a sequence-classification model (wrapped or not)."""
    base = unwrap_model(model)
    for name in HEAD_NAMES:
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(base).__name__} has no sequence-classification head named {' or '.join(HEAD_NAMES)}")


def load_reward_backbone(name_or_path: str, *, pad_token_id: int, dtype: str = "float32", seed: int = 0,
                         trust_remote_code: bool = False) -> torch.nn.Module:
    """``AutoModelForSequenceClassification`` with one label. A causal-LM checkpoint gets a newly
    initialised head, drawn from ``seed`` so that runs are reproducible."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    # HF's own pooling refuses batches without a pad id; align pools by the attention mask instead.
    model.config.pad_token_id = pad_token_id
    return model


def reward_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                   features: bool = False, layout: str = "padded", group_size: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rewards (N,) of right-padded rows, and with ``features`` the hidden states (N, D) that feed the
    head at the same positions (the representations of the contrastive loss, Wang et al. 2024 §3.1).
    ``layout`` (``align.hf_utils.forward_rows``: padded, packed or shared_prefix over groups of ``group_size``
    rows) changes how the rows run, not their rewards: each is read at the last token of its sequence.

    The head's input and output are read with a forward hook: HF pools at the last token that is not
    the pad id, which is wrong when pad == EOS (the completion's EOS would be skipped).
    """
    head = getattr(unwrap_model(model), head_name(model))
    seen = {}

    def keep(module, args, output):
        seen["hidden"], seen["scores"] = args[0], output

    inputs, index = forward_rows(model, input_ids, attention_mask, layout=layout, group_size=group_size)
    handle = head.register_forward_hook(keep)
    try:
        model(**inputs)
    finally:
        handle.remove()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    last = index[rows, attention_mask.sum(-1) - 1]
    rewards = seen["scores"].flatten(0, 1)[last, 0].float()
    return rewards, (seen["hidden"].flatten(0, 1)[last] if features else None)


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, *, max_length: int,
           max_prompt_length: int, finished: bool = True) -> list[int]:
    """Token ids of ``prompt + completion`` by the rule the reward model was trained with (``align.data``):
    the prompt (as rendered, chat markup included) without a doubled BOS, keeping its last
    ``max_prompt_length`` tokens; the completion ending with EOS unless it was cut at the sampler's token
    limit (``finished=False``), then cut at its end to fit ``max_length``."""
    prompt_ids = encode_prompt(tokenizer, prompt)[-max_prompt_length:]
    ids = encode_completion(tokenizer, completion, finished=finished)
    return prompt_ids + ids[: max_length - len(prompt_ids)]


def load_reward_model(path: str | Path, *, dtype: str = "float32",
                      trust_remote_code: bool = False) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, dict]:
    """Model (eval mode; a LoRA adapter is merged), tokenizer and ``reward_model.json`` of a saved
    reward-model directory (adapter over a base, or full weights)."""
    path = Path(path).expanduser()
    adapter_config = path / "adapter_config.json"
    if not adapter_config.exists() and not (path / "config.json").exists():
        raise RewardError(f"reward model {str(path)!r}: no adapter_config.json or config.json; expected a directory "
                         "written by `align train` with `trainer: reward`")
    base = json.loads(adapter_config.read_text())["base_model_name_or_path"] if adapter_config.exists() else str(path)
    tokenizer = AutoTokenizer.from_pretrained(path if (path / "tokenizer_config.json").exists() else base,
                                              trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer, str(path))
    model = load_reward_backbone(base, pad_token_id=tokenizer.pad_token_id, dtype=dtype,
                                 trust_remote_code=trust_remote_code)
    if adapter_config.exists():
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    info = json.loads((path / INFO_FILE).read_text()) if (path / INFO_FILE).exists() else {}
    return model.eval(), tokenizer, info


class RewardModelReward:
    """``reward(prompts, completions) -> list[float]`` from a trained reward model: batched, no grad,
    optionally normalised to ``(r - mean) / std`` with the reward statistics of its training data."""

    def __init__(self, path: str | Path, *, normalize: bool = False, batch_size: int = 32,
                 device: str | None = None, dtype: str = "float32"):
        if batch_size < 1:
            raise RewardError(f"reward model batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.info = load_reward_model(path, dtype=dtype)
        if normalize and not {"reward_mean", "reward_std"} <= set(self.info):
            raise RewardError(f"reward model {str(path)!r}: normalize needs the training reward statistics in "
                             f"{INFO_FILE} (written when `align train` ends, not in intermediate checkpoints)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.normalize, self.batch_size = normalize, batch_size
        self.max_length = self.info.get("max_length", 1024)
        self.max_prompt_length = self.info.get("max_prompt_length", 512)

    @classmethod
    def from_spec(cls, spec: str) -> "RewardModelReward":
        """``<dir>[?normalize=true&batch_size=N&device=cuda&dtype=bfloat16]``."""
        path, _, query = spec.partition("?")
        options = dict(parse_qsl(query, strict_parsing=bool(query)))
        unknown = set(options) - {"normalize", "batch_size", "device", "dtype"}
        if unknown:
            raise RewardError(f"reward rm:{spec}: unknown option(s) {sorted(unknown)}; "
                             "known: normalize, batch_size, device, dtype")
        kwargs = {}
        if "normalize" in options:
            if options["normalize"].lower() not in ("true", "false", "1", "0"):
                raise RewardError(f"reward rm:{spec}: normalize must be true or false")
            kwargs["normalize"] = options["normalize"].lower() in ("true", "1")
        if "batch_size" in options:
            if not options["batch_size"].isdigit():
                raise RewardError(f"reward rm:{spec}: batch_size must be a positive integer")
            kwargs["batch_size"] = int(options["batch_size"])
        for key in ("device", "dtype"):
            if key in options:
                kwargs[key] = options[key]
        return cls(path, **kwargs)

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], finished: list[bool] | None = None) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        finished = [True] * len(completions) if finished is None else finished
        ids = [encode(self.tokenizer, p, c, max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                      finished=f) for p, c, f in zip(prompts, completions, finished)]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
        rewards = torch.empty(len(ids))
        for start in range(0, len(ids), self.batch_size):
            index = order[start : start + self.batch_size]
            rows = [torch.tensor(ids[i]) for i in index]
            input_ids = pad_sequence(rows, batch_first=True, padding_value=self.tokenizer.pad_token_id)
            mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0)
            scores, _ = reward_forward(self.model, input_ids.to(self.device), mask.to(self.device))
            rewards[index] = scores.cpu()
        if self.normalize:
            rewards = (rewards - self.info["reward_mean"]) / max(self.info["reward_std"], 1e-8)
        return rewards.tolist()
