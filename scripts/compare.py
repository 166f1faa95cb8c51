"""Compare alignment methods on a built-in task at equal gradient steps and equal sampled completions:
offline CPL, DPO and CoPG (pairs sampled once from the base policy and labelled by the task's reward) and
online CoPG, CPL, GRPO and RLOO (fresh samples from the current policy every step), with the same base
policy, LoRA and optimiser. Every ``--eval-every`` steps the policy is evaluated against its reference on
held-out prompts under the task's reward. Writes a markdown table, JSON and a PNG of reward and KL against
steps.

    python scripts/compare.py --out runs/compare                           # builtin:demo, ~10 min on 2 cores
    python scripts/compare.py --task constraints --methods "online CoPG,online GRPO,online RLOO" \\
        --steps 24 --batch-size 4 --eval-every 12 --eval-prompts 32 --out runs/compare_constraints   # SmolLM2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from align import tasks
from align.api import build_trainer, make_config
from align.eval.policy import evaluate_against_reference

METHODS = {
    "offline CPL": {"trainer": "cpl", "lam": 0.8},
    "offline DPO": {"trainer": "dpo", "beta": 0.1},
    "offline CoPG": {"trainer": "copg", "beta": 0.05},
    "online CoPG": {"trainer": "copg", "beta": 0.05, "online": True},
    "online CPL": {"trainer": "cpl", "lam": 0.8, "online": True},
    "online GRPO": {"trainer": "grpo", "beta": 0.04},
    "online RLOO": {"trainer": "rloo", "beta": 0.05},
}
# Per task: the base model, the training reward, generation length and optimiser, and how many completions
# the offline pairs cost per prompt (they are sampled once from the base policy).
TASKS = {
    "demo": {"config": {"model": "builtin:demo", "dataset": "builtin:demo", "reward": "builtin:demo", "max_new_tokens": 12,
                        "learning_rate": 2e-3, "lora_r": 8, "lora_alpha": 16},
             "samples_per_pair": 2},
    "constraints": {"config": {"model": "builtin:smollm2-135m-instruct", "dataset": "builtin:constraints",
                               "reward": "builtin:constraints_shaped", "max_new_tokens": 64, "learning_rate": 3e-4,
                               "lora_r": 16, "lora_alpha": 32, "max_prompt_length": 256, "max_length": 384},
                    "samples_per_pair": tasks.SAMPLES_PER_PROMPT},
}


class EvalCallback(TrainerCallback):
    def __init__(self, trainer, task, prompts, every, max_new_tokens, seed):
        self.trainer, self.task, self.prompts, self.every = trainer, task, prompts, every
        self.max_new_tokens, self.seed, self.curve = max_new_tokens, seed, []

    def evaluate(self, step):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        result = evaluate_against_reference(model, self.trainer.processing_class, self.prompts, self.task.reward,
                                            max_new_tokens=self.max_new_tokens, seed=self.seed, n=2)
        self.curve.append({"step": step} | result)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.evaluate(state.global_step)


def run(name: str, overrides: dict, args) -> dict:
    """One method: ``steps`` steps of ``batch`` prompts; online methods sample ``k`` completions per prompt and
    step, offline methods get pairs sampled from the base policy at the same total number of completions."""
    setting, online = TASKS[args.task], overrides.get("online") or overrides["trainer"] in ("grpo", "rloo")
    samples = args.steps * args.batch_size * args.k
    prompts = args.steps * args.batch_size if online else samples // setting["samples_per_pair"]
    config = make_config(setting["config"] | {
        "output_dir": str(Path(args.out) / name.replace(" ", "_")), "num_generations": args.k, "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size, "task_train_prompts": prompts, "save_strategy": "no",
        "logging_steps": args.eval_every, "disable_tqdm": True, "torch_threads": args.threads, "seed": args.seed,
        "report_to": "none"} | overrides)
    task = tasks.get_task(config.dataset)
    trainer = build_trainer(config)
    callback = EvalCallback(trainer, task, task.prompts("heldout", args.eval_prompts, args.seed), args.eval_every,
                            config.max_new_tokens, args.seed + 1)
    trainer.add_callback(callback)
    callback.evaluate(0)
    start = time.perf_counter()
    trainer.train()
    if trainer.state.global_step % args.eval_every:
        callback.evaluate(trainer.state.global_step)
    final = callback.curve[-1]
    return {"curve": callback.curve, "seconds": time.perf_counter() - start, "steps": trainer.state.global_step,
            "samples": samples, "reward": final["true_reward_after"], "reward_reference": final["true_reward_before"],
            "win_rate": final["win_rate_vs_reference"], "kl": final["kl_to_reference"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(TASKS), default="demo")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per step")
    parser.add_argument("--k", type=int, default=2, help="completions per prompt and step (online)")
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
    lines = ["| method | steps | samples | task reward (reference) | win rate vs reference | KL to reference | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['steps']} | {r['samples']} | {r['reward']:.3f} ({r['reward_reference']:.3f}) "
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
    ax_r.set(title=f"task reward of policy samples ({args.task})", xlabel="step")
    ax_kl.set(title="KL(policy ‖ reference)", xlabel="step")
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)


if __name__ == "__main__":
    main()
