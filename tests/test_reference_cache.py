"""precompute_ref_logps: the reference log-probs of an offline dataset, computed once, cached on disk, and the
same numbers (and training) as the reference forward of every step."""

import json
import random

import pytest
import torch

from align import api
from align.data import GroupCollator
from align.models import reference_completion_logps, sequence_logps
from align.trainers import reference

WORDS = "good great fine bad awful the cat sees sun mud".split()


@pytest.fixture
def data(tmp_path):
    rng = random.Random(0)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    rows = [{"prompt": text(rng.randint(2, 6)), "chosen": text(rng.randint(1, 9)), "rejected": text(rng.randint(1, 9))}
            for _ in range(24)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ref_logps"


def trainer_for(tiny_lm_dir, data, tmp_path, **overrides):
    values = {"trainer": "dpo", "model": str(tiny_lm_dir), "dataset": str(data), "seed": 0, "max_steps": 3,
              "per_device_train_batch_size": 4, "per_device_eval_batch_size": 5, "learning_rate": 1e-2,
              "output_dir": str(tmp_path / "out"), "save_strategy": "no", "logging_steps": 1, "report_to": "none"}
    return api.build_trainer(api.make_config(values | overrides))


@pytest.mark.parametrize("length_normalize", [False, True])
def test_precomputed_equal_the_per_step_reference(tiny_lm_dir, data, tmp_path, length_normalize):
    trainer = trainer_for(tiny_lm_dir, data, tmp_path, precompute_ref_logps=True, length_normalize=length_normalize)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    plain = [{k: v for k, v in ex.items() if k != "ref_logps"} for ex in examples]
    batch = GroupCollator(trainer.processing_class.pad_token_id)(plain)
    assert "ref_logps" not in batch
    forward = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    token = reference_completion_logps(trainer.model, **forward)
    expected = sequence_logps(token, batch["completion_mask"], length_normalize=length_normalize).view(-1, 2)
    got = torch.tensor([ex["ref_logps"] for ex in examples])
    assert got.shape == (24, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # batched in other groups, same values


def test_training_with_precomputed_reference_matches_the_per_step_one(tiny_lm_dir, data, tmp_path):
    def losses(**overrides):
        trainer = trainer_for(tiny_lm_dir, data, tmp_path / str(overrides), **overrides)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    per_step, precomputed = losses(), losses(precompute_ref_logps=True)
    assert len(per_step) == 3
    assert precomputed == pytest.approx(per_step, rel=1e-4, abs=1e-6)


def test_cache_is_reused_and_keyed_by_data_and_model(tiny_lm_dir, data, tmp_path, own_cache, monkeypatch):
    first = trainer_for(tiny_lm_dir, data, tmp_path, precompute_ref_logps=True)
    files = sorted(own_cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # written atomically: no temporary left

    def no_forward(*args, **kwargs):
        raise AssertionError("the cache should have been read")

    with monkeypatch.context() as patched:
        patched.setattr(reference, "compute_reference_logps", no_forward)
        again = trainer_for(tiny_lm_dir, data, tmp_path, precompute_ref_logps=True, learning_rate=1e-3)
    assert [ex["ref_logps"] for ex in again.train_dataset] == [ex["ref_logps"] for ex in first.train_dataset]

    fewer = data.with_name("fewer.jsonl")
    fewer.write_text("\n".join(data.read_text().splitlines()[:10]) + "\n")
    trainer_for(tiny_lm_dir, fewer, tmp_path, precompute_ref_logps=True)  # other data: its own entry
    trainer_for(tiny_lm_dir, data, tmp_path, precompute_ref_logps=True, length_normalize=True)  # other rule
    assert len(list(own_cache.iterdir())) == 3


def test_online_refuses_precompute(tmp_path):
    with pytest.raises(ValueError, match="precompute_ref_logps is for offline data"):
        api.make_config({"trainer": "copg", "online": True, "reward": "builtin:demo", "precompute_ref_logps": True,
                         "output_dir": str(tmp_path)})


def test_precomputed_reference_is_not_data_to_resume_checks(tiny_lm_dir, data, tmp_path):
    """A run checkpointed with precompute_ref_logps resumes without it (and back): same data fingerprint."""
    from align import checkpoints

    with_ref = trainer_for(tiny_lm_dir, data, tmp_path, precompute_ref_logps=True)
    without = trainer_for(tiny_lm_dir, data, tmp_path)
    assert "ref_logps" in with_ref.train_dataset[0] and "ref_logps" not in without.train_dataset[0]
    assert checkpoints.data_fingerprint(with_ref.train_dataset) == checkpoints.data_fingerprint(without.train_dataset)
