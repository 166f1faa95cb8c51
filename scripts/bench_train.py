"""Seconds per optimizer step, tokens/s and peak memory of align's trainers against TRL's, same model, same data.

    python scripts/bench_train.py [--repeats 3] [--steps 5] [--warmup 2] [--json bench_train.json]

Every trainer trains the same locally built Llama (~42M parameters, weights from a config and a seed) with a LoRA
adapter (r=16, all linear layers, no gradient checkpointing) on the same synthetic preference pairs (prompt ~32
tokens, completions ~64, right-padded to the batch maximum), batch 8 pairs, fp32 on a CPU, bf16 on a GPU. Each
measurement runs in its own process (so peak memory is its own), and the trainers take turns (round r runs them in
a rotated order), so a load change on a shared machine hits all of them alike. Per measurement: the median seconds
per optimizer step after ``--warmup`` steps, real (non-pad) tokens through the policy forward per second, and the
peak resident memory (CPU: VmHWM, reset after warm-up; GPU: peak allocated). The table shows the median over
rounds; each ratio is the median over rounds of align/TRL measured in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = dict(vocab_size=16384, hidden_size=512, layers=8, heads=8, intermediate_size=1376, max_positions=256)
PROMPT_WORDS, COMPLETION_WORDS = (24, 40), (48, 80)  # uniform ranges: means 32 and 64 tokens (+ BOS / EOS)
LORA = dict(r=16, alpha=32, target_modules="all-linear")
MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 64

# name -> (library, trainer, loss); the TRL rows are the baselines of the ratios below.
RUNS = {
    "trl_dpo": ("trl", "dpo", "sigmoid"),
    "trl_ipo": ("trl", "dpo", "ipo"),
    "trl_reward": ("trl", "reward", None),
    "align_cpl": ("align", "cpl", None),
    "align_dpo": ("align", "dpo", "sigmoid"),
    "align_ipo": ("align", "dpo", "ipo"),
    "align_copg": ("align", "copg", None),
    "align_reward": ("align", "reward", None),
}
RATIOS = {  # ratio name -> (align run, TRL run)
    "cpl_vs_trl_dpo": ("align_cpl", "trl_dpo"),
    "dpo_vs_trl_dpo": ("align_dpo", "trl_dpo"),
    "ipo_vs_trl_ipo": ("align_ipo", "trl_ipo"),
    "copg_vs_trl_dpo": ("align_copg", "trl_dpo"),
    "reward_vs_trl_reward": ("align_reward", "trl_reward"),
}


# --- the worker: one trainer, one process ---------------------------------------------------------------
def synthetic_rows(n: int, vocab_words: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def text(lo_hi):
        return " ".join(f"w{rng.randrange(vocab_words)}" for _ in range(rng.randint(*lo_hi)))

    rows = []
    for _ in range(n):
        prompt, chosen, rejected = text(PROMPT_WORDS), text(COMPLETION_WORDS), text(COMPLETION_WORDS)
        rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected,
                     "chosen_reward": rng.gauss(1, 1), "rejected_reward": rng.gauss(0, 1)})
    return rows


def proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
            f.write("5")


def memory_mb(device: str, peak: bool) -> float:
    import torch

    if device == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20
    return proc_status_mb("VmHWM" if peak else "VmRSS")


def build_trainer(name: str, args, workdir: str):
    """The trainer of run ``name``: the model saved in ``workdir`` (seeded, so every run loads the same weights),
    the same rows and the same training settings. align's trainers are built by ``align.api.build_trainer``, the
    path of ``align train``; TRL's by their own constructors with a ``peft_config``."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from align import api
    from align.models.tiny import tiny_llama, word_tokenizer

    library, kind, loss = RUNS[name]
    tokenizer = word_tokenizer([f"w{i}" for i in range(MODEL["vocab_size"] - 8)])  # + 8 special and chat tokens
    model = tiny_llama(MODEL["vocab_size"], hidden_size=MODEL["hidden_size"], layers=MODEL["layers"],
                       heads=MODEL["heads"], intermediate_size=MODEL["intermediate_size"],
                       max_positions=MODEL["max_positions"], seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    model_dir = os.path.join(workdir, "model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = synthetic_rows(args.batch * (args.warmup + args.steps), MODEL["vocab_size"] - 8, seed=args.seed)
    cuda = args.device == "cuda"
    common = dict(output_dir=os.path.join(workdir, "out"), per_device_train_batch_size=args.batch,
                  max_steps=args.warmup + args.steps, learning_rate=1e-4, logging_steps=10_000, save_strategy="no",
                  report_to="none", disable_tqdm=True, seed=args.seed, gradient_checkpointing=False, bf16=cuda,
                  use_cpu=not cuda)

    if library == "align":
        data_path = os.path.join(workdir, "pairs.jsonl")
        with open(data_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        extra = {"dpo": dict(loss_type=loss, beta=0.1, length_normalize=loss == "ipo"), "copg": dict(beta=0.1)}
        config = api.make_config({"trainer": kind, "model": model_dir, "dataset": data_path, "lora_r": LORA["r"],
                                  "lora_alpha": LORA["alpha"], "max_length": MAX_LENGTH,
                                  "max_prompt_length": MAX_PROMPT_LENGTH, **extra.get(kind, {}), **common})
        return api.build_trainer(config), n_params

    data = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"],
                             task_type="SEQ_CLS" if kind == "reward" else "CAUSAL_LM")
    if kind == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        return RewardTrainer(model=model, args=RewardConfig(max_length=MAX_LENGTH, **common), train_dataset=data,
                             processing_class=tokenizer, peft_config=peft_config), n_params
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = DPOConfig(max_length=MAX_LENGTH, loss_type=[loss], beta=0.1, precompute_ref_log_probs=False, **common)
    return DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                      peft_config=peft_config), n_params


def worker(name: str, args) -> dict:
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.set_device(0)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, a, state, control, **kwargs):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            if state.global_step == args.warmup:
                reset_peak(args.device)

    with tempfile.TemporaryDirectory() as workdir:
        trainer, n_params = build_trainer(name, args, workdir)
        clock = StepClock()
        trainer.add_callback(clock)
        tokens: list[tuple[int, int]] = []  # (real, padded) tokens of each policy forward batch
        compute_loss = trainer.compute_loss

        def counted(model, inputs, *a, **k):
            mask = inputs["attention_mask"]
            tokens.append((int(mask.sum()), mask.numel()))
            return compute_loss(model, inputs, *a, **k)

        trainer.compute_loss = counted
        before_mb = memory_mb(args.device, peak=False)  # model, data and libraries: what training adds is on top
        trainer.train()
        peak = memory_mb(args.device, peak=True)
    step_s = [b - a for a, b in zip(clock.ends[args.warmup - 1 :], clock.ends[args.warmup :])]
    timed = tokens[args.warmup :]
    real = sum(t for t, _ in timed) / len(timed)
    median = statistics.median(step_s)
    return {"name": name, "s_per_step": median, "tokens_per_s": real / median, "peak_mem_mb": peak,
            "train_mem_mb": peak - before_mb, "tokens_per_step": real, "loadavg": os.getloadavg()[0], "pad_fraction": 1 - sum(t for t, _ in timed) / sum(p for _, p in timed),
            "step_s": step_s, "params": n_params}


# --- the driver: rounds of worker processes ----------------------------------------------------------------
def available_runs() -> list[str]:
    from align.trainers import TRAINERS

    return [n for n, (lib, kind, _) in RUNS.items() if lib == "trl" or kind in TRAINERS]


def run_worker(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--threads", str(args.threads), "--device", args.device, "--seed", str(args.seed)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(rounds: list[dict[str, dict]]) -> dict:
    names = [n for n in RUNS if all(n in r for r in rounds)]
    rows = []
    for n in names:
        per_round = [r[n] for r in rounds]
        rows.append({
            "name": n,
            "s_per_step": statistics.median(m["s_per_step"] for m in per_round),
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in per_round),
            "peak_mem_mb": statistics.median(m["peak_mem_mb"] for m in per_round),
            "train_mem_mb": statistics.median(m["train_mem_mb"] for m in per_round),
            "tokens_per_step": per_round[0]["tokens_per_step"],
            "pad_fraction": per_round[0]["pad_fraction"],
            "tokens_per_s_rounds": [m["tokens_per_s"] for m in per_round],
            "loadavg_rounds": [m["loadavg"] for m in per_round],
        })
    ratios = {}
    for key, (mine, theirs) in RATIOS.items():
        if mine in names and theirs in names:
            ratios[key] = statistics.median(r[mine]["tokens_per_s"] / r[theirs]["tokens_per_s"] for r in rounds)
            ratios[key + "_mem"] = statistics.median(r[mine]["peak_mem_mb"] / r[theirs]["peak_mem_mb"] for r in rounds)
    return {"rows": rows, "ratios": ratios}


def print_table(result: dict, header: str) -> None:
    print(header)
    print(f"{'run':14s} {'s/step':>8s} {'tokens/s':>9s} {'peak MB':>8s} {'train MB':>8s} {'tok/step':>8s} {'pad':>5s}"
          "  tokens/s (load avg) per round")
    for r in result["rows"]:
        rounds = " ".join(f"{t:.1f} ({l:.1f})" for t, l in zip(r["tokens_per_s_rounds"], r["loadavg_rounds"]))
        print(f"{r['name']:14s} {r['s_per_step']:8.2f} {r['tokens_per_s']:9.1f} {r['peak_mem_mb']:8.0f} "
              f"{r['train_mem_mb']:8.0f} {r['tokens_per_step']:8.0f} {r['pad_fraction']:5.2f}  {rounds}")
    for key, value in result["ratios"].items():
        print(f"{key:28s} {value:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="rounds; every trainer runs once per round")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="a subset of the runs")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and ratios as JSON")
    parser.add_argument("--worker", choices=list(RUNS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step's end starts the clock)")
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    names = [n for n in available_runs() if not args.only or n in args.only]
    start, rounds, load_before = time.perf_counter(), [], os.getloadavg()
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        rounds.append({n: run_worker(n, args) for n in order})
        print(f"round {r + 1}/{args.repeats} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    result = summarise(rounds)
    result["settings"] = {"device": args.device, "threads": args.threads, "batch_pairs": args.batch,
                          "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "model": MODEL,
                          "params": rounds[0][names[0]]["params"], "lora": LORA, "max_length": MAX_LENGTH,
                          "loadavg_before": load_before, "wall_s": time.perf_counter() - start,
                          "loadavg_after": os.getloadavg()}
    print_table(result, f"{args.device}, {args.threads} threads, batch {args.batch} pairs, "
                        f"{args.steps} timed steps after {args.warmup}, median of {args.repeats} rounds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
