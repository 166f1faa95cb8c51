"""Compare offline CPL, DPO and CoPG with online CoPG and CPL on the built-in demo task.

Same base policy, same number of gradient steps, same number of sampled completions (offline: pairs
sampled once from the base policy; online: fresh samples from the current policy every step), same
LoRA and optimiser. Every ``--eval-every`` steps the policy is evaluated against the reference under
the true reward. Writes a markdown table, JSON and a PNG plot of true reward (and KL) against steps.

    python scripts/compare.py --out runs/compare        # about 5-10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from align import demo
from align.api import build_trainer, make_config
from align.eval.policy import evaluate_against_reference
from align.rewards import load_reward

METHODS = {
    "offline CPL": {"trainer": "cpl", "lam": 0.8},
    "offline DPO": {"trainer": "dpo", "beta": 0.1},
    "offline CoPG": {"trainer": "copg", "beta": 0.05},
    "online CoPG": {"trainer": "copg", "beta": 0.05, "online": True},
    "online CPL": {"trainer": "cpl", "lam": 0.8, "online": True},
}


class EvalCallback(TrainerCallback):
    def __init__(self, trainer, prompts, every, max_new_tokens, seed):
        self.trainer, self.prompts, self.every, self.max_new_tokens, self.seed = trainer, prompts, every, max_new_tokens, seed
        self.curve = []

    def evaluate(self, step):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        result = evaluate_against_reference(model, self.trainer.processing_class, self.prompts, load_reward("builtin:demo"),
                                            max_new_tokens=self.max_new_tokens, seed=self.seed, n=2)
        self.curve.append({"step": step} | result)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.evaluate(state.global_step)


def run(name, overrides, args) -> dict:
    steps, batch = args.steps, args.batch_size
    config = make_config({
        "model": "builtin:demo", "dataset": "builtin:demo", "output_dir": str(Path(args.out) / name.replace(" ", "_")),
        "reward": "builtin:demo", "num_generations": 2, "max_new_tokens": 12, "max_steps": steps,
        "per_device_train_batch_size": batch, "task_train_prompts": steps * batch, "learning_rate": 2e-3,
        "lora_r": 8, "lora_alpha": 16, "save_strategy": "no", "logging_steps": args.eval_every, "disable_tqdm": True,
        "torch_threads": args.threads, "seed": args.seed, "report_to": "none",
    } | overrides)
    trainer = build_trainer(config)
    prompts = demo.MarkovLanguage(demo.DemoSpec()).prompts(args.eval_prompts, seed=args.seed + 10_000)
    callback = EvalCallback(trainer, prompts, args.eval_every, 12, args.seed + 1)
    trainer.add_callback(callback)
    callback.evaluate(0)
    start = time.perf_counter()
    trainer.train()
    final = callback.curve[-1]
    return {"curve": callback.curve, "seconds": time.perf_counter() - start, "steps": steps,
            "samples": 2 * steps * batch, "true_reward": final["true_reward_after"],
            "true_reward_reference": final["true_reward_before"], "win_rate": final["win_rate_vs_reference"],
            "kl": final["kl_to_reference"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {name: run(name, METHODS[name], args) for name in args.methods.split(",")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| method | steps | samples | true reward (reference) | win rate vs reference | KL to reference | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['steps']} | {r['samples']} | {r['true_reward']:.3f} ({r['true_reward_reference']:.3f}) "
                     f"| {r['win_rate']:.3f} | {r['kl']:.2f} | {r['seconds']:.0f} |")
    table = "\n".join(lines)
    print(table)
    (out / "compare.md").write_text(table + "\n")
    (out / "compare.json").write_text(json.dumps(results, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, r in results.items():
        steps = [p["step"] for p in r["curve"]]
        ax_r.plot(steps, [p["true_reward_after"] for p in r["curve"]], marker=".", label=name)
        ax_kl.plot(steps, [p["kl_to_reference"] for p in r["curve"]], marker=".", label=name)
    ax_r.set(title="true reward of policy samples", xlabel="step")
    ax_kl.set(title="KL(policy ‖ reference)", xlabel="step")
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)


if __name__ == "__main__":
    main()
