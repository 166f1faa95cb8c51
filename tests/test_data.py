"""Dataset formats (TRL's, plain and conversational), validation errors, skip policy, truncation."""

import json

import pytest
import torch

from align.data import DataError, GroupCollator, build_dataset, load_records
from align.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    return load_tokenizer(str(tiny_lm_dir))


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_plain_pairs_tokenize_like_the_sampler(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat", "chosen": "sees the sun", "rejected": "sees mud"}])
    ds = build_dataset(load_records(src), tokenizer, source=src)
    ex = ds[0]
    assert ex["prompt_ids"] == tokenizer("the cat")["input_ids"]  # BOS + words
    assert ex["completion_ids"][0] == tokenizer("sees the sun", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ex["completion_ids"][1][-1] == tokenizer.eos_token_id
    assert "scores" not in ex


def test_implicit_prompt_is_extracted(tokenizer):
    rows = [{"chosen": "the cat sees the sun", "rejected": "the cat sees mud"}]
    ex = build_dataset(rows, tokenizer, source="mem")[0]
    assert tokenizer.decode(ex["prompt_ids"], skip_special_tokens=True) == "the cat sees"


def test_conversational_rows_use_the_chat_template(tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "the cat"}],
             "chosen": [{"role": "assistant", "content": "sees the sun"}],
             "rejected": [{"role": "assistant", "content": "sees mud"}]}]
    ex = build_dataset(rows, tokenizer, source="mem")[0]
    prompt = tokenizer.decode(ex["prompt_ids"])
    assert "<user>" in prompt and prompt.rstrip().endswith("<assistant>")
    assert tokenizer.decode(ex["completion_ids"][0]).split()[:3] == ["sees", "the", "sun"]


def test_groups_and_scored_pairs_carry_scores(tokenizer):
    groups = [{"prompt": "a dog", "completions": ["runs", "sits", "walks by"], "rewards": [1, 0.5, -2]}]
    ex = build_dataset(groups, tokenizer, source="mem")[0]
    assert len(ex["completion_ids"]) == 3 and ex["scores"] == [1.0, 0.5, -2.0]
    pairs = [{"prompt": "a", "chosen": "sun", "rejected": "mud", "chosen_reward": 1, "rejected_reward": -1}]
    assert build_dataset(pairs, tokenizer, source="mem")[0]["scores"] == [1.0, -1.0]


@pytest.mark.parametrize("row, field, problem", [
    ({"prompt": "a", "rejected": "b"}, "chosen", "missing"),
    ({"prompt": "a", "chosen": "", "rejected": "b"}, "chosen", "empty"),
    ({"prompt": "a", "chosen": 3, "rejected": "b"}, "chosen", "expected a string"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "rejected", "identical"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "chosen_reward": float("nan"), "rejected_reward": 1}, "chosen_reward", "finite"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "chosen_reward": 1}, "rejected_reward", "missing"),
    ({"prompt": "a", "chosen": [{"role": "assistant"}], "rejected": "c"}, "chosen", "message 0"),
])
def test_bad_rows_name_file_row_field(tokenizer, tmp_path, row, field, problem):
    good = {"prompt": "a", "chosen": "sun", "rejected": "mud"}
    src = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as err:
        build_dataset(load_records(src), tokenizer, source=src)
    assert err.value.row == 2 and err.value.field == field and problem in str(err.value)
    assert str(tmp_path / "bad.jsonl") in str(err.value)


def test_group_errors(tokenizer):
    rows = [{"prompt": "a", "completions": ["x", "y"], "rewards": [1, 2]},
            {"prompt": "b", "completions": ["x", "y", "z"], "rewards": [1, 2, 3]}]
    with pytest.raises(DataError, match="row 2.*completions.*3 completions where earlier rows have 2"):
        build_dataset(rows, tokenizer, source="g")
    with pytest.raises(DataError, match="rewards.*expected a list of 2"):
        build_dataset([{"prompt": "a", "completions": ["x", "y"], "rewards": [1]}], tokenizer, source="g")


def test_skip_policy_counts_reasons(tokenizer):
    rows = [{"prompt": "a", "chosen": "sun", "rejected": "mud"}, {"prompt": "a", "chosen": "x", "rejected": "x"},
            {"prompt": "a", "chosen": "", "rejected": "mud"}, {"prompt": "b", "chosen": "gold", "rejected": "rain"}]
    ds = build_dataset(rows, tokenizer, source="s", on_bad_row="skip")
    assert len(ds) == 2 and ds.stats.kept == 2 and sum(ds.stats.skipped.values()) == 2


def test_non_utf8_and_broken_json_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match="row 2.*UTF-8"):
        load_records(str(path))
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match="row 2.*invalid JSON"):
        load_records(str(path))
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_truncation_rule_keeps_prompt_end_and_completion_start(tokenizer):
    rows = [{"prompt": " ".join(["cat"] * 20) + " dog", "chosen": " ".join(["sun"] * 20), "rejected": "mud"}]
    ds = build_dataset(rows, tokenizer, source="t", max_length=16, max_prompt_length=6)
    ex = ds[0]
    assert len(ex["prompt_ids"]) == 6 and ex["prompt_ids"][-1] == tokenizer.convert_tokens_to_ids("dog")
    assert len(ex["prompt_ids"]) + len(ex["completion_ids"][0]) == 16
    assert ds.stats.truncated_prompts == 1 and ds.stats.truncated_completions == 1


def test_collator_is_group_major_and_masks_completions(tokenizer):
    rows = [{"prompt": "a dog", "chosen": "sun", "rejected": "mud rain"},
            {"prompt": "the", "chosen": "gold joy", "rejected": "cold"}]
    ds = build_dataset(rows, tokenizer, source="c")
    batch = GroupCollator(tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["group_size"] == 2 and batch["input_ids"].shape[0] == 4
    for row, (ex, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        p, c = ds[ex]["prompt_ids"], ds[ex]["completion_ids"][j]
        n = len(p) + len(c)
        assert batch["input_ids"][row, :n].tolist() == p + c
        assert batch["completion_mask"][row].tolist() == [0] * len(p) + [1] * len(c) + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["attention_mask"][row].sum() == n
    assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id)


def batch_padding(order, lengths, batch_size):
    """Pad tokens over all tokens when ``order`` is cut into batches padded to their longest row."""
    batches = [[lengths[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    padded = sum(max(b) * len(b) for b in batches)
    return 1 - sum(lengths) / padded


def test_length_grouped_sampler_cuts_padding_and_keeps_randomness():
    from align.data import LengthGroupedSampler

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 200, (1000,), generator=gen).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8)
    torch.manual_seed(0)
    epoch1, epoch2 = list(sampler), list(sampler)
    assert sorted(epoch1) == list(range(1000)) and sorted(epoch2) == list(range(1000))  # each index once
    assert epoch1 != epoch2  # a new order every epoch
    torch.manual_seed(0)
    assert list(sampler) == epoch1  # from the global RNG: seeded runs repeat it
    seed = sampler.seed  # what a checkpoint in the middle of that epoch records
    resumed = LengthGroupedSampler(lengths, batch_size=8, resume_seed=seed)
    torch.manual_seed(1)  # a resumed run's RNG, not the one the epoch began with
    assert list(resumed) == epoch1 and list(resumed) != epoch1  # that epoch's order, then fresh draws again
    random_order = torch.randperm(1000, generator=gen).tolist()
    assert batch_padding(random_order, lengths, 8) > 0.3  # lengths 20..200: random batches are mostly padding
    assert batch_padding(epoch1, lengths, 8) < 0.05


def test_trainers_group_by_length_by_default(tiny_lm_dir, tmp_path):
    """The trainer's batches come from the length-grouped order (of the global batch); "random" turns it off."""
    from align import api
    from align.data import LengthGroupedSampler, padded_length

    rows = [{"prompt": "the cat " * (1 + i % 7), "chosen": "sees the sun " * (1 + i % 11), "rejected": "mud"}
            for i in range(64)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)

    def padding(strategy):
        config = api.make_config({"trainer": "cpl", "model": str(tiny_lm_dir), "dataset": src, "seed": 0,
                                  "output_dir": str(tmp_path / strategy), "per_device_train_batch_size": 4,
                                  "gradient_accumulation_steps": 2, "train_sampling_strategy": strategy})
        trainer = api.build_trainer(config)
        sampler = trainer._get_train_sampler()
        assert isinstance(sampler, LengthGroupedSampler) == (strategy == "group_by_length")
        torch.manual_seed(0)
        lengths = [padded_length(ex) for ex in trainer.train_dataset]
        if strategy == "group_by_length":
            assert sampler.batch_size == 8  # per device x processes x accumulation
        return batch_padding(list(sampler), lengths, 4)

    assert padding("group_by_length") < padding("random") / 2
