"""Load a Hugging Face causal LM as a LoRA policy whose reference is the same model, adapter disabled."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from trl.trainer import add_fused_lm_head

from align.errors import ModelLoadError
from align.hf_utils import DTYPES, ensure_pad_token
from align.models.reference import freeze_reference
from align.models.resolve import resolve_model

logger = logging.getLogger(__name__)


def _check_local(name_or_path: str) -> None:
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.exists():
        raise ModelLoadError(f"model path {name_or_path!r} does not exist; check the `model` key of the config")
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelLoadError(
            f"{path} has no config.json: not a Hugging Face model directory "
            "(save one with `save_pretrained`, or point `model` at a hub id)"
        )


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer; a tokenizer without a pad token gets its EOS token as pad (logged).
    ``name_or_path`` may also be a ``.gguf`` file or ``builtin:<model>`` (``resolve_model``)."""
    name_or_path = resolve_model(name_or_path)
    _check_local(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:  # TypeError: a config.json that is not a mapping
        raise ModelLoadError(f"could not load a tokenizer from {name_or_path!r}: {err}") from err
    try:
        return ensure_pad_token(tokenizer, name_or_path)
    except ValueError as err:
        raise ModelLoadError(str(err)) from None


def load_causal_lm(
    name_or_path: str, *, dtype: str = "float32", trust_remote_code: bool = False
) -> torch.nn.Module:
    """Load a causal LM with TRL's fused LM head, so log-probs never materialise (B, T, V) logits.
    ``name_or_path`` may also be a ``.gguf`` file or ``builtin:<model>``: the converted directory is
    loaded, and is what ``model.name_or_path`` (vLLM, a saved adapter's base) names."""
    name_or_path = resolve_model(name_or_path)
    _check_local(name_or_path)
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, TypeError, RuntimeError) as err:  # RuntimeError: weights that do not fit config.json
        raise ModelLoadError(f"could not load a causal LM from {name_or_path!r}: {err}") from err
    except SafetensorError as err:
        raise ModelLoadError(f"could not load a causal LM from {name_or_path!r}: a weights file is damaged or "
                             f"incomplete ({err}); save or download the model again") from err
    add_fused_lm_head(model)  # must come before PEFT wrapping (TRL docstring)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in the model's own layers (``nn.Dropout`` modules and the attention's dropout rate), as TRL's
    trainers do, so that the policy and its reference score a completion alike (the log-ratio is 0 before any
    update) and reference log-probs computed once equal the per-step ones. LoRA's own dropout
    (``lora_dropout``) is a training choice of the adapter and is left as configured."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def check_vocab(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embed:
        raise ModelLoadError(
            f"tokenizer of {name!r} has {len(tokenizer)} tokens but the model embeds only {n_embed}; "
            "use the tokenizer saved with the model, or resize the embeddings"
        )


# `lora_init` values: peft's ``init_lora_weights`` for each. Those that need data (EVA, CorDA, LoRA-GA), a
# quantized model (LoftQ) or a randomised SVD (``pissa_niter_N``: a saved adapter would not reload onto the same
# residual) are left out.
LORA_INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
# Inits that move part of each base weight into the adapter: peft subtracts s·B₀A₀ from W, so with the adapter
# disabled the model is the residual W − s·B₀A₀, not the base model.
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")


def wrap_lora(
    model: torch.nn.Module,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    modules_to_save: list[str] | None = None,
    task_type: str = "CAUSAL_LM",
    use_dora: bool = False,
    use_rslora: bool = False,
    init: str = "default",
) -> PeftModel:
    """Wrap a model with a fresh peft LoRA adapter (named "default"); the base weights are frozen.

    ``use_dora``: DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", Eq. 5), a learned
    per-output magnitude times the normalised ``W + ΔW``. ``use_rslora``: rank-stabilised scaling α/√r
    (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA") instead of α/r.
    ``init`` (a key of ``LORA_INITS``): ``default`` (B = 0), ``gaussian``, ``pissa`` (Meng et al. 2024,
    "PiSSA: Principal Singular Values and Singular Vectors Adaptation") or ``olora`` (Büyükakyüz 2024, "OLoRA:
    Orthonormal Low-Rank Adaptation"). PiSSA and OLoRA start the adapter at a rank-r part of W and subtract it
    from the base weights, so the adapter-disabled model is no longer the base model (see
    ``base_weights_modified``).
    """
    if init not in LORA_INITS:
        raise ValueError(f"LoRA init {init!r} is not supported; choose one of {', '.join(LORA_INITS)}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        task_type=task_type,
        use_dora=use_dora,
        use_rslora=use_rslora,
        init_lora_weights=LORA_INITS[init],
    )
    return get_peft_model(model, config)


def base_weights_modified(model: torch.nn.Module) -> bool:
    """Whether the policy's base weights differ from the checkpoint's: an adapter initialised (or loaded) with
    PiSSA, OLoRA, CorDA or LoftQ, for which peft replaces W by the residual W − s·B₀A₀. Disabling the adapter then
    gives that residual model, not the base model, so it cannot serve as the reference policy."""
    if not isinstance(model, PeftModel):
        return False
    init = model.peft_config[model.active_adapter].init_lora_weights
    return isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS)


def load_policy(
    name_or_path: str,
    *,
    adapter_path: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    **lora_kwargs,
) -> PeftModel:
    """A LoRA policy: a new adapter, or a saved one from ``adapter_path`` (trainable), which is then also the
    reference policy, frozen (``align.models.reference``): training continues from it and stays close to it."""
    model = load_causal_lm(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    if adapter_path is None:
        try:
            return wrap_lora(model, **lora_kwargs)
        except ValueError as err:
            raise ModelLoadError(f"could not add LoRA to {name_or_path!r}: {err}; check `lora_target_modules`") from err
    try:
        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:  # missing files, another base model
        raise ModelLoadError(f"could not load the adapter {adapter_path!r} onto {name_or_path!r}: "
                             f"{str(err).splitlines()[0]}; check `adapter_path` (and that it was trained on this model)") from err
    freeze_reference(model)
    return model


def load_generator(name_or_path: str, adapter: str | None = None, *, trust_remote_code: bool = False):
    """A model for generation (eval mode), with a saved LoRA adapter when given, and its tokenizer."""
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    model = load_causal_lm(name_or_path, trust_remote_code=trust_remote_code)
    if adapter is not None:
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            raise ModelLoadError(f"could not load the adapter {adapter!r} onto {name_or_path!r}: "
                                 f"{str(err).splitlines()[0]}") from err
    return model.eval(), tokenizer
