"""End-to-end training on the built-in demo task, whose true reward is known."""

import json

import pytest
from safetensors.torch import load_file

from align.api import make_config, train

FAST = {"model": "builtin:demo", "dataset": "builtin:demo", "lora_r": 8, "lora_alpha": 16, "learning_rate": 2e-3,
        "per_device_train_batch_size": 16, "max_new_tokens": 12, "task_eval_prompts": 64, "logging_steps": 4,
        "save_strategy": "no", "disable_tqdm": True, "torch_threads": 1, "seed": 0}


def _summary(out):
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_cpl_raises_true_reward_and_saves_adapter(tmp_path):
    config = make_config(FAST | {"trainer": "cpl", "lam": 0.8, "task_train_prompts": 384, "num_train_epochs": 2,
                                 "output_dir": str(tmp_path), "merge_on_save": True})
    summary = train(config)
    assert summary == _summary(tmp_path)
    assert summary["true_reward_after"] > summary["true_reward_before"] + 0.05
    assert summary["win_rate_vs_reference"] > 0.6
    assert summary["kl_to_reference"] > 0
    weights = load_file(tmp_path / "adapter_model.safetensors")  # peft format, safetensors
    assert weights and all("lora_" in k for k in weights)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "training.png").stat().st_size > 0
    assert (tmp_path / "merged" / "model.safetensors").exists()


@pytest.mark.slow
def test_online_copg_raises_true_reward(tmp_path):
    config = make_config(FAST | {"trainer": "copg", "online": True, "reward": "builtin:demo", "beta": 0.05,
                                 "num_generations": 4, "max_steps": 32, "per_device_train_batch_size": 16,
                                 "task_train_prompts": 512, "output_dir": str(tmp_path)})
    summary = train(config)
    assert summary["steps"] == 32
    assert summary["true_reward_after"] > summary["true_reward_before"] + 0.05
    assert summary["win_rate_vs_reference"] > 0.6


@pytest.mark.parametrize("trainer, extra", [("dpo", {"loss_type": "sigmoid"}), ("dpo", {"loss_type": "ipo"}),
                                            ("copg", {"beta": 0.1}), ("cpl", {"use_reference": True}),
                                            ("cpl", {"bc_weight": 0.5, "bc_warmup_steps": 2})])
def test_offline_trainers_run_and_log_trl_metrics(tmp_path, trainer, extra):
    config = make_config(FAST | extra | {"trainer": trainer, "task_train_prompts": 48, "max_steps": 4,
                                         "per_device_train_batch_size": 8, "task_eval_prompts": 8,
                                         "output_dir": str(tmp_path)})
    summary = train(config)
    assert summary["steps"] == 4 and summary["nonfinite_skipped"] == 0
    logged = json.loads((tmp_path / "summary.json").read_text())
    assert logged["train_loss"] == pytest.approx(summary["train_loss"])
