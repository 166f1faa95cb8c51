"""Sampling throughput of the HF and vLLM backends, and the cost of a vLLM weight sync, merged vs adapter-only.

Both backends sample from the same LoRA policy, for the same prompts, lengths and seeds. Reported
(median of ``--runs`` timed runs after one warm-up, as one JSON line on stdout):

* ``tokens_per_s``: generated tokens / wall time of one ``sample`` call, for ``hf`` (``HFSampler``:
  ``generate`` on the PEFT model), ``vllm_merged`` (vLLM with the LoRA merged into its weights) and
  ``vllm_adapter`` (vLLM applying the adapter as a LoRA request);
* ``sync_s``: one ``push_weights`` in each sync mode, with the bytes it moves.

One colocated vLLM engine (LoRA enabled) serves both vLLM modes. Without ``--model`` a randomly
initialised Llama (``--hidden-size``/``--layers``) is built in a temporary directory; on a GPU pass a
real checkpoint directory, e.g. ``--model ~/models/Qwen2.5-0.5B --dtype bfloat16 --lora-r 16``.

Run ``python scripts/bench_sampling.py [--prompts 8 --n 4 --max-new-tokens 32 --runs 3] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

# vLLM logs to stdout by default; keep stdout for the result line.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from align.models.tiny import tiny_llama, word_tokenizer  # noqa: E402
from align.sampling import HFSampler, SamplingParams  # noqa: E402
from align.sampling.vllm import VLLMSampler, vllm_weights  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: build a random tiny Llama)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, ... for both backends")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--n", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="HF policy device")
    p.add_argument("--json", metavar="PATH", help="also write the result to this file")
    return p.parse_args()


def build_tiny(path: str, hidden_size: int, layers: int) -> None:
    tokenizer = word_tokenizer([f"w{i}" for i in range(2000)])
    # head size 64: vLLM's CPU attention has no kernel for head sizes under 32
    model = tiny_llama(len(tokenizer), hidden_size=hidden_size, layers=layers, heads=hidden_size // 64,
                       intermediate_size=4 * hidden_size, max_positions=1024, seed=0,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def timed(fn, runs: int) -> tuple[float, list]:
    """Median wall time of ``runs`` calls after a warm-up, and the last result."""
    fn()
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    args = parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="align-bench-")
    path = args.model or tmp.name
    if args.model is None:
        build_tiny(path, args.hidden_size, args.layers)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device)
    policy = get_peft_model(base, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear"))
    policy.eval()

    rng = random.Random(0)
    specials = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in specials]
    prompts = [[tokenizer.bos_token_id] + rng.choices(vocab, k=args.prompt_len - 1) for _ in range(args.prompts)]

    def throughput(sampler) -> float:
        seconds, out = timed(lambda: sampler.sample(prompts, params), args.runs)
        return sum(map(len, out.completion_ids)) / seconds

    result = {"model": args.model or f"random-llama-h{args.hidden_size}-l{args.layers}", "dtype": args.dtype,
              "device": args.device, "lora_r": args.lora_r, "prompts": args.prompts, "prompt_len": args.prompt_len,
              "n": args.n, "max_new_tokens": args.max_new_tokens, "runs": args.runs}
    params = SamplingParams(n=args.n, max_new_tokens=args.max_new_tokens, seed=0)
    tokens_per_s = {"hf": throughput(HFSampler(policy, tokenizer, batch_size=args.hf_batch_size))}

    start = time.perf_counter()
    vllm = VLLMSampler(policy, tokenizer, sync="adapter", enable_lora=True, model_path=path, dtype=args.dtype,
                       tensor_parallel_size=args.tensor_parallel_size,
                       gpu_memory_utilization=args.gpu_memory_utilization)
    result["vllm_start_s"] = time.perf_counter() - start
    sync_s = {}
    for mode in ("merged", "adapter"):
        vllm.sync = mode
        sync_s[mode], _ = timed(vllm.push_weights, args.runs)
        tokens_per_s[f"vllm_{mode}"] = throughput(vllm)
    vllm.close()

    merged_bytes = sum(t.numel() * t.element_size() for _, t in vllm_weights(policy))
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in policy.named_parameters() if "lora_" in n)
    result.update(tokens_per_s=tokens_per_s, sync_s=sync_s,
                  sync_bytes={"merged": merged_bytes, "adapter": adapter_bytes},
                  vllm_version=__import__("vllm").__version__, torch_threads=torch.get_num_threads())
    print(json.dumps(result), file=sys.stdout, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":  # vLLM starts worker processes
    main()
