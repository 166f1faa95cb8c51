"""Exact resume after SIGKILL.

A CPL run and an online CoPG run (``align train`` on the tiny demo model, each in its own process)
are killed with SIGKILL: one at a random step, one in the middle of writing a checkpoint file.
Resumed with ``align train --resume``, each finishes with the same adapter, bit for bit, the same
logged values at every step and the same evaluation as an uninterrupted run with the same seed (CPU).

What makes that possible (see ``align.checkpoints``): transformers' RNG, optimizer and scheduler
states; the data order, a function of (seed, epoch); the on-policy sampling seed, a function of
(seed, step, rank); align's counters in the checkpoint manifest. There is no replay buffer to save:
online batches are sampled afresh at every step. Logged values match when ``save_steps`` is a
multiple of ``logging_steps`` (transformers restarts its running loss sum at a resume).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from align import checkpoints

pytestmark = pytest.mark.slow  # real subprocesses: about a minute per trainer on 2 cores

COMMON = {"model": "builtin:demo", "dataset": "builtin:demo", "learning_rate": 2.0e-3, "max_steps": 12,
          "save_steps": 4, "logging_steps": 1, "save_total_limit": 2, "task_eval_prompts": 8,
          "torch_threads": 1, "seed": 0}
CONFIGS = {
    # 64 prompts / 8 = 8 steps per epoch: the run crosses an epoch; dropout makes the RNG state matter.
    "cpl": COMMON | {"trainer": "cpl", "alpha": 0.1, "lam": 0.8, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                     "per_device_train_batch_size": 8, "max_new_tokens": 12, "task_train_prompts": 64},
    "copg": COMMON | {"trainer": "copg", "online": True, "reward": "builtin:demo", "beta": 0.1, "num_generations": 2,
                      "max_new_tokens": 8, "lora_r": 4, "lora_alpha": 8, "per_device_train_batch_size": 4,
                      "task_train_prompts": 32},
}
# The checkpoint file each trainer's second run dies writing (half of it reaches the disk).
DIES_WRITING = {"cpl": "checkpoint-8/optimizer.pt", "copg": "checkpoint-8/rng_state.pth"}


def train_argv(config, out) -> list[str]:
    return ["train", "--config", str(config), "--output_dir", str(out)]


def kill_at_step(pid: int, stdout, step: int, timeout: float = 300) -> None:
    """SIGKILL ``pid`` as soon as its ``stdout`` file shows ``step`` optimizer steps (one log per step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stdout.exists() and stdout.read_text(errors="replace").count("{'loss'") >= step:
            break
        time.sleep(0.005)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it finished first
        pass


def outcome(out) -> dict:
    """Final adapter, per-step log entries and evaluation of a finished run."""
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("train_loss")  # transformers averages it over the steps of this process only
    return {"adapter": load_file(out / "adapter_model.safetensors"),
            "logs": [h for h in state["log_history"] if "loss" in h], "summary": summary}


def assert_same(resumed: dict, reference: dict, why: str) -> None:
    assert resumed["adapter"].keys() == reference["adapter"].keys()
    for key, value in reference["adapter"].items():
        assert torch.equal(resumed["adapter"][key], value), f"{why}: adapter tensor {key} differs"
    assert len(reference["logs"]) == 12
    assert resumed["logs"] == reference["logs"], why
    assert resumed["summary"] == reference["summary"], why


def damaged_checkpoints(out) -> int:
    """Checkpoints in ``out`` that do not verify: data a crash destroyed (must be none)."""
    bad = 0
    for path in checkpoints.list_checkpoints(out):
        try:
            checkpoints.verify(path)
        except checkpoints.CheckpointError:
            bad += 1
    return bad


@pytest.mark.parametrize("name", ["cpl", "copg"])
def test_sigkill_then_resume_matches_uninterrupted_run(name, tmp_path, zygote, record_property):
    start = time.monotonic()
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(CONFIGS[name]))
    kill_step = random.SystemRandom().randint(5, 11)  # after the first checkpoint (step 4), before the end
    record_property("kill_step", kill_step)
    record_property("cases", 2)  # two runs killed: at a random step, and while writing a checkpoint
    runs = {"random-step": tmp_path / "random-step", "mid-write": tmp_path / "mid-write"}
    reference = zygote.start(train_argv(config, tmp_path / "reference"), tmp_path / "reference")
    killed = zygote.start(train_argv(config, runs["random-step"]), tmp_path / "random-step")
    writing = zygote.start(train_argv(config, runs["mid-write"]), tmp_path / "mid-write", dies_writing=DIES_WRITING[name])
    kill_at_step(killed, tmp_path / "random-step.out", kill_step)
    assert zygote.wait(writing) == -signal.SIGKILL
    assert zygote.wait(killed) in (-signal.SIGKILL, 0)  # 0: it finished before the signal arrived
    assert zygote.wait(reference) == 0, (tmp_path / "reference.err").read_text()[-3000:]

    # The run killed while writing checkpoint-8: that checkpoint never appeared, checkpoint-4 is intact.
    staged = runs["mid-write"] / (checkpoints.TMP_PREFIX + "checkpoint-8")
    assert staged.is_dir() and not (runs["mid-write"] / "checkpoint-8").exists()
    assert [p.name for p in checkpoints.list_checkpoints(runs["mid-write"])] == ["checkpoint-4"]

    lost = sum(damaged_checkpoints(out) for out in runs.values())
    record_property("data_lost", lost)
    assert lost == 0
    for out in runs.values():
        assert checkpoints.list_checkpoints(out), f"{out.name}: no checkpoint survived"
    resumed = {label: zygote.start([*train_argv(config, out), "--resume"], tmp_path / f"{label}-resumed")
               for label, out in runs.items()}
    expected = outcome(tmp_path / "reference")
    for label, out in runs.items():
        assert zygote.wait(resumed[label]) == 0, (tmp_path / f"{label}-resumed.err").read_text()[-3000:]
        assert not list(out.glob(checkpoints.TMP_PREFIX + "*")), "the crashed save's leftovers are removed"
        assert_same(outcome(out), expected, f"{name}, killed ({label}, step {kill_step}) and resumed")
    record_property("wall_s", round(time.monotonic() - start, 1))
