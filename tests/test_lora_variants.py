"""LoRA variants as config keys (DoRA, rsLoRA, PiSSA/OLoRA inits): what the policy computes, what merged
vLLM sync pushes, what adapter sync refuses, and the reference rule for inits that modify the base weights.
(vLLM parity of the variants is in tests/test_vllm.py.)"""

import copy
import json
import math

import pytest
import torch

from align import api
from align.config import ConfigError
from align.models import base_weights_modified, load_causal_lm, load_policy
from align.sampling.vllm import adapter_sync_problem, save_adapter_for_vllm, vllm_weights

IDS = torch.tensor([[1, 5, 7, 9, 11, 3, 4]])


def trained(model, steps=3, lr=0.05):
    """A few Adam steps of NLL on IDS: every adapter tensor (and DoRA's magnitude) moves off its init."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def test_rslora_scales_the_delta_by_alpha_over_sqrt_r(tiny_lm_dir):
    model = trained(load_policy(str(tiny_lm_dir), r=4, alpha=8, use_rslora=True))
    q = q_proj(model)
    assert q.scaling["default"] == 8 / math.sqrt(4)  # 4.0, where plain LoRA has 8 / 4 = 2
    by_hand = q.base_layer.weight + 4.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    merged = dict(vllm_weights(model))["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(merged, by_hand, rtol=0, atol=1e-6)


def test_dora_merged_weight_is_the_magnitude_times_the_normalised_direction(tiny_lm_dir):
    """DoRA (Liu et al. 2024, Eq. 5): W' = m · (W + s·B·A) / ‖W + s·B·A‖_c, the norm taken per output row of the
    (out, in) weight. The merged sync pushes W' for every adapted layer, as peft's own merge computes it, and
    leaves the training model untouched."""
    model = trained(load_policy(str(tiny_lm_dir), r=4, alpha=8, use_dora=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = dict(vllm_weights(model))
    q = q_proj(model)
    direction = q.base_layer.weight + 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    magnitude = q.lora_magnitude_vector["default"].weight
    assert not torch.allclose(magnitude, direction.norm(dim=1))  # trained: the magnitude is no longer ‖W‖
    by_hand = magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], by_hand, rtol=0, atol=1e-6)
    peft_merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(merged) == set(peft_merged)
    assert all(torch.equal(merged[k], peft_merged[k]) for k in merged)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(not layer._caches for layer in model.modules() if hasattr(layer, "_caches"))
    # the merged weights are the policy: a plain model loaded with them computes the same logits
    plain = load_causal_lm(str(tiny_lm_dir))
    plain.load_state_dict(merged, strict=False)
    torch.testing.assert_close(logits(plain), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_at_the_base_model_but_move_it_into_the_adapter(tiny_lm_dir, tmp_path, init):
    """peft replaces W by the residual W − s·B₀A₀: the policy starts at the base model, while the adapter-disabled
    model is the residual, not the base. A saved adapter reloads onto the same residual."""
    base = logits(load_causal_lm(str(tiny_lm_dir)))
    model = load_policy(str(tiny_lm_dir), r=4, alpha=8, init=init)
    assert base_weights_modified(model)
    torch.testing.assert_close(logits(model), base, rtol=0, atol=1e-5)
    with model.disable_adapter():
        assert (logits(model) - base).abs().max() > 1e-2
    trained(model).save_pretrained(tmp_path)
    reloaded = load_policy(str(tiny_lm_dir), adapter_path=str(tmp_path))
    assert base_weights_modified(reloaded)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_default_and_gaussian_keep_the_base_weights(tiny_lm_dir, init):
    base = load_causal_lm(str(tiny_lm_dir))
    model = load_policy(str(tiny_lm_dir), r=4, alpha=8, init=init)
    assert not base_weights_modified(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(base))
    assert torch.equal(logits(model), logits(base))  # both start with B = 0 (gaussian draws only A differently)


def config_values(tiny_lm_dir, tmp_path, **overrides):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the cat", "chosen": f"sees the sun {i}", "rejected": "mud"}) + "\n"
                            for i in range(8)))
    return {"model": str(tiny_lm_dir), "dataset": str(data), "seed": 0, "max_steps": 2, "lora_r": 4, "lora_alpha": 8,
            "per_device_train_batch_size": 4, "output_dir": str(tmp_path / "out"), "save_strategy": "no",
            "report_to": "none"} | overrides


@pytest.mark.parametrize("trainer,extra", [("dpo", {}), ("cpl", {"use_reference": True})])
def test_trainers_with_a_reference_refuse_pissa(tiny_lm_dir, tmp_path, trainer, extra):
    config = api.make_config(config_values(tiny_lm_dir, tmp_path, trainer=trainer, lora_init="pissa", **extra))
    with pytest.raises(ConfigError, match=r"lora_init=pissa .*adapter-disabled model is not the base model.*"
                                          r"\w+Trainer"):
        api.build_trainer(config)


def test_config_keys_reach_the_policy_and_train(tiny_lm_dir, tmp_path):
    """CPL without a reference trains an OLoRA + DoRA + rsLoRA policy through the API."""
    config = api.make_config(config_values(tiny_lm_dir, tmp_path, trainer="cpl", lora_init="olora", use_dora=True,
                                           use_rslora=True))
    trainer = api.build_trainer(config)
    peft_config = trainer.model.peft_config["default"]
    assert (peft_config.init_lora_weights, peft_config.use_dora, peft_config.use_rslora) == ("olora", True, True)
    magnitude = q_proj(trainer.model).lora_magnitude_vector["default"].weight.detach().clone()
    trainer.train()
    assert not torch.equal(q_proj(trainer.model).lora_magnitude_vector["default"].weight, magnitude)


@pytest.mark.parametrize("values,message", [
    ({"lora_init": "eva"}, "lora_init='eva': choose one of default, gaussian, pissa, olora"),
    ({"lora_init": "pissa_niter_4"}, "lora_init='pissa_niter_4': choose one of"),
    ({"use_dora": "yes"}, "key 'use_dora' expects bool"),
    ({"use_dora": True, "sampler": "vllm", "vllm_sync": "adapter"}, "cannot express DoRA.*set vllm_sync: merged"),
])
def test_bad_variant_keys_are_clear_errors(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        api.make_config({"trainer": "cpl", "output_dir": str(tmp_path)} | values)


def test_adapter_sync_refuses_dora_and_keeps_rslora(tiny_lm_dir, tmp_path):
    """vLLM's LoRA layers have no DoRA magnitude; they do read use_rslora (α/√r) from adapter_config.json."""
    dora = load_policy(str(tiny_lm_dir), r=4, alpha=8, use_dora=True)
    assert "cannot express DoRA" in adapter_sync_problem(dora)
    rslora = load_policy(str(tiny_lm_dir), r=4, alpha=8, use_rslora=True, init="pissa")
    assert adapter_sync_problem(rslora) is None
    with open(f"{save_adapter_for_vllm(rslora, str(tmp_path))}/adapter_config.json") as f:
        saved = json.load(f)
    # the engine holds the residual base already: vLLM must not (and would refuse to) re-run PiSSA
    assert saved["use_rslora"] is True and saved["init_lora_weights"] is True


def test_the_api_key_stays_out_of_saved_and_printed_config(tmp_path):
    config = api.make_config({"trainer": "copg", "output_dir": str(tmp_path), "vllm_api_key": "s3cret-key"})
    assert config.vllm_api_key == "s3cret-key"
    for text in (config.to_json_string(), str(config), repr(config), json.dumps(config.to_sanitized_dict())):
        assert "s3cret" not in text
    assert json.loads(config.to_json_string())["vllm_api_key"] == "<VLLM_API_KEY>"
