"""GRPO and RLOO as trainers on the online CoPG loop: they feed their objectives the sampled groups, and
they raise the demo's true reward."""

from __future__ import annotations

import pytest
import torch

from align import api
from align.errors import ConfigError
from align.objectives import grpo_loss, rloo_loss
from align.trainers import GRPOTrainer, RLOOTrainer

BASE = {"model": "builtin:demo", "dataset": "builtin:demo", "reward": "builtin:demo", "lora_r": 8, "lora_alpha": 16,
        "max_new_tokens": 12, "task_eval_prompts": 64, "logging_steps": 4, "save_strategy": "no",
        "torch_threads": 1, "disable_tqdm": True, "seed": 0}


@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_online_only(trainer, tmp_path):
    with pytest.raises(ConfigError, match="on-policy samples only"):
        api.make_config(BASE | {"trainer": trainer, "online": False, "output_dir": str(tmp_path)})


@pytest.mark.parametrize("trainer, cls, beta", [("grpo", GRPOTrainer, 0.04), ("rloo", RLOOTrainer, 0.05),
                                                ("grpo", GRPOTrainer, 0.0)])
def test_objective_is_the_pure_loss_on_the_sampled_group(trainer, cls, beta, tmp_path):
    config = api.make_config(BASE | {"trainer": trainer, "beta": beta, "num_generations": 3, "max_steps": 1,
                                     "per_device_train_batch_size": 2, "output_dir": str(tmp_path)})
    built = api.build_trainer(config)
    assert isinstance(built, cls) and built.uses_reference == (beta > 0)
    batch = built.prepare_batch({"prompt_ids": [built.train_dataset[i]["prompt_ids"] for i in range(2)]})
    seen = {}
    real = built.objective

    def spy(logps, ref_logps, b):
        seen.update(logps=logps, ref=ref_logps, batch=b)
        return real(logps, ref_logps, b)

    built.objective = spy
    losses, _ = built.loss(built.model, batch)
    logps, ref = seen["logps"], seen["ref"]
    if trainer == "rloo":
        expected = rloo_loss(logps.sequence, batch["scores"], ref_logps=ref, beta=beta)
    else:
        mask = batch["completion_mask"][:, 1:].float().view(2, 3, -1)
        ref_token = seen["batch"].get("ref_token_logps")
        expected = grpo_loss(logps.token.view(2, 3, -1), None, None if ref_token is None else ref_token.view(2, 3, -1),
                             batch["scores"], mask, beta=beta, max_completion_length=12)
        assert (ref_token is None) == (beta == 0)
    torch.testing.assert_close(losses, expected)


@pytest.mark.slow
@pytest.mark.parametrize("trainer, extra", [("grpo", {"beta": 0.04}), ("rloo", {"beta": 0.05})])
def test_raises_true_reward(trainer, extra, tmp_path):
    config = api.make_config(BASE | extra | {"trainer": trainer, "num_generations": 4, "max_steps": 32,
                                             "learning_rate": 2e-3, "per_device_train_batch_size": 16,
                                             "task_train_prompts": 512, "output_dir": str(tmp_path)})
    summary = api.train(config)
    assert summary["true_reward_after"] > summary["true_reward_before"] + 0.05
    assert summary["win_rate_vs_reference"] > 0.6
