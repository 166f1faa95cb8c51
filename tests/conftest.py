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
