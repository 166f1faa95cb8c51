"""The sandbox for code-executing rewards contains malicious completions: an infinite loop, file
deletion outside its directory, a fork bomb, network access, memory and output floods."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from align.rewards import load_reward
from align.rewards.sandbox import SandboxLimits, SandboxReward, isolation, run_python

FAST = SandboxLimits(timeout=3.0)
ISOLATION = isolation()
needs_nobody = pytest.mark.skipif(not ISOLATION["runs_as_nobody"], reason="file protection comes from the user switch, "
                                  "which needs root; as another user the sandbox runs as that user")
needs_namespaces = pytest.mark.skipif(not ISOLATION["pid_namespace"], reason="no PID/network namespace on this machine")


def _processes_in(directory: str) -> int:
    """Processes whose working directory is ``directory`` (or what is left of it)."""
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            count += entry.name.isdigit() and os.readlink(entry / "cwd").startswith(directory)
        except OSError:  # gone meanwhile, or a kernel thread
            pass
    return count


def test_a_program_runs_in_a_fresh_directory_with_a_clean_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    result = run_python("import os, sys\nprint(os.getcwd())\nprint(sorted(os.environ))\nsys.exit(3)", FAST)
    assert result.returncode == 3 and not result.passed and not result.timed_out
    workdir, env = result.stdout.splitlines()
    assert Path(workdir).name.startswith("align-sandbox-") and not Path(workdir).exists()  # removed afterwards
    assert env == "['HOME', 'LANG', 'PATH', 'TMPDIR']"
    assert run_python("import json, unittest\nassert json.loads('[1]') == [1]", FAST).passed


def test_infinite_loop_is_killed_at_the_time_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass", SandboxLimits(timeout=1.0))
    assert result.timed_out and not result.passed and time.monotonic() - start < 10


@needs_nobody
def test_files_outside_its_directory_cannot_be_deleted_or_changed():
    outside = Path(tempfile.mkdtemp(prefix="align-precious-"))  # in /tmp, readable by everyone
    outside.chmod(0o755)
    precious = outside / "precious.txt"
    precious.write_text("keep me")
    try:
        program = textwrap.dedent(f"""
            import os, shutil, subprocess
            errors = 0
            for attack in (lambda: os.remove({str(precious)!r}), lambda: shutil.rmtree({str(outside)!r}),
                           lambda: open({str(precious)!r}, "w").write("gone"), lambda: os.chmod({str(precious)!r}, 0o777)):
                try:
                    attack()
                except PermissionError:
                    errors += 1
            subprocess.run(["rm", "-rf", {str(outside)!r}])
            print(errors)
        """)
        result = run_python(program, FAST)
        assert result.stdout.strip() == "4", result.stderr
        assert precious.read_text() == "keep me" and stat.S_IMODE(precious.stat().st_mode) == 0o644
    finally:
        precious.unlink()
        outside.rmdir()


@needs_nobody
@needs_namespaces
def test_fork_bomb_is_contained_and_leaves_nothing_behind():
    program = "import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    result = run_python(program, SandboxLimits(timeout=2.0, processes=8))
    assert result.timed_out and time.monotonic() - start < 15
    workdir = result.stdout.splitlines()[0]
    deadline = time.monotonic() + 10  # the kernel tears the PID namespace down asynchronously
    while _processes_in(workdir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_in(workdir) == 0


def test_no_network():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted, done = [], threading.Event()

    def accept():
        while not done.is_set():
            try:
                accepted.append(server.accept())
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    via_module = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", FAST)
    assert "network access is disabled in the sandbox" in via_module.stderr
    if ISOLATION["network_namespace"]:  # going around the socket module meets an empty network namespace
        raw = run_python(f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))", FAST)
        assert not raw.passed and "Network is unreachable" in raw.stderr
    done.set()
    thread.join()
    server.close()
    assert accepted == []


def test_memory_limit():
    result = run_python("block = bytearray(4 * 1024**3)", SandboxLimits(timeout=5.0, memory_mb=512))
    assert not result.passed and "MemoryError" in result.stderr


def test_output_flood_is_capped():
    result = run_python("while True:\n    print('x' * 1000)", SandboxLimits(timeout=3.0, file_mb=1, output_chars=5000))
    assert not result.passed and len(result.stdout) == 5000


# --- the reward -----------------------------------------------------------------------------

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def build(prompt: str, completion: str) -> str:
    return completion + "\n" + TESTS


def build_per_test(prompt: str, completion: str) -> list[str]:
    return [completion + "\n" + line for line in TESTS.splitlines()]


def test_sandbox_reward_scores_completions():
    reward = SandboxReward(build, FAST)
    completions = ["def add(a, b):\n    return a + b",   # correct
                   "def add(a, b):\n    return a - b",   # wrong
                   "def add(a, b):\n    while True: pass",  # hangs
                   "import sys\nsys.exit(0)",           # exits with success before the tests run
                   "def add(a, b) return"]              # does not parse
    assert reward(["add"] * 5, completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    # Partial credit: one program per test; add(a, b) = a * b + 1 passes only the second test.
    assert SandboxReward(build_per_test, FAST)(["add"], ["def add(a, b):\n    return a * b + 1"]) == [0.5]


def test_sandbox_reward_from_a_config_spec(tmp_path, monkeypatch):
    (tmp_path / "my_code_reward.py").write_text(f"TESTS = {TESTS!r}\n\ndef build(prompt, completion):\n"
                                                "    return completion + '\\n' + TESTS\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load_reward("sandbox:my_code_reward:build")
    assert isinstance(reward, SandboxReward)
    assert reward(["add", "add"], ["def add(a, b):\n    return a + b", "add = max"]) == [1.0, 0.0]


def test_limits_are_checked():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        SandboxLimits(timeout=0)
    with pytest.raises(ValueError, match="leaves the working directory"):
        run_python("pass", FAST, files={"../escape.py": "x"})
    assert not os.path.exists(Path(tempfile.gettempdir()) / "escape.py")
