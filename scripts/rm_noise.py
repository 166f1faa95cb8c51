"""Reward models on noisy preference labels (Secrets of RLHF II, arXiv 2401.06080, §2), with a known truth.

Task: the built-in demo language (``align.demo``). Two completions per prompt are sampled from the demo
base policy and scored by the true reward R (``align.rewards.tasks.sentiment_reward``). Training labels:

* near-ties, ``|R(a) - R(b)| < tie_band``: a random order (ambiguous pairs; a labeller cannot tell);
* the other pairs: the true order, then a random ``noise`` fraction of them flipped (the known set F).

Held-out pairs (fresh prompts) are scored against the *true* order; pairs with R(a) = R(b) are left
out. Every method is the same LoRA reward model on the demo base (``RewardTrainer``, same
hyper-parameters), trained once per seed:

* ``bt``: plain Bradley-Terry;
* ``flip``: the pairs with μ̂ < 0 swapped, the lowest first, at most ``flip_fraction`` of the pairs (§2.4.1);
* ``margin``: adaptive margin max(μ̂, 0);  * ``ls``: label smoothing α = ``ls_alpha`` on all pairs;
* ``simcse``: + SimCSE (β = 1, τ = 0.05, embedding dropout 0.05);
* ``simcse_diff``: + SimCSE on chosen-minus-rejected features;
* ``flip_margin``: flip + margin, the paper's combination of its two data-side fixes (§2.5);
* ``soft_margin``: "Soft Label + Margin" (§2.5): label smoothing α = ``soft_alpha`` on the pairs with
  μ̂ < 0 (the paper's alternative to flipping them; α is not given, 0.5 makes them ties) + margin;
* ``metarm``: MetaRM (§3.2, Alg. 1) with the trainer's defaults (a normalised inner ascent step of RMS
  η = lr·√((1-β₁)/(1+β₁)) ≈ lr/4 per parameter, about an AdamW step, on the learning-rate schedule);
  the unlabelled meta set is ``meta_k`` demo base-policy samples for each of ``meta_prompts`` fresh
  prompts (the distribution the held-out pairs come from; the paper's is the RL-shifted policy, which
  this task does not have);
* ``metarm_sgd``: MetaRM with Alg. 1's plain SGD inner step η∇J, η = lr (align's default before #13,
  which had no schedule on η);
* ``clean``: plain BT on the same pairs without the flips (a reference, not a method).

The preference strength μ̂ comes from an ensemble of ``models`` plain BT reward models trained on the
noisy training pairs (M LoRA adapters on one frozen base, ``align.strength.strength_ensemble``);
``strength_precision``/``strength_recall`` say how well the pairs ``flip`` swaps find F (and
``negative_precision``/``negative_recall`` how well all the pairs with μ̂ < 0 do). For MetaRM the table
gives the mean inner step ‖θ' − θ‖ and the mean optimizer step ‖θ_t − θ_{t-1}‖.

Run ``python scripts/rm_noise.py [--seeds 0 1 2] [--workers 2] [--json PATH] [--out DIR]``; the table
(markdown and JSON) and ``rm_noise.png`` go to ``--out`` (default runs/rm_noise).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from align import demo
from align.data import build_dataset
from align.models import load_causal_lm, load_tokenizer
from align.objectives import flip_mask
from align.sampling import HFSampler, SamplingParams
from align.strength import strength_ensemble
from align.trainers.reward import RewardConfig, RewardTrainer, pair_rewards

METHODS = {
    "bt": {},
    "flip": {"flip_fraction": None},  # None: the --flip-fraction value
    "margin": {"adaptive_margin": True},
    "ls": {"label_smoothing": None},  # None: the --ls-alpha value
    "simcse": {"contrastive": "simcse"},
    "simcse_diff": {"contrastive": "simcse_diff"},
    "flip_margin": {"flip_fraction": None, "adaptive_margin": True},
    "soft_margin": {"label_smoothing": None, "smoothing_slice": "negative", "adaptive_margin": True},
    "metarm": {"meta_dataset": None},  # None: the meta set this script samples
    "metarm_sgd": {"meta_dataset": None, "meta_normalize": False},
    "clean": {},
}
DEFAULT_METHODS = ["bt", "flip", "margin", "ls", "simcse", "flip_margin", "soft_margin", "metarm", "metarm_sgd",
                   "clean"]


def noisy_labels(rows: list[dict], *, noise: float, tie_band: float, seed: int) -> tuple[list[dict], list[dict], dict]:
    """Relabel pairs that carry true rewards: near-ties in random order, the others in the true order
    with exactly ``round(noise · n)`` of them flipped. Returns (noisy rows, clean rows, masks)."""
    rng = random.Random(seed)
    clean, near_tie = [], []
    for row in rows:
        (a, ra), (b, rb) = (row["chosen"], row["chosen_reward"]), (row["rejected"], row["rejected_reward"])
        tie = abs(ra - rb) < tie_band
        if (tie and rng.random() < 0.5) or (not tie and rb > ra):
            (a, ra), (b, rb) = (b, rb), (a, ra)
        clean.append({"prompt": row["prompt"], "chosen": a, "rejected": b, "chosen_reward": ra, "rejected_reward": rb})
        near_tie.append(tie)
    decided = [i for i, tie in enumerate(near_tie) if not tie]
    flipped = set(rng.sample(decided, round(noise * len(decided))))
    noisy = [swap(r) if i in flipped else r for i, r in enumerate(clean)]
    masks = {"flipped": torch.tensor([i in flipped for i in range(len(rows))]), "near_tie": torch.tensor(near_tie)}
    return noisy, clean, masks


def meta_groups(policy, tokenizer, prompts: list[str], *, k: int, seed: int) -> list[dict]:
    """MetaRM's unlabelled set: ``k`` policy samples per prompt (prompts with an empty sample are left out)."""
    samples = HFSampler(policy, tokenizer).sample([tokenizer(p)["input_ids"] for p in prompts],
                                                  SamplingParams(n=k, max_new_tokens=12, seed=seed))
    groups = [{"prompt": p, "completions": [samples.texts[i].strip() for i in index]}
              for p, index in zip(prompts, samples.grouped())]
    return [g for g in groups if all(g["completions"])]


def swap(row: dict) -> dict:
    return {"prompt": row["prompt"], "chosen": row["rejected"], "rejected": row["chosen"],
            "chosen_reward": row["rejected_reward"], "rejected_reward": row["chosen_reward"]}


def accuracies(diff: torch.Tensor, true: torch.Tensor, tie_band: float) -> dict:
    """Agreement of the reward model's order with the true order (true ties left out), overall and on
    clear (|ΔR| ≥ tie_band) and near-tie pairs."""
    right = (diff > 0) == (true > 0)
    out = {}
    for name, keep in (("accuracy", true != 0), ("accuracy_clear", true.abs() >= tie_band),
                       ("accuracy_near_tie", (true != 0) & (true.abs() < tie_band))):
        out[name] = right[keep].float().mean().item() if keep.any() else math.nan
    return out


def precision_recall(selected: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """Precision and recall of a boolean selection against the true set (0 for an empty one)."""
    found = int((selected & truth).sum())
    return found / max(int(selected.sum()), 1), found / max(int(truth.sum()), 1)


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), t.std(correction=0).item()


def plot(result: dict, strength: torch.Tensor, masks: dict, threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(result["methods"])
    means = [result["methods"][n]["accuracy"] for n in names]
    stds = [result["methods"][n]["accuracy_std"] for n in names]
    colors = ["grey" if n == "clean" else "tab:blue" for n in names]
    left.bar(names, means, yerr=stds, color=colors, capsize=3)
    low = min(means) - 3 * max(max(stds), 0.005)
    left.set_ylim(max(low, 0.0), min(max(means) + 3 * max(max(stds), 0.005), 1.0))
    left.set_ylabel("held-out accuracy vs true preference")
    left.set_title(f"{len(result['settings']['seeds'])} seeds, {result['settings']['noise']:.0%} flipped + near-ties")
    left.tick_params(axis="x", rotation=30)
    groups = {"correct label": ~masks["flipped"] & ~masks["near_tie"], "flipped": masks["flipped"],
              "near-tie": masks["near_tie"]}
    bins = torch.linspace(strength.min().item(), strength.max().item(), 41).tolist()
    for label, keep in groups.items():
        right.hist(strength[keep].tolist(), bins=bins, alpha=0.55, label=f"{label} ({int(keep.sum())})")
    right.axvline(threshold, color="black", linestyle="--", linewidth=1, label="flip threshold")
    right.set_xlabel("ensemble preference strength μ̂ (training pairs)")
    right.set_title(f"strength finds flips: precision {result['strength_precision']:.2f}, "
                    f"recall {result['strength_recall']:.2f}")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    lines = ["| method | accuracy (mean ± std) | clear pairs | near-ties | seconds/model | MetaRM ‖θ'−θ‖ / step |",
             "|---|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        steps = (f"{m['metarm/inner_step_norm']:.3g} / {m['metarm/outer_step_norm']:.3g}"
                 if "metarm/inner_step_norm" in m else "")
        lines.append(f"| {name} | {m['accuracy']:.4f} ± {m['accuracy_std']:.4f} | {m['accuracy_clear']:.4f} | "
                     f"{m['accuracy_near_tie']:.4f} | {m['seconds']:.1f} | {steps} |")
    s, settings = result, result["settings"]
    lines += ["", (f"Ensemble strength ({settings['models']} models): `flip` swaps {s['strength_flipped']} pairs "
                   f"(μ̂ < 0, lowest first, at most {settings['flip_fraction']:.0%}): precision "
                   f"{s['strength_precision']:.3f}, recall {s['strength_recall']:.3f}; all μ̂ < 0 "
                   f"({s['strength_negative_fraction']:.1%} of pairs): precision {s['negative_precision']:.3f}, "
                   f"recall {s['negative_recall']:.3f} (mislabelled pairs: {s['data']['flipped']} of "
                   f"{s['data']['train_pairs']}; near-ties {s['data']['near_ties']}).")]
    return "\n".join(lines)


def pairs(rows: list[dict], tokenizer):
    return build_dataset(rows, tokenizer, source="rm_noise", kinds=("pairs",))


def train_and_score(job: dict) -> dict:
    """One reward model: train on ``job["rows"]`` with ``job["options"]``, score the held-out pairs."""
    torch.set_num_threads(1)  # tiny models: threading only adds overhead
    start, tokenizer = time.perf_counter(), load_tokenizer(job["base"])
    config = RewardConfig(**job["common"], **job["options"], seed=job["seed"])
    model = RewardTrainer.load_model(config, job["base"], tokenizer)
    data = pairs(job["rows"], tokenizer)
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    rewards = pair_rewards(model, pairs(job["test_rows"], tokenizer), tokenizer.pad_token_id, batch_size=128)
    true = torch.tensor([r["chosen_reward"] - r["rejected_reward"] for r in job["test_rows"]])
    # the last log (the end of training) averages the metrics recorded since the start (logging_strategy=no)
    steps = {k: v for k, v in trainer.state.log_history[-1].items() if k.endswith("_step_norm")}
    return (accuracies(rewards[:, 0] - rewards[:, 1], true, job["tie_band"]) | steps
            | {"seconds": time.perf_counter() - start})


def ensemble_strength(job: dict) -> dict:
    """Preference strength of ``job["rows"]`` from ``job["models"]`` plain BT models (LoRA adapters on one base)."""
    torch.set_num_threads(1)
    start, tokenizer = time.perf_counter(), load_tokenizer(job["base"])
    config = RewardConfig(**job["common"], seed=job["seed"])
    model = RewardTrainer.load_model(config, job["base"], tokenizer)
    result = strength_ensemble(config, model, tokenizer, pairs(job["rows"], tokenizer), job["models"])
    return {"mean": result["mean"], "std": result["std"], "memory": result["memory"],
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-pairs", type=int, default=2000, help="training prompts (one pair each)")
    parser.add_argument("--test-pairs", type=int, default=1000, help="held-out prompts (one pair each)")
    parser.add_argument("--noise", type=float, default=0.25, help="fraction of non-tie training labels flipped")
    parser.add_argument("--tie-band", type=float, default=0.05, help="|ΔR| below this: a near-tie, random label")
    parser.add_argument("--models", type=int, default=10, help="ensemble size M (paper: 10)")
    parser.add_argument("--flip-fraction", type=float, default=0.2, help="flip: at most this fraction of the pairs, those with μ̂ < 0, lowest first (paper: 0.1-0.2)")
    parser.add_argument("--ls-alpha", type=float, default=0.1, help="label smoothing α of the `ls` method")
    parser.add_argument("--soft-alpha", type=float, default=0.5, help="label smoothing α of `soft_margin` (on μ̂ < 0)")
    parser.add_argument("--meta-prompts", type=int, default=500, help="MetaRM: prompts of the unlabelled meta set")
    parser.add_argument("--meta-k", type=int, default=4, help="MetaRM: policy samples per meta prompt (k)")
    parser.add_argument("--meta-batch-size", type=int, default=8, help="MetaRM: meta prompts per step (m)")
    parser.add_argument("--meta-lr", type=float, help="MetaRM inner step η (default: the trainer's, = --lr)")
    parser.add_argument("--epochs", type=float, default=2.0, help="epochs of every reward model, ensemble included")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--workers", type=int, default=2, help="reward models trained in parallel (one CPU core each)")
    parser.add_argument("--base", help="base causal LM directory (default: the demo base model)")
    parser.add_argument("--out", default="runs/rm_noise", help="directory for the table, JSON and plot")
    parser.add_argument("--json", metavar="PATH", help="also write the results JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = args.base or str(demo.base_model_path())
    tokenizer = load_tokenizer(base)
    policy = load_causal_lm(base)
    language = demo.MarkovLanguage(demo.DemoSpec())
    train_rows, test_rows = (demo.preference_pairs(policy, tokenizer, language.prompts(n, seed=seed), seed=seed)
                             for n, seed in ((args.train_pairs, 1), (args.test_pairs, 10_000)))
    noisy, clean, masks = noisy_labels(train_rows, noise=args.noise, tie_band=args.tie_band, seed=2)
    meta_path = out / "meta.jsonl"
    if any(METHODS[name].keys() & {"meta_dataset"} for name in args.methods):
        groups = meta_groups(policy, tokenizer, language.prompts(args.meta_prompts, seed=20_000), k=args.meta_k,
                             seed=20_000)
        meta_path.write_text("".join(json.dumps(g) + "\n" for g in groups))
    del policy
    common = dict(output_dir=str(out / "work"), learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
                  per_device_eval_batch_size=128, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                  num_train_epochs=args.epochs, save_strategy="no", logging_strategy="no", report_to="none",
                  disable_tqdm=True)

    meta = {"meta_batch_size": args.meta_batch_size} | ({} if args.meta_lr is None else {"meta_lr": args.meta_lr})

    def job(name: str, seed: int, rows: list[dict]) -> dict:
        defaults = {"flip_fraction": args.flip_fraction, "meta_dataset": str(meta_path),
                    "label_smoothing": args.soft_alpha if name == "soft_margin" else args.ls_alpha}
        options = {k: defaults[k] if v is None else v for k, v in METHODS[name].items()}
        if "meta_dataset" in options:
            options |= meta
        return {"base": base, "common": common, "options": options, "seed": seed, "test_rows": test_rows,
                "rows": clean if name == "clean" else rows, "tie_band": args.tie_band}

    # The ensemble runs while the methods that need no strength train; then the ones that do.
    runs = [(seed, name) for seed in args.seeds for name in args.methods]
    needs_strength = {name for name in args.methods if {"flip_fraction", "adaptive_margin", "smoothing_slice"}
                      & set(METHODS[name])}
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("fork")) as pool:
        ensemble_run = pool.submit(ensemble_strength, {"base": base, "common": common, "seed": args.seeds[0],
                                                       "rows": noisy, "models": args.models})
        futures = {run: pool.submit(train_and_score, job(run[1], run[0], noisy))
                   for run in runs if run[1] not in needs_strength}
        ensemble = ensemble_run.result()
        strength = ensemble["mean"]
        print(f"ensemble of {args.models}: {ensemble['seconds']:.0f}s", flush=True)
        strong = [r | {"strength_mean": m, "strength_std": s}
                  for r, m, s in zip(noisy, strength.tolist(), ensemble["std"].tolist())]
        futures |= {run: pool.submit(train_and_score, job(run[1], run[0], strong))
                    for run in runs if run[1] in needs_strength}
        per_seed = {name: [futures[(seed, name)].result() for seed in args.seeds] for name in args.methods}
    slice_ = flip_mask(strength, args.flip_fraction)
    found = precision_recall(slice_, masks["flipped"])
    negative = precision_recall(strength < 0, masks["flipped"])

    methods = {}
    for name, results in per_seed.items():
        acc, acc_std = mean_std([r["accuracy"] for r in results])
        methods[name] = {"accuracy": acc, "accuracy_std": acc_std, "per_seed": [r["accuracy"] for r in results]}
        methods[name] |= {k: mean_std([r[k] for r in results])[0] for k in results[0] if k != "accuracy"}
    result = {
        "methods": methods,
        "strength_flipped": int(slice_.sum()),
        "strength_precision": found[0],
        "strength_recall": found[1],
        "negative_precision": negative[0],
        "negative_recall": negative[1],
        "strength_negative_fraction": (strength < 0).float().mean().item(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "out", "workers")},
        "data": {"train_pairs": len(noisy), "flipped": int(masks["flipped"].sum()),
                 "near_ties": int(masks["near_tie"].sum()),
                 "test_pairs": sum(r["chosen_reward"] != r["rejected_reward"] for r in test_rows)},
        "ensemble": {"seconds": ensemble["seconds"], "memory": ensemble["memory"]},
        "seconds": time.perf_counter() - start,
    }
    md = table(result)
    print("\n" + md)
    (out / "rm_noise.md").write_text(md + "\n")
    (out / "rm_noise.json").write_text(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    plot(result, strength, masks, strength[slice_].max().item() if slice_.any() else math.nan, out / "rm_noise.png")
    return result


if __name__ == "__main__":
    main()
