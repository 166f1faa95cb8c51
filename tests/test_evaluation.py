"""Evaluation while training (align.trainers.evaluation), its report_to outputs, and the model card."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from align import api
from align.eval.policy import win_rate
from align.rewards.tasks import sentiment_reward
from align.trainers import AlignTrainer

TOY = {"trainer": "copg", "model": "builtin:demo", "dataset": "builtin:demo", "online": True, "reward": "builtin:demo",
       "num_generations": 4, "beta": 0.05, "lora_r": 8, "lora_alpha": 16, "learning_rate": 2e-3,
       "per_device_train_batch_size": 8, "max_new_tokens": 8, "task_train_prompts": 32, "task_eval_prompts": 8,
       "logging_steps": 2, "save_strategy": "no", "disable_tqdm": True, "torch_threads": 1, "seed": 0,
       "eval_num_prompts": 6, "report_to": "none"}


def test_win_rate_counts_ties_half_and_leaves_out_failed_rewards():
    assert win_rate(torch.tensor([1.0, 0.0, 0.0, math.nan]), torch.tensor([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.5)
    assert win_rate(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])) == pytest.approx(0.75)


def test_reference_against_itself_wins_half_at_zero_kl(tmp_path):
    """Before any update the policy is its reference: same prompts and seeds give the same samples."""
    trainer = api.build_trainer(api.make_config(TOY | {"output_dir": str(tmp_path), "eval_steps": 2}))
    metrics = trainer.evaluate()
    assert metrics["eval_win_rate_vs_reference"] == 0.5
    assert metrics["eval_kl"] == pytest.approx(0.0, abs=1e-6) and metrics["eval_kl_k3"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval_reward_mean"] == pytest.approx(metrics["eval_reference_reward_mean"])
    rows = [json.loads(line) for line in (tmp_path / "completions" / "step_0.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * 2 and all(r["completion"] == r["reference_completion"] for r in rows)
    assert not trainer._metrics["train"]  # evaluation records no training rollout metrics


def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def test_eval_reward_scores_the_evaluation_while_training_keeps_its_reward(tmp_path):
    """A training reward and another evaluation reward (e.g. shaped and strict): each is used where it belongs."""
    trainer = api.build_trainer(api.make_config(TOY | {"output_dir": str(tmp_path), "eval_steps": 2,
                                                       "eval_reward": f"{__name__}:length_reward"}))
    assert trainer.reward_fn is api.load_reward("builtin:demo") and trainer.policy_evaluation.reward is length_reward
    trainer.evaluate()
    rows = [json.loads(line) for line in (tmp_path / "completions" / "step_0.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == [float(len(r["completion"])) for r in rows]


def test_eval_while_training_to_tensorboard_and_jsonl_leaves_training_unchanged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, plain = tmp_path / "eval", tmp_path / "plain"
    api.train(api.make_config(TOY | {"output_dir": str(out), "max_steps": 4, "eval_steps": 2, "report_to": "tensorboard"}))
    api.train(api.make_config(TOY | {"output_dir": str(plain), "max_steps": 4}))

    # training randomness is untouched: the same adapter, bit for bit, with and without evaluation
    a, b = load_file(out / "adapter_model.safetensors"), load_file(plain / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent), size_guidance={"tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("eval/reward_mean", "eval/win_rate_vs_reference", "eval/kl", "eval/completion_length"):
        assert tag in scalars, (tag, scalars)
        assert [e.step for e in events.Scalars(tag)] == [2, 4]
    assert not any(t.startswith("eval/reward/") for t in scalars)  # no training rollout metric under eval/
    table = events.Tensors("eval/completions/text_summary")
    assert [e.step for e in table] == [2, 4]
    assert "| prompt | completion | reward | reference_completion |" in table[0].tensor_proto.string_val[0].decode()

    steps = {}
    for step in (2, 4):
        rows = [json.loads(line) for line in (out / "completions" / f"step_{step}.jsonl").read_text().splitlines()]
        assert len(rows) == 6 * 2 and set(rows[0]) == {"prompt", "completion", "reward", "reference_completion",
                                                       "reference_reward"}
        assert [r["reward"] for r in rows] == pytest.approx(sentiment_reward([], [r["completion"] for r in rows]))
        mean = events.Scalars("eval/reward_mean")[step // 2 - 1].value
        assert mean == pytest.approx(sum(r["reward"] for r in rows) / len(rows), abs=1e-6)
        steps[step] = rows
    # the reference's samples are drawn once: the same at every evaluation
    assert [r["reference_completion"] for r in steps[2]] == [r["reference_completion"] for r in steps[4]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_win_rate_vs_reference"] == pytest.approx(events.Scalars("eval/win_rate_vs_reference")[-1].value)


def test_tempered_sampling_logs_a_log_ratio_not_a_kl(tmp_path):
    trainer = api.build_trainer(api.make_config(TOY | {"output_dir": str(tmp_path), "eval_steps": 2, "temperature": 0.7,
                                                       "eval_num_prompts": 2}))
    metrics = trainer.evaluate()
    assert "eval_log_ratio_mean" in metrics and "eval_kl" not in metrics and "eval_kl_k3" not in metrics


def test_offline_trainer_evaluates_loss_and_policy(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"the cat {w}", "chosen": "sun joy", "rejected": "mud rain"}) + "\n"
                             for w in ("walks", "sees", "runs")))
    config = api.make_config({"trainer": "dpo", "model": "builtin:demo", "dataset": str(pairs), "eval_dataset": str(pairs),
                              "reward": "builtin:demo", "output_dir": str(tmp_path / "out"), "eval_steps": 1,
                              "max_new_tokens": 6, "lora_r": 4, "lora_alpha": 8, "save_strategy": "no", "disable_tqdm": True})
    trainer = api.build_trainer(config)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_reward_mean", "eval_win_rate_vs_reference", "eval_kl"} <= set(metrics)
    assert metrics["eval_win_rate_vs_reference"] == 0.5  # no update yet


def test_eval_steps_without_a_reward_or_prompts_is_a_config_error(tmp_path):
    from align.errors import ConfigError

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "the cat", "chosen": "sun", "rejected": "mud"}) + "\n")
    with pytest.raises(ConfigError, match="needs prompts"):
        api.build_trainer(api.make_config({"trainer": "cpl", "model": "builtin:demo", "dataset": str(pairs),
                                           "output_dir": str(tmp_path / "o"), "eval_steps": 2}))
    with pytest.raises(ConfigError, match="needs a reward"):
        api.build_trainer(api.make_config({"trainer": "cpl", "model": "builtin:demo", "dataset": str(pairs),
                                           "eval_prompts": str(pairs), "output_dir": str(tmp_path / "o"), "eval_steps": 2}))


def test_model_card_states_the_run_and_is_pushed_with_it(tmp_path, monkeypatch):
    from transformers import Trainer

    pushed = []
    monkeypatch.setattr(Trainer, "init_hf_repo", lambda self, token=None: setattr(self, "hub_model_id", "me/toy"))
    monkeypatch.setattr(AlignTrainer, "push_to_hub", lambda self, **kw: pushed.append(
        (tmp_path / "README.md").read_text()))
    summary = api.train(api.make_config(TOY | {"output_dir": str(tmp_path), "max_steps": 2, "push_to_hub": True,
                                               "hub_model_id": "me/toy"}),
                        command="align train --config toy.yaml --max_steps 2")
    card = (tmp_path / "README.md").read_text()
    assert pushed == [card]  # pushed once, after the card was written
    for text in ("builtin:demo", "`copg`", "- `beta`: `0.05`", "rows: 32 read, 32 kept, 0 dropped",
                 "align train --config toy.yaml --max_steps 2", f"| steps | {summary['steps']} |",
                 f"| win_rate_vs_reference | {summary['win_rate_vs_reference']:.4g} |"):
        assert text in card, text


def test_api_run_card_gives_the_python_call(tmp_path):
    api.train(api.make_config(TOY | {"output_dir": str(tmp_path), "max_steps": 1, "task_eval_prompts": 2}))
    card = (tmp_path / "README.md").read_text()
    assert "train(make_config({'trainer': 'copg'" in card and "'beta': 0.05" in card


def test_offline_precomputed_reference_with_task_evaluation(tmp_path):
    """The prompt set of a built-in task's evaluation has no completions: nothing to precompute for it."""
    config = api.make_config({"trainer": "dpo", "model": "builtin:demo", "dataset": "builtin:demo", "task_train_prompts": 8,
                              "precompute_ref_logps": True, "eval_steps": 1, "eval_num_prompts": 2, "max_new_tokens": 6,
                              "lora_r": 4, "lora_alpha": 8, "output_dir": str(tmp_path), "save_strategy": "no"})
    metrics = api.build_trainer(config).evaluate()
    assert metrics["eval_win_rate_vs_reference"] == 0.5 and "eval_loss" not in metrics
