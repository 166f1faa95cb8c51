"""Config files: every shipped recipe validates; bad keys, types and values give named errors."""

from pathlib import Path

import pytest
import torch

from align.api import load_config, make_config
from align.config import ConfigError, parse_overrides
from align.trainers import CoPGConfig, CPLConfig

CONFIGS = sorted(p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path, tmp_path):
    overrides = {"output_dir": str(tmp_path)}
    if not torch.cuda.is_available():  # GPU recipes ask for bf16, which TrainingArguments rejects on a CPU
        overrides["bf16"] = False
    config = load_config(str(path), overrides)
    assert config.output_dir == str(tmp_path)


def test_quickstart_is_cpl_on_builtin_demo(tmp_path):
    config = load_config("configs/quickstart.yaml", {"output_dir": str(tmp_path)})
    assert isinstance(config, CPLConfig) and config.model == config.dataset == "builtin:demo"


def test_overrides_parse_types():
    values = parse_overrides(["--learning_rate", "3e-3", "--lam=0.5", "--online", "--dataset", "my.jsonl",
                              "--lora_target_modules", "[q_proj, v_proj]"])
    assert values == {"learning_rate": 3e-3, "lam": 0.5, "online": True, "dataset": "my.jsonl",
                      "lora_target_modules": ["q_proj", "v_proj"]}


def test_cli_style_override_wins(tmp_path):
    config = load_config("configs/quickstart.yaml", {"output_dir": str(tmp_path), "dataset": "my.jsonl", "lam": 0.5})
    assert config.dataset == "my.jsonl" and config.lam == 0.5


@pytest.mark.parametrize("values, message", [
    ({"trainer": "ppo"}, "trainer"),
    ({"trainer": "cpl", "alpah": 0.1}, "did you mean 'alpha'"),
    ({"trainer": "cpl", "alpha": "big"}, "key 'alpha' expects float"),
    ({"trainer": "cpl", "lam": 0.0}, "lam"),
    ({"trainer": "cpl", "lam": 1.5}, "lam"),
    ({"trainer": "dpo", "beta": -1.0}, "beta"),
    ({"trainer": "copg", "beta": 0}, "beta"),
    ({"trainer": "cpl", "lora_r": 0}, "lora_r"),
    ({"trainer": "cpl", "online": True}, "reward"),
    ({"trainer": "cpl", "num_train_epochs": True}, "num_train_epochs"),
])
def test_bad_values_name_the_key(values, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        make_config({"output_dir": str(tmp_path)} | values, source="test.yaml")


def test_copg_config_defaults(tmp_path):
    config = make_config({"trainer": "copg", "output_dir": str(tmp_path)})
    assert isinstance(config, CoPGConfig) and config.beta == 0.1
