"""RewardTrainer, the preference-strength ensemble and reward-model scoring (Secrets of RLHF in Large
Language Models Part II, Wang et al. 2024). The loss formulas themselves are tested in
test_reward_objectives.py; here: the trainer applies them to the right pairs and features."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import TrainerCallback

from align import api
from align.data import DataError, build_dataset
from align.models import load_tokenizer
from align.objectives import bradley_terry_loss, difference_views, flip_mask, metarm_difference, simcse_loss

from align.rewards import RewardError, load_reward
from align.rewards.model import RewardModelReward, reward_forward
from align.rewards.tasks import BAD_WORDS, GOOD_WORDS, NEUTRAL_WORDS, sentiment_reward
from align.strength import strength_ensemble
from align.trainers.reward import RewardConfig, RewardTrainer, pair_rewards

QUIET = {"report_to": "none", "save_strategy": "no", "logging_strategy": "no", "disable_tqdm": True,
         "per_device_train_batch_size": 8, "learning_rate": 5e-3, "lora_r": 4, "lora_alpha": 8, "seed": 0}


def pair_rows(n: int, seed: int = 0, strengths: list[float] | None = None) -> list[dict]:
    """Pairs of random word strings, chosen = the higher true reward (no ties)."""
    rng, rows = random.Random(seed), []
    words = GOOD_WORDS + BAD_WORDS + NEUTRAL_WORDS
    while len(rows) < n:
        prompt = " ".join(rng.choices(NEUTRAL_WORDS, k=3))
        a, b = (" ".join(rng.choices(words, k=rng.randint(4, 7))) for _ in range(2))
        ra, rb = sentiment_reward([prompt] * 2, [a, b])
        if ra == rb:
            continue
        if rb > ra:
            (a, ra), (b, rb) = (b, rb), (a, ra)
        rows.append({"prompt": prompt, "chosen": a, "rejected": b, "chosen_reward": ra, "rejected_reward": rb})
    for row, s in zip(rows, strengths or []):
        row["strength_mean"], row["strength_std"] = s, abs(s) / 10
    return rows


def make_trainer(tmp_path, base, rows, **options):
    config = RewardConfig(output_dir=str(tmp_path / "out"), **(QUIET | options))
    tokenizer = load_tokenizer(str(base))
    model = RewardTrainer.load_model(config, str(base), tokenizer)
    data = build_dataset(rows, tokenizer, source="test", kinds=("pairs",))
    return RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)


def full_batch(trainer):
    data = trainer.train_dataset
    return trainer.data_collator([data[i] for i in range(len(data))])


def hf_rewards(model, batch) -> torch.Tensor:
    """Rewards from HF's own pooling (last non-pad token; pad != EOS here), (B, 2)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].view(-1, 2)


def last_features(model, batch) -> torch.Tensor:
    """Final hidden states at each row's last real token, from the backbone directly."""
    hidden = model.get_base_model().model(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"]).last_hidden_state
    return hidden[torch.arange(len(hidden)), batch["attention_mask"].sum(-1) - 1]


def test_recipes_validate(tmp_path):
    quick = api.load_config("configs/reward_quickstart.yaml", {"output_dir": str(tmp_path)})
    assert isinstance(quick, RewardConfig) and quick.model == quick.dataset == "builtin:demo"
    # the real recipe, and its denoised second step, as its header comment runs them (no download)
    overrides = {"output_dir": str(tmp_path), "bf16": torch.cuda.is_available()}
    hh = api.load_config("configs/reward_qwen2.5-0.5b_hh.yaml", overrides)
    assert hh.model == "Qwen/Qwen2.5-0.5B" and hh.dataset == "Anthropic/hh-rlhf" and not hh.uses_strength
    denoised = api.load_config("configs/reward_qwen2.5-0.5b_hh.yaml", overrides | {
        "dataset": "strength.jsonl", "flip_fraction": 0.1, "adaptive_margin": True})
    assert denoised.uses_strength


# --------------------------------------------------------------------------------------------------
# The loss the trainer computes


def test_plain_loss_is_bradley_terry_on_the_head_scores(tmp_path, tiny_lm_dir):
    trainer = make_trainer(tmp_path, tiny_lm_dir, pair_rows(8))
    model, batch = trainer.model.eval(), full_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        r = hf_rewards(model, batch)
    torch.testing.assert_close(loss, -F.logsigmoid(r[:, 0] - r[:, 1]).mean())
    assert r.std() > 0  # the seeded new head gives distinct rewards


def test_the_model_is_a_function_of_the_seed(tmp_path, tiny_lm_dir):
    tokenizer = load_tokenizer(str(tiny_lm_dir))

    def weights(seed):
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        config = RewardConfig(output_dir=str(tmp_path), seed=seed, lora_r=4)
        return {n: p for n, p in RewardTrainer.load_model(config, str(tiny_lm_dir), tokenizer).named_parameters()}

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    head, lora_a = "base_model.model.score.modules_to_save.default.weight", next(n for n in a if "lora_A" in n)
    assert not torch.equal(a[head], c[head]) and not torch.equal(a[lora_a], c[lora_a])


def test_adaptive_margin_and_smoothing_slices_apply_to_the_right_pairs(tmp_path, tiny_lm_dir):
    strengths = [-2.0, -1.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0]
    rows = pair_rows(8, strengths=strengths)
    mu = torch.tensor(strengths)
    cases = {
        # margin = scale · max(μ̂, 0), inside σ: BT(d - m)
        (("adaptive_margin", True), ("margin_scale", 0.5)): (0.5 * mu.clamp(min=0), 0.0),
        # the strongest 25% (two pairs: μ̂ = 4, 5) are smoothed
        (("label_smoothing", 0.2), ("smoothing_slice", "strongest"), ("smoothing_fraction", 0.25)):
            (None, 0.2 * (mu >= 4).float()),
        # Soft Label + Margin (§2.5): smoothing on μ̂ < 0, margin on all pairs
        (("label_smoothing", 0.3), ("smoothing_slice", "negative"), ("adaptive_margin", True)):
            (mu.clamp(min=0), 0.3 * (mu < 0).float()),
        (("label_smoothing", 0.1),): (None, 0.1),
    }
    for options, (margin, smoothing) in cases.items():
        trainer = make_trainer(tmp_path, tiny_lm_dir, rows, **dict(options))
        model, batch = trainer.model.eval(), full_batch(trainer)
        with torch.no_grad():
            loss = trainer.compute_loss(model, batch)
            r = hf_rewards(model, batch)
        d = r[:, 0] - r[:, 1]
        expected = -((1 - torch.as_tensor(smoothing)) * F.logsigmoid(d - (0 if margin is None else margin))
                     + torch.as_tensor(smoothing) * F.logsigmoid(-(d - (0 if margin is None else margin))))
        torch.testing.assert_close(loss, expected.mean(), msg=str(options))


def test_margin_moves_the_decision_boundary_by_exactly_the_margin(tmp_path, tiny_lm_dir):
    """At d = m the margin loss is ln 2 and its gradient with respect to d is -1/2 (P = 1/2)."""
    trainer = make_trainer(tmp_path, tiny_lm_dir, pair_rows(4, strengths=[0.3, 1.0, 2.0, 0.0]),
                           adaptive_margin=True)
    margin = torch.tensor([0.3, 1.0, 2.0, 0.0])
    d = margin.clone().requires_grad_()
    losses = trainer.bt_losses(d, torch.zeros(4), {"strength_mean": margin})
    (grad,) = torch.autograd.grad(losses.sum(), d)
    torch.testing.assert_close(losses.detach(), torch.full((4,), 0.6931471805599453))
    torch.testing.assert_close(grad, torch.full((4,), -0.5))


def test_flipping_swaps_exactly_the_selected_pairs_in_a_batch(tmp_path, tiny_lm_dir):
    strengths = [0.7, -3.0, 2.0, -0.5, 1.5, -1.0, 0.1, 3.0, 0.05, -0.2]
    rows = pair_rows(10, strengths=strengths)
    plain = make_trainer(tmp_path, tiny_lm_dir, rows)
    # half of the pairs may flip, but only the four the ensemble disagrees with (μ̂ < 0) do (§2.4.1)
    flipping = make_trainer(tmp_path, tiny_lm_dir, rows, flip_fraction=0.5)
    expected = flip_mask(torch.tensor(strengths), 0.5)
    assert expected.tolist() == [s < 0 for s in strengths]
    assert torch.equal(flipping.flipped, expected)
    before, after = full_batch(plain), full_batch(flipping)
    n_pos = before["input_ids"].shape[1]
    for i, flipped in enumerate(expected.tolist()):
        rows_before = before["input_ids"][2 * i : 2 * i + 2]
        rows_after = after["input_ids"][2 * i : 2 * i + 2, :n_pos]
        assert torch.equal(rows_after, rows_before.flip(0) if flipped else rows_before)
        assert after["scores"][i].tolist() == (before["scores"][i].flip(0) if flipped else before["scores"][i]).tolist()
        assert after["strength_mean"][i] == (-1 if flipped else 1) * before["strength_mean"][i]
        assert after["strength_std"][i] == before["strength_std"][i]
    # the loss is Bradley-Terry on the swapped pairs: their chosen row now is the old rejected one
    with torch.no_grad():
        r = hf_rewards(plain.model.eval(), before)
        loss = flipping.compute_loss(flipping.model.eval(), after)
    d = torch.where(expected, r[:, 1] - r[:, 0], r[:, 0] - r[:, 1])
    torch.testing.assert_close(loss, -F.logsigmoid(d).mean())


def test_strength_options_need_strength_in_the_data(tmp_path, tiny_lm_dir):
    for options in ({"flip_fraction": 0.1}, {"adaptive_margin": True},
                    {"label_smoothing": 0.1, "smoothing_slice": "negative"}):
        with pytest.raises(DataError, match="align rm strength"):
            make_trainer(tmp_path, tiny_lm_dir, pair_rows(4), **options)
    with pytest.raises(ValueError, match="offline"):
        RewardConfig(output_dir=str(tmp_path), online=True, reward="builtin:demo")
    with pytest.raises(ValueError, match="contrastive"):
        RewardConfig(output_dir=str(tmp_path), contrastive="swav")


@pytest.mark.parametrize("variant", ["simcse", "simcse_diff"])
def test_contrastive_loss_on_last_token_features(tmp_path, tiny_lm_dir, variant):
    """Without dropout the two views coincide: L = BT + β·SimCSE(h, h) over the responses (or the
    chosen-minus-rejected differences and their negations)."""
    trainer = make_trainer(tmp_path, tiny_lm_dir, pair_rows(6), contrastive=variant, contrastive_dropout=0.0,
                           contrastive_weight=0.5, contrastive_temperature=0.1)
    model, batch = trainer.model.train(), full_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        r, h = hf_rewards(model, batch), last_features(model, batch)
    instances = h if variant == "simcse" else difference_views(h[0::2], h[1::2])
    expected = -F.logsigmoid(r[:, 0] - r[:, 1]).mean() + 0.5 * simcse_loss(instances, instances, temperature=0.1).mean()
    torch.testing.assert_close(loss, expected)
    # SimCSE with identical views: ℓ_i = -log(e^{1/τ} / Σ_j e^{cos_ij/τ}), here from the features directly
    cos = F.normalize(instances, dim=-1) @ F.normalize(instances, dim=-1).T
    torch.testing.assert_close(simcse_loss(instances, instances, temperature=0.1),
                               -(1 / 0.1 - torch.logsumexp(cos / 0.1, dim=1)))


def test_embedding_dropout_makes_two_views_in_training_only(tmp_path, tiny_lm_dir):
    trainer = make_trainer(tmp_path, tiny_lm_dir, pair_rows(4), contrastive="simcse")
    model, batch = trainer.model, full_batch(trainer)
    with torch.no_grad():
        model.train()
        a, b = (reward_forward(model, batch["input_ids"], batch["attention_mask"])[0] for _ in range(2))
        assert not torch.equal(a, b)
        model.eval()
        a, b = (reward_forward(model, batch["input_ids"], batch["attention_mask"])[0] for _ in range(2))
        assert torch.equal(a, b)


def test_metrics_accuracy_margin_and_strength_buckets(tmp_path, tiny_lm_dir):
    strengths = [-2.0, -1.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0]
    trainer = make_trainer(tmp_path, tiny_lm_dir, pair_rows(8, strengths=strengths), strength_buckets=2)
    model, batch = trainer.model.eval(), full_batch(trainer)
    with torch.no_grad():
        trainer.compute_loss(model, batch)
        r = hf_rewards(model, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    d = r[:, 0] - r[:, 1]
    assert logged["rewards/accuracies"] == pytest.approx((d > 0).float().mean().item())
    assert logged["rewards/margins"] == pytest.approx(d.mean().item(), abs=1e-6)
    assert logged["reward/std"] == pytest.approx(r.flatten().std(correction=0).item(), abs=1e-6)
    assert logged["rewards/true_accuracy"] == logged["rewards/accuracies"]  # chosen is truly better in pair_rows
    # two buckets split at the median strength (1.5): the first four pairs, then the last four
    assert logged["accuracy/strength_q1"] == pytest.approx((d[:4] > 0).float().mean().item())
    assert logged["accuracy/strength_q2"] == pytest.approx((d[4:] > 0).float().mean().item())


# --------------------------------------------------------------------------------------------------
# MetaRM (§3.2, Alg. 1)


def _meta_trainer(tmp_path, base, **meta_options):
    meta = tmp_path / "meta.jsonl"
    groups = [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"], r["prompt"]]}
              for r in pair_rows(6, seed=5)]  # k = 3 unlabelled responses per prompt
    meta.write_text("\n".join(json.dumps(g) for g in groups))
    return make_trainer(tmp_path, base, pair_rows(8), meta_dataset=str(meta), meta_batch_size=3, **meta_options)


def _grads(trainer, batch):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    before = [p.detach().clone() for p in params]
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is not running here
    trainer.training_step(trainer.model, dict(batch))
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # θ is restored exactly
    return [p.grad.clone() for p in params]


def _relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return (sum(((x - y) ** 2).sum() for x, y in zip(a, b)) / sum((y**2).sum() for y in b)).sqrt().item()


def test_metarm_with_zero_inner_step_is_the_vanilla_gradient(tmp_path, tiny_lm_dir):
    for normalize in (True, False):
        trainer = _meta_trainer(tmp_path, tiny_lm_dir, meta_lr=0.0, meta_normalize=normalize)
        batch = full_batch(trainer)
        meta_grads = _grads(trainer, batch)
        trainer.meta_batches = None
        vanilla = _grads(trainer, batch)
        assert all(torch.equal(a, b) for a, b in zip(meta_grads, vanilla))


def test_metarm_with_defaults_moves_the_gradient_away_from_bradley_terry(tmp_path, tiny_lm_dir):
    """With the defaults the inner step is about an AdamW step of the learning rate (RMS η per parameter,
    η = lr·√((1-β₁)/(1+β₁))), so ∇L(θ') differs measurably from the vanilla ∇L(θ); a plain SGD step
    η∇J with η = lr (the old default) left MetaRM equal to Bradley-Terry."""
    trainer = _meta_trainer(tmp_path, tiny_lm_dir)
    eta = 5e-3 * (0.1 / 1.9) ** 0.5  # β₁ = 0.9
    assert trainer.args.meta_normalize and trainer.meta_lr == pytest.approx(eta)
    batch, meta = full_batch(trainer), next(trainer.meta_batches)
    trainer.meta_batches = iter([meta, meta])
    meta_grads = _grads(trainer, batch)
    n = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["metarm/inner_step_norm"] == pytest.approx(eta * n**0.5, rel=1e-4)
    trainer.args.meta_normalize, trainer.meta_lr = False, trainer.args.learning_rate  # the old default
    sgd_grads = _grads(trainer, batch)
    trainer.meta_batches = None
    vanilla = _grads(trainer, batch)
    assert _relative_difference(meta_grads, vanilla) > 0.05
    assert _relative_difference(sgd_grads, vanilla) < 0.01


@pytest.mark.parametrize("normalize", [True, False])
def test_metarm_takes_the_bradley_terry_gradient_at_the_ascended_parameters(tmp_path, tiny_lm_dir, normalize):
    trainer = _meta_trainer(tmp_path, tiny_lm_dir, meta_lr=0.05 if normalize else 0.5, meta_normalize=normalize)
    batch, meta = full_batch(trainer), next(trainer.meta_batches)
    trainer.meta_batches = iter([meta])
    got = _grads(trainer, batch)
    # by hand: θ' = θ + η ∇J(X_s) (normalised: θ + η√n ∇J/‖∇J‖), then ∇L(θ')
    model = trainer.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    rewards, _ = reward_forward(model, meta["input_ids"], meta["attention_mask"])
    J = metarm_difference(rewards.view(-1, 3)).mean()
    grads_J = [torch.zeros_like(p) if g is None else g
               for p, g in zip(params, torch.autograd.grad(J, params, allow_unused=True))]
    assert any(g.abs().sum() > 0 for g in grads_J)
    norm = torch.cat([g.flatten() for g in grads_J]).norm()
    n = sum(p.numel() for p in params)
    step = 0.05 * n**0.5 / norm if normalize else 0.5
    with torch.no_grad():
        for p, g in zip(params, grads_J):
            p.add_(step * g)
    r = hf_rewards(model, batch)
    expected = torch.autograd.grad(bradley_terry_loss(r[:, 0], r[:, 1]).mean(), params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["metarm/inner_step_norm"] == pytest.approx(float(step * norm), rel=1e-4)


def test_metarm_logs_the_outer_step_beside_the_inner_step(tmp_path, tiny_lm_dir):
    """A short run: ‖θ_t - θ_{t-1}‖ of each optimizer step is logged at the next step, beside ‖θ' - θ‖,
    whose η follows the learning-rate schedule."""
    trainer = _meta_trainer(tmp_path, tiny_lm_dir, max_steps=3, logging_strategy="steps", logging_steps=1)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append([p.detach().clone() for p in params])

    trainer.add_callback(Snapshot())
    initial = [p.detach().clone() for p in params]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "metarm/inner_step_norm" in h]
    assert len(logs) == 3 and "metarm/outer_step_norm" not in logs[0]
    thetas = [initial] + snapshots
    for step in (1, 2):  # logged at step t + 1: the step from θ_{t-1} to θ_t
        expected = RewardTrainer.parameter_distance(thetas[step], thetas[step - 1])
        assert logs[step]["metarm/outer_step_norm"] == pytest.approx(expected, rel=1e-4)
    # RMS η per parameter, η on the learning rate's linear schedule: η₀ · (1, 2/3, 1/3)
    n = sum(p.numel() for p in params)
    for step, h in enumerate(logs):
        assert h["metarm/inner_step_norm"] == pytest.approx(trainer.meta_lr * (1 - step / 3) * n**0.5, rel=1e-4)


# --------------------------------------------------------------------------------------------------
# Preference strength: M adapters on one frozen base


def test_strength_ensemble_population_std_and_one_shared_base(tmp_path, tiny_lm_dir):
    trainer = make_trainer(tmp_path, tiny_lm_dir, pair_rows(16), max_steps=3)
    model, config = trainer.model, trainer.args
    base = {n: p.detach().clone() for n, p in model.named_parameters()
            if "lora_" not in n and "modules_to_save" not in n}
    n_params = sum(p.numel() for p in model.parameters())
    result = strength_ensemble(config, model, trainer.processing_class, trainer.train_dataset, num_models=3)
    diffs = result["diffs"]
    assert diffs.shape == (3, 16)
    assert not torch.allclose(diffs[0], diffs[1]) and not torch.allclose(diffs[1], diffs[2])  # different seeds
    torch.testing.assert_close(result["mean"], diffs.mean(0))
    torch.testing.assert_close(result["std"], ((diffs - diffs.mean(0)) ** 2).mean(0).sqrt())  # ddof = 0
    # the base is frozen and held once; each member adds only its LoRA weights and head
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    per_member = n_params - sum(p.numel() for p in base.values())
    assert sum(p.numel() for p in model.parameters()) == n_params + 2 * per_member
    memory = result["memory"]
    assert memory["ensemble_bytes"] == memory["base_bytes"] + 3 * memory["adapter_bytes"]
    assert memory["full_copies_bytes"] == 3 * memory["base_bytes"]
    # training a later member left the earlier ones as they were
    for m, name in enumerate(["default", "member1", "member2"]):
        model.set_adapter(name)
        r = pair_rewards(model, trainer.train_dataset, trainer.processing_class.pad_token_id)
        torch.testing.assert_close(r[:, 0] - r[:, 1], diffs[m])


def test_strength_command_writes_a_dataset_the_trainer_reads(tmp_path, tiny_lm_dir):
    rows = pair_rows(12)
    data = tmp_path / "pairs.jsonl"
    bad = rows[0] | {"rejected": rows[0]["chosen"]}  # identical chosen and rejected: skipped
    data.write_text("\n".join(json.dumps(r) for r in rows + [bad]))
    config = tmp_path / "rm.yaml"
    config.write_text(yaml.safe_dump({"trainer": "reward", "model": str(tiny_lm_dir), "dataset": str(data),
                                      "output_dir": str(tmp_path / "rm"), "on_bad_row": "skip", "flip_fraction": 0.2,
                                      "max_steps": 2, "torch_threads": 1} | QUIET))
    from align.strength import strength_main

    out = tmp_path / "strength.jsonl"
    summary = strength_main(str(config), {}, 2, str(out))
    assert summary["pairs"] == 12 and summary["skipped_rows"] == 1 and summary["num_models"] == 2
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: r[k] for k in rows[0]} for r in written] == rows  # the kept rows, in order
    assert all(r["strength_std"] >= 0 for r in written)
    assert summary["negative_fraction"] == pytest.approx(sum(r["strength_mean"] < 0 for r in written) / 12)
    trainer = api.build_trainer(api.load_config(str(config), {"dataset": str(out), "flip_fraction": 0.25}))
    mu = torch.tensor([r["strength_mean"] for r in written])
    assert torch.equal(trainer.flipped, flip_mask(mu, 0.25)) and int(trainer.flipped.sum()) == min(3, int((mu < 0).sum()))
    assert (mu[trainer.flipped] < 0).all()


# --------------------------------------------------------------------------------------------------
# Scoring with a saved reward model, and inside online CoPG


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tiny_lm_dir):
    root = tmp_path_factory.mktemp("rm")
    data = root / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in pair_rows(32, seed=1)))
    config = api.make_config(QUIET | {"trainer": "reward", "model": str(tiny_lm_dir), "dataset": str(data),
                                      "output_dir": str(root / "rm"), "max_steps": 6, "save_strategy": "steps",
                                      "save_steps": 3, "torch_threads": 1})
    summary = api.train(config)
    assert summary["trainer"] == "reward" and summary["steps"] == 6
    return root / "rm", data


def test_saved_reward_model_scores_like_the_trained_one(trained_rm, tiny_lm_dir):
    path, data = trained_rm
    info = json.loads((path / "reward_model.json").read_text())
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = build_dataset(rows, tokenizer, source="test", kinds=("pairs",))
    # reference: the adapter loaded onto the base with peft, unmerged
    from peft import PeftModel

    from align.rewards.model import load_reward_backbone

    model = PeftModel.from_pretrained(load_reward_backbone(str(tiny_lm_dir), pad_token_id=tokenizer.pad_token_id),
                                      str(path)).eval()
    expected = pair_rewards(model, dataset, tokenizer.pad_token_id)
    assert info["stats_pairs"] == 32
    assert info["reward_mean"] == pytest.approx(expected.mean().item(), abs=1e-5)
    assert info["reward_std"] == pytest.approx(expected.std(correction=0).item(), abs=1e-5)

    prompts = [r["prompt"] for r in rows for _ in range(2)]
    completions = [c for r in rows for c in (r["chosen"], r["rejected"])]
    raw = load_reward(f"rm:{path}")
    scores = torch.tensor(raw(prompts, completions))
    torch.testing.assert_close(scores, expected.flatten(), atol=1e-5, rtol=1e-5)
    one_by_one = RewardModelReward(path, batch_size=1)(prompts[:5], completions[:5])
    torch.testing.assert_close(torch.tensor(one_by_one), scores[:5], atol=1e-5, rtol=1e-5)
    normalised = torch.tensor(load_reward(f"rm:{path}?normalize=true&batch_size=7")(prompts, completions))
    torch.testing.assert_close(normalised, (scores - info["reward_mean"]) / info["reward_std"], atol=1e-5, rtol=1e-5)
    with pytest.raises(RewardError, match="unknown option"):
        load_reward(f"rm:{path}?normalise=true")
    with pytest.raises(RewardError, match="batch_size must be a positive integer"):
        load_reward(f"rm:{path}?batch_size=many")
    # a checkpoint scores too (limits saved), but has no statistics to normalise with
    checkpoint = json.loads((path / "checkpoint-3" / "reward_model.json").read_text())
    assert checkpoint == {"max_length": 1024, "max_prompt_length": 512}
    assert "reward_model.json" in json.loads((path / "checkpoint-3" / "align_checkpoint.json").read_text())["files"]
    assert len(load_reward(f"rm:{path / 'checkpoint-3'}")(prompts[:3], completions[:3])) == 3
    with pytest.raises(RewardError, match="statistics"):
        load_reward(f"rm:{path / 'checkpoint-3'}?normalize=true")
    with pytest.raises(RewardError, match="adapter_config.json or config.json"):
        load_reward(f"rm:{path / 'nowhere'}")


def test_reward_model_scores_completions_inside_online_copg(tmp_path, trained_rm, tiny_lm_dir):
    path, data = trained_rm
    config = api.make_config({k: v for k, v in QUIET.items() if k != "logging_strategy"}
                             | {"trainer": "copg", "model": str(tiny_lm_dir), "dataset": str(data), "online": True,
                                "reward": f"rm:{path}?normalize=true", "num_generations": 2, "max_new_tokens": 6,
                                "max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1,
                                "output_dir": str(tmp_path / "copg"), "torch_threads": 1})
    trainer = api.build_trainer(config)
    assert isinstance(trainer.reward_fn, RewardModelReward) and trainer.reward_fn.normalize
    calls = []
    rm = trainer.reward_fn

    def recording(prompts, completions):
        calls.append((prompts, completions, rm(prompts, completions)))
        return calls[-1][2]

    trainer.reward_fn = recording
    trainer.train()
    assert len(calls) == 2 and all(len(c) == 8 for _, c, _ in calls)
    reference = RewardModelReward(path, normalize=True)
    for prompts, completions, scores in calls:
        assert scores == pytest.approx(reference(prompts, completions), abs=1e-5)
    logged = [h for h in trainer.state.log_history if "reward/mean" in h]
    assert [h["reward/mean"] for h in logged] == pytest.approx([sum(s) / len(s) for _, _, s in calls], abs=1e-5)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
