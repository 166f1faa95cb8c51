"""Base success rate of a chat model on builtin:constraints, per kind (strict, shaped, greedy).

    python scripts/probe_constraints.py --model /work/models/smollm2-135m-instruct \
        --prompts 4 --samples 4 --max-new-tokens 96 --also-at 64 --out probe.json

For each kind: ``--prompts`` held-out prompts, ``--samples`` completions each at temperature 1 (no top-k/top-p,
so samples come from the model itself) and one greedy completion. Completions that did not emit EOS are
marked unfinished. ``--also-at`` re-scores the same samples cut to fewer tokens (as if max_new_tokens
were smaller). Prints a markdown table; ``--out`` also writes every completion and its scores as JSON.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.rewards.constraints import KINDS, constraint_prompts, constraint_reward, shaped_constraint_reward


def generate(model, tok, texts: list[str], n: int, max_new_tokens: int, sample: bool, seed: int):
    """Completion token ids (EOS and padding removed) and whether each ended with EOS, ``n`` per prompt."""
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    extra = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=n,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra)
    completions = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        ended = tok.eos_token_id in row
        completions.append((row[: row.index(tok.eos_token_id)] if ended else row, ended))
    return completions


def score(tok, prompts, completions, limit):
    """(strict, shaped) rewards of ``completions`` cut to ``limit`` tokens."""
    texts = [tok.decode(ids[:limit], skip_special_tokens=True) for ids, _ in completions]
    finished = [ended and len(ids) < limit for ids, ended in completions]  # the EOS itself fits in the limit
    return texts, finished, constraint_reward(prompts, texts, finished), shaped_constraint_reward(prompts, texts, finished)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/models/smollm2-135m-instruct")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--also-at", type=int, nargs="*", default=[64])
    parser.add_argument("--kinds", nargs="*", default=sorted(KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    limits = [args.max_new_tokens] + sorted(args.also_at, reverse=True)
    header = ["kind"] + [f"{name}@{limit}" for limit in limits for name in ("strict", "shaped", "ended", "greedy")]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    records, totals = [], {h: [] for h in header[1:]}
    for kind in args.kinds:
        rows = constraint_prompts(args.split, args.prompts, args.seed, kinds=[kind])
        texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
        sampled = generate(model, tok, texts, args.samples, args.max_new_tokens, True, args.seed)
        greedy = generate(model, tok, texts, 1, args.max_new_tokens, False, args.seed)
        cells = [kind]
        for limit in limits:
            prompts = [t for t in texts for _ in range(args.samples)]
            out, finished, strict, shaped = score(tok, prompts, sampled, limit)
            _, _, greedy_strict, _ = score(tok, texts, greedy, limit)
            for name, values in (("strict", strict), ("shaped", shaped), ("ended", finished), ("greedy", greedy_strict)):
                totals[f"{name}@{limit}"] += list(map(float, values))
                cells.append(f"{sum(values) / len(values):.2f}")
            if limit == args.max_new_tokens:
                records += [{"kind": kind, "prompt": p, "completion": c, "finished": f, "strict": s, "shaped": h}
                            for p, c, f, s, h in zip(prompts, out, finished, strict, shaped)]
        print("| " + " | ".join(cells) + " |", flush=True)
    print("| all | " + " | ".join(f"{sum(v) / len(v):.2f}" for v in totals.values()) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
