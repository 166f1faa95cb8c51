"""Seconds per optimizer step, tokens/s and peak memory of align's trainers against TRL's: same model, same data.

    python scripts/bench_train.py [--shape all] [--json bench_train.json]   # both shapes, ~15 min on 2 slow cores
    python scripts/bench_train.py --shape synthetic --repeats 2 --steps 4   # more rounds, more timed steps
    python scripts/bench_train.py --sweep [--json sweep.json]     # how align's step grows (README, scaling)
    python scripts/bench_train.py --layout compare [--only align_cpl align_reward]   # packed, shared prefix / padded

Two model shapes (``--shape``; ``all``, the default, runs both, one after the other):
- ``synthetic``: a locally built Llama (42M parameters, weights from a config and a seed) on synthetic scored
  preference pairs of random words (prompt ~32 tokens, completions ~64 ± 25%), batch 8 pairs;
- ``smollm2``: SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``, resolved by ``align.models.resolve``:
  30 layers, GQA, tied embeddings, vocabulary 49152) with its own tokenizer and chat template on conversational
  pairs (a user turn of 8-16 words, assistant completions of ~32 ± 25% tokens, words that are one token each),
  batch 4 pairs. Skipped, with a message, when the model is not installed.
Every trainer gets a LoRA adapter (r=16, all linear layers, no gradient checkpointing), fp32 on a CPU, bf16
(mixed precision) on a GPU (``--dtype``). TRL's DPOTrainer (sigmoid, ipo) and RewardTrainer get the model and a
``peft_config``; align's trainers are built by ``align.api.build_trainer``, the code of ``align train``, with its
defaults (so batches are grouped by length: less padding). Each run (one trainer) is its own process; the runs
take turns, each next to its TRL baseline, in reverse order every other round, so a changing load on a shared
machine hits all of them alike.

Two measurements per run, in its process, memory first (the process as fresh as a process of its own):
- memory: on pairs whose prompts and completions all have the mean lengths (so every trainer's batches have one
  shape), the peak resident memory (VmHWM) of step 2 and "train MB", that peak minus the resident memory before
  the step (see ``start_memory_step``); and "step MB", the most tensor memory held at once during step 3 above
  what was held at its start, from the profiler's record of every allocation (exact; the RSS varies by a few
  percent between runs). On a GPU: the peak allocated memory.
- time: a second trainer of the same run on ``--rows`` pairs: after ``--warmup`` steps, the median seconds per
  optimizer step over ``--steps`` steps, the real (non-pad) tokens of the policy forward per second, and the
  same per CPU-second of the process (all its threads).
The table shows the median over rounds; each ratio is the median over rounds of align/TRL measured in the same
round. On a machine shared with other work, use ``--threads 1`` and compare tokens per CPU-second: with two
threads, a step took 7 s when both got a core and 27 s when they shared one (spinning at every barrier), and its
CPU time changed with it; one thread's CPU time does not depend on how often it is descheduled.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VOCAB, HIDDEN, LAYERS = 16384, 512, 8  # with LlamaConfig's other sizes below: ~42M parameters
PROMPT_WORDS = (24, 40)  # uniform range: 32 tokens on average (+ BOS); completions: --completion-tokens ± 25%
# shape -> its defaults: the model (built, or a spec for align.models.resolve), batch (pairs), mean completion
# tokens, and the words of a prompt (the real model's chat template adds ~30 tokens of its own around them)
SHAPES = {
    "synthetic": {"model": None, "batch": 8, "completion_tokens": 64, "prompt_words": PROMPT_WORDS},
    "smollm2": {"model": "builtin:smollm2-135m-instruct", "batch": 4, "completion_tokens": 32, "prompt_words": (8, 16)},
}
LORA = dict(r=16, alpha=32, target_modules="all-linear")
MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 64

# name -> (library, trainer, loss); the TRL rows are the baselines of the ratios below, each run next to its own.
RUNS = {
    "trl_dpo": ("trl", "dpo", "sigmoid"),
    "align_dpo": ("align", "dpo", "sigmoid"),
    "align_cpl": ("align", "cpl", None),
    "align_copg": ("align", "copg", None),
    # precompute_ref_logps (only with --only: its one reference pass over all --rows pairs takes ~2 min here)
    "align_dpo_precomputed": ("align", "dpo", "sigmoid"),
    "trl_ipo": ("trl", "dpo", "ipo"),
    "align_ipo": ("align", "dpo", "ipo"),
    "trl_reward": ("trl", "reward", None),
    "align_reward": ("align", "reward", None),
}
# --sweep: offline CoPG (reference forward, groups of k), one setting changed at a time from the default
# (completion 64 tokens, batch 8 prompts, k = 2, 42M parameters); the k points use batch 4, like "batch 4".
SWEEP = [("base", {}), ("completion_tokens", {"completion_tokens": 32}), ("completion_tokens", {"completion_tokens": 128}),
         ("batch", {"batch": 4}), ("batch", {"batch": 16}), ("k", {"batch": 4, "k": 4}), ("k", {"batch": 4, "k": 8}),
         ("params", {"hidden": 256, "layers": 4}), ("params", {"hidden": 768, "layers": 8}),
         ("params", {"hidden": 1024, "layers": 8})]
RATIOS = {  # ratio name -> (align run, TRL run)
    "cpl_vs_trl_dpo": ("align_cpl", "trl_dpo"),
    "dpo_vs_trl_dpo": ("align_dpo", "trl_dpo"),
    "ipo_vs_trl_ipo": ("align_ipo", "trl_ipo"),
    "copg_vs_trl_dpo": ("align_copg", "trl_dpo"),
    "reward_vs_trl_reward": ("align_reward", "trl_reward"),
}


# --- the worker: one trainer, one process ---------------------------------------------------------------
def synthetic_rows(n: int, words: list[str], completion_tokens: int, k: int, seed: int, fixed: bool,
                   prompt_words: tuple[int, int] = PROMPT_WORDS, chat: bool = False) -> list[dict]:
    """Scored pairs (k = 2) or groups of k completions, of random ``words`` (one token each): prompts of
    ``prompt_words`` words and completions of ``completion_tokens`` ± 25% tokens, or with ``fixed`` exactly the
    mean lengths (every batch then has the same shape in every trainer: the memory runs). ``chat``: as
    conversations (a user turn, assistant turns), which both libraries render with the chat template."""
    rng = random.Random(seed)
    completion_words = (round(0.75 * completion_tokens), round(1.25 * completion_tokens) - 1)  # + EOS
    if fixed:
        completion_words = (completion_tokens - 1,) * 2

    def text(lo_hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(*lo_hi)))

    def turn(role: str, content: str):
        return [{"role": role, "content": content}] if chat else content

    rows = []
    for _ in range(n):
        prompt = turn("user", text((sum(prompt_words) // 2,) * 2 if fixed else prompt_words))
        completions = [turn("assistant", ("" if chat else " ") + text(completion_words)) for _ in range(k)]
        rewards = sorted((rng.gauss(0, 1) for _ in range(k)), reverse=True)
        if k == 2:
            rows.append({"prompt": prompt, "chosen": completions[0], "rejected": completions[1],
                         "chosen_reward": rewards[0], "rejected_reward": rewards[1]})
        else:
            rows.append({"prompt": prompt, "completions": completions, "rewards": rewards})
    return rows


def proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def start_memory_step(device: str) -> float:
    """Before the (untimed) memory step: on a CPU, make resident memory follow the live tensors, then reset
    the peak; returns the memory in use before the step. glibc's adaptive mmap threshold keeps freed blocks of
    up to 32 MiB in its heap, so the peak RSS of the very same step varied by ±20%; with a fixed 64 KiB
    threshold every larger block goes back to the system when freed (the mmap/munmap calls cost time, hence
    not during the timed steps)."""
    import ctypes

    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return memory_mb(device, peak=False)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    return memory_mb(device, peak=False)


def memory_mb(device: str, peak: bool) -> float:
    import torch

    if device == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20
    return proc_status_mb("VmHWM" if peak else "VmRSS")


def start_tensor_profile(device: str):
    """Starts recording every tensor allocation and free of the next step (CPU); on a GPU, resets the peak."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    profiler.start()
    return profiler


def tensor_peak_mb(profiler, device: str) -> float:
    """The most tensor memory held at once during the profiled step, above what was held at its start: the
    activations, gradients and temporaries of one step, exactly, whatever the allocator keeps cached (the
    resident memory of the same step varies by a few percent between runs; this does not)."""
    import torch
    from torch._C._profiler import _EventType

    if device == "cuda":
        return (torch.cuda.max_memory_allocated() - profiler) / 2**20
    profiler.stop()
    allocations, stack = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))  # frees are negative
        stack.extend(node.children)
    held = peak = 0
    for _, size in sorted(allocations):
        held += size
        peak = max(peak, held)
    return peak / 2**20


def one_token_words(tokenizer) -> list[str]:
    """Lower-case words that are one token both alone and after a space (SmolLM2's byte-level BPE: ``w`` and
    ``Ġw``): any text of n such words, at the start of a turn or inside it, is n tokens."""
    vocab = tokenizer.get_vocab()
    return sorted(w for w in vocab if w.isascii() and w.isalpha() and w.islower() and len(w) > 2 and "Ġ" + w in vocab)


def prepare_model(args, workdir: str):
    """(model directory, tokenizer, words of the data, parameters) of the run's shape: the synthetic Llama built
    and saved in ``workdir`` (seeded, so every run loads the same weights), or the real model's directory."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from align.models.tiny import tiny_llama, word_tokenizer

    if args.shape == "synthetic":
        words = [f"w{i}" for i in range(VOCAB - 8)]
        tokenizer = word_tokenizer(words)  # + 8 special and chat tokens
        model = tiny_llama(VOCAB, hidden_size=args.hidden, layers=args.layers, heads=args.hidden // 64,
                           intermediate_size=args.hidden * 43 // 16, max_positions=2 * MAX_LENGTH, seed=0)
        model_dir = os.path.join(workdir, "model")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
    else:
        model_dir = args.model_dir
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        words = one_token_words(tokenizer)
    n_params = 0
    for path in sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors")):
        with safe_open(os.path.join(model_dir, path), "pt") as f:
            n_params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    return model_dir, tokenizer, words, n_params


def build_trainer(name: str, args, model_dir: str, tokenizer, rows: list[dict], steps: int, workdir: str):
    """The trainer of run ``name`` on ``rows`` for ``steps`` steps, with the same training settings in every run.
    align's trainers are built by ``align.api.build_trainer``, the path of ``align train``; TRL's by their own
    constructors with a ``peft_config``."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from align import api

    library, kind, loss = RUNS[name]
    cuda, bf16 = args.device == "cuda", args.dtype == "bfloat16"
    common = dict(output_dir=os.path.join(workdir, "out"), per_device_train_batch_size=args.batch,
                  max_steps=steps, learning_rate=1e-4, logging_steps=10_000, save_strategy="no",
                  report_to="none", disable_tqdm=True, seed=args.seed, gradient_checkpointing=False, bf16=bf16,
                  use_cpu=not cuda)

    if library == "align":
        os.makedirs(workdir, exist_ok=True)
        data_path = os.path.join(workdir, "data.jsonl")
        with open(data_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        extra = {"dpo": dict(loss_type=loss, beta=0.1, length_normalize=loss == "ipo"), "copg": dict(beta=0.1)}
        config = api.make_config({"trainer": kind, "model": model_dir, "dataset": data_path, "lora_r": LORA["r"],
                                  "lora_alpha": LORA["alpha"], "max_length": MAX_LENGTH,
                                  "max_prompt_length": MAX_PROMPT_LENGTH, **extra.get(kind, {}), **common,
                                  "precompute_ref_logps": name.endswith("_precomputed"),
                                  "train_sampling_strategy": args.sampling,
                                  **LAYOUT_SETTINGS[args.layout]})
        os.environ["ALIGN_CACHE"] = workdir  # a fresh cache: the precomputation is timed, not read from disk
        start = time.perf_counter()
        trainer = api.build_trainer(config)
        trainer.setup_s = time.perf_counter() - start  # model and data loading, + the reference pass if precomputed
        return trainer

    data = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"],
                             task_type="SEQ_CLS" if kind == "reward" else "CAUSAL_LM")
    if kind == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        return RewardTrainer(model=model, args=RewardConfig(max_length=MAX_LENGTH, **common), train_dataset=data,
                             processing_class=tokenizer, peft_config=peft_config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = DPOConfig(max_length=MAX_LENGTH, loss_type=[loss], beta=0.1, precompute_ref_log_probs=False, **common)
    return DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                      peft_config=peft_config)


MEMORY_STEPS = 3  # a first step (the optimizer state is created), one for the peak RSS, one profiled


def restore_malloc() -> None:
    """After the memory steps, before the timed ones: back from the fixed 64 KiB mmap threshold of
    ``start_memory_step`` (every large free an munmap, slow) to glibc's steady state (its adaptive threshold
    rises with the blocks a process frees, to at most 32 MiB; a threshold once set stays fixed, so set that)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 64 * 2**20)  # M_TRIM_THRESHOLD: twice the threshold, as glibc sets it when adapting


def worker(name: str, args) -> dict:
    """Both measurements of run ``name`` in this process, each with a trainer of its own: first the memory
    steps (the peak RSS of step 2 and the peak tensor memory of step 3, see MEMORY_STEPS) on fixed-length pairs,
    then the timed steps after the warm-up on ``--rows`` pairs."""
    import gc

    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.set_device(0)
    chat = args.shape != "synthetic"
    prompt_words = SHAPES[args.shape]["prompt_words"]

    class StepClock(TrainerCallback):
        def __init__(self, measure: str):
            self.measure = measure
            self.ends: list[tuple[float, float]] = []  # (wall, this process's CPU time: all its threads)

        def on_step_end(self, a, state, control, **kwargs):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.ends.append((time.perf_counter(), time.process_time()))
            if self.measure == "time":
                return
            if state.global_step == 1:
                self.before_mb = start_memory_step(args.device)
            elif state.global_step == 2:
                self.peak_mb = memory_mb(args.device, peak=True)
                self.profiler = start_tensor_profile(args.device)
            elif state.global_step == 3:
                self.step_tensor_mb = tensor_peak_mb(self.profiler, args.device)

    def run(measure: str, workdir: str) -> tuple:
        memory = measure == "memory"
        steps = MEMORY_STEPS if memory else args.warmup + args.steps
        rows = synthetic_rows(args.batch * steps if memory else args.rows, words, args.completion_tokens, args.k,
                              seed=args.seed, fixed=memory, prompt_words=prompt_words, chat=chat)
        trainer = build_trainer(name, args, model_dir, tokenizer, rows, steps, os.path.join(workdir, measure))
        clock = StepClock(measure)
        trainer.add_callback(clock)
        tokens: list[tuple[int, int, int]] = []  # (real, padded, completion) tokens of each policy forward batch
        compute_loss = trainer.compute_loss

        def counted(model, inputs, *a, **k):
            mask = inputs["attention_mask"]
            completion = int(inputs["completion_mask"].sum()) if "completion_mask" in inputs else 0
            tokens.append((int(mask.sum()), mask.numel(), completion))
            return compute_loss(model, inputs, *a, **k)

        trainer.compute_loss = counted
        trainer.train()
        return clock, tokens, getattr(trainer, "setup_s", None)

    with tempfile.TemporaryDirectory() as workdir:
        model_dir, tokenizer, words, n_params = prepare_model(args, workdir)
        clock, tokens, _ = run("memory", workdir)
        result = {"name": name, "peak_mem_mb": clock.peak_mb, "train_mem_mb": clock.peak_mb - clock.before_mb,
                  "step_tensor_mb": clock.step_tensor_mb, "memory_step_tokens": tokens[-1][1]}
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        else:
            restore_malloc()
        clock, tokens, setup_s = run("time", workdir)
    ends = clock.ends[args.warmup - 1 :]
    step_s, cpu_s = ([b[i] - a[i] for a, b in zip(ends, ends[1:])] for i in (0, 1))
    timed = tokens[args.warmup :]
    real, padded, completion = (statistics.mean(t[i] for t in timed) for i in range(3))
    return {**result, "setup_s": setup_s,
            "s_per_step": statistics.median(step_s), "tokens_per_s": real / statistics.median(step_s),
            "cpu_s_per_step": statistics.median(cpu_s), "tokens_per_cpu_s": real / statistics.median(cpu_s),
            "tokens_per_step": real, "padded_tokens_per_step": padded, "completion_tokens_per_step": completion,
            "pad_fraction": 1 - real / padded,
            "loadavg": os.getloadavg()[0], "step_s": step_s, "cpu_s": cpu_s, "params": n_params}


# --- the driver: rounds of worker processes ----------------------------------------------------------------
def available_runs() -> list[str]:
    from align.trainers import TRAINERS

    return [n for n, (lib, kind, _) in RUNS.items() if lib == "trl" or kind in TRAINERS]


def measure(name: str, args, **overrides) -> dict:
    """Both measurements of run ``name`` (see ``worker``) in a process of its own (so its peak memory is its own)."""
    settings = {k: overrides.get(k, getattr(args, k)) for k in WORKER_ARGS}
    cmd = [sys.executable, __file__, "--worker", name]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    print(f"  {settings['shape']} {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(rounds: list[dict[str, dict]]) -> dict:
    names = [n for n in RUNS if all(n in r for r in rounds)]
    rows = []
    for n in names:
        per_round = [r[n] for r in rounds]
        rows.append({
            "name": n,
            "s_per_step": statistics.median(m["s_per_step"] for m in per_round),
            "setup_s": None if per_round[0]["setup_s"] is None else statistics.median(m["setup_s"] for m in per_round),
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in per_round),
            "peak_mem_mb": statistics.median(m["peak_mem_mb"] for m in per_round),
            "train_mem_mb": statistics.median(m["train_mem_mb"] for m in per_round),
            "step_tensor_mb": statistics.median(m["step_tensor_mb"] for m in per_round),
            "cpu_s_per_step": statistics.median(m["cpu_s_per_step"] for m in per_round),
            "tokens_per_cpu_s": statistics.median(m["tokens_per_cpu_s"] for m in per_round),
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
            ratios[key + "_step_mem"] = statistics.median(r[mine]["step_tensor_mb"] / r[theirs]["step_tensor_mb"]
                                                          for r in rounds)
            ratios[key + "_cpu"] = statistics.median(r[mine]["tokens_per_cpu_s"] / r[theirs]["tokens_per_cpu_s"]
                                                     for r in rounds)
    return {"rows": rows, "ratios": ratios, "rounds": rounds}


def print_table(result: dict, header: str) -> None:
    print(header)
    print(f"{'run':21s} {'setup s':>7s} {'s/step':>7s} {'tokens/s':>8s} {'CPU s/step':>10s} {'tok/CPU s':>9s} {'peak MB':>7s} "
          f"{'train MB':>8s} {'step MB':>7s} {'tok/step':>8s} {'pad':>4s}  tokens/s (load average) per round")
    for r in result["rows"]:
        rounds = " ".join(f"{t:.1f} ({l:.1f})" for t, l in zip(r["tokens_per_s_rounds"], r["loadavg_rounds"]))
        setup = "" if r["setup_s"] is None else f"{r['setup_s']:.1f}"
        print(f"{r['name']:21s} {setup:>7s} {r['s_per_step']:7.2f} {r['tokens_per_s']:8.1f} {r['cpu_s_per_step']:10.2f} "
              f"{r['tokens_per_cpu_s']:9.1f} {r['peak_mem_mb']:7.0f} {r['train_mem_mb']:8.0f} {r['step_tensor_mb']:7.0f} "
              f"{r['tokens_per_step']:8.0f} "
              f"{r['pad_fraction']:4.2f}  {rounds}")
    print("align / TRL, median over rounds of the same-round ratio:  tokens/s   tokens/CPU s   peak RSS   step tensors")
    for key, (mine, theirs) in RATIOS.items():
        if key in result["ratios"]:
            q = result["ratios"]
            print(f"  {key:26s} {q[key]:8.3f} {q[key + '_cpu']:14.3f} {q[key + '_mem']:10.3f} "
                  f"{q[key + '_step_mem']:14.3f}")


def cpu_seconds() -> float:
    """CPU time of the finished workers: on an idle machine, the wall time is about this / the cores."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


WORKER_ARGS = ("shape", "model_dir", "steps", "warmup", "rows", "batch", "threads", "device", "dtype", "seed",
               "completion_tokens", "k", "hidden", "layers", "sampling", "layout")
LAYOUT_SETTINGS = {  # --layout -> align's batch layout keys (align.hf_utils.forward_rows)
    "auto": {"padding_free": None, "prefix_sharing": None},
    "padded": {"padding_free": False, "prefix_sharing": False},
    "packed": {"padding_free": True, "prefix_sharing": False},
    "shared_prefix": {"padding_free": False, "prefix_sharing": True},
}


def step_flops(hidden: int, layers: int, rows: int, padded_tokens: float, completion_tokens: float) -> float:
    """FLOPs of one offline CoPG step (README, scaling notes): the policy's forward (2 per weight and token) and
    backward (2: input gradients only, the base weights are frozen; LoRA's r << width adds ~2%), the
    reference forward (2), over every padded token; the LM head over the completion tokens only; attention
    (4·T·width per token and layer forward, 8 backward, 4 reference; T the padded row length)."""
    d_ff = hidden * 43 // 16
    linear = layers * (4 * hidden**2 + 3 * hidden * d_ff)
    width = padded_tokens / rows
    return 6 * linear * padded_tokens + 6 * hidden * VOCAB * completion_tokens + 16 * layers * hidden * width * padded_tokens


def sweep(args) -> dict:
    """How step time and memory grow along each axis (see SWEEP), against the formulas of the README: the
    CPU's achieved FLOP/s under ``step_flops`` (constant if the formula captures the growth), and the
    activation bytes per token, layer and unit of width (constant if memory grows as tokens x layers x width)."""
    rows = []
    print(f"{'axis':17s} {'setting':38s} {'params':>7s} {'rows':>4s} {'tokens':>6s} {'s/step':>7s} {'GFLOP/s':>7s} "
          f"{'peak MB':>7s} {'step MB':>7s} {'B/(tok·L·d)':>11s}")
    for axis, overrides in SWEEP:
        m = measure("align_copg", args, **overrides)
        setting = {k: overrides.get(k, getattr(args, k)) for k in ("batch", "k", "completion_tokens", "hidden", "layers")}
        n_rows = setting["batch"] * setting["k"]
        flops = step_flops(setting["hidden"], setting["layers"], n_rows, m["padded_tokens_per_step"],
                           m["completion_tokens_per_step"])
        bytes_per = m["step_tensor_mb"] * 2**20 / (m["memory_step_tokens"] * setting["layers"] * setting["hidden"])
        rows.append({"axis": axis, **setting, **{k: v for k, v in m.items() if k != "name"}, "step_flops": flops,
                     "gflop_per_s": flops / m["s_per_step"] / 1e9, "activation_bytes_per_token_layer_width": bytes_per})
        print(f"{axis:17s} {json.dumps(overrides):38s} {m['params'] / 1e6:6.1f}M {n_rows:4d} {m['tokens_per_step']:6.0f} "
              f"{m['s_per_step']:7.2f} {rows[-1]['gflop_per_s']:7.1f} {m['peak_mem_mb']:7.0f} {m['step_tensor_mb']:7.0f} "
              f"{bytes_per:11.1f}", flush=True)
    return {"sweep": rows}


def layout_compare(args, names: list[str]) -> dict:
    """align's runs in each batch layout (padded, packed, shared prefix), the layouts of a round in turn (in
    reverse order every other round): the median over rounds of each layout's tokens/s and peak step tensor
    memory over the padded batches'."""
    layouts = ("padded", "packed", "shared_prefix")
    rows = []
    for name in names:
        rounds = []
        for r in range(args.repeats):
            rounds.append({layout: measure(name, args, layout=layout) for layout in layouts[:: 1 if r % 2 == 0 else -1]})
        row = {"name": name, "pad_fraction": rounds[0]["padded"]["pad_fraction"], "rounds": rounds}
        for layout in layouts:
            row[f"{layout}_tokens_per_s"] = statistics.median(m[layout]["tokens_per_s"] for m in rounds)
            row[f"{layout}_vs_padded"] = statistics.median(m[layout]["tokens_per_s"] / m["padded"]["tokens_per_s"]
                                                           for m in rounds)
            row[f"{layout}_vs_padded_step_mem"] = statistics.median(
                m[layout]["step_tensor_mb"] / m["padded"]["step_tensor_mb"] for m in rounds)
        rows.append(row)
        print(f"{name:21s} padded {row['padded_tokens_per_s']:8.1f} tok/s  " + "  ".join(
            f"{layout} {row[f'{layout}_vs_padded']:.3f}x (step tensors {row[f'{layout}_vs_padded_step_mem']:.3f}x)"
            for layout in layouts[1:]) + f"  pad {row['pad_fraction']:.2f}", flush=True)
    return {"layout_compare": rows}


def shape_args(args, shape: str) -> argparse.Namespace | str:
    """The settings of one shape (its defaults where the command line gives none, its model resolved), or why
    it is skipped: the real model is not installed."""
    from align.errors import AlignError
    from align.models.resolve import resolve_model

    settings = argparse.Namespace(**vars(args))
    settings.shape, settings.model_dir = shape, ""
    for key in ("batch", "completion_tokens"):
        if getattr(settings, key) is None:
            setattr(settings, key, SHAPES[shape][key])
    if SHAPES[shape]["model"]:
        try:
            settings.model_dir = resolve_model(SHAPES[shape]["model"])
        except AlignError as err:
            return f"skipping the {shape} shape: {SHAPES[shape]['model']} is not installed ({err})"
    return settings


def compare(args, names: list[str]) -> dict:
    """Rounds of every run in ``names`` on one shape; the summary, its settings, and the printed table."""
    start, rounds, load_before, cpu_before = time.perf_counter(), [], os.getloadavg(), cpu_seconds()
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]  # A B B A: a steady drift in load cancels out
        rounds.append({n: measure(n, args) for n in order})
        print(f"{args.shape}: round {r + 1}/{args.repeats} done ({time.perf_counter() - start:.0f} s, "
              f"load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    result = summarise(rounds)
    model = {"vocab": VOCAB, "hidden": args.hidden, "layers": args.layers} if args.shape == "synthetic" else \
        SHAPES[args.shape]["model"]
    result["settings"] = {"shape": args.shape, "device": args.device, "dtype": args.dtype, "threads": args.threads,
                          "batch_pairs": args.batch, "steps": args.steps, "warmup": args.warmup,
                          "repeats": args.repeats, "model": model, "completion_tokens": args.completion_tokens,
                          "k": args.k, "params": rounds[0][names[0]]["params"], "lora": LORA,
                          "max_length": MAX_LENGTH, "loadavg_before": load_before,
                          "wall_s": time.perf_counter() - start, "loadavg_after": os.getloadavg(),
                          "cpu_s": cpu_seconds() - cpu_before}
    st = result["settings"]
    print_table(result, f"\n{args.shape} ({st['params'] / 1e6:.0f}M parameters): {args.device} {args.dtype}, "
                        f"{args.threads} threads, batch {args.batch} x {args.k} completions, {args.steps} timed steps "
                        f"after {args.warmup}, median of {args.repeats} rounds")
    print(f"wall {st['wall_s']:.0f} s, workers' CPU time {st['cpu_s']:.0f} s, load average "
          f"{st['loadavg_before'][0]:.1f} -> {st['loadavg_after'][0]:.1f} on {os.cpu_count()} cores", flush=True)
    return result


def write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all", help="model shape(s), see above")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; every trainer runs once per round")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--rows", type=int, default=400,
                        help="rows of the dataset of the timed steps (400: the 50 batches of 8 that align's "
                             "length grouping sorts together)")
    parser.add_argument("--batch", type=int, default=None, help="prompts (pairs) per step (default: the shape's)")
    parser.add_argument("--completion-tokens", type=int, default=None,
                        help="mean completion length (± 25%%; default: the shape's)")
    parser.add_argument("--k", type=int, default=2, help="completions per prompt (> 2: align CPL and CoPG only)")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="synthetic model width (heads of 64)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="synthetic model depth")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="float32, or bf16 mixed precision (default: bfloat16 on cuda, float32 on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="a subset of the runs")
    parser.add_argument("--sweep", action="store_true", help="the scaling sweep of offline CoPG instead (SWEEP)")
    parser.add_argument("--layout", choices=[*LAYOUT_SETTINGS, "compare"], default="auto",
                        help="align's batch layout (padding_free, prefix_sharing); compare: each align run padded, "
                             "packed and prompt-shared (layout_compare)")
    parser.add_argument("--sampling", choices=["group_by_length", "random"], default="group_by_length",
                        help="align's batch order (train_sampling_strategy; TRL's stays its default): random batches carry more padding")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and ratios as JSON, one section per shape")
    parser.add_argument("--worker", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step's end starts the clock)")
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    start = time.perf_counter()
    if args.sweep:  # the synthetic model, whose width and depth it varies
        write_json(args.json, sweep(shape_args(args, "synthetic")))
        return
    names = [n for n in available_runs() if n in args.only] if args.only else [
        n for n in available_runs() if not n.endswith("_precomputed")]
    if args.k != 2:
        names = [n for n in names if RUNS[n][1] in ("cpl", "copg")]
    results = {}
    for shape in SHAPES if args.shape == "all" else [args.shape]:
        settings = shape_args(args, shape)
        if isinstance(settings, str):
            print(settings, flush=True)
            results[shape] = {"skipped": settings}
        elif args.layout == "compare":
            results[shape] = layout_compare(settings, [n for n in names if RUNS[n][0] == "align"])
        else:
            results[shape] = compare(settings, names)
    results["wall_s"] = time.perf_counter() - start
    print(f"\ntotal wall time {results['wall_s']:.0f} s ({results['wall_s'] / 60:.1f} min)", flush=True)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
