"""Security: no remote code unless asked, nothing pickled to load, safe YAML, output paths that stay
inside the output directory. (Sandboxed code execution: tests/test_sandbox.py.)"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers.dynamic_module_utils
import yaml

from align import checkpoints, cli
from align.checkpoints import CheckpointError, output_path
from align.config import ConfigError, load_yaml
from align.models import ModelLoadError, load_causal_lm, load_tokenizer
from align.trainers import TRAINERS

PACKAGE = Path(__file__).parents[1] / "align"
UNSAFE_CALLS = {("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("yaml", "load_all"),
                ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("torch", "save")}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            yield node, (node.func.value.id, node.func.attr)


def test_source_never_unpickles_loads_unsafe_yaml_or_trusts_remote_code():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, name in _calls(tree):
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            if name in UNSAFE_CALLS:
                problems.append(f"{where}: {'.'.join(name)}")
            if name == ("torch", "load") and not any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords):
                problems.append(f"{where}: torch.load without weights_only=True")
        for node in ast.walk(tree):
            if (isinstance(node, ast.keyword) and node.arg == "trust_remote_code"
                    and isinstance(node.value, ast.Constant) and node.value.value is True):
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{node.value.lineno}: trust_remote_code=True")
    assert problems == []


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_trust_remote_code_is_off_unless_set(trainer, tmp_path):
    config_cls = TRAINERS[trainer].config_class
    assert {f.name: f.default for f in dataclasses.fields(config_cls)}["trust_remote_code"] is False


@pytest.fixture
def custom_code_model(tmp_path):
    """A model directory whose config asks for its own code; importing that code leaves a marker."""
    model = tmp_path / "custom"
    model.mkdir()
    marker = tmp_path / "code-ran"
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                "AutoTokenizer": ["evil.EvilTokenizer", None]}
    (model / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
    (model / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (model / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                   "from transformers import PretrainedConfig\n\n"
                                   "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    return model, marker


def test_custom_model_code_is_refused_by_default(custom_code_model, tmp_path, capsys, snapshot):
    model, marker = custom_code_model
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        load_causal_lm(str(model))
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        load_tokenizer(str(model))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"trainer": "cpl", "model": str(model), "output_dir": str(tmp_path / "out")}))
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "align: error:" in err and "trust_remote_code" in err and "Traceback" not in err
    assert not marker.exists() and snapshot(tmp_path / "out") == {}


def test_custom_model_code_runs_only_when_set(custom_code_model, tmp_path, monkeypatch):
    model, marker = custom_code_model
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        with pytest.raises(AttributeError, match="EvilModel"):  # the code ran; it just defines no model
            load_causal_lm(str(model), trust_remote_code=True)
    finally:
        for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
            del sys.modules[name]
    assert marker.exists()


def test_outputs_are_safetensors_and_nothing_pickled_is_left(trained_run):
    _, out = trained_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_args.json").is_file()
    assert not [p for p in files if p.suffix in (".bin", ".pkl", ".pickle")]
    # What transformers keeps with torch.save (optimizer, scheduler, RNG state) holds only tensors and
    # plain values: it loads with weights_only=True, as transformers loads it.
    from transformers.trainer_pt_utils import safe_globals

    states = [p for p in files if p.suffix in (".pt", ".pth")]
    assert {p.name for p in states} == {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    with safe_globals():
        for path in states:
            torch.load(path, weights_only=True)


def test_merged_export_is_safetensors(trained_run, tmp_path):
    config, _ = trained_run
    out = tmp_path / "out"
    assert cli.main(["train", "--config", str(config), "--output_dir", str(out), "--max_steps", "1",
                     "--merge_on_save"]) == 0
    merged = {p.name for p in (out / "merged").iterdir()}
    assert "model.safetensors" in merged and not {n for n in merged if n.endswith((".bin", ".pt"))}


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_file_is_not_unpickled(trained_run, tmp_path, capsys):
    """An optimizer.pt that would run a command when unpickled, with a manifest rewritten to match
    (an attacker who controls the whole directory): resuming refuses it, nothing runs."""
    config, out = trained_run
    shutil.copytree(out, tmp_path / "out")
    checkpoint, marker = tmp_path / "out" / "checkpoint-8", tmp_path / "code-ran"
    (checkpoint / "optimizer.pt").write_bytes(pickle.dumps({"state": _RunsCode(marker)}, protocol=2))  # as torch.save
    checkpoints.write_manifest(checkpoint, checkpoints.verify(out / "checkpoint-8"))
    assert cli.main(["train", "--config", str(config), "--output_dir", str(tmp_path / "out"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-8: a file holds objects other than tensors and was not loaded" in err and "Traceback" not in err
    assert not marker.exists()


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "code-ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"trainer: cpl\noutput_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(config)
    assert not marker.exists()


def test_output_paths_stay_inside_the_output_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert output_path(out, "checkpoint-4") == (out / "checkpoint-4").resolve()
    with pytest.raises(CheckpointError, match="outside the output directory"):
        output_path(out, "..", "elsewhere")
    with pytest.raises(CheckpointError, match="outside the output directory"):
        output_path(out, "/etc/passwd")
    (out / "summary.json").symlink_to(tmp_path / "victim.txt")
    with pytest.raises(CheckpointError, match="outside the output directory"):
        output_path(out, "summary.json")


def test_a_link_out_of_the_output_dir_stops_training_before_it_starts(trained_run, tmp_path, capsys):
    config, _ = trained_run
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious")
    (out / "summary.json").symlink_to(victim)
    assert cli.main(["train", "--config", str(config), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "outside the output directory" in err and "Traceback" not in err
    assert victim.read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["summary.json"]
