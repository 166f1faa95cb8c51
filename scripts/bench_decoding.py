"""Tokens/s of align's contrastive search vs transformers 4.55's built-in one and vs greedy ``generate``, per shape.

    python scripts/bench_decoding.py [--shape readme llama38m smollm2] [--model DIR ...] [--batch 8]
        [--repeats 3] [--threads 1] [--tf4-python /work/venv455/bin/python] [--device cpu] [--dtype float32]
        [--json out.json]

Shapes (``--shape``; all three unless ``--model DIR ...`` names Hugging Face causal-LM directories instead):

* ``readme``: the README's locally built Llama (~35M parameters: vocabulary 16000, width 512, 6 layers), random
  prompts of 32 tokens, 128 new tokens.
* ``llama38m``: a 38M Llama (vocabulary 16384, width 512, 8 layers, untied head), same prompts and length.
* ``smollm2``: SmolLM2-135M-Instruct (30 layers, GQA 9/3 heads, vocabulary 49152, tied embeddings), from
  ``--smollm2`` (default: $ALIGN_REAL_MODEL, else /work/models/smollm2-135m-instruct; skipped if absent): --batch chat
  prompts through its chat template, left padded, 64 new tokens. A ``--model DIR`` is run the same way.

The built shapes are made from a config and a seed in both environments, and every model's weights and buffers
(RoPE's frequencies included) are checked bit-identical across the two by SHA-256. All run in fp32 with EOS off, so
every row decodes every step. transformers 4.55 (the last with contrastive search in its core) runs in its own
environment (``python3 -m venv /work/venv455 && /work/venv455/bin/pip install torch==2.13.0 transformers==4.55.4``),
in a worker subprocess that waits for prompts on stdin, so only one of the two processes computes at a time. After a
short warm-up, each repeat times align, transformers 4.55 and greedy once each, in an order that rotates from repeat
to repeat, so that the three share whatever load the machine has. Figures are medians; ratios divide medians of the
same run, by wall-clock and by CPU time (``time.process_time``, which a machine shared with other jobs inflates less).
align's tokens are compared with transformers 4.55's on every timed run.

Without a transformers 4.55 environment (``--tf4-python`` missing or empty, e.g. on a GPU machine) it says so and
compares align with greedy only. ``--device cuda`` and ``--dtype`` (default float32) move the models of both
environments; the weights are checked before, in fp32.

Prints one JSON line per shape, then a table; ``--json`` writes everything to a file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

# This script's folder is on sys.path.
from make_contrastive_reference import build, load_pretrained, weights_sha256


def llama(vocab: int, hidden: int, layers: int, intermediate: int) -> dict:
    """A spec for ``make_contrastive_reference.build``: an fp32 Llama with heads of 64, no BOS/EOS."""
    config = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=512,
                  bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    return {"config_class": "LlamaConfig", "model_class": "LlamaForCausalLM", "config": config}


BUILT_SHAPES = {  # name -> (model spec, prompt length, new tokens)
    "readme": (llama(16000, 512, 6, 1376), 32, 128),
    "llama38m": (llama(16384, 512, 8, 1024), 32, 128),
}
CHAT_NEW_TOKENS = 64
CHAT_QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain recursion to a child.",
    "Give three tips for learning a new language.", "Why is the sky blue?",
    "Summarise the plot of Hamlet in two sentences.", "What is 17 times 23?", "Describe a famous painting.",
    "How do vaccines work?", "Suggest a name for a bakery.", "What causes the seasons?", "Tell me a short joke.",
]
SEED = 0


def load_model(source: dict) -> torch.nn.Module:
    """The model of a shape: built from a spec and a seed, or read from a directory (fp32, EOS off)."""
    model = build(source["spec"], SEED) if "spec" in source else load_pretrained(source["dir"])
    # generate() fills a generation config's unset fields from the model's own, so EOS goes off there.
    model.generation_config.eos_token_id = None
    return model.eval()


def model_digest(model: torch.nn.Module) -> dict:
    """SHA-256 of the weights and of each buffer (e.g. RoPE's inverse frequencies, which config fields set)."""
    buffers = {name: hashlib.sha256(buffer.detach().contiguous().numpy().tobytes()).hexdigest()
               for name, buffer in model.named_buffers()}
    return {"weights": weights_sha256(model), "buffers": buffers}


def same_model(digest: dict, other: dict) -> bool:
    """Same weights, and same buffers where both have one of that name (transformers 5 adds a few)."""
    common = digest["buffers"].keys() & other["buffers"].keys()
    return digest["weights"] == other["weights"] and all(digest["buffers"][n] == other["buffers"][n] for n in common)


def random_prompts(batch: int, length: int, vocab: int) -> tuple[list, list]:
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(SEED))
    return ids.tolist(), torch.ones_like(ids).tolist()


def chat_prompts(model_dir: str, batch: int) -> tuple[list, list, int]:
    """``batch`` questions through the tokenizer's chat template (plain text without one), left padded."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    questions = [CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)] for i in range(batch)]
    if tokenizer.chat_template is not None:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                               add_generation_prompt=True) for q in questions]
    else:
        texts = questions
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenizer.pad_token_id, tokenizer.padding_side = pad, "left"
    encoded = tokenizer(texts, padding=True, add_special_tokens=tokenizer.chat_template is None)
    return encoded["input_ids"], encoded["attention_mask"], pad


def timed(fn) -> tuple[float, float, list]:
    """(wall seconds, CPU seconds, output ids) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out.tolist()


def hf_generate(model, request: dict, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(
            input_ids=torch.tensor(request["input_ids"], device=model.device),
            attention_mask=torch.tensor(request["attention_mask"], device=model.device),
            do_sample=False, max_new_tokens=request["new_tokens"], pad_token_id=request["pad"], **kwargs,
        )


def on_device(model: torch.nn.Module, source: dict) -> torch.nn.Module:
    return model.to(device=source.get("device", "cpu"), dtype=getattr(torch, source.get("dtype", "float32")))


def worker(source: dict) -> None:
    """transformers 4.55's contrastive search, one run per JSON request line on stdin."""
    model = load_model(source)
    print(json.dumps({"model_digest": model_digest(model), "transformers": transformers.__version__}), flush=True)
    model = on_device(model, source)
    for line in sys.stdin:
        request = json.loads(line)
        settings = {"penalty_alpha": request["penalty_alpha"], "top_k": request["top_k"]}
        wall, cpu, ids = timed(lambda: hf_generate(model, request, **settings))  # noqa: B023 (called at once)
        print(json.dumps({"wall": wall, "cpu": cpu, "ids": ids}), flush=True)


class Transformers455:
    """The worker subprocess in the transformers 4.55 environment, for one model."""

    def __init__(self, python: str, source: dict, threads: int):
        command = [python, __file__, "--worker", json.dumps(source), "--threads", str(threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONPATH": ""})  # nothing of this environment's
        hello = self.reply()
        self.model_digest, self.version = hello["model_digest"], hello["transformers"]

    def reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            sys.exit(f"the transformers 4.55 worker exited (code {self.process.wait()}); see its error above")
        return json.loads(line)

    def __call__(self, request: dict) -> tuple[float, float, list]:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self.reply()
        return reply["wall"], reply["cpu"], reply["ids"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def shape_sources(args) -> dict[str, dict]:
    """name -> {"spec" or "dir", "new_tokens", "prompt_length"?} for every shape asked for."""
    sources = {}
    for name in args.shape:
        if name == "smollm2":
            if not Path(args.smollm2, "config.json").exists():
                print(f"skipping smollm2: no model at {args.smollm2} (set ALIGN_REAL_MODEL or --smollm2)", flush=True)
                continue
            sources[name] = {"dir": str(Path(args.smollm2).resolve()), "new_tokens": CHAT_NEW_TOKENS}
        else:
            spec, prompt_length, new_tokens = BUILT_SHAPES[name]
            sources[name] = {"spec": spec, "prompt_length": prompt_length, "new_tokens": new_tokens}
    for directory in args.model:
        sources[Path(directory).name] = {"dir": str(Path(directory).resolve()), "new_tokens": CHAT_NEW_TOKENS}
    if args.new_tokens:
        for source in sources.values():
            source["new_tokens"] = args.new_tokens
    return sources


def bench_shape(name: str, source: dict, args) -> dict:
    from align.decoding import contrastive_search

    model = load_model(source)
    placement = {"device": args.device, "dtype": args.dtype}
    tf4 = None
    if args.tf4_python:
        tf4 = Transformers455(args.tf4_python, {**{key: source[key] for key in ("spec", "dir") if key in source},
                                                **placement}, args.threads)
        if not same_model(model_digest(model), tf4.model_digest):
            sys.exit(f"{name}: the two environments hold different weights or buffers")
    model = on_device(model, placement)
    if "spec" in source:
        input_ids, attention_mask = random_prompts(args.batch, source["prompt_length"], model.config.vocab_size)
        pad = 0
    else:
        input_ids, attention_mask, pad = chat_prompts(source["dir"], args.batch)
    request = dict(input_ids=input_ids, attention_mask=attention_mask, pad=pad, penalty_alpha=args.penalty_alpha,
                   top_k=args.top_k)
    ids, mask = torch.tensor(input_ids, device=model.device), torch.tensor(attention_mask, device=model.device)

    def run(impl: str, new_tokens: int) -> tuple[float, float, list]:
        if impl == "align":
            return timed(lambda: contrastive_search(model, ids, mask, penalty_alpha=args.penalty_alpha,
                                                    top_k=args.top_k, max_new_tokens=new_tokens))
        if impl == "transformers455":
            return tf4({**request, "new_tokens": new_tokens})
        return timed(lambda: hf_generate(model, {**request, "new_tokens": new_tokens}))

    impls = ["align", "transformers455", "greedy"] if tf4 else ["align", "greedy"]
    for impl in impls:  # warm-up: allocator, kernels, lazy imports
        run(impl, args.warmup_tokens)
    new_tokens = source["new_tokens"]
    runs = {impl: [] for impl in impls}
    identical = True
    for repeat in range(args.repeats):
        outputs = {}
        for impl in impls[repeat % len(impls):] + impls[: repeat % len(impls)]:  # rotating order
            wall, cpu, outputs[impl] = run(impl, new_tokens)
            runs[impl].append((wall, cpu))
        if any(len(row) != len(input_ids[0]) + new_tokens for out in outputs.values() for row in out):
            sys.exit(f"{name}: a run stopped before {new_tokens} new tokens")
        if tf4:
            identical &= outputs["align"] == outputs["transformers455"]
    if tf4:
        tf4.close()

    tokens = args.batch * new_tokens
    result = {
        "shape": name, "parameters": sum(p.numel() for p in model.parameters()), "batch": args.batch,
        "prompt_length": len(input_ids[0]), "new_tokens": new_tokens, "penalty_alpha": args.penalty_alpha,
        "top_k": args.top_k, "threads": args.threads, "repeats": args.repeats, **placement,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "transformers_reference": tf4.version if tf4 else None},
        "identical_to_transformers455": identical if tf4 else None,
    }
    for impl in impls:
        walls, cpus = [timing[0] for timing in runs[impl]], [timing[1] for timing in runs[impl]]
        result[impl] = {"tokens_per_s": round(tokens / statistics.median(walls), 2),
                        "tokens_per_cpu_s": round(tokens / statistics.median(cpus), 2),
                        "wall_s": [round(wall, 3) for wall in walls], "cpu_s": [round(cpu, 3) for cpu in cpus]}
    for label, fast, slow in (("align_vs_transformers455", "align", "transformers455"),
                              ("greedy_vs_align", "greedy", "align")):
        if slow not in impls:
            continue
        result[label] = {"by_wall_time": round(result[fast]["tokens_per_s"] / result[slow]["tokens_per_s"], 3),
                         "by_cpu_time": round(result[fast]["tokens_per_cpu_s"] / result[slow]["tokens_per_cpu_s"], 3)}
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict]) -> str:
    """One row per shape: tokens/s (wall clock) and the ratios by wall-clock and by CPU time."""
    header = ("shape", "params", "prompt", "new", "align tok/s", "4.55 tok/s", "greedy tok/s",
              "align/4.55 wall|cpu", "greedy/align wall|cpu", "identical")

    def ratio(r: dict, label: str) -> str:
        return f"{r[label]['by_wall_time']:.2f}x | {r[label]['by_cpu_time']:.2f}x" if label in r else "-"

    def identical(r: dict) -> str:
        return {True: "yes", False: "NO", None: "-"}[r["identical_to_transformers455"]]

    rows = [header] + [(
        r["shape"], f"{r['parameters'] / 1e6:.0f}M", str(r["prompt_length"]), str(r["new_tokens"]),
        f"{r['align']['tokens_per_s']:.1f}",
        f"{r['transformers455']['tokens_per_s']:.1f}" if "transformers455" in r else "-",
        f"{r['greedy']['tokens_per_s']:.1f}", ratio(r, "align_vs_transformers455"), ratio(r, "greedy_vs_align"),
        identical(r),
    ) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="*", choices=["readme", "llama38m", "smollm2"],
                        help="default: all three, or none if --model is given")
    parser.add_argument("--model", nargs="*", default=[], help="model directories, run like smollm2")
    parser.add_argument("--smollm2", default=os.environ.get("ALIGN_REAL_MODEL", "/work/models/smollm2-135m-instruct"))
    parser.add_argument("--tf4-python", default="/work/venv455/bin/python",
                        help="python of an environment with transformers 4.55 (the last with contrastive search)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=0, help="override every shape's number of new tokens")
    parser.add_argument("--penalty-alpha", type=float, default=0.6)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each implementation (medians)")
    parser.add_argument("--warmup-tokens", type=int, default=4, help="new tokens of the untimed warm-up runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in both environments (1: steady figures on a shared machine)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every model runs")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="every model's dtype (fp32: tokens comparable with transformers 4.55's)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.shape is None:
        args.shape = [] if args.model else ["readme", "llama38m", "smollm2"]
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.tf4_python and not Path(args.tf4_python).exists():
        print(f"no python at {args.tf4_python}: align against greedy only (for transformers 4.55's contrastive search, "
              "make its environment, see this script's docstring)", flush=True)
        args.tf4_python = ""

    results = [bench_shape(name, source, args) for name, source in shape_sources(args).items()]
    print(f"\ncontrastive search, batch {args.batch}, alpha {args.penalty_alpha}, k {args.top_k}, {args.device} {args.dtype}, "
          f"{args.threads} thread(s), medians of {args.repeats} runs\n" + table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    if any(r["identical_to_transformers455"] is False for r in results):
        sys.exit("align's tokens differ from transformers 4.55's")


if __name__ == "__main__":
    main()
