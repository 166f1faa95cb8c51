"""Preemption and restarts of online runs: on the real model (SmolLM2-135M-Instruct, HF sampler), and with the
vLLM sampler, whose engine must sample from the resumed weights from the first post-resume step on.

Sizes are the smallest that still train: 2 prompts x 2 samples x 8 new tokens a step, 4 steps.
"""

from __future__ import annotations

import importlib.util
import random
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_real_model import SMOLLM2, needs_real

from align import api, checkpoints
from align.errors import PREEMPTED_EXIT_CODE, Preempted
from align.trainers import base

ONLINE = {"trainer": "copg", "online": True, "beta": 0.1, "num_generations": 2, "per_device_train_batch_size": 2,
          "max_new_tokens": 8, "max_steps": 4, "save_steps": 2, "logging_steps": 1, "lora_r": 4, "lora_alpha": 8,
          "learning_rate": 1e-3, "task_eval_prompts": 1, "disable_tqdm": True, "seed": 0}


def adapters_equal(a, b) -> bool:
    a, b = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.real
@pytest.mark.slow
@needs_real
def test_real_model_online_copg_sigterm_and_sigkill_then_resume(zygote, tmp_path, record_property):
    """Online CoPG on SmolLM2 (built-in constraints task, shaped reward): SIGTERM at a random step saves that
    step and exits with PREEMPTED_EXIT_CODE; SIGKILL before the first checkpoint leaves nothing to resume; in
    both cases the same command with --resume ends with the uninterrupted run's adapter and evaluation."""
    config = tmp_path / "copg.yaml"
    config.write_text(yaml.safe_dump(ONLINE | {"model": SMOLLM2, "dataset": "builtin:constraints",
                                               "reward": "builtin:constraints_shaped", "task_train_prompts": 4,
                                               "torch_threads": 1}))
    rng = random.SystemRandom()
    term_at, kill_at = rng.randint(0, 2), rng.randint(0, 1)  # steps completed when the signal comes
    record_property("signal_steps", f"SIGTERM {term_at}, SIGKILL {kill_at}")
    record_property("cases", 2)

    def argv(name, *extra):
        return ["train", "--config", str(config), "--output_dir", str(tmp_path / name), *extra]

    pids = {"reference": zygote.start(argv("reference"), tmp_path / "reference"),
            "term": zygote.start(argv("term"), tmp_path / "term", signal_at_step=[term_at, signal.SIGTERM]),
            "kill": zygote.start(argv("kill"), tmp_path / "kill", signal_at_step=[kill_at, signal.SIGKILL])}
    expected = {"reference": 0, "term": PREEMPTED_EXIT_CODE, "kill": -signal.SIGKILL}
    for name, pid in pids.items():
        assert zygote.wait(pid) == expected[name], (tmp_path / f"{name}.err").read_text()[-3000:]
    assert checkpoints.newest_good_checkpoint(tmp_path / "term") == tmp_path / "term" / f"checkpoint-{term_at + 1}"
    assert checkpoints.list_checkpoints(tmp_path / "kill") == []
    resumed = {name: zygote.start(argv(name, "--resume"), tmp_path / f"{name}-resumed") for name in ("term", "kill")}
    reference = (tmp_path / "reference" / "summary.json").read_text()
    for name, pid in resumed.items():
        assert zygote.wait(pid) == 0, (tmp_path / f"{name}-resumed.err").read_text()[-3000:]
        assert adapters_equal(tmp_path / name, tmp_path / "reference"), name
        summary = yaml.safe_load((tmp_path / name / "summary.json").read_text())
        assert {k: v for k, v in summary.items() if k != "train_loss"} == \
            {k: v for k, v in yaml.safe_load(reference).items() if k != "train_loss"}, name
    assert not adapters_equal(tmp_path / "reference" / "checkpoint-2", tmp_path / "reference")  # the steps trained
    record_property("data_lost", 0)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (pip install 'align[vllm]')")
def test_vllm_samples_from_the_resumed_weights_first(tmp_path, monkeypatch, record_property):
    """Three runs share one vLLM engine (it starts once): one stopped by SIGTERM during step 2, the uninterrupted
    one, then the resumed one. The engine last held the uninterrupted run's final weights, so the resumed run's
    first samples (step 3) equal the uninterrupted run's step-3 samples only if the resumed weights reach the
    engine before it samples; the adapters then end equal too."""
    shared = {}

    class Recorder:
        """The shared sampler, recording each step's completions; ``close`` is left to the test."""

        def __init__(self, sampler):
            self.sampler, self.samples, self.requests = sampler, [], []

        def sample(self, prompt_ids, params):
            out = self.sampler.sample(prompt_ids, params)
            self.samples.append(out.completion_ids)
            self.requests.append((prompt_ids, params))
            return out

        def __getattr__(self, name):
            return getattr(self.sampler, name)

        def close(self):
            pass

    real_make_sampler = api.make_sampler

    def make_sampler(config, model, tokenizer):
        if "engine" not in shared:
            shared["engine"] = real_make_sampler(config, model, tokenizer)
        shared["engine"].model = model  # the engine syncs from this run's policy
        shared["run"] = Recorder(shared["engine"])
        return shared["run"]

    real_loss = base.AlignTrainer.compute_loss

    def signalling_loss(self, model, inputs, *args, **kwargs):  # SIGTERM during step 2 of the run that asks for it
        if shared.get("signal") and model.training and self.state.global_step == 1:
            shared.pop("signal")
            signal.raise_signal(signal.SIGTERM)
        return real_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(api, "make_sampler", make_sampler)
    monkeypatch.setattr(base.AlignTrainer, "compute_loss", signalling_loss)

    def config(name):
        return api.make_config(ONLINE | {"model": "builtin:demo", "dataset": "builtin:demo", "reward": "builtin:demo",
                                         "sampler": "vllm", "vllm_mode": "colocate", "vllm_sync": "merged",
                                         "task_train_prompts": 8, "torch_threads": 1, "learning_rate": 5e-2,
                                         "output_dir": str(tmp_path / name)})

    try:
        shared["signal"] = True
        with pytest.raises(Preempted, match="after step 2 of 4"):
            api.train(config("preempted"))
        first = shared["run"].samples
        api.train(config("reference"))
        reference = shared["run"].samples
        api.train(config("preempted"), resume_from_checkpoint=True)
        resumed = shared["run"].samples
        # what a stale engine would have sampled at step 3: the engine now holds the final weights again
        stale = shared["engine"].sample(*shared["run"].requests[0]).completion_ids
    finally:
        if "engine" in shared:
            shared["engine"].close()
    assert len(reference) == 4 and first == reference[:2]
    assert resumed == reference[2:]  # from the first post-resume sample on
    assert stale != reference[2]  # the test can tell: step 3 sampled from other weights differs
    assert adapters_equal(tmp_path / "preempted", tmp_path / "reference")
    record_property("data_lost", 0)
