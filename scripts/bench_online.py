"""Where the time of an online CoPG step goes: sampling, scoring, weight sync and training, per backend.

    python scripts/bench_online.py [--backends hf vllm] [--steps 3] [--warmup 1] [--json bench_online.json]

Each backend trains online CoPG (the policy, prompts and reward of ``align train``, ``align.api.build_trainer``;
the sampler built here: ``HFSampler``, or a colocated ``VLLMSampler`` in fp32 on a CPU) for ``--warmup`` +
``--steps`` optimizer steps in its own process, on the built-in demo (its Markov-language policy and
reward, or ``--model``/``--reward``), ``--batch`` prompts × ``--k`` samples of up to ``--max-new-tokens``
tokens a step. Per timed step: sampling (``sampler.sample``), scoring (the reward function), weight sync
(``sampler.sync_weights``: pushing the LoRA policy into vLLM; nothing for HF, which samples from the
trained model itself) and training (the rest of the step: reference and policy forwards, backward,
optimizer). Prints the mean of each part over the timed steps, its share of the step, and sampled tokens/s.
``--size 512,8`` trains a larger (randomly initialised) Llama with the demo's tokenizer instead: slower steps, where
the engines' fixed costs matter less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PARTS = ("sample", "score", "sync")


def worker(backend: str, args) -> dict:
    import torch
    from transformers import TrainerCallback

    from align import api
    from align.sampling import HFSampler

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        config = api.make_config({
            "trainer": "copg", "online": True, "model": args.model, "dataset": args.dataset,
            "reward": args.reward, "num_generations": args.k, "max_new_tokens": args.max_new_tokens,
            "per_device_train_batch_size": args.batch, "max_steps": args.warmup + args.steps,
            "task_train_prompts": args.batch * (args.warmup + args.steps), "output_dir": out, "save_strategy": "no",
            "logging_steps": 10_000, "report_to": "none", "disable_tqdm": True, "seed": args.seed,
            "bf16": args.device == "cuda", "use_cpu": args.device == "cpu",
        })
        # align train's policy, prompts and reward; the sampler is built here, with the engine settings below
        built = api.build_trainer(config)
        if backend == "hf":
            sampler = HFSampler(built.model, built.processing_class)
        else:
            from align.sampling.vllm import VLLMSampler

            sampler = VLLMSampler(built.model, built.processing_class, sync=args.vllm_sync,
                                  dtype="bfloat16" if args.device == "cuda" else "float32",
                                  max_model_len=args.max_model_len)
        trainer = type(built)(model=built.model, args=config, train_dataset=built.train_dataset,
                              processing_class=built.processing_class, reward_fn=built.reward_fn, sampler=sampler)
        spent = dict.fromkeys(PARTS, 0.0)
        sampled_tokens = [0]

        def timed(part, fn):
            def call(*a, **k):
                start = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    spent[part] += time.perf_counter() - start
            return call

        sample = timed("sample", trainer.sampler.sample)

        def counted_sample(prompt_ids, params):
            completions = sample(prompt_ids, params)
            sampled_tokens[0] += sum(len(c) for c in completions.completion_ids)
            return completions

        trainer.sampler.sample = counted_sample
        trainer.sampler.sync_weights = timed("sync", trainer.sampler.sync_weights)
        trainer.reward_fn = timed("score", trainer.reward_fn)
        steps: list[dict] = []

        class StepClock(TrainerCallback):
            def on_step_begin(self, a, state, control, **kwargs):
                self.start, self.before = time.perf_counter(), dict(spent, tokens=sampled_tokens[0])

            def on_step_end(self, a, state, control, **kwargs):
                # the sync callback was added before this one, so its push is inside the step
                row = {part: spent[part] - self.before[part] for part in PARTS}
                row["step"] = time.perf_counter() - self.start
                row["train"] = row["step"] - sum(row[part] for part in PARTS)
                row["tokens"] = sampled_tokens[0] - self.before["tokens"]
                steps.append(row)

        trainer.add_callback(StepClock())
        trainer.train()
        if backend == "vllm":
            sampler.close()
    timed_steps = steps[args.warmup :]
    result = {"backend": backend}
    for key in (*PARTS, "train", "step"):  # means, so that the parts add up to the step
        result[f"{key}_s"] = statistics.mean(s[key] for s in timed_steps)
    result["sampled_tokens_per_s"] = sum(s["tokens"] for s in timed_steps) / sum(s["sample"] for s in timed_steps)
    result["steps"] = timed_steps
    return result


def build_model(hidden: int, layers: int, path: str) -> str:
    from align import demo
    from align.models import load_tokenizer
    from align.models.tiny import tiny_llama

    tokenizer = load_tokenizer(str(demo.base_model_path()))
    model = tiny_llama(len(tokenizer), hidden_size=hidden, layers=layers, heads=hidden // 64,
                       intermediate_size=hidden * 43 // 16, max_positions=512, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"])
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (vLLM's first push, caches)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per step")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", default="builtin:demo")
    parser.add_argument("--size", metavar="HIDDEN,LAYERS", help="instead of --model: a Llama of this width and depth "
                        "(heads of 64, random weights from a seed) with the demo's tokenizer, so the demo reward applies")
    parser.add_argument("--dataset", default="builtin:demo", help="prompts")
    parser.add_argument("--reward", default="builtin:demo")
    parser.add_argument("--vllm-sync", choices=["merged", "adapter"], default="merged")
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM: longest prompt + completion (default: the model's)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--worker", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    if args.size:
        args.model = build_model(*map(int, args.size.split(",")), tempfile.mkdtemp(prefix="bench_online_"))
        args.size = None
    results = []
    for backend in args.backends:
        cmd = [sys.executable, __file__, "--worker", backend] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("backends", "json", "worker") and v is not None]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            print(f"{backend} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"online CoPG, {args.device}: {args.batch} prompts x {args.k} samples x <= {args.max_new_tokens} tokens, "
          f"mean of {args.steps} steps after {args.warmup}, model {args.model}")
    print(f"{'backend':8s} {'step s':>7s} " + " ".join(f"{p + ' s (%)':>15s}" for p in (*PARTS, "train"))
          + f" {'sampled tok/s':>14s}")
    for r in results:
        parts = " ".join(f"{r[p + '_s']:7.2f} ({100 * r[p + '_s'] / r['step_s']:3.0f}%)" for p in (*PARTS, "train"))
        print(f"{r['backend']:8s} {r['step_s']:7.2f} {parts} {r['sampled_tokens_per_s']:14.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "results": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
