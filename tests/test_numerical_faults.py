"""Numerical faults: a NaN/inf loss or gradient skips its optimizer step (counted, weights untouched)
or stops the run with a clear error; a reward that raises or hangs is reported with its prompt and
handled by policy (retry, skip, stop)."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
import yaml
from transformers import TrainerCallback

from align import api, checkpoints, cli
from align.rewards import RewardError, score
from align.trainers import CoPGTrainer, CPLTrainer

CPL = {"trainer": "cpl", "model": "builtin:demo", "dataset": "builtin:demo", "lora_r": 4, "lora_alpha": 8,
       "learning_rate": 2.0e-3, "per_device_train_batch_size": 8, "max_new_tokens": 8, "task_train_prompts": 16,
       "task_eval_prompts": 4, "max_steps": 6, "logging_steps": 1, "save_strategy": "no", "torch_threads": 1}
COPG = {"trainer": "copg", "model": "builtin:demo", "dataset": "builtin:demo", "online": True, "reward": "builtin:demo",
        "lora_r": 4, "lora_alpha": 8, "per_device_train_batch_size": 4, "max_new_tokens": 6, "task_train_prompts": 8,
        "task_eval_prompts": 4, "max_steps": 2, "logging_steps": 1, "save_strategy": "no", "torch_threads": 1}


class StepRecorder(TrainerCallback):
    """Trainable parameters before and after every optimizer step."""

    def __init__(self, model):
        self.model, self.before, self.after = model, [], []

    def _params(self):
        return [p.detach().clone() for p in self.model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before.append(self._params())

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.after.append(self._params())

    def changed(self, step: int) -> bool:  # step: 1-based optimizer step
        return any(not torch.equal(a, b) for a, b in zip(self.before[step - 1], self.after[step - 1]))


def _trainer(values: dict, tmp_path, **overrides):
    config = api.make_config(values | {"output_dir": str(tmp_path / "out")} | overrides)
    trainer = api.build_trainer(config)
    recorder = StepRecorder(trainer.model)
    trainer.add_callback(recorder)
    return trainer, recorder


def _poison_objective(trainer, steps: set[int], value: float) -> None:
    real = trainer.objective

    def objective(logps, ref_logps, batch):
        losses, metrics = real(logps, ref_logps, batch)
        return (losses + value if trainer.state.global_step + 1 in steps else losses), metrics

    trainer.objective = objective


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_loss_skips_the_step(value, tmp_path):
    trainer, recorder = _trainer(CPL, tmp_path)
    _poison_objective(trainer, {2, 5}, value)
    trainer.train()
    assert trainer.state.global_step == 6 and trainer.nonfinite_steps == 2
    assert [recorder.changed(s) for s in range(1, 7)] == [True, False, True, True, False, True]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logged = [h["nonfinite_skipped"] for h in trainer.state.log_history if "loss" in h]
    assert logged == [0, 1, 1, 1, 2, 2]


def test_nonfinite_reward_model_loss_skips_the_step(tmp_path):
    """The reward trainer takes the same path: the step is dropped (no update: Adam's moments would move the
    weights even on a zero gradient), counted and logged."""
    trainer, recorder = _trainer(CPL | {"trainer": "reward", "max_steps": 4}, tmp_path)
    real = trainer.bt_losses
    trainer.bt_losses = lambda *a: real(*a) * (math.nan if trainer.state.global_step + 1 == 2 else 1.0)
    trainer.train()
    assert trainer.nonfinite_steps == 1
    assert [recorder.changed(s) for s in range(1, 5)] == [True, False, True, True]
    logged = [h["nonfinite_skipped"] for h in trainer.state.log_history if "loss" in h]
    assert logged == [0, 1, 1, 1]


def test_nonfinite_gradient_skips_the_step(tmp_path):
    trainer, recorder = _trainer(CPL, tmp_path)
    lora_b = next(p for n, p in trainer.model.named_parameters() if "lora_B" in n)
    lora_b.register_hook(lambda g: g * math.nan if trainer.state.global_step + 1 == 3 else g)
    trainer.train()
    assert trainer.nonfinite_steps == 1
    assert [recorder.changed(s) for s in range(1, 7)] == [True, True, False, True, True, True]
    # AdamW's moments were untouched too: the step after the skipped one is an ordinary step.
    assert all(torch.isfinite(s["exp_avg"]).all() for s in trainer.optimizer.state.values())


def test_stop_policy_ends_the_run_with_a_clear_error(tmp_path, monkeypatch, capsys, snapshot):
    real = CPLTrainer.objective

    def objective(self, logps, ref_logps, batch):
        losses, metrics = real(self, logps, ref_logps, batch)
        return (losses * math.nan if self.state.global_step + 1 == 3 else losses), metrics

    monkeypatch.setattr(CPLTrainer, "objective", objective)
    config = tmp_path / "cpl.yaml"
    config.write_text(yaml.safe_dump(CPL | {"save_strategy": "steps", "save_steps": 2}))
    out = tmp_path / "out"
    assert cli.main(["train", "--config", str(config), "--output_dir", str(out), "--on_nonfinite", "stop"]) == 2
    err = capsys.readouterr().err
    assert "align: error: non-finite loss at step 3 (on_nonfinite=stop)" in err and "Traceback" not in err
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2"]
    checkpoints.verify(out / "checkpoint-2")  # the last good state, ready for --resume


# --- rewards ------------------------------------------------------------------------------------

PROMPTS = ["the cat", "a dog", "the bad prompt", "one bird"]
COMPLETIONS = ["sun", "rain", "joy", "mud"]


def fragile(prompts, completions):
    """Length of each completion; raises on the bad prompt."""
    if any("bad" in p for p in prompts):
        raise ZeroDivisionError("division by zero")
    return [float(len(c)) for c in completions]


def test_raising_reward_skip_isolates_the_failing_prompt(caplog):
    values = score(fragile, PROMPTS, COMPLETIONS, on_error="skip")
    assert values[:2] == [3.0, 4.0] and math.isnan(values[2]) and values[3] == 3.0
    assert "prompt 2 'the bad prompt'" in caplog.text and "ZeroDivisionError" in caplog.text


def test_raising_reward_stop_names_the_prompt():
    with pytest.raises(RewardError, match=r"raised ZeroDivisionError: division by zero on prompt 2 'the bad prompt' "
                                          r"\(1 of 4 prompts failed\)"):
        score(fragile, PROMPTS, COMPLETIONS, on_error="stop")


def test_retries_recover_a_flaky_reward():
    calls = []

    def flaky(prompts, completions):
        calls.append(len(prompts))
        if len(calls) < 3:
            raise ConnectionError("reward server busy")
        return [1.0] * len(prompts)

    assert score(flaky, PROMPTS, COMPLETIONS, retries=2) == [1.0] * 4
    assert calls == [4, 4, 4]


def test_slow_reward_times_out():
    def sleepy(prompts, completions):
        time.sleep(30)

    start = time.monotonic()
    with pytest.raises(RewardError, match=r"timed out \(took longer than 0.2 s\) on a batch of 4 starting at prompt 0 'the cat'"):
        score(sleepy, PROMPTS, COMPLETIONS, timeout=0.2)
    values = score(sleepy, PROMPTS, COMPLETIONS, timeout=0.2, on_error="skip")
    assert all(math.isnan(v) for v in values) and time.monotonic() - start < 5


def test_spinning_reward_is_interrupted():
    def spin(prompts, completions):
        while True:
            pass

    start = time.monotonic()
    with pytest.raises(RewardError, match="timed out"):
        score(spin, PROMPTS, COMPLETIONS, timeout=0.2, retries=1)
    assert time.monotonic() - start < 5  # two attempts of 0.2 s, and nothing left spinning


def test_timeout_outside_the_main_thread_is_refused():
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(RewardError, score, fragile, PROMPTS[:1],
                                                                         COMPLETIONS[:1], timeout=1.0)))
    thread.start()
    thread.join()
    assert "needs the main thread" in str(errors[0].value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "high", None])
def test_nonfinite_or_non_numeric_rewards(bad):
    reward = lambda prompts, completions: [1.0, bad, 0.0, 2.0]  # noqa: E731
    with pytest.raises(RewardError, match=r"for prompt 1 'a dog'; rewards must be finite numbers"):
        score(reward, PROMPTS, COMPLETIONS)
    values = score(reward, PROMPTS, COMPLETIONS, on_error="skip")
    assert values[0] == 1.0 and math.isnan(values[1]) and values[2:] == [0.0, 2.0]


def test_wrong_number_of_rewards():
    with pytest.raises(RewardError, match="returned 3 values for 4 completions"):
        score(lambda p, c: [0.0] * 3, PROMPTS, COMPLETIONS, on_error="skip")


def test_online_training_skips_groups_whose_reward_fails(tmp_path):
    """The reward fails on half the prompts: their groups are dropped and counted, training goes on."""
    trainer, _ = _trainer(COPG, tmp_path, reward_on_error="skip")
    assert isinstance(trainer, CoPGTrainer)
    # rewards see each prompt as the policy saw it, special tokens included
    bad_prompts = set(trainer.processing_class.batch_decode([ex["prompt_ids"] for ex in trainer.train_dataset][::2]))

    def reward(prompts, completions):
        if any(p in bad_prompts for p in prompts):
            raise RuntimeError("reward backend crashed")
        return [float(len(c.split())) for c in completions]

    trainer.reward_fn = reward
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.skipped_groups == 4  # 2 of 4 prompts, 2 steps
    assert [h["skipped_groups"] for h in trainer.state.log_history if "loss" in h] == [2, 4]


def test_online_training_stop_policy_names_the_prompt(tmp_path, monkeypatch, capsys):
    def reward(prompts, completions):
        raise RuntimeError("reward backend crashed")

    monkeypatch.setattr(api, "load_reward", lambda spec: reward)
    config = tmp_path / "copg.yaml"
    config.write_text(yaml.safe_dump(COPG))
    assert cli.main(["train", "--config", str(config), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "align: error: reward raised RuntimeError: reward backend crashed on prompt 0 '" in err
    assert "Traceback" not in err
