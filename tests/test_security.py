"""Security: no remote code unless asked, nothing pickled to load, safe YAML, output paths that stay
inside the output directory, code rewards that a policy cannot forge. (What the sandbox contains:
tests/test_sandbox.py.)"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pickle
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import transformers.dynamic_module_utils
import yaml

from align import checkpoints, cli
from align.checkpoints import CheckpointError, output_path
from align.config import ConfigError, load_yaml
from align.models import ModelLoadError, load_causal_lm, load_tokenizer
from align.rewards import sandbox
from align.rewards.sandbox import AssertTask, CodeTask, SandboxLimits, SandboxReward, isolation
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
    (tmp_path / "out" / "summary.json").unlink()  # not a finished run: --resume resumes it
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


# --- code rewards that a policy cannot forge ----------------------------------------------------------
#
# The task: "write def add(a, b)", judged on these cases (or, as a stdin/stdout task, "print the sum of
# the two integers on stdin"). Every attack below is wrong code that tries to score anyway; each must
# get 0 from the default judge. Attacks that look for the expected values use FIND, which would
# succeed if the values were anywhere it looks (the controls at the end show it does).

ADD_CASES = [((2, 3), 5), ((-1, 1), 0), ((10, 20), 30), ((123, 456), 579)]
ASSERTS = "".join(f"assert add({a}, {b}) == {c}\n" for (a, b), c in ADD_CASES)
FAST = SandboxLimits(timeout=3.0)

FIND = textwrap.dedent("""
    import json, re

    def find(things, args):
        # The expected value for args, if things hold it anywhere: an (args, expected) pair, a JSON text of
        # such pairs, or an assert on add with numbers. None (a wrong answer) otherwise.
        pattern, stack, seen = re.compile(r"add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)"), list(things), set()
        while stack:
            item = stack.pop()
            if id(item) in seen:
                continue
            seen.add(id(item))
            try:
                if isinstance(item, bytes):
                    item = item.decode("utf-8", "replace")
                if isinstance(item, str):
                    for a, b, c in pattern.findall(item):
                        if [int(a), int(b)] == list(args):
                            return int(c)
                    if item[:1] in "[{":
                        stack.append(json.loads(item))
                elif isinstance(item, (list, tuple)):
                    if len(item) == 2 and isinstance(item[0], (list, tuple)) and list(item[0]) == list(args):
                        return item[1]
                    stack.extend(item)
                elif isinstance(item, dict):
                    stack.extend(item.values())
                    stack.extend(item.keys())
            except Exception:
                pass
        return None
""")


def _attacks(dataset: Path) -> dict[str, str]:
    """name -> a completion for the function task ``add``."""
    reads_dataset = f"open({str(dataset)!r}).read()"
    return {
        "the issue's forgery: print co_consts, os._exit(0)": textwrap.dedent("""
            import os, sys
            print(*[c for c in sys._getframe().f_code.co_consts if isinstance(c, str)], flush=True)
            os._exit(0)
        """),
        "co_consts, locals and globals of every frame": FIND + textwrap.dedent("""
            import sys

            def add(a, b):
                things, frame = [], sys._getframe()
                while frame:
                    things += [frame.f_code.co_consts, frame.f_locals, frame.f_globals]
                    frame = frame.f_back
                return find(things, (a, b))
        """),
        "gc.get_objects() at call time": FIND + textwrap.dedent("""
            import gc

            def add(a, b):
                return find([gc.get_objects()], (a, b))
        """),
        "read its source, its directory and the dataset file": FIND + textwrap.dedent(f"""
            import os, sys

            def texts():
                for name in os.listdir("."):
                    yield open(name, "rb").read()
                try:
                    yield {reads_dataset}  # where the expected values come from
                except OSError:
                    pass

            def add(a, b):
                return find([open(__file__).read(), sys.argv, *texts()], (a, b))
        """),
        "/proc: self and parent cmdline, environ, fds, mem; ptrace the parent": FIND + textwrap.dedent("""
            import ctypes, os

            def proc():
                pids = [p for p in os.listdir("/proc") if p.isdigit()] if os.path.isdir("/proc") else []
                for pid in ["self", str(os.getppid()), *pids]:
                    for name in ("cmdline", "environ"):
                        try:
                            yield open(f"/proc/{pid}/{name}", "rb").read()
                        except OSError:
                            pass
                    try:
                        for fd in os.listdir(f"/proc/{pid}/fd"):
                            yield open(f"/proc/{pid}/fd/{fd}", "rb").read(1 << 20)
                    except OSError:
                        pass
                    try:
                        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
                            for line in maps:
                                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                                if "r" in line.split()[1] and end - start < 1 << 24:
                                    mem.seek(start)
                                    yield mem.read(end - start)
                    except (OSError, ValueError, OverflowError):
                        pass

            def add(a, b):
                libc = ctypes.CDLL(None)
                libc.ptrace(16, os.getppid(), 0, 0)  # PTRACE_ATTACH
                return find(list(proc()), (a, b))
        """),
        "patch builtins, AssertionError, json.dumps and os.write": textwrap.dedent("""
            import builtins, json, os
            builtins.AssertionError = type("AssertionError", (Exception,), {})
            builtins.print = lambda *args, **kwargs: None
            json.dumps = lambda obj, **kwargs: '{"case": %d, "passed": true, "ok": true}' % obj.get("case", 0)
            real_write = os.write
            os.write = lambda fd, data: real_write(fd, data.replace(b"false", b"true"))

            def add(a, b):
                return "PASS"
        """),
        "re-exec itself with python -O (asserts stripped)": textwrap.dedent("""
            import os, sys
            if sys.flags.optimize == 0:
                os.execv(sys.executable, [sys.executable, "-O", __file__])

            def add(a, b):
                return a - b
        """),
        "sys.exit(0) and os._exit(0) in atexit": textwrap.dedent("""
            import atexit, os, sys
            atexit.register(os._exit, 0)
            atexit.register(sys.exit, 0)

            def add(a, b):
                return a * b
        """),
        "sys.exit(0) before the function exists": "import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b",
        "print expected-looking output": textwrap.dedent("""
            print("PASS\\nOK\\nAll tests passed\\n" + "\\n".join('{"case": %d, "value": %d}' % c for c in enumerate((5, 0, 30, 579))))

            def add(a, b):
                print("5 0 30 579 PASS")
                return None
        """),
        "write forged reports on every descriptor": textwrap.dedent("""
            import os

            def forge():
                for fd in range(1024):
                    for case in range(4):
                        for line in ('{"case": %d, "passed": true}' % case, '{"case": %d, "ok": true}' % case,
                                     '{"case": %d, "value": "PASS"}' % case, '{"case": %d, "value": 0}' % case):
                            try:
                                os.write(fd, (line + "\\n").encode())
                            except OSError:
                                pass

            forge()

            def add(a, b):
                forge()
                return a - b
        """),
        "close the report descriptor": "import os\nos.closerange(3, 1 << 16)\ndef add(a, b):\n    return a - b",
        "dup stdout onto the report descriptor": textwrap.dedent("""
            import os
            for fd in range(3, 1024):
                try:
                    os.fstat(fd)
                    os.dup2(1, fd)
                except OSError:
                    pass

            def add(a, b):
                return a - b
        """),
        "overwrite the dataset with its own answers": textwrap.dedent(f"""
            import json
            for path in ({str(dataset)!r},):
                try:
                    open(path, "w").write(json.dumps([[[2, 3], 0], [[-1, 1], 0], [[10, 20], 0], [[123, 456], 0]]))
                except OSError:
                    pass

            def add(a, b):
                return a - b
        """),
        "sleep past the time limit": "import time\ntime.sleep(60)\ndef add(a, b):\n    return a + b",
        "answer wrongly, then hang in atexit": "import atexit, time\natexit.register(time.sleep, 60)\n"
                                               "def add(a, b):\n    return a - b",
        "kill every process it can see": "import os, signal\nos.kill(-1, signal.SIGKILL)\ndef add(a, b):\n    return a - b",
        "return an object equal to everything": textwrap.dedent("""
            class Anything(int):
                def __eq__(self, other):
                    return True
                __hash__ = int.__hash__

            def add(a, b):
                return Anything(-1)
        """),
    }


STDIN_ATTACKS = {
    "the issue's forgery: print co_consts, os._exit(0)": "import os, sys\n"
        "print(*[c for c in sys._getframe().f_code.co_consts if isinstance(c, str)], flush=True)\nos._exit(0)",
    "print expected-looking output": "print('PASS')\nprint('OK: 4/4 tests passed')",
    "exit 0 without output": "import os\nos._exit(0)",
    "gc.get_objects() and stdin": FIND + "import gc, sys\na, b = map(int, sys.stdin.read().split())\n"
                                        "print(find([gc.get_objects()], (a, b)))",
}


@pytest.fixture(scope="module")
def dataset():
    """The expected values in a file everyone may read and write (as a careless dataset might be)."""
    folder = Path(tempfile.mkdtemp(prefix="align-dataset-"))
    folder.chmod(0o755)
    path = folder / "add.json"
    path.write_text(json.dumps({"cases": ADD_CASES, "tests": ASSERTS}))
    path.chmod(0o666)
    yield path
    shutil.rmtree(folder)


def _add_reward(python: str | None = None) -> SandboxReward:
    return SandboxReward(lambda prompt, completion: CodeTask(completion, ADD_CASES, function="add"), FAST, python=python)


ATTACK_NAMES = list(_attacks(Path("/dataset")))


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_attacks_on_a_function_task_score_zero(name, dataset, record_property):
    content = dataset.read_text()
    rewards = _add_reward()(["add"], [_attacks(dataset)[name]])
    record_property("data_lost", int(dataset.read_text() != content))
    assert rewards == [0.0] and dataset.read_text() == content  # nothing changed what the trainer reads


@pytest.mark.parametrize("name", list(STDIN_ATTACKS))
def test_attacks_on_a_stdin_task_score_zero(name):
    cases = [(f"{a} {b}\n", f"{c}\n") for (a, b), c in ADD_CASES]
    reward = SandboxReward(lambda prompt, completion: CodeTask(completion, cases), FAST)
    assert reward(["sum"], [STDIN_ATTACKS[name]]) == [0.0]


def test_honest_programs_score_the_fraction_of_cases_they_pass():
    reward = _add_reward()
    assert reward(["add"] * 3, ["def add(a, b):\n    return a + b",
                                "def add(a, b):\n    return a + b if a < 5 else 0",   # 2 of 4
                                "def add(a, b):\n    return a - b"]) == [1.0, 0.5, 0.0]


# The controls: the same attacks succeed where the expected values are within reach. This is what the
# opt-in assert mode cannot guarantee (the program and its tests share a process), and what the
# private root prevents.

def test_assert_tasks_can_be_forged(dataset):
    reward = SandboxReward(lambda prompt, completion: AssertTask(completion + "\n" + ASSERTS), FAST)
    attacks = _attacks(dataset)
    forged = [attacks["the issue's forgery: print co_consts, os._exit(0)"],
              attacks["read its source, its directory and the dataset file"]]
    assert reward(["add"] * 3, [*forged, "def add(a, b):\n    return a - b"]) == [1.0, 1.0, 0.0]


@pytest.mark.skipif(not isolation()["runs_as_nobody"], reason="without the user switch the sandbox runs as this user")
def test_without_the_private_root_a_readable_dataset_gives_the_answers_away(dataset, monkeypatch):
    attack = _attacks(dataset)["read its source, its directory and the dataset file"]
    assert _add_reward()(["add"], [attack]) == [0.0]
    monkeypatch.setattr(sandbox, "_private_filesystem", lambda python: False)
    python = sandbox.default_python.__wrapped__()  # one that runs without the private root
    assert _add_reward(python)(["add"], [attack]) == [1.0]
