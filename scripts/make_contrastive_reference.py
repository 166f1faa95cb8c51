"""Records transformers 4.x's built-in contrastive search on tiny models, as a reference for align's.

transformers removed contrastive search from its core in 4.56, so this runs in a separate environment:

    python3 -m venv /work/venv455 && /work/venv455/bin/pip install torch==2.13.0 transformers==4.55.4
    /work/venv455/bin/python scripts/make_contrastive_reference.py --out tests/data/contrastive_reference.json

The models are built from the config kwargs and seed stored in the JSON, so ``tests/test_contrastive_search.py``
rebuilds them under transformers 5; the weights' SHA-256 (also stored) proves the two builds are bit-identical.

It also records a few chat prompts on a real model (``--real-model``, default $ALIGN_REAL_MODEL, else
/work/models/smollm2-135m-instruct: SmolLM2-135M-Instruct); without that directory the previous file's record is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import torch
import transformers

SEED = 0
VOCAB = 128
MODELS = {
    "llama": {
        "config_class": "LlamaConfig",
        "model_class": "LlamaForCausalLM",
        "config": dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
        ),
    },
    "gpt2": {
        "config_class": "GPT2Config",
        "model_class": "GPT2LMHeadModel",
        "config": dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
        ),
    },
    # SmolLM2's layout in small: grouped-query attention (3 query heads per key/value head), the LM head tied to the
    # token embeddings, RoPE θ = 1e5.
    "llama_gqa_tied": {
        "config_class": "LlamaConfig",
        "model_class": "LlamaForCausalLM",
        "config": dict(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        ),
    },
}
# No pad_token_id in the configs: with one, Llama's padding embedding is the zero vector, so are the last hidden
# states of the padding positions, and transformers 4.x's cosine divides 0 by 0. Every score becomes NaN and its
# argmax falls back to the top-1 token (greedy) for every left-padded row. align masks padding out and does not
# reproduce that; tests/test_contrastive_search.py covers the zero-state case against rows decoded alone.
SETTINGS = [(0.6, 4), (0.6, 6), (0.3, 4), (0.3, 6)]
REAL_QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]
REAL_MAX_NEW_TOKENS = 16
MAX_NEW_TOKENS = 24
PROMPT_LENGTHS = [9, 5, 12]  # one left-padded batch; the first prompt is also decoded alone


def build(spec: dict, seed: int) -> torch.nn.Module:
    config = getattr(transformers, spec["config_class"])(**spec["config"])
    torch.manual_seed(seed)
    return getattr(transformers, spec["model_class"])(config).eval()


def load_pretrained(model_dir: str) -> torch.nn.Module:
    """A causal LM from a directory in fp32, read as transformers 5 reads it whichever the major version."""
    if int(transformers.__version__.split(".")[0]) >= 5:
        return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = transformers.AutoConfig.from_pretrained(model_dir)
    # transformers 5 writes RoPE's settings as `rope_parameters`, which 4.x keeps as an unknown field while it falls
    # back to its default rope_theta (10000, where SmolLM2 has 100000): a different model.
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        config.rope_theta = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = rope
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, config=config, torch_dtype=torch.float32).eval()


def chat_prompt_texts(model_dir: str, questions: list[str]) -> tuple[list[str], object]:
    """Each question as a one-turn chat through the model's chat template, and the (fast) tokenizer."""
    directory = Path(model_dir)
    # transformers 4.55 cannot read a tokenizer_config.json written by transformers 5; tokenizer.json it can.
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    template = (directory / "chat_template.jinja").read_text()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], chat_template=template, tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    return texts, tokenizer


def real_model_record(model_dir: str) -> dict:
    """Contrastive search on the real model's chat prompts, left padded, with its EOS (= its pad token)."""
    model = load_pretrained(model_dir)
    texts, tokenizer = chat_prompt_texts(model_dir, REAL_QUESTIONS)
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    eos = pad = model.generation_config.eos_token_id
    width = max(map(len, rows))
    ids = [[pad] * (width - len(row)) + row for row in rows]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
    with torch.no_grad():
        output = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), penalty_alpha=0.6,
                                top_k=4, max_new_tokens=REAL_MAX_NEW_TOKENS, do_sample=False, eos_token_id=eos,
                                pad_token_id=pad)
    return dict(model=Path(model_dir).name, weights_sha256=weights_sha256(model), questions=REAL_QUESTIONS,
                penalty_alpha=0.6, top_k=4, max_new_tokens=REAL_MAX_NEW_TOKENS, eos_token_id=eos, pad_token_id=pad,
                input_ids=ids, attention_mask=mask, output_ids=output.tolist())


def weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def prompts(seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Left-padded random prompts (ids 3.. so that no prompt holds BOS/EOS/PAD)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(PROMPT_LENGTHS)
    ids, mask = [], []
    for length in PROMPT_LENGTHS:
        row = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        ids.append([0] * (width - length) + row)
        mask.append([0] * (width - length) + [1] * length)
    return ids, mask


def contrastive(model, ids, mask, alpha, k, eos, pad) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            penalty_alpha=alpha,
            top_k=k,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    return out.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/contrastive_reference.json")
    parser.add_argument("--real-model",
                        default=os.environ.get("ALIGN_REAL_MODEL", "/work/models/smollm2-135m-instruct"))
    args = parser.parse_args()
    major = int(transformers.__version__.split(".")[0])
    minor = int(transformers.__version__.split(".")[1])
    if (major, minor) > (4, 55):
        sys.exit(f"needs transformers <= 4.55 (built-in contrastive search), found {transformers.__version__}")

    ids, mask = prompts(SEED)
    single_width = PROMPT_LENGTHS[0]
    single = ([ids[0][-single_width:]], [mask[0][-single_width:]])
    cases, models = [], {}
    for name, spec in MODELS.items():
        model = build(spec, SEED)
        models[name] = {**spec, "seed": SEED, "weights_sha256": weights_sha256(model)}
        for alpha, k in SETTINGS:
            for batch_ids, batch_mask in [(ids, mask), single]:
                # No EOS: every row runs MAX_NEW_TOKENS steps.
                output = contrastive(model, batch_ids, batch_mask, alpha, k, None, None)
                cases.append(dict(model=name, penalty_alpha=alpha, top_k=k, eos_token_id=None, pad_token_id=None,
                                  input_ids=batch_ids, attention_mask=batch_mask, output_ids=output))
        # With an EOS that the first row emits mid-way (taken from the α=0.6, k=4 run), so rows stop at different
        # steps and finished rows are padded; pad differs from EOS so the two are told apart.
        first_row = cases[-2 * len(SETTINGS)]["output_ids"][0][len(ids[0]):]
        eos = next(t for t in first_row[MAX_NEW_TOKENS // 3:] if first_row.index(t) >= MAX_NEW_TOKENS // 3)
        output = contrastive(model, ids, mask, 0.6, 4, eos, 0)
        cases.append(dict(model=name, penalty_alpha=0.6, top_k=4, eos_token_id=eos, pad_token_id=0,
                          input_ids=ids, attention_mask=mask, output_ids=output))

    if Path(args.real_model, "config.json").exists():
        real_model = real_model_record(args.real_model)
    elif Path(args.out).exists():
        real_model = json.loads(Path(args.out).read_text()).get("real_model")
    else:
        real_model = None

    reference = {
        "about": "transformers 4.x built-in contrastive search (generate(penalty_alpha, top_k, do_sample=False)) "
                 "on tiny randomly initialised fp32 models built from `config` with torch.manual_seed(seed).",
        "command": "/work/venv455/bin/python scripts/make_contrastive_reference.py --out " + args.out,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "max_new_tokens": MAX_NEW_TOKENS,
        "models": models,
        "real_model": real_model,
        "cases": cases,
    }
    # One line per header field and per case keeps the file small and diffs readable.
    fields = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in reference.items() if key != "cases"]
    body = ",\n".join(f"  {json.dumps(case)}" for case in cases)
    with open(args.out, "w") as f:
        f.write("{\n" + ",\n".join(fields) + ',\n "cases": [\n' + body + "\n ]\n}\n")
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
