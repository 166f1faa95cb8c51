"""Shared fixtures: offline hub, one torch thread (tiny models), a session-wide model cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # the test models are tiny: threads cost more than they give


@pytest.fixture(scope="session", autouse=True)
def align_cache(tmp_path_factory):
    """The demo base model is built once per session (or reused from $ALIGN_CACHE, as CI sets it)."""
    if "ALIGN_CACHE" not in os.environ:
        os.environ["ALIGN_CACHE"] = str(tmp_path_factory.mktemp("align_cache"))
    return os.environ["ALIGN_CACHE"]


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A small word-level tokenizer + Llama saved as a local HF model directory."""
    from align.models.tiny import tiny_llama, word_tokenizer
    from align.rewards.tasks import BAD_WORDS, GOOD_WORDS, NEUTRAL_WORDS

    path = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = word_tokenizer(GOOD_WORDS + BAD_WORDS + NEUTRAL_WORDS)
    model = tiny_llama(len(tokenizer), hidden_size=32, intermediate_size=64, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def demo_base_dir(align_cache):
    from align import demo

    return demo.base_model_path()


def _snapshot(directory) -> dict[str, str]:
    """{relative path: SHA-256} of every file under ``directory`` ({} if it does not exist)."""
    import hashlib
    from pathlib import Path

    root = Path(directory)
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def snapshot():
    """Fingerprint a directory, to show that a failed command left it exactly as it was."""
    return _snapshot


# A short CPL run on the demo model with checkpoints at steps 4 and 8 (two epochs of 4 steps).
TRAINED_RUN = {"trainer": "cpl", "model": "builtin:demo", "dataset": "builtin:demo", "alpha": 0.1, "lam": 0.8,
               "lora_r": 4, "lora_alpha": 8, "learning_rate": 2.0e-3, "per_device_train_batch_size": 8,
               "max_new_tokens": 8, "task_train_prompts": 32, "task_eval_prompts": 4, "max_steps": 8,
               "save_steps": 4, "logging_steps": 1, "torch_threads": 1, "seed": 0}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, demo_base_dir):
    """(config file, output dir) of ``TRAINED_RUN``, trained once per session. Copy the output dir
    before changing anything in it."""
    import yaml

    from align import cli

    root = tmp_path_factory.mktemp("trained_run")
    config = root / "cpl.yaml"
    config.write_text(yaml.safe_dump(TRAINED_RUN))
    assert cli.main(["train", "--config", str(config), "--output_dir", str(root / "out")]) == 0
    return config, root / "out"
