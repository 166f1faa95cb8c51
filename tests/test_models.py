"""Log-prob computation, the adapter-disabled reference, and what training touches."""

import torch
from peft import PeftModel

from align.data import concat_rows
from align.models import completion_logps, load_causal_lm, load_policy, load_tokenizer, reference_completion_logps
from align.models.logprobs import sequence_logps


def _batch(tokenizer):
    prompts = [tokenizer("the cat sees")["input_ids"], tokenizer("a dog")["input_ids"]]
    completions = [tokenizer("the sun", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
                   tokenizer("runs by the river and", add_special_tokens=False)["input_ids"]]
    return prompts, completions, concat_rows(prompts, completions, tokenizer.pad_token_id)


def _naive_logps(model, prompt, completion):
    """Summed log-probs of one unpadded row from full logits."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, :-1].float()
    token = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return token[len(prompt) - 1 :].sum()


def test_completion_logps_match_naive_forward_and_ignore_padding(tiny_lm_dir):
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    model = load_policy(str(tiny_lm_dir), r=4, alpha=8)
    prompts, completions, batch = _batch(tokenizer)
    token = completion_logps(model, **batch)
    assert token.dtype == torch.float32 and token.shape == (2, batch["input_ids"].shape[1] - 1)
    assert (token[batch["completion_mask"][:, 1:] == 0] == 0).all()
    summed = sequence_logps(token, batch["completion_mask"])
    for i in range(2):
        torch.testing.assert_close(summed[i], _naive_logps(model, prompts[i], completions[i]), atol=1e-5, rtol=0)
    mean = sequence_logps(token, batch["completion_mask"], length_normalize=True)
    torch.testing.assert_close(mean, summed / torch.tensor([len(c) for c in completions]))


def test_reference_is_base_model_and_only_lora_params_train(tiny_lm_dir):
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    model = load_policy(str(tiny_lm_dir), r=4, alpha=8)
    assert isinstance(model, PeftModel)
    _, _, batch = _batch(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # a few steps so that LoRA B is non-zero and the policy moves
        loss = -completion_logps(model, **batch).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    base = load_causal_lm(str(tiny_lm_dir))  # a fresh copy of the base weights
    reference = reference_completion_logps(model, **batch)
    torch.testing.assert_close(reference, completion_logps(base, **batch), atol=1e-6, rtol=0)
    policy = completion_logps(model, **batch)
    assert (policy - reference).abs().max() > 1e-3  # the adapter did change the policy
    assert reference.grad_fn is None


def test_completion_logps_and_gradients_exact_across_vocabulary_tiles(tmp_path):
    """A vocabulary of 2.5 CPU tiles: the tiled head's log-probs and gradients equal full-logits ones, and
    TRL's tile width is set only during the forward (and still exists: a TRL upgrade that drops it fails here)."""
    import trl.trainer.utils as trl_utils

    from align.models.logprobs import CPU_VOCAB_TILE
    from align.models.tiny import tiny_llama

    default = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    vocab = CPU_VOCAB_TILE * 5 // 2
    tiny_llama(vocab, hidden_size=32, intermediate_size=64, seed=0).save_pretrained(tmp_path)
    model = load_causal_lm(str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (3, 5)]
    completions = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (6, 2)]
    batch = concat_rows(prompts, completions, pad_token_id=0)
    tiled = sequence_logps(completion_logps(model, **batch), batch["completion_mask"])
    grads = torch.autograd.grad(tiled.sum(), [model.lm_head.weight, model.model.embed_tokens.weight])
    naive = torch.stack([_naive_logps(model, p, c) for p, c in zip(prompts, completions)])
    expected = torch.autograd.grad(naive.sum(), [model.lm_head.weight, model.model.embed_tokens.weight])
    torch.testing.assert_close(tiled, naive, atol=1e-5, rtol=0)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == default
