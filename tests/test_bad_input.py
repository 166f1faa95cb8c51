"""Malformed input at every entry point of ``align train``: dataset rows and files, configs and
command lines, models and tokenizers. Each gets an ``align: error:`` that names the file, row and
field and suggests a fix (or a documented skip or fallback, with a count), never a traceback, and
none changes an existing output directory. A hypothesis fuzz test drives the dataset loader."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align import cli, demo
from align.data import DataError, build_dataset, load_records
from align.data.examples import KNOWN_FIELDS
from align.models import load_policy, wrap_lora
from align.models.tiny import tiny_llama, word_tokenizer

BASE = {"trainer": "cpl", "model": "builtin:demo", "max_steps": 1, "per_device_train_batch_size": 2,
        "logging_steps": 1, "save_steps": 1, "torch_threads": 1, "seed": 0}
PAIR = {"prompt": "the cat sees", "chosen": "the sun and joy", "rejected": "rain and mud"}
GROUP = {"prompt": "the cat", "completions": ["sun", "rain"], "rewards": [1.0, 0.0]}


def jsonl(*rows) -> bytes:
    return b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n"


def without(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


# (id, file name, content, extra command line, fragments the error must contain; {file} = the data file)
DATA = [
    ("missing-field", "d.jsonl", jsonl(PAIR, without(PAIR, "chosen")), [],
     ["{file}, row 2, field 'chosen': missing field", "pairs need 'chosen' and 'rejected'"]),
    ("null-field", "d.jsonl", jsonl(PAIR | {"rejected": None}), [], ["row 1, field 'rejected': missing or null"]),
    ("int-field", "d.jsonl", jsonl(PAIR | {"chosen": 42}), [], ["field 'chosen': expected a string or a list of messages, got int"]),
    ("dict-field", "d.jsonl", jsonl(PAIR | {"chosen": {"text": "sun"}}), [], ["field 'chosen'", "got dict"]),
    ("float-prompt", "d.jsonl", jsonl(PAIR | {"prompt": 3.5}), [], ["field 'prompt'", "got float"]),
    ("empty-prompt", "d.jsonl", jsonl(PAIR | {"prompt": ""}), [], ["field 'prompt': empty text", "drop the row or fill the field"]),
    ("blank-completion", "d.jsonl", jsonl(PAIR, PAIR | {"rejected": "  \t "}), [], ["row 2, field 'rejected': empty text"]),
    ("chosen-equals-rejected", "d.jsonl", jsonl(PAIR | {"rejected": PAIR["chosen"]}), [],
     ["field 'rejected': chosen and rejected are identical", "drop the row"]),
    ("empty-message-list", "d.jsonl", jsonl(PAIR | {"chosen": []}), [], ["field 'chosen'", "(empty list)"]),
    ("message-without-content", "d.jsonl", jsonl(PAIR | {"chosen": [{"role": "assistant"}]}), [],
     ["field 'chosen': message 0 is not a {{'role': str, 'content': str}} dict"]),
    ("all-messages-empty", "d.jsonl", jsonl(PAIR | {"chosen": [{"role": "assistant", "content": " "}]}), [],
     ["field 'chosen': all messages are empty"]),
    ("no-prompt-no-common-prefix", "d.jsonl", jsonl({"chosen": "sun", "rejected": "rain"}), [],
     ["field 'prompt'", "add a 'prompt' field"]),
    ("row-is-a-list", "d.jsonl", jsonl(PAIR, b'["the cat", "sun"]'), [], ["row 2", "expected a JSON object, got list"]),
    ("broken-json", "d.jsonl", jsonl(PAIR, b'{"prompt": "the cat",'), [], ["row 2", "invalid JSON"]),
    ("non-utf8", "d.jsonl", jsonl(PAIR, b'{"prompt": "the \xff\xfe cat"}'), [],
     ["{file}, row 2", "not valid UTF-8", "re-encode the file as UTF-8"]),
    ("nan-reward", "d.jsonl", jsonl(PAIR | {"chosen_reward": math.nan, "rejected_reward": 0.0}), [],
     ["field 'chosen_reward': not a finite number (nan)", "drop or fix the row"]),
    ("inf-reward", "d.jsonl", jsonl(PAIR | {"chosen_reward": 1.0, "rejected_reward": -math.inf}), [],
     ["field 'rejected_reward': not a finite number (-inf)"]),
    ("string-reward", "d.jsonl", jsonl(PAIR | {"chosen_reward": "high", "rejected_reward": 0}), [],
     ["field 'chosen_reward': expected a number, got str"]),
    ("bool-reward", "d.jsonl", jsonl(PAIR | {"chosen_reward": True, "rejected_reward": 0}), [], ["expected a number, got bool"]),
    ("one-sided-reward", "d.jsonl", jsonl(PAIR | {"chosen_reward": 1.0}), [],
     ["field 'rejected_reward': missing while the other reward is given"]),
    ("strength-not-a-number", "d.jsonl", jsonl(PAIR | {"strength_mean": "strong"}), [], ["field 'strength_mean'"]),
    ("one-completion", "d.jsonl", jsonl(GROUP | {"completions": ["sun"], "rewards": None}), [],
     ["field 'completions': expected a list of at least 2 completions", "of length 1"]),
    ("completions-not-a-list", "d.jsonl", jsonl(GROUP | {"completions": "sun rain"}), [], ["field 'completions'", "got str"]),
    ("wrong-number-of-rewards", "d.jsonl", jsonl(GROUP | {"rewards": [1.0]}), [],
     ["field 'rewards': expected a list of 2 numbers (one per completion), got 1"]),
    ("nan-in-rewards", "d.jsonl", jsonl(GROUP | {"rewards": [1.0, math.nan]}), [], ["field 'rewards[1]': not a finite number"]),
    ("wrong-number-of-completions", "d.jsonl", jsonl(GROUP, GROUP | {"completions": ["a", "b", "c"], "rewards": None}), [],
     ["row 2, field 'completions': 3 completions where earlier rows have 2", "same number of completions"]),
    ("empty-completion-in-group", "d.jsonl", jsonl(GROUP | {"completions": ["sun", ""]}), [],
     ["field 'completions[1]': empty text"]),
    ("empty-file", "d.jsonl", b"", [], ["{file}: the dataset has no rows"]),
    ("blank-lines-only", "d.jsonl", b"\n  \n\n", [], ["the dataset has no rows"]),
    ("prompts-for-offline-trainer", "d.jsonl", jsonl({"prompt": "the cat"}), [],
     ["rows look like 'prompts' but this trainer takes pairs or groups", "see the dataset formats"]),
    ("json-not-a-list", "d.json", b'{"prompt": "the cat"}', [], ["{file}: expected a JSON list of objects"]),
    ("json-broken", "d.json", b'[{"prompt": ', [], ["{file}: invalid JSON"]),
    ("json-non-utf8", "d.json", b'[{"prompt": "\xff"}]', [], ["{file}: file is not valid UTF-8"]),
    ("csv-missing-column", "d.csv", b"prompt,chosen\nthe cat,sun\n", [], ["{file}, row 1, field 'rejected': missing field"]),
    ("unsupported-file-type", "d.txt", b"the cat sees the sun\n", [], ["unsupported file type '.txt'", "use .jsonl, .json, .csv"]),
    ("missing-file", None, None, [], ["{file}: file or directory does not exist", "check the `dataset` path"]),
    ("directory-not-a-dataset", "dir", None, [], ["{file}: not a saved dataset directory"]),
    ("bad-eval-dataset", "d.jsonl", jsonl(PAIR | {"chosen": 7}), ["--eval_dataset", "{file}", "--dataset", "{good}"],
     ["{file}, row 1, field 'chosen'"]),
    ("copg-pairs-without-rewards", "d.jsonl", jsonl(PAIR, PAIR | {"chosen": "sun"}), ["--trainer", "copg"],
     ["{file}, field 'rewards': 2 of 2 rows have no rewards; `trainer: copg` needs them on pairs", "set `reward` to compute them"]),
]

# (id, config text (None: no file), extra command line, fragments; {config} = the config file)
CONFIGS = [
    ("missing-config", None, [], ["config file {config} does not exist"]),
    ("not-yaml", "trainer: cpl\n  bad: [indent", [], ["{config}: not valid YAML"]),
    ("yaml-list", "- trainer\n- cpl\n", [], ["{config}: expected a mapping of keys to values, got list"]),
    ("non-utf8", b"trainer: cpl\nmodel: \xff\xfe\n", [], ["{config}: not valid YAML"]),
    ("empty", "", [], ["key 'trainer' must be one of cpl, dpo, copg"]),
    ("unknown-trainer", "trainer: ppo\n", [], ["key 'trainer' must be one of", "got 'ppo'"]),
    ("misspelt-key", {"alpah": 0.1}, [], ["unknown key 'alpah'; did you mean 'alpha'?"]),
    ("unknown-key", {"frobnicate": 1}, [], ["unknown key 'frobnicate'", "`align train --help-keys` lists them"]),
    ("unknown-key-command-line", {}, ["--bogus_key", "3"], ["command line: unknown key 'bogus_key'"]),
    ("not-a-key-value", {}, ["positional"], ["command line: expected --key value, got 'positional'"]),
    ("float-as-string", {"alpha": "big"}, [], ["key 'alpha' expects float, got str 'big'"]),
    ("int-as-float", {"lora_r": 2.5}, [], ["key 'lora_r' expects int, got float 2.5"]),
    ("bool-as-string", {"online": "maybe"}, [], ["key 'online' expects bool, got str 'maybe'"]),
    ("list-as-int", {"lora_target_modules": 5}, [], ["key 'lora_target_modules' expects list"]),
    ("alpha-zero", {"alpha": 0}, [], ["alpha=0 is out of range: it must be > 0"]),
    ("alpha-negative", {"alpha": -0.5}, [], ["alpha=-0.5 is out of range: it must be > 0"]),
    ("lambda-zero", {"lam": 0.0}, [], ["lam=0.0 is out of range: it must be in (0, 1]"]),
    ("lambda-above-one", {"lam": 1.5}, [], ["lam=1.5 is out of range: it must be in (0, 1]"]),
    ("lambda-negative", {"lam": -0.2}, [], ["lam=-0.2 is out of range: it must be in (0, 1]"]),
    ("beta-zero-dpo", {"trainer": "dpo", "beta": 0}, [], ["beta=0 is out of range: it must be > 0"]),
    ("beta-negative-copg", {"trainer": "copg", "beta": -1.0}, [], ["beta=-1.0 is out of range: it must be > 0"]),
    ("lora-rank-zero", {"lora_r": 0}, [], ["lora_r=0 is out of range: it must be >= 1"]),
    ("lora-dropout-one", {"lora_dropout": 1.0}, [], ["lora_dropout=1.0 is out of range: it must be in [0, 1)"]),
    ("learning-rate-negative", {"learning_rate": -1.0e-4}, [], ["learning_rate=-0.0001 is out of range: it must be > 0"]),
    ("learning-rate-zero", {"learning_rate": 0.0}, [], ["learning_rate=0.0 is out of range"]),
    ("batch-size-zero", {"per_device_train_batch_size": 0}, [], ["per_device_train_batch_size=0 is out of range: it must be >= 1"]),
    ("accumulation-zero", {"gradient_accumulation_steps": 0}, [], ["gradient_accumulation_steps=0 is out of range"]),
    ("epochs-negative", {"num_train_epochs": -1}, [], ["num_train_epochs=-1 is out of range: it must be > 0"]),
    ("save-steps-zero", {"save_steps": 0}, [], ["save_steps=0 is out of range"]),
    ("logging-steps-zero", {"logging_steps": 0}, [], ["requires non-zero --logging_steps"]),
    ("seed-negative", {"seed": -1}, [], ["seed=-1 is out of range: it must be in [0, 2**32)"]),
    ("weight-decay-negative", {"weight_decay": -0.1}, [], ["weight_decay=-0.1 is out of range: it must be >= 0"]),
    ("one-generation", {"num_generations": 1}, [], ["num_generations=1 is out of range: it must be >= 2"]),
    ("temperature-zero", {"temperature": 0.0}, [], ["temperature=0.0 is out of range: it must be > 0"]),
    ("top-p-above-one", {"top_p": 1.5}, [], ["top_p=1.5 is out of range: it must be in (0, 1]"]),
    ("prompt-longer-than-max", {"max_length": 64, "max_prompt_length": 64}, [], ["max_prompt_length=64 is out of range"]),
    ("reward-timeout-zero", {"reward_timeout": 0}, [], ["reward_timeout=0 is out of range: it must be > 0 seconds"]),
    ("retries-negative", {"reward_retries": -1}, [], ["reward_retries=-1 is out of range"]),
    ("bad-dtype", {"dtype": "float64"}, [], ["dtype='float64': choose one of float32, bfloat16, float16"]),
    ("bad-policy", {"on_bad_row": "ignore"}, [], ["on_bad_row='ignore': choose one of error, skip"]),
    ("online-without-reward", {"online": True}, [], ["online=true needs a `reward`"]),
    ("unknown-builtin-reward", {"trainer": "copg", "online": True, "reward": "builtin:nope"}, [],
     ["unknown built-in reward 'nope'"]),
    ("reward-module-missing", {"trainer": "copg", "online": True, "reward": "no_such_module:score"}, [],
     ["reward 'no_such_module:score': cannot import module 'no_such_module'"]),
    ("reward-model-missing", {"trainer": "copg", "online": True, "reward": "rm:no_such_rm"}, [],
     ["reward model 'no_such_rm': no adapter_config.json or config.json"]),
    ("reward-model-bad-option", {"trainer": "copg", "online": True, "reward": "rm:no_such_rm?normalise=1"}, [],
     ["unknown option(s) ['normalise']"]),
    ("precompute-online", {"trainer": "copg", "online": True, "reward": "builtin:demo", "precompute_ref_logps": True},
     [], ["precompute_ref_logps is for offline data"]),
    ("empty-output-dir", {"output_dir": ""}, [], ["output_dir is required"]),
    ("resume-dir-missing", {}, ["--resume", "{tmp}/no/such/checkpoint-4"], ["checkpoint {tmp}/no/such/checkpoint-4 does not exist"]),
]


def _model_dir(tmp_path, name):
    path = tmp_path / name
    shutil.copytree(demo.base_model_path(), path)
    return path


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del data[key]
    path.write_text(json.dumps(data))


def _other_base_adapter(tmp_path):
    """A LoRA adapter trained on a model of another shape (hidden size 32, not 64)."""
    tokenizer = word_tokenizer(demo.WORDS)
    path = tmp_path / "adapter"
    wrap_lora(tiny_llama(len(tokenizer), hidden_size=32, intermediate_size=64), r=4).save_pretrained(path)
    return path


# (id, prepare(tmp_path) -> extra command line, fragments)
MODELS = [
    ("model-dir-missing", lambda t: ["--model", str(t / "nowhere")], ["model path", "does not exist; check the `model` key"]),
    ("no-config-json", lambda t: ["--model", str(_rm(_model_dir(t, "m"), "config.json"))],
     ["has no config.json: not a Hugging Face model directory"]),
    ("broken-config-json", lambda t: ["--model", str(_write(_model_dir(t, "m"), "config.json", b"{oops"))],
     ["config.json' is not a valid JSON file"]),
    ("no-weights", lambda t: ["--model", str(_rm(_model_dir(t, "m"), "model.safetensors"))],
     ["could not load a causal LM", "no file named model.safetensors"]),
    ("truncated-weights", lambda t: ["--model", str(_truncate(_model_dir(t, "m"), "model.safetensors"))],
     ["a weights file is damaged or incomplete", "save or download the model again"]),
    ("garbage-weights", lambda t: ["--model", str(_write(_model_dir(t, "m"), "model.safetensors", b"\0" * 4096))],
     ["a weights file is damaged or incomplete"]),
    ("no-tokenizer", lambda t: ["--model", str(_rm(_model_dir(t, "m"), "tokenizer.json", "tokenizer_config.json"))],
     ["could not load a tokenizer from"]),
    ("no-pad-no-eos", lambda t: ["--model", str(_tok(_model_dir(t, "m"), pad_token=None, eos_token=None))],
     ["has neither a pad nor an EOS token", "tokenizer.add_special_tokens"]),
    ("mismatched-vocab", lambda t: ["--model", str(_bigger_vocab(_model_dir(t, "m")))],
     ["tokens but the model embeds only", "use the tokenizer saved with the model"]),
    ("adapter-missing", lambda t: ["--adapter_path", str(t / "no-adapter")], ["could not load the adapter", "check `adapter_path`"]),
    ("adapter-of-another-model", lambda t: ["--adapter_path", str(_other_base_adapter(t))],
     ["could not load the adapter", "trained on this model"]),
    ("hub-id-offline", lambda t: ["--model", "some-org/some-model"], ["could not load a tokenizer from 'some-org/some-model'"]),
    ("model-is-a-file", lambda t: ["--model", str(_write(t, "model.bin", b"weights") / "model.bin")],
     ["could not load a tokenizer from"]),
    ("empty-model-dir", lambda t: ["--model", str(_mkdir(t / "empty"))], ["has no config.json"]),
    ("unknown-model-type", lambda t: ["--model", str(_write(_model_dir(t, "m"), "config.json", b'{"model_type": "nope"}'))],
     ["model type `nope` but Transformers does not recognize this architecture"]),
    ("config-json-is-a-list", lambda t: ["--model", str(_write(_model_dir(t, "m"), "config.json", b"[1, 2]"))],
     ["could not load a tokenizer from"]),
    ("config-json-empty", lambda t: ["--model", str(_write(_model_dir(t, "m"), "config.json", b""))], ["not a valid JSON file"]),
    ("weights-of-another-shape", lambda t: ["--model", str(_other_shape_weights(_model_dir(t, "m")))],
     ["could not load a causal LM", "ignore_mismatched_sizes"]),
    ("config-vocab-disagrees-with-weights", lambda t: ["--model", str(_config(_model_dir(t, "m"), vocab_size=10))],
     ["could not load a causal LM"]),
    ("missing-shard", lambda t: ["--model", str(_missing_shard(_model_dir(t, "m")))],
     ["No such file or directory", "model-00001-of-00002.safetensors"]),
    ("broken-tokenizer-json", lambda t: ["--model", str(_write(_model_dir(t, "m"), "tokenizer.json", b"{garbage"))],
     ["could not load a tokenizer from"]),
    ("broken-tokenizer-config", lambda t: ["--model", str(_write(_model_dir(t, "m"), "tokenizer_config.json", b"{garbage"))],
     ["could not load a tokenizer from"]),
    ("custom-code-not-trusted", lambda t: ["--model", str(_config(_model_dir(t, "m"), model_type="evil", auto_map={"AutoConfig": "x.C"}))],
     ["contains custom code", "trust_remote_code=True"]),
    ("adapter-config-broken", lambda t: ["--adapter_path", str(_write(_adapter(t), "adapter_config.json", b"{garbage"))],
     ["could not load the adapter", "check `adapter_path`"]),
    ("adapter-without-weights", lambda t: ["--adapter_path", str(_rm(_adapter(t), "adapter_model.safetensors"))],
     ["could not load the adapter"]),
    ("adapter-truncated", lambda t: ["--adapter_path", str(_truncate(_adapter(t), "adapter_model.safetensors"))],
     ["could not load the adapter", "Error while deserializing header"]),
    ("adapter-unknown-type", lambda t: ["--adapter_path", str(_adapter_config(_adapter(t), peft_type="NOPE"))],
     ["could not load the adapter"]),
    ("adapter-targets-missing-modules", lambda t: ["--adapter_path", str(_adapter_config(_adapter(t), target_modules=["x"]))],
     ["Target modules {{'x'}} not found in the base model"]),
    ("lora-targets-missing-modules", lambda t: ["--lora_target_modules", "[no_such_proj]"],
     ["could not add LoRA to", "check `lora_target_modules`"]),
]


def _mkdir(path):
    path.mkdir()
    return path


def _config(path, **changes):
    _edit_json(path / "config.json", **changes)
    return path


def _other_shape_weights(path):
    small = path.parent / "small"
    tiny_llama(len(word_tokenizer(demo.WORDS)), hidden_size=32, intermediate_size=64).save_pretrained(small)
    shutil.copy(small / "model.safetensors", path / "model.safetensors")
    return path


def _missing_shard(path):
    (path / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    return _write(path, "model.safetensors.index.json", json.dumps(index).encode())


def _adapter(tmp_path):
    """A LoRA adapter saved for the demo base model."""
    path = tmp_path / "adapter"
    load_policy(str(demo.base_model_path()), r=4, alpha=8).save_pretrained(path)
    return path


def _adapter_config(path, **changes):
    _edit_json(path / "adapter_config.json", **changes)
    return path


def _rm(path, *names):
    for name in names:
        (path / name).unlink()
    return path


def _write(path, name, data: bytes):
    (path / name).write_bytes(data)
    return path


def _truncate(path, name):
    data = (path / name).read_bytes()
    return _write(path, name, data[: len(data) // 3])


def _tok(path, **changes):
    _edit_json(path / "tokenizer_config.json", **changes)
    return path


def _bigger_vocab(path):
    word_tokenizer(demo.WORDS + [f"extra{i}" for i in range(40)]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
    """An output directory holding an earlier run's files: no failing command may touch it."""
    out = tmp_path_factory.mktemp("previous") / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "align_checkpoint.json").write_text('{"files": {}, "state": {}}')
    (out / "adapter_model.safetensors").write_bytes(b"earlier weights")
    (out / "summary.json").write_text('{"steps": 2}')
    return out


def _run(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


def _expect_error(argv, fragments, out, capsys, snapshot, record_property, **fmt):
    before = snapshot(out)
    code, err = _run(argv, capsys)
    record_property("data_lost", int(snapshot(out) != before))
    assert code == 2, err
    assert err.count("align: error: ") == 1, err
    message = err[err.index("align: error: "):]  # before it: progress bars and log lines
    for fragment in fragments:
        assert fragment.format(**fmt) in message, message
    assert snapshot(out) == before


@pytest.fixture
def base_config(tmp_path, previous_run, demo_base_dir):
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl(PAIR, PAIR | {"chosen": "the gold sun"}))
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(BASE | {"dataset": str(good), "output_dir": str(previous_run)}))
    return config, good


@pytest.mark.parametrize("case", DATA, ids=[c[0] for c in DATA])
def test_bad_dataset(case, tmp_path, base_config, previous_run, capsys, snapshot, record_property):
    _, name, content, extra, fragments = case
    config, good = base_config
    data = tmp_path / (name or "missing.jsonl")
    if name == "dir":
        data.mkdir()
    elif content is not None:
        data.write_bytes(content)
    fmt = {"file": str(data), "good": str(good)}
    argv = ["train", "--config", str(config), "--dataset", str(data), *[a.format(**fmt) for a in extra]]
    _expect_error(argv, fragments, previous_run, capsys, snapshot, record_property, **fmt)


@pytest.mark.parametrize("case", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_config(case, tmp_path, base_config, previous_run, capsys, snapshot, record_property):
    _, text, extra, fragments = case
    good_config, _ = base_config
    config = tmp_path / "config.yaml"
    if isinstance(text, dict):
        config.write_text(yaml.safe_dump(yaml.safe_load(good_config.read_text()) | text))
    elif isinstance(text, (str, bytes)):
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
    fmt = {"config": str(config), "tmp": str(tmp_path)}
    argv = ["train", "--config", str(config), *[a.format(**fmt) for a in extra]]
    _expect_error(argv, fragments, previous_run, capsys, snapshot, record_property, **fmt)


@pytest.mark.parametrize("case", MODELS, ids=[c[0] for c in MODELS])
def test_bad_model(case, tmp_path, base_config, previous_run, capsys, snapshot, record_property):
    _, prepare, fragments = case
    config, _ = base_config
    argv = ["train", "--config", str(config), *prepare(tmp_path)]
    _expect_error(argv, fragments, previous_run, capsys, snapshot, record_property)


# --- documented handling instead of an error: a count in the summary, or a logged fallback ---------


def _train_ok(argv, capsys, tmp_path) -> dict:
    code, err = _run([*argv, "--output_dir", str(tmp_path / "new")], capsys)
    assert code == 0, err
    return json.loads((tmp_path / "new" / "summary.json").read_text())


def test_bad_rows_are_skipped_and_counted(tmp_path, base_config, capsys, record_property):
    config, _ = base_config
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(jsonl(PAIR, without(PAIR, "chosen"), PAIR | {"prompt": " "}, PAIR | {"rejected": PAIR["chosen"]},
                           PAIR | {"chosen": "the gold sun"}, PAIR | {"chosen_reward": math.nan, "rejected_reward": 0.0}))
    summary = _train_ok(["train", "--config", str(config), "--dataset", str(data), "--on_bad_row", "skip"], capsys, tmp_path)
    assert summary["data"] == ("2/6 rows kept; skipped: 1 missing field, 1 empty text, 1 chosen and rejected are "
                               "identical, 1 not a finite number; 0 prompts and 0 completions truncated")
    record_property("data_lost", 0)


def test_huge_rows_are_truncated_and_counted(tmp_path, base_config, capsys, record_property):
    config, _ = base_config
    data = tmp_path / "huge.jsonl"
    data.write_bytes(jsonl(PAIR | {"prompt": "the cat " * 200_000}, PAIR | {"chosen": "sun " * 100_000}))
    summary = _train_ok(["train", "--config", str(config), "--dataset", str(data), "--max_length", "64",
                         "--max_prompt_length", "32"], capsys, tmp_path)
    assert summary["data"] == "2/2 rows kept; 1 prompts and 1 completions truncated"
    record_property("data_lost", 0)


def test_extra_fields_are_ignored_and_logged(tmp_path, base_config, capsys, caplog, record_property):
    caplog.set_level(logging.INFO)
    config, _ = base_config
    data = tmp_path / "extra.jsonl"
    data.write_bytes(jsonl(PAIR | {"id": 1, "source": "web"}, PAIR | {"chosen": "the gold sun", "id": 2}))
    summary = _train_ok(["train", "--config", str(config), "--dataset", str(data)], capsys, tmp_path)
    assert summary["data"].startswith("2/2 rows kept") and "ignored fields ['id', 'source']" in caplog.text
    record_property("data_lost", 0)


def test_tokenizer_without_pad_token_uses_eos(tmp_path, base_config, capsys, caplog, record_property):
    caplog.set_level(logging.INFO)
    config, _ = base_config
    model = _tok(_model_dir(tmp_path, "m"), pad_token=None)
    summary = _train_ok(["train", "--config", str(config), "--model", str(model)], capsys, tmp_path)
    assert summary["steps"] == 1 and "has no pad token; using EOS '<eos>' as pad" in caplog.text
    record_property("data_lost", 0)


def test_every_entry_point_gets_at_least_30_cases():
    assert len(DATA) >= 30 and len(CONFIGS) >= 30 and len(MODELS) + 1 >= 30  # + the pad-token fallback


# --- fuzzing the dataset loader ------------------------------------------------------------------

TOKENIZER = word_tokenizer(demo.WORDS)
MAX_LENGTH, MAX_PROMPT = 24, 12
texts = st.one_of(st.text(max_size=30), st.lists(st.sampled_from(demo.WORDS + ["<eos>", "\n"]), max_size=12).map(" ".join),
                  st.sampled_from(["the \ud800 cat", "\udfff"]))  # lone surrogates: valid JSON, not valid Unicode
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", 7]), "content": texts}), max_size=3)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts)
values = st.one_of(scalars, texts, messages, st.lists(st.one_of(texts, st.floats(), st.integers()), max_size=4),
                   st.dictionaries(st.text(max_size=4), scalars, max_size=2))
rows = st.dictionaries(st.sampled_from(sorted(KNOWN_FIELDS) + ["extra"]), values, max_size=6)
lines = st.lists(st.one_of(rows.map(lambda r: json.dumps(r).encode()), st.binary(max_size=40)), max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=lines, skip=st.booleans())
def test_fuzzed_files_load_or_fail_with_a_data_error(lines, skip, tmp_path):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        records = load_records(str(path))
        dataset = build_dataset(records, TOKENIZER, source=str(path), kinds=("pairs", "groups"), max_length=MAX_LENGTH,
                                max_prompt_length=MAX_PROMPT, on_bad_row="skip" if skip else "error")
    except DataError as err:
        assert str(err).startswith(str(path)) and err.problem
        return
    stats = dataset.stats
    assert stats.kept == len(dataset) >= 1 and stats.kept + sum(stats.skipped.values()) == stats.rows == len(records)
    group_size = len(dataset[0]["completion_ids"])
    for example in dataset.examples:
        assert 1 <= len(example["prompt_ids"]) <= MAX_PROMPT and len(example["completion_ids"]) == group_size >= 2
        for ids in [example["prompt_ids"], *example["completion_ids"]]:
            assert all(isinstance(t, int) and 0 <= t < len(TOKENIZER) for t in ids)
        assert all(len(example["prompt_ids"]) + len(c) <= MAX_LENGTH for c in example["completion_ids"])
        assert all(math.isfinite(s) for s in example.get("scores", []))
