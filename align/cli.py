"""``align`` command line: train, generate, eval, serve, rm."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from align.config import parse_overrides
from align.errors import PREEMPTED_EXIT_CODE, AlignError, ConfigError, Preempted


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from align import api
    from align.trainers import TRAINERS

    if args.help_keys:
        for f in dataclasses.fields(TRAINERS[args.help_keys].config_class):
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
    summary = api.train(config, resume_from_checkpoint=args.resume, command=shlex.join(["align", *sys.argv[1:]]))
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


def _generation_settings(args: argparse.Namespace, **fixed):
    from align.decoding import GenerationSettings

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationSettings) if hasattr(args, f.name)}
    try:
        return GenerationSettings(**values | fixed)
    except ValueError as err:
        raise ConfigError(f"command line: {err}") from None


def _prompts(args: argparse.Namespace) -> list[str]:
    from align.data import read_prompts

    prompts = list(args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise ConfigError("give prompts with --prompt TEXT (repeatable) or --prompts FILE (.txt, .jsonl, ...)")
    return prompts


def _generate(args: argparse.Namespace) -> int:
    from align.decoding import generate
    from align.models import load_generator

    settings = _generation_settings(args)
    prompts = _prompts(args)
    model, tokenizer = load_generator(args.model, args.adapter, trust_remote_code=args.trust_remote_code)
    rows = [{"prompt": p, "completion": c, "strategy": settings.strategy}
            for p, c in zip(prompts, generate(model, tokenizer, prompts, settings))]
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(lines, encoding="utf-8")
        print(f"wrote {len(rows)} completions to {args.output}", file=sys.stderr)
    else:
        print(lines, end="")
    return 0


def _eval_decoding(args: argparse.Namespace) -> int:
    from align.decoding import STRATEGIES
    from align.eval.decoding import compare_strategies, markdown_table
    from align.models import load_generator

    strategies = args.strategies.split(",")
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        raise ConfigError(f"--strategies: unknown {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")
    settings = _generation_settings(args, strategy=strategies[0])
    model, tokenizer = load_generator(args.model, args.adapter, trust_remote_code=args.trust_remote_code)
    table = compare_strategies(model, tokenizer, _prompts(args), strategies, settings)
    text = markdown_table(table)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).with_suffix(".md").write_text(text + "\n")
        Path(args.output).with_suffix(".json").write_text(json.dumps(table, indent=2))
    return 0


def _eval_logprobs(args: argparse.Namespace) -> int:
    from align.data import build_dataset, load_records
    from align.eval.logprobs import dataset_logprobs, summarize
    from align.models import load_generator

    model, tokenizer = load_generator(args.model, args.adapter, trust_remote_code=args.trust_remote_code)
    dataset = build_dataset(load_records(args.dataset), tokenizer, source=args.dataset, kinds=("pairs", "groups"),
                            max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    records = dataset_logprobs(model, dataset, tokenizer.pad_token_id, batch_size=args.batch_size)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("".join(json.dumps({"row": i, **r}) + "\n" for i, r in enumerate(records, 1)))
    print(json.dumps(summarize(records)))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from align.sampling.vllm_server import serve

    # The server runs in its own process group; leaving the `with` (Ctrl-C included) stops it.
    from align.models import resolve_model

    try:
        server = serve(resolve_model(args.model), host=args.host, port=args.port, api_key=args.api_key,
                       tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
                       max_lora_rank=args.max_lora_rank)
    except (ValueError, OSError) as err:  # a host other than 127.0.0.1 without an API key, a port in use
        raise ConfigError(f"align serve: {err}") from None
    # The server runs in its own process group; leaving the `with` (Ctrl-C included) stops it.
    with server:
        print(f"vLLM server for {args.model} listening on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
        return server.wait()


def _model_path(args: argparse.Namespace) -> int:
    from align.models import resolve_model

    print(resolve_model(args.model))
    return 0


def _rm_strength(args: argparse.Namespace, extra: list[str]) -> int:
    from align.strength import strength_main

    result = strength_main(args.config, parse_overrides(extra), args.num_models, args.output)
    print(json.dumps(result, indent=2))
    return 0


def _option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """``--name-with-dashes`` and ``--name_with_underscores``: align train's config keys use underscores,
    the other subcommands dashes; both spellings are accepted everywhere."""
    dashed = "--" + name.replace("_", "-")
    parser.add_argument(dashed, *([] if "-" not in dashed[2:] else ["--" + name]), dest=name, **kwargs)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _option(p, "model", required=True, help="HF model directory, hub id, .gguf file or builtin:<model> (the base model)")
    _option(p, "adapter", help="a LoRA adapter directory saved by align train")
    _option(p, "trust_remote_code", action="store_true", help="run model code from the checkpoint (trusted models only)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    from align.decoding import GenerationSettings

    _add_model_args(p)
    _option(p, "prompt", action="append", help="a prompt (repeatable)")
    _option(p, "prompts", help="prompts file: .txt (one per line) or .jsonl/.json/.csv/.parquet with `prompt`")
    _option(p, "output", help="output path")
    helps = {"penalty_alpha": "contrastive search α", "top_k": "contrastive candidates, or sampling top-k (0 = off)"}
    for f in dataclasses.fields(GenerationSettings):
        if f.name in ("strategy", "chat_template"):
            continue
        _option(p, f.name, type=type(f.default), default=f.default, help=helps.get(f.name, f"(default {f.default})"))
    p.add_argument("--no-chat-template", "--no_chat_template", dest="chat_template", action="store_false",
                   help="give prompts to the model as they are, even when its tokenizer has a chat template")


def build_parser() -> argparse.ArgumentParser:
    from align.decoding import STRATEGIES, GenerationSettings
    from align.trainers import TRAINERS

    parser = argparse.ArgumentParser(prog="align", description="Contrastive alignment of LLMs: CPL, CoPG, DPO/IPO, "
                                     "contrastive reward models, contrastive-search decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a policy or reward model from a YAML config",
                           description="align train --config configs/quickstart.yaml [--key value ...]: any config key "
                           "can be overridden on the command line.")
    train.add_argument("--config", help="YAML config (see configs/)")
    train.add_argument("--resume", nargs="?", const=True, default=None,
                       help="resume from the newest checkpoint in output_dir that passes its integrity check, or "
                       "start afresh if there is none (a finished run is not trained again); with DIR, from that "
                       "checkpoint directory (which must verify)")
    _option(train, "num_processes", type=int, default=1, help="data-parallel processes (accelerate launch)")
    _option(train, "accelerate_config", metavar="FILE",
            help="run under `accelerate launch --config_file FILE` (configs/accelerate/: ddp, fsdp, zero2, zero3)")
    _option(train, "help_keys", metavar="TRAINER", choices=list(TRAINERS), help="list the config keys of a trainer and exit")
    train.set_defaults(handler=_train, takes_overrides=True)

    gen = sub.add_parser("generate", help="generate text: greedy, sample, beam or contrastive search")
    _add_generation_args(gen)
    gen.add_argument("--strategy", choices=STRATEGIES, default=GenerationSettings.strategy)
    gen.set_defaults(handler=_generate)

    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="what", required=True)
    dec = ev.add_parser("decoding", help="compare decoding strategies: rep-n, diversity, isotropy")
    _add_generation_args(dec)
    dec.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    dec.set_defaults(handler=_eval_decoding)
    lp = ev.add_parser("logprobs", help="per-completion log-probs of a dataset's chosen and rejected completions "
                       "(or of every completion of a group); prints a JSON summary line")
    _add_model_args(lp)
    _option(lp, "dataset", required=True, help="pairs or groups: .jsonl/.json/.csv/.parquet or a saved dataset")
    _option(lp, "output", help="per-example records (.jsonl)")
    _option(lp, "batch_size", type=int, default=16)
    _option(lp, "max_length", type=int, default=1024)
    _option(lp, "max_prompt_length", type=int, default=512)
    lp.set_defaults(handler=_eval_logprobs)

    srv = sub.add_parser("serve", help="start a vLLM server for `sampler: vllm` + `vllm_mode: server`")
    _option(srv, "model", required=True, help="local model directory, .gguf file or builtin:<model>")
    _option(srv, "host", default="127.0.0.1", help="address to listen on; any but 127.0.0.1, ::1 and localhost "
            "(0.0.0.0, a LAN address) requires an API key")
    _option(srv, "api_key", help="every request but /health must carry it (Authorization: Bearer KEY); default: "
            "$ALIGN_VLLM_API_KEY, which other users of this machine cannot read from the process list")
    _option(srv, "port", type=int, default=8000)
    _option(srv, "tensor_parallel_size", type=int, default=1)
    _option(srv, "gpu_memory_utilization", type=float, default=0.9)
    _option(srv, "max_lora_rank", type=int, default=16)
    srv.set_defaults(handler=_serve)

    mdl = sub.add_parser("model", help="model tools").add_subparsers(dest="what", required=True)
    path = mdl.add_parser("path", help="print the Hugging Face directory of a model spec, converting a .gguf file "
                          "or builtin:<model> (e.g. builtin:smollm2-135m-instruct) once into $ALIGN_CACHE/models")
    path.add_argument("model", help="a .gguf file, builtin:<model>, or a directory / hub id (printed unchanged)")
    path.set_defaults(handler=_model_path)

    rm = sub.add_parser("rm", help="reward-model tools").add_subparsers(dest="what", required=True)
    strength = rm.add_parser("strength", help="preference strength from an ensemble of reward models (M LoRA "
                             "adapters on one backbone); extra --key value pairs override the config")
    strength.add_argument("--config", required=True, help="a `trainer: reward` YAML config")
    _option(strength, "num_models", type=int, default=10, help="ensemble size M (the paper: 10)")
    strength.add_argument("--output", required=True, help="dataset with strength_mean/strength_std (.jsonl)")
    strength.set_defaults(handler=_rm_strength, takes_overrides=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    level = logging.INFO if _rank() == 0 else logging.WARNING  # one log, not one per data-parallel rank
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    takes_overrides = getattr(args, "takes_overrides", False)
    if extra and not takes_overrides:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        return args.handler(args, extra) if takes_overrides else args.handler(args)
    except AlignError as err:
        print(f"align: error: {err}", file=sys.stderr)
        return 2
    except Preempted as err:
        print(f"align: {err}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
