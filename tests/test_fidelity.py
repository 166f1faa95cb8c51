"""The trainers feed the objectives what the papers mean: online pairs are (best, worst) and never tied,
scored groups go through the ranked loss whatever their order, sampling seeds never repeat, the KL metric
is named honestly, and CPL's BC warm-up restarts the optimizer and the schedule."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from align import api, cli
from align.errors import DataError
from align.sampling import Completions, SamplingParams
from align.trainers.base import LogProbs
from align.trainers.rollout import rollout

TINY = {"model": "builtin:demo", "dataset": "builtin:demo", "lora_r": 4, "lora_alpha": 8, "max_new_tokens": 6,
        "task_train_prompts": 16, "task_eval_prompts": 4, "logging_steps": 1, "save_strategy": "no",
        "torch_threads": 1, "disable_tqdm": True}


class FixedSampler:
    """Returns given completions (token ids) for every prompt, and records the seeds it was asked for."""

    def __init__(self, completions: list[list[int]], eos: int):
        self.completions, self.eos, self.seeds = completions, eos, []

    def sample(self, prompt_ids, params: SamplingParams) -> Completions:
        self.seeds.append(params.seed)
        rows = [self.completions[j % len(self.completions)] for _ in prompt_ids for j in range(params.n)]
        return Completions(prompt_ids=list(prompt_ids), completion_ids=rows, logprobs=[[0.0] * len(r) for r in rows],
                           texts=[" ".join(map(str, r)) for r in rows], n=params.n)

    def sync_weights(self):
        pass

    push_weights = sync_weights


class Tok:
    eos_token_id, pad_token_id = 2, 0

    def batch_decode(self, ids, skip_special_tokens=False):
        return [" ".join(map(str, r)) for r in ids]


def test_online_pairs_are_best_against_worst_and_ties_are_dropped():
    sampler = FixedSampler([[5, 2], [6, 2], [7, 2], [8, 2]], eos=2)
    table = {"5 2": 1.0, "6 2": 0.0, "7 2": 1.0, "8 2": 0.0}

    def reward(prompts, completions):  # prompt 1: [1, 0, 1, 0]; prompt 2: all 0.5
        return [table[c] for c in completions[:4]] + [0.5] * 4

    batch, metrics = rollout([[1, 3], [1, 4]], sampler, reward, SamplingParams(n=4, seed=0), Tok(), pairs=True)
    assert batch["group_size"] == 2 and batch["scores"].tolist() == [[1.0, 0.0]]  # the tied group is dropped
    assert metrics["skipped_groups"] == 1
    # the pair is a completion rewarded 1 against one rewarded 0, never two that both scored 1
    completions = batch["input_ids"][:, 2:].tolist()
    assert [table[" ".join(map(str, c))] for c in completions] == [1.0, 0.0]


def test_rollout_tells_rewards_which_completions_finished():
    sampler = FixedSampler([[5, 2], [6, 7]], eos=2)  # the second was cut at the token limit
    seen = {}

    def reward(prompts, completions, finished):
        seen["finished"] = finished
        return [0.0, 1.0]

    rollout([[1, 3]], sampler, reward, SamplingParams(n=2, seed=0), Tok())
    assert seen["finished"] == [True, False]


def test_cpl_on_unsorted_scored_pairs_raises_the_better_completion(tmp_path):
    """A group scored [0.1, 0.9] must push up its second completion (the old code took column 0 as chosen)."""
    config = api.make_config(TINY | {"trainer": "cpl", "output_dir": str(tmp_path), "alpha": 0.5})
    trainer = api.build_trainer(config)
    seq = torch.zeros(1, 2, requires_grad=True)
    logps = LogProbs(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.long), 2, False)
    logps.sequence = seq
    losses, metrics = trainer.objective(logps, None, {"scores": torch.tensor([[0.1, 0.9]])})
    losses.sum().backward()
    assert seq.grad[0, 1] < 0 < seq.grad[0, 0]  # descent raises log π of the higher-reward completion
    # exact ties carry no preference: no loss, no gradient
    seq.grad = None
    losses, _ = trainer.objective(logps, None, {"scores": torch.tensor([[0.3, 0.3]])})
    assert losses.item() == 0.0


def test_cpl_on_groups_without_rewards_is_a_data_error_before_the_model_loads(tmp_path, monkeypatch):
    data = tmp_path / "groups.jsonl"
    data.write_text(json.dumps({"prompt": "the cat", "completions": ["sun joy", "mud rain"]}) + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr("align.trainers.base.load_policy", no_model)
    config = api.make_config(TINY | {"trainer": "cpl", "dataset": str(data), "output_dir": str(tmp_path / "o")})
    with pytest.raises(DataError, match="rows have no rewards; `trainer: cpl` needs them on groups"):
        api.build_trainer(config)


def test_sampling_seeds_differ_per_step_micro_batch_and_rank(tmp_path):
    config = api.make_config(TINY | {"trainer": "copg", "online": True, "reward": "builtin:demo",
                                     "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                                     "max_steps": 3, "output_dir": str(tmp_path)})
    trainer = api.build_trainer(config)
    sampler = FixedSampler([[8, 9, trainer.processing_class.eos_token_id]], eos=trainer.processing_class.eos_token_id)
    trainer.sampler = sampler
    trainer.train()
    assert len(sampler.seeds) == 6 and len(set(sampler.seeds)) == 6  # 3 steps x 2 micro-batches, all distinct
    # a resumed run at step 1 derives the same seeds as the uninterrupted one
    again = api.build_trainer(config)
    resampler = FixedSampler(sampler.completions, eos=sampler.eos)
    again.sampler, again.state.global_step = resampler, 1
    again.prepare_batch({"prompt_ids": [[1, 5]]})
    assert resampler.seeds[0] == sampler.seeds[2]


def _logged(trainer):
    return {k for h in trainer.state.log_history for k in h}


def test_kl_is_logged_only_on_on_policy_samples_at_temperature_one(tmp_path):
    online = {"trainer": "copg", "online": True, "reward": "builtin:demo", "max_steps": 2,
              "per_device_train_batch_size": 4, "num_generations": 2}
    trainer = api.build_trainer(api.make_config(TINY | online | {"output_dir": str(tmp_path / "a")}))
    trainer.train()
    assert {"kl", "kl_k3", "log_ratio/mean"} <= _logged(trainer)
    assert all(h["kl_k3"] >= 0 for h in trainer.state.log_history if "kl_k3" in h)
    tempered = api.build_trainer(api.make_config(TINY | online | {"temperature": 0.7, "output_dir": str(tmp_path / "b")}))
    tempered.train()
    assert "kl" not in _logged(tempered) and "log_ratio/mean" in _logged(tempered)
    offline = api.build_trainer(api.make_config(TINY | {"trainer": "dpo", "max_steps": 1, "output_dir": str(tmp_path / "c")}))
    offline.train()
    assert "kl" not in _logged(offline) and "log_ratio/mean" in _logged(offline)


def test_cpl_bc_warmup_restarts_optimizer_and_schedule(tmp_path):
    config = api.make_config(TINY | {"trainer": "cpl", "bc_warmup_steps": 3, "max_steps": 6, "warmup_steps": 2,
                                     "per_device_train_batch_size": 4, "output_dir": str(tmp_path)})
    trainer = api.build_trainer(config)
    state_sizes = {}

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            state_sizes[state.global_step] = len(trainer.optimizer.state)

    trainer.add_callback(Record())
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    # warm-up over the BC phase (steps 1-3), then again from 0 for the contrastive phase (steps 4-6)
    assert lrs[0] == lrs[3] < lrs[1] and lrs[3] < lrs[4]
    assert state_sizes[3] == 0 < state_sizes[2]  # fresh Adam moments when CPL begins (after the restart hook)


def test_eval_logprobs_shows_cpl_raising_the_higher_reward_completion(tmp_path, capsys, demo_base_dir):
    """CPL on K = 2 groups whose rewards favour the *second* completion raises that completion's log-prob
    against the first, as `align eval logprobs` reports (chosen = the highest reward)."""
    rows = [{"prompt": p, "completions": [f"{p} mud rain", f"{p} sun joy"], "rewards": [0.1, 0.9]}
            for p in ("the cat", "a dog", "the road", "two birds", "a red boat", "the old town")]
    data = tmp_path / "groups.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def evaluate(adapter=None) -> dict:
        argv = ["eval", "logprobs", "--model", str(demo_base_dir), "--dataset", str(data),
                "--output", str(tmp_path / "lp.jsonl")] + (["--adapter", str(adapter)] if adapter else [])
        assert cli.main(argv) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    before = evaluate()
    records = [json.loads(line) for line in (tmp_path / "lp.jsonl").read_text().splitlines()]
    assert all(r["chosen"] == 1 and r["rejected"] == 0 for r in records)
    first = records[0]["completions"]
    assert first[1]["logps_mean"] == pytest.approx(first[1]["logps_sum"] / first[1]["tokens"])
    assert before["chosen_logps_mean"] == pytest.approx(sum(r["completions"][1]["logps_sum"] for r in records) / 6)
    config = TINY | {"trainer": "cpl", "dataset": str(data), "max_steps": 8, "learning_rate": 5e-3,
                     "per_device_train_batch_size": 6, "output_dir": str(tmp_path / "out")}
    api.train(api.make_config(config))
    after = evaluate(tmp_path / "out")
    assert after["margin_mean"] > before["margin_mean"] + 1.0
    assert after["accuracy"] >= before["accuracy"] and after["accuracy"] == 1.0
