"""``align`` command line: train, generate, eval, serve."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from align.config import ConfigError, parse_overrides
from align.data import DataError
from align.models import ModelLoadError
from align.rewards import RewardError
from align.checkpoints import CheckpointError

# FloatingPointError: a NaN/inf loss or gradient with on_nonfinite=stop (the message says what to do).
USER_ERRORS = (ConfigError, DataError, ModelLoadError, RewardError, CheckpointError, FloatingPointError, FileNotFoundError)


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from align import api
    from align.trainers import TRAINERS

    if args.help_keys:
        name = args.help_keys
        for f in dataclasses.fields(TRAINERS[name][0]):
            if f.init and f.metadata.get("help"):
                print(f"  {f.name:28s} {f.metadata['help']} (default {f.default!r})")
        return 0
    if args.config is None:
        raise ConfigError("align train needs --config FILE (see configs/)")
    overrides = parse_overrides(extra)
    if (args.num_processes > 1 or args.accelerate_config) and "ALIGN_LAUNCHED" not in os.environ:
        command, env = _accelerate_command(args, extra)
        os.environ.update(env)
        os.execv(sys.executable, command)
    config = api.load_config(args.config, overrides)
    summary = api.train(config, resume_from_checkpoint=args.resume)
    if _rank() == 0:
        print(json.dumps(summary, indent=2))
    return 0


def _rank() -> int:
    """This process's rank under `accelerate launch` / torchrun (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def _accelerate_command(args: argparse.Namespace, extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """This `align train` command under `accelerate launch`, and the environment it needs: the setup of
    ``--accelerate-config`` (see configs/accelerate/), or else DDP over ``--num-processes`` processes.
    Rank 0 alone writes checkpoints, the adapter and logs (transformers.Trainer and `align.api.train`
    check the rank)."""
    import torch

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0"]  # 0: a free port
    env = {"ALIGN_LAUNCHED": "1"}
    if args.accelerate_config:
        launch += ["--config_file", args.accelerate_config]
    else:
        # torchrun, one process per rank: without a GPU, accelerate runs several processes only this way,
        # and ACCELERATE_USE_CPU makes each rank train on the CPU over gloo.
        launch.append("--multi_gpu")
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "true"
    if args.num_processes > 1:
        launch += ["--num_processes", str(args.num_processes)]
    resume = [] if args.resume is None else ["--resume"] if args.resume is True else ["--resume", args.resume]
    return launch + ["-m", "align.cli", "train", "--config", args.config, *resume, *extra], env


def _generation_settings(args: argparse.Namespace):
    from align.generate import GenerationSettings

    try:
        return GenerationSettings(strategy=getattr(args, "strategy", "contrastive"), max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, penalty_alpha=args.penalty_alpha, top_k=args.top_k,
                                  temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams,
                                  seed=args.seed)
    except ValueError as err:
        raise ConfigError(f"command line: {err}") from None


def _prompts(args: argparse.Namespace) -> list[str]:
    from align.generate import read_prompts

    prompts = list(args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise ConfigError("give prompts with --prompt TEXT (repeatable) or --prompts FILE (.txt, .jsonl, ...)")
    return prompts


def _generate(args: argparse.Namespace, extra: list[str]) -> int:
    from align.generate import generate, load_generator, write_jsonl

    settings = _generation_settings(args)
    prompts = _prompts(args)
    model, tokenizer = load_generator(args.model, args.adapter, trust_remote_code=args.trust_remote_code)
    completions = generate(model, tokenizer, prompts, settings)
    if args.output:
        write_jsonl(args.output, prompts, completions, settings.strategy)
        print(f"wrote {len(completions)} completions to {args.output}", file=sys.stderr)
    else:
        for p, c in zip(prompts, completions):
            print(json.dumps({"prompt": p, "completion": c, "strategy": settings.strategy}))
    return 0


def _eval_decoding(args: argparse.Namespace, extra: list[str]) -> int:
    from pathlib import Path

    from align.generate import STRATEGIES, compare_strategies, load_generator, markdown_table

    strategies = args.strategies.split(",")
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        raise ConfigError(f"--strategies: unknown {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")
    model, tokenizer = load_generator(args.model, args.adapter, trust_remote_code=args.trust_remote_code)
    table = compare_strategies(model, tokenizer, _prompts(args), strategies, _generation_settings(args))
    text = markdown_table(table)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).with_suffix(".md").write_text(text + "\n")
        Path(args.output).with_suffix(".json").write_text(json.dumps(table, indent=2))
    return 0


def _serve(args: argparse.Namespace, extra: list[str]) -> int:
    from align.sampling.vllm_server import serve

    try:
        server = serve(args.model, host=args.host, port=args.port, tensor_parallel_size=args.tensor_parallel_size,
                       gpu_memory_utilization=args.gpu_memory_utilization, max_lora_rank=args.max_lora_rank,
                       api_key=args.api_key)
    except (ValueError, OSError) as err:  # a host other than 127.0.0.1 without an API key, a port in use
        raise ConfigError(f"align serve: {err}") from None
    # The server runs in its own process group; leaving the `with` (Ctrl-C included) stops it.
    with server:
        print(f"vLLM server for {args.model} listening on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
        return server.wait()


def _rm_strength(args: argparse.Namespace, extra: list[str]) -> int:
    from align.trainers.reward import strength_main

    result = strength_main(args.config, parse_overrides(extra), args.num_models, args.output)
    print(json.dumps(result, indent=2))
    return 0


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory or hub id (the base model)")
    p.add_argument("--adapter", help="a LoRA adapter directory saved by align train")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="prompts file: .txt (one per line) or .jsonl/.json/.csv/.parquet with `prompt`")
    p.add_argument("--output", help="output path")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--penalty-alpha", type=float, default=0.6, help="contrastive search α")
    p.add_argument("--top-k", type=int, default=4, help="contrastive candidates, or sampling top-k (0 = off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true", help="run model code from the checkpoint (trusted models only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="Contrastive alignment of LLMs: CPL, CoPG, DPO/IPO, "
                                     "contrastive reward models, contrastive-search decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a policy or reward model from a YAML config",
                           description="align train --config configs/quickstart.yaml [--key value ...]: any config key "
                           "can be overridden on the command line.")
    train.add_argument("--config", help="YAML config (see configs/)")
    train.add_argument("--resume", nargs="?", const=True, default=None,
                       help="resume from the newest checkpoint in output_dir that passes its integrity check, "
                       "or from the given checkpoint directory")
    train.add_argument("--num-processes", type=int, default=1, help="data-parallel processes (accelerate launch)")
    train.add_argument("--accelerate-config", metavar="FILE",
                       help="run under `accelerate launch --config_file FILE` (configs/accelerate/: ddp, fsdp, zero2, zero3)")
    train.add_argument("--help-keys", metavar="TRAINER", choices=["cpl", "dpo", "copg", "reward"],
                       help="list the config keys of a trainer and exit")
    train.set_defaults(handler=_train)

    gen = sub.add_parser("generate", help="generate text: greedy, sample, beam or contrastive search")
    _add_generation_args(gen)
    gen.add_argument("--strategy", choices=["greedy", "sample", "beam", "contrastive"], default="contrastive")
    gen.set_defaults(handler=_generate)

    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="what", required=True)
    dec = ev.add_parser("decoding", help="compare decoding strategies: rep-n, diversity, isotropy")
    _add_generation_args(dec)
    dec.add_argument("--strategies", default="greedy,sample,beam,contrastive", help="comma-separated")
    dec.set_defaults(handler=_eval_decoding)

    srv = sub.add_parser("serve", help="start a vLLM server for `sampler: vllm` + `vllm_mode: server`")
    srv.add_argument("--model", required=True, help="local model directory")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on; any but 127.0.0.1, ::1 and "
                     "localhost (0.0.0.0, a LAN address) requires an API key")
    srv.add_argument("--api-key", help="every request but /health must carry it (Authorization: Bearer KEY); default: "
                     "$ALIGN_VLLM_API_KEY, which other users of this machine cannot read from the process list")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--tensor-parallel-size", type=int, default=1)
    srv.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    srv.add_argument("--max-lora-rank", type=int, default=16)
    srv.set_defaults(handler=_serve)

    rm = sub.add_parser("rm", help="reward-model tools").add_subparsers(dest="what", required=True)
    strength = rm.add_parser("strength", help="preference strength from an ensemble of reward models (M LoRA "
                             "adapters on one backbone); extra --key value pairs override the config")
    strength.add_argument("--config", required=True, help="a `trainer: reward` YAML config")
    strength.add_argument("--num-models", type=int, default=10, help="ensemble size M (the paper: 10)")
    strength.add_argument("--output", required=True, help="dataset with strength_mean/strength_std (.jsonl)")
    strength.set_defaults(handler=_rm_strength)
    return parser


def main(argv: list[str] | None = None) -> int:
    level = logging.INFO if _rank() == 0 else logging.WARNING  # one log, not one per data-parallel rank
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "rm"):
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        return args.handler(args, extra)
    except USER_ERRORS as err:
        print(f"align: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
