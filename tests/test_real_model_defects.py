"""Defects a real chat model exposes, shown on small local models: dropout, the reference of a run that
starts from an adapter, a checkpoint's generation config, the reward-model format, doubled BOS, the HF
sampler's memory, and chat templates in `align generate`."""

from __future__ import annotations

import json

import torch
from transformers import AutoTokenizer, GenerationConfig

from align import api, cli
from align.data import build_dataset
from align.decoding import prompt_ids
from align.hf_utils import encode_prompt
from align.models import (
    completion_logps,
    freeze_reference,
    load_policy,
    load_tokenizer,
    reference_completion_logps,
)
from align.models.tiny import tiny_llama, word_tokenizer
from align.rewards.model import encode
from align.rewards.tasks import BAD_WORDS, GOOD_WORDS, NEUTRAL_WORDS
from align.sampling import HFSampler, SamplingParams

WORDS = GOOD_WORDS + BAD_WORDS + NEUTRAL_WORDS


def _model_dir(tmp_path, name="m", **config):
    path = tmp_path / name
    tokenizer = word_tokenizer(WORDS)
    model = tiny_llama(len(tokenizer), hidden_size=32, intermediate_size=64, seed=0)
    for key, value in config.items():
        setattr(model.config, key, value)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _batch(tokenizer):
    prompt, completion = tokenizer("the cat")["input_ids"], tokenizer("sees the sun", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + completion])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "completion_mask": torch.tensor([[0] * len(prompt) + [1] * len(completion)])}


def test_dropout_is_off_so_the_log_ratio_starts_at_zero(tmp_path):
    path = _model_dir(tmp_path, attention_dropout=0.5)
    config = api.make_config({"trainer": "dpo", "model": str(path), "dataset": "builtin:demo", "output_dir": str(tmp_path / "o"),
                              "task_train_prompts": 4, "max_new_tokens": 4})
    model = api.TRAINERS["dpo"].load_model(config, str(path), load_tokenizer(str(path)))
    model.train()  # dropout would be active in train mode
    batch = _batch(load_tokenizer(str(path)))
    policy = completion_logps(model, **batch)
    torch.testing.assert_close(policy, reference_completion_logps(model, **batch))  # exact at step 0
    on = api.make_config({"trainer": "dpo", "model": str(path), "output_dir": str(tmp_path / "o2"), "disable_dropout": False})
    noisy = api.TRAINERS["dpo"].load_model(on, str(path), load_tokenizer(str(path))).train()
    torch.manual_seed(0)
    assert not torch.allclose(completion_logps(noisy, **batch), reference_completion_logps(noisy, **batch))


def test_a_run_from_a_saved_adapter_keeps_that_adapter_as_its_reference(tmp_path):
    path = _model_dir(tmp_path)
    sft = load_policy(str(path), r=4, alpha=8)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained SFT adapter: not the base model
    sft.save_pretrained(tmp_path / "sft")
    policy = load_policy(str(path), adapter_path=str(tmp_path / "sft"))
    batch = _batch(load_tokenizer(str(path)))
    with torch.no_grad():
        start = completion_logps(policy, **batch)
    torch.testing.assert_close(reference_completion_logps(policy, **batch), start)  # the SFT policy, not the base
    base = load_policy(str(path), r=4, alpha=8)  # a fresh adapter: B = 0, so the base model
    assert not torch.allclose(start, completion_logps(base, **batch))
    # training moves the policy; the reference stays the SFT adapter, and swapping it in and out is exact
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.requires_grad:
                p.add_(0.1)
    moved = [p.detach().clone() for p in policy.parameters() if p.requires_grad]
    torch.testing.assert_close(reference_completion_logps(policy, **batch), start)
    assert all(torch.equal(a, p) for a, p in zip(moved, [p for p in policy.parameters() if p.requires_grad]))


def test_freeze_reference_snapshots_the_current_adapter(tmp_path):
    policy = load_policy(str(_model_dir(tmp_path)), r=4, alpha=8)
    batch = _batch(load_tokenizer(str(tmp_path / "m")))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    freeze_reference(policy)
    snap = completion_logps(policy, **batch).detach()
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.2)
    torch.testing.assert_close(reference_completion_logps(policy, **batch), snap)


def test_sampling_ignores_the_checkpoints_generation_extras(tmp_path):
    plain = _model_dir(tmp_path, "plain")
    extras = _model_dir(tmp_path, "extras")
    GenerationConfig(do_sample=True, repetition_penalty=1.3, no_repeat_ngram_size=2, top_k=3).save_pretrained(extras)
    tokenizer = load_tokenizer(str(plain))
    prompts = [tokenizer("the cat")["input_ids"], tokenizer("a dog sees")["input_ids"]]
    params = SamplingParams(n=4, max_new_tokens=12, seed=7)
    a = HFSampler(api.load_causal_lm(str(plain)), tokenizer).sample(prompts, params)
    model = api.load_causal_lm(str(extras))
    assert model.generation_config.repetition_penalty == 1.3
    b = HFSampler(model, tokenizer).sample(prompts, params)
    assert a.completion_ids == b.completion_ids  # samples of π itself, whatever the checkpoint asks
    assert model.generation_config.repetition_penalty == 1.3  # and the checkpoint's config is left as it was


def test_hf_sampler_keeps_no_scores_and_reports_processed_logprobs(tmp_path, monkeypatch):
    path = _model_dir(tmp_path)
    tokenizer, model = load_tokenizer(str(path)), api.load_causal_lm(str(path))
    seen = {}
    real = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    params = SamplingParams(n=2, max_new_tokens=8, temperature=0.7, top_k=5, seed=3)
    out = HFSampler(model, tokenizer).sample([tokenizer("the cat")["input_ids"]], params)
    assert not seen.get("output_scores") and not seen.get("output_logits")
    torch.manual_seed(3)
    ref = real(input_ids=torch.tensor([tokenizer("the cat")["input_ids"]] * 2), do_sample=True, temperature=0.7, top_k=5,
               max_new_tokens=8, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               return_dict_in_generate=True, output_scores=True)
    new = ref.sequences[:, -8:]
    logps = torch.stack(ref.scores, 1).float().log_softmax(-1).gather(-1, new[..., None])[..., 0]
    for row, ids, lps in zip(range(2), out.completion_ids, out.logprobs):
        assert ids == new[row, : len(ids)].tolist()
        torch.testing.assert_close(torch.tensor(lps), logps[row, : len(ids)])


def _bos_template_tokenizer(tmp_path):
    tokenizer = word_tokenizer(WORDS)
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' <end> ' }}"
                               "{% endfor %}{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}")
    tokenizer.save_pretrained(tmp_path / "tok")
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


def test_no_doubled_bos_when_the_chat_template_emits_one(tmp_path):
    tokenizer = _bos_template_tokenizer(tmp_path)
    assert tokenizer("the cat")["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer adds BOS itself
    rows = [{"prompt": [{"role": "user", "content": "the cat"}], "chosen": [{"role": "assistant", "content": "sun"}],
             "rejected": [{"role": "assistant", "content": "mud"}]}]
    ids = build_dataset(rows, tokenizer, source="t").examples[0]["prompt_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert prompt_ids(tokenizer, "the cat").count(tokenizer.bos_token_id) == 1


def test_reward_models_score_the_format_they_were_trained_on(tmp_path):
    tokenizer = _bos_template_tokenizer(tmp_path)
    rows = [{"prompt": [{"role": "user", "content": "the cat"}], "chosen": [{"role": "assistant", "content": "sun joy"}],
             "rejected": [{"role": "assistant", "content": "mud"}]}]
    example = build_dataset(rows, tokenizer, source="t").examples[0]
    rendered = tokenizer.decode(example["prompt_ids"])  # the prompt as online training passes it to rewards
    trained = example["prompt_ids"] + example["completion_ids"][0]
    completion = tokenizer.decode(example["completion_ids"][0], skip_special_tokens=True)  # as a sampler's text
    assert encode(tokenizer, rendered, completion, max_length=64, max_prompt_length=32) == trained
    cut = encode(tokenizer, rendered, completion, max_length=64, max_prompt_length=32, finished=False)
    assert cut == trained[:-1] and trained[-1] == tokenizer.eos_token_id  # no EOS on a cut completion
    assert encode_prompt(tokenizer, rendered).count(tokenizer.bos_token_id) == 1


def test_generate_applies_the_chat_template_and_takes_both_spellings(tmp_path, capsys):
    path = _model_dir(tmp_path)
    tokenizer = load_tokenizer(str(path))
    assert prompt_ids(tokenizer, "the cat") == tokenizer("<user> the cat <end> <assistant> ")["input_ids"]
    assert prompt_ids(tokenizer, "the cat", chat_template=False) == tokenizer("the cat")["input_ids"]
    outputs = {}
    for flag, extra in (("--max-new-tokens", []), ("--max_new_tokens", []), ("--max_new_tokens", ["--no-chat-template"])):
        assert cli.main(["generate", "--model", str(path), "--prompt", "the cat", "--strategy", "greedy", flag, "5", *extra]) == 0
        outputs[(flag, bool(extra))] = json.loads(capsys.readouterr().out.strip())["completion"]
    assert outputs[("--max-new-tokens", False)] == outputs[("--max_new_tokens", False)]
    greedy = api.load_causal_lm(str(path)).generate(torch.tensor([prompt_ids(tokenizer, "the cat")]), do_sample=False,
                                                    max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
    assert outputs[("--max-new-tokens", False)] == tokenizer.decode(greedy[0, -5:], skip_special_tokens=True)
    assert len(outputs[("--max-new-tokens", False)].split()) <= 5
