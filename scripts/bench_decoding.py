"""Tokens/s of align's contrastive search vs transformers 4.x's built-in one and vs greedy ``generate``.

    python scripts/bench_decoding.py --tf4-python /work/tf4venv/bin/python [--repeats 5] [--threads 1]

All three decode the same locally built Llama (fp32, weights from a config and a seed, checked bit-identical across
the two environments by SHA-256) from the same random prompts, with no EOS so every row runs --new-tokens steps.
transformers 4.x (≤ 4.55, the last with contrastive search in its core) runs in its own environment, in a worker
subprocess of this script that waits for requests on stdin, so only one of the two processes computes at a time.
The three are timed in turn, run after run, so that they share whatever load the machine has. Both wall-clock and
CPU time (``time.process_time``, which a loaded machine inflates less) are reported.

Prints one JSON line per measurement (medians of --repeats timed runs after one warm-up run each), then one line
per comparison, with whether align's tokens equal transformers 4.x's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import transformers
from make_contrastive_reference import weights_sha256  # this script's folder is on sys.path

MODEL = dict(  # ~35M parameters
    vocab_size=16000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
)


def build_model(seed: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(**MODEL)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def prompts(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, MODEL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def timed(fn) -> tuple[float, float, torch.Tensor]:
    """(wall seconds, CPU seconds, output) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def hf_generate(model, ids, args, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=args.new_tokens, pad_token_id=0, **kwargs,
        )


def worker(args) -> None:
    """transformers 4.x's contrastive search, one run per ``{"batch": B}`` line on stdin."""
    model = build_model(args.seed)
    print(json.dumps({"weights_sha256": weights_sha256(model)}), flush=True)
    for line in sys.stdin:
        batch = json.loads(line)["batch"]
        ids = prompts(batch, args.prompt_length, args.seed)
        wall, cpu, out = timed(
            lambda: hf_generate(model, ids, args, penalty_alpha=args.penalty_alpha, top_k=args.top_k)
        )
        print(json.dumps({"wall": wall, "cpu": cpu, "ids": out.tolist()}), flush=True)


def measurement(impl: str, batch: int, runs: list[tuple[float, float]], args, versions: dict, **extra) -> dict:
    wall = statistics.median(run[0] for run in runs)
    cpu = statistics.median(run[1] for run in runs)
    tokens = batch * args.new_tokens
    contrastive = "contrastive" in impl
    line = {
        "impl": impl, "batch": batch, "new_tokens": args.new_tokens, "prompt_length": args.prompt_length,
        "penalty_alpha": args.penalty_alpha if contrastive else None, "top_k": args.top_k if contrastive else None,
        "tokens_per_s": round(tokens / wall, 2), "tokens_per_cpu_s": round(tokens / cpu, 2),
        "wall_s": [round(run[0], 3) for run in runs], "cpu_s": [round(run[1], 3) for run in runs],
        "threads": torch.get_num_threads(), **versions, **extra,
    }
    print(json.dumps(line), flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf4-python", default="/work/tf4venv/bin/python",
                        help="python of an environment with transformers <= 4.55")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--penalty-alpha", type=float, default=0.6)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in both environments (1: steady figures on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return

    from align.decoding import contrastive_search

    tf4_version = subprocess.run(
        [args.tf4_python, "-c", "import transformers; print(transformers.__version__)"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    forwarded = ["new_tokens", "prompt_length", "penalty_alpha", "top_k", "threads", "seed"]
    command = [args.tf4_python, __file__, "--worker"]
    for name in forwarded:
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    tf4 = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def tf4_run(batch: int) -> tuple[float, float, list]:
        tf4.stdin.write(json.dumps({"batch": batch}) + "\n")
        tf4.stdin.flush()
        reply = json.loads(tf4.stdout.readline())
        return reply["wall"], reply["cpu"], reply["ids"]

    model = build_model(args.seed)
    if weights_sha256(model) != json.loads(tf4.stdout.readline())["weights_sha256"]:
        sys.exit("the two environments built different weights from the same config and seed")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    tf4_versions = {"torch": torch.__version__, "transformers": tf4_version}

    medians = {}
    for batch in args.batch_sizes:
        ids = prompts(batch, args.prompt_length, args.seed)
        impls = {
            "align_contrastive_search": lambda: timed(lambda: contrastive_search(
                model, ids, penalty_alpha=args.penalty_alpha, top_k=args.top_k, max_new_tokens=args.new_tokens
            )),
            "transformers4_contrastive_search": lambda: tf4_run(batch),
            "transformers_greedy_generate": lambda: timed(lambda: hf_generate(model, ids, args)),
        }
        warm = {name: run()[2] for name, run in impls.items()}
        identical = warm["align_contrastive_search"].tolist() == warm["transformers4_contrastive_search"]
        runs = {name: [] for name in impls}
        for _ in range(args.repeats):
            for name, run in impls.items():
                runs[name].append(run()[:2])
        for name in impls:
            extra = {"identical_to_transformers4": identical} if name == "align_contrastive_search" else {}
            env = tf4_versions if name.startswith("transformers4") else versions
            medians[name, batch] = measurement(name, batch, runs[name], args, env, **extra)

    tf4.stdin.close()
    tf4.wait()
    for batch in args.batch_sizes:
        align = medians["align_contrastive_search", batch]
        tf4_line = medians["transformers4_contrastive_search", batch]
        greedy = medians["transformers_greedy_generate", batch]
        for label, fast, slow in (("speedup_vs_transformers4", align, tf4_line),
                                  ("slowdown_vs_greedy", greedy, align)):
            print(json.dumps({
                "comparison": label, "batch": batch,
                "by_wall_time": round(fast["tokens_per_s"] / slow["tokens_per_s"], 3),
                "by_cpu_time": round(fast["tokens_per_cpu_s"] / slow["tokens_per_cpu_s"], 3),
                "identical_to_transformers4": align["identical_to_transformers4"],
            }), flush=True)

if __name__ == "__main__":
    main()
