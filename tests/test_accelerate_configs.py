"""The accelerate configs in configs/accelerate/ (DDP, FSDP2, DeepSpeed ZeRO-2/3), read the way
`accelerate launch --config_file` reads them: each selects the intended setup, every option in it is
one the launcher knows (it ignores unknown nested keys silently, so a typo would be lost), and the
environment it hands the training processes is what accelerate's plugins are built from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
NAMES = ["ddp", "fsdp", "zero2", "zero3"]


def launch_args(name: str):
    """The launcher's arguments for `accelerate launch --config_file <name>.yaml -m align.cli train ...`,
    and the environment the training processes get."""
    args = launch_command_parser().parse_args(
        ["--config_file", str(CONFIGS / f"{name}.yaml"), "-m", "align.cli", "train", "--config", "my.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_the_four_setups_are_shipped():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_nested_options_are_launcher_options(name):
    known = {action.dest for action in launch_command_parser()._actions}
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = set(config.get(section, {})) - known
        assert not unknown, f"{name}.yaml {section}: {sorted(unknown)} are not `accelerate launch` options"


@pytest.mark.parametrize("name", NAMES)
def test_config_selects_its_setup(name):
    args, env = launch_args(name)
    assert args.num_processes == 8 and args.num_machines == 1 and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    setup = {"ddp": (True, False, False), "fsdp": (False, True, False), "zero2": (False, False, True),
             "zero3": (False, False, True)}[name]
    assert (bool(args.multi_gpu), bool(args.use_fsdp), bool(args.use_deepspeed)) == setup
    if name.startswith("zero"):
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == name[-1]
        assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "none"
    if name == "zero3":  # rank 0 can write the adapter only from weights gathered on save
        assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"


def test_fsdp_config_builds_an_fsdp2_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    _, env = launch_args("fsdp")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's environment, as each rank does
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"


@pytest.mark.parametrize("name", NAMES)
def test_documented_align_command_parses(name):
    from align import cli

    header = [line for line in (CONFIGS / f"{name}.yaml").read_text().splitlines() if "align train" in line]
    assert header, f"{name}.yaml documents no `align train` command"
    argv = header[0].split("align ", 1)[1].split()
    args, extra = cli.build_parser().parse_known_args(argv)
    assert args.accelerate_config == f"configs/accelerate/{name}.yaml" and args.config == "my.yaml"
    assert (CONFIGS.parents[1] / args.accelerate_config).exists()
