"""The sandbox for code-executing rewards contains malicious completions (an infinite loop, file
deletion outside its directory, a fork bomb, network access, memory and output floods), and the code
reward judges outputs outside it. (Attempts to forge the reward: tests/test_security.py.)"""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from align.rewards import load_reward, sandbox
from align.rewards.sandbox import (AssertTask, Call, CodeTask, SandboxLimits, SandboxReward, call_python, isolation,
                                   run_python, same_json, same_output)

FAST = SandboxLimits(timeout=3.0)
ISOLATION = isolation()
needs_nobody = pytest.mark.skipif(not ISOLATION["runs_as_nobody"], reason="file protection comes from the user switch, "
                                  "which needs root; as another user the sandbox runs as that user")
needs_namespaces = pytest.mark.skipif(not ISOLATION["pid_namespace"], reason="no PID/network namespace on this machine")
needs_private_root = pytest.mark.skipif(not ISOLATION["private_filesystem"], reason="no private root on this machine")


def _outside_dir() -> Path:
    """A directory outside the sandbox that everyone may read (as a dataset usually is)."""
    outside = Path(tempfile.mkdtemp(prefix="align-precious-"))
    outside.chmod(0o755)
    return outside


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
    outside = _outside_dir()
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
                except OSError:  # not allowed (PermissionError), or not even there (in the private root)
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


@needs_private_root
def test_the_program_sees_only_the_system_the_interpreter_and_its_directory():
    outside = _outside_dir()
    dataset = outside / "expected.json"
    dataset.write_text("[5]")
    dataset.chmod(0o666)  # even a file everyone may read and write
    try:
        # The project's files stay hidden (its directory itself appears when the venv lies inside it).
        program = textwrap.dedent(f"""
            import errno, json, os
            print(json.dumps(os.listdir("/")))
            for path in ({str(dataset)!r}, "/proc/self/environ", {__file__!r}):
                print(path, os.path.exists(path))
            for path in ("/usr/new", "/etc/new", "/new", "new"):
                try:
                    open(path, "w").write("x")
                    print(path, "written")
                except OSError as error:
                    print(path, errno.errorcode[error.errno])
        """)
        result = run_python(program, FAST)
        lines = result.stdout.splitlines()
        bound = (*sandbox.SYSTEM_PATHS, *sandbox._interpreter_prefixes(sandbox.default_python()), "/dev/null",
                 tempfile.gettempdir())
        assert set(json.loads(lines[0])) <= {Path(path).parts[1] for path in bound}  # no /proc, /home, /work...
        assert lines[1:] == [f"{dataset} False", "/proc/self/environ False", f"{__file__} False",
                             "/usr/new EROFS", "/etc/new EROFS", "/new EROFS", "new written"], result.stderr
        assert dataset.read_text() == "[5]"
    finally:
        dataset.unlink()
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


def test_stdin_reaches_the_program():
    result = run_python("import sys\nprint(sum(map(int, sys.stdin.read().split())))", FAST, stdin="2 3\n4\n")
    assert result.passed and result.stdout == "9\n"


def test_a_function_is_called_on_each_input_and_its_values_come_back():
    program = textwrap.dedent("""
        import sys
        def f(a, b=0):
            if a == 3:
                sys.exit(0)                     # fails this call only
            return {"sum": a + b, "pair": (a, b), "ok": a > b}
        print("printing is allowed")
        if __name__ == "__main__":
            raise RuntimeError("not run: the program is loaded as a module")
    """)
    result, calls = call_python(program, "f", [(2, 1), [1], (3, 4), ("x", 1)], FAST)
    assert result.passed and result.stdout == "printing is allowed\n"
    assert calls[:2] == [Call(value={"sum": 3, "pair": [2, 1], "ok": True}), Call(value={"sum": 1, "pair": [1, 0], "ok": True})]
    assert calls[2] == Call(error="SystemExit: 0")
    assert calls[3].value is None and calls[3].error.startswith("TypeError: can only concatenate str")
    _, missing = call_python("def g(): pass", "f", [()], FAST)
    assert missing == [Call(error="NameError: the program defines no function 'f'")]
    # A call that does not return in time fails, with the calls after it; the ones before it count.
    result, calls = call_python("def f(x):\n    while x == 1: pass\n    return x", "f", [[0], [1], [2]], SandboxLimits(timeout=2))
    assert result.timed_out and calls[0] == Call(value=0) and calls[1].error == calls[2].error and calls[1].error.startswith("no result")


def test_reports_are_parsed_without_trusting_them():
    reported = "\n".join(['{"case": 0, "value": 5}', '{"case": 1, "value": 1}', '{"case": 1, "value": 2}',
                          '{"case": 7, "value": 1}', '{"case": true, "value": 1}', '{"case": "2", "value": 1}',
                          "[" * 100_000, "not json", '{"case": 2}', '{"value": 3}', '{"case": 3, "error": "boom"}'])
    assert sandbox._read_reports(reported, 5) == [
        Call(value=5), Call(error="reported more than once"),
        Call(error="no result: the program exited, crashed or ran out of time first"), Call(error="boom"),
        Call(error="no result: the program exited, crashed or ran out of time first")]


def test_comparisons():
    assert same_json(5, 5) and same_json(5, 5.0) and same_json((1, [2, "a"]), [1, [2, "a"]])
    assert same_json({"a": None, 1: [True]}, {"a": None, "1": [True]})  # as JSON: keys are strings
    assert not same_json(1, True) and not same_json(False, 0) and not same_json([1], [1, 1]) and not same_json("1", 1)
    assert not same_json(None, 0) and not same_json({"a": 1}, {"a": 1, "b": 2}) and not same_json(1.0, float("nan"))
    assert same_output("5\n6", "5  \n6\n\n") and same_output("", "\n")
    assert not same_output("5\n6", "5 6") and not same_output("5", " 5") and not same_output("5", "5\n\n6")


def test_code_tasks_are_checked():
    for kwargs, message in [(dict(cases=[]), "no cases"), (dict(cases=[("1",)]), "case 0: expected an .input"),
                            (dict(cases=[("1", 1)]), "a stdin/stdout case takes strings"),
                            (dict(cases=[((1,), 1), (1, 1)], function="f"), "case 1: the input of a call is a list"),
                            (dict(cases=[((1,), {1, 2})], function="f"), "case 0: the expected value {1, 2} is not"),
                            (dict(cases=[((object(),), 1)], function="f"), "case 0: the input of a call")]:
        with pytest.raises(ValueError, match=message):
            CodeTask("pass", **kwargs)
    CodeTask("pass", cases=[((1,), {1, 2})], function="f", compare=lambda expected, got: set(got) == expected)


# --- the reward -----------------------------------------------------------------------------

ADD_CASES = [((2, 3), 5), ((-1, 1), 0), ((10, 20), 30)]
SUM_CASES = [("2 3\n", "5\n"), ("-1 1\n", "0\n"), ("10 20\n", "30\n")]


def add_task(prompt: str, completion: str) -> CodeTask:
    return CodeTask(completion, ADD_CASES, function="add")


def sum_task(prompt: str, completion: str) -> CodeTask:
    return CodeTask(completion, SUM_CASES)


def test_function_tasks_are_judged_case_by_case():
    reward = SandboxReward(add_task, FAST)
    completions = ["def add(a, b):\n    return a + b",                # correct
                   "def add(a, b):\n    return a * b + 1 if a < 0 else a + b if a < 5 else 0",  # 2 of 3
                   "def add(a, b):\n    return a - b",                # wrong
                   "def add(a, b):\n    return str(a + b)",           # right digits, wrong type
                   "def add(a, b) return",                            # does not parse
                   "def plus(a, b):\n    return a + b"]               # not the function asked for
    assert reward(["add"] * 6, completions) == [1.0, pytest.approx(2 / 3), 0.0, 0.0, 0.0, 0.0]
    all_or_nothing = SandboxReward(lambda p, c: CodeTask(c, ADD_CASES, function="add", partial_credit=False), FAST)
    assert all_or_nothing(["add"] * 2, completions[:2]) == [1.0, 0.0]


def test_stdin_tasks_are_judged_case_by_case():
    reward = SandboxReward(sum_task, FAST)
    completions = ["a, b = map(int, input().split())\nprint(a + b)",          # correct
                   "a, b = map(int, input().split())\nprint(a + b, end='  \\n\\n')",  # trailing space: correct
                   "a, b = map(int, input().split())\nprint(a + b if a > 0 else 1)",  # 2 of 3
                   "a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(1)",  # right output, failed exit
                   "print(5)",                                                 # 1 of 3 by luck
                   "import time\ntime.sleep(60)"]                              # hangs
    assert reward(["sum"] * 6, completions) == [1.0, 1.0, pytest.approx(2 / 3), 0.0, pytest.approx(1 / 3), 0.0]


def test_a_custom_comparison_runs_in_the_trainer():
    def build(prompt, completion):
        return CodeTask(completion, [((2.0,), 1.4142135)], function="root",
                        compare=lambda expected, got: abs(got - expected) < 1e-6)

    reward = SandboxReward(build, FAST)
    assert reward(["r"] * 3, ["def root(x):\n    return x ** 0.5",
                              "def root(x):\n    return 1.4",
                              "def root(x):\n    return 'a string makes the comparison raise'"]) == [1.0, 0.0, 0.0]


ASSERT_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_assert_tasks_are_an_opt_in_and_score_programs_that_run_to_their_end():
    reward = SandboxReward(lambda prompt, completion: AssertTask(completion + "\n" + ASSERT_TESTS), FAST)
    completions = ["def add(a, b):\n    return a + b",   # correct
                   "def add(a, b):\n    return a - b",   # wrong
                   "def add(a, b):\n    while True: pass",  # hangs
                   "import sys\nsys.exit(0)",           # exits with success before the tests run
                   "def add(a, b) return"]              # does not parse
    assert reward(["add"] * 5, completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    # Partial credit: one program per test; add(a, b) = a * b + 1 passes only the second test.
    per_test = SandboxReward(lambda p, c: AssertTask([c + "\n" + line for line in ASSERT_TESTS.splitlines()]), FAST)
    assert per_test(["add"], ["def add(a, b):\n    return a * b + 1"]) == [0.5]


def test_sandbox_reward_from_a_config_spec(tmp_path, monkeypatch):
    (tmp_path / "my_code_reward.py").write_text(
        "from align.rewards.sandbox import CodeTask\n\n"
        "def build(prompt, completion):\n"
        f"    return CodeTask(completion, {ADD_CASES!r}, function='add')\n\n"
        "def old_style(prompt, completion):\n"
        "    return completion + '\\nassert add(2, 3) == 5\\n'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load_reward("sandbox:my_code_reward:build")
    assert isinstance(reward, SandboxReward)
    assert reward(["add", "add"], ["def add(a, b):\n    return a + b", "add = max"]) == [1.0, 0.0]
    # A program with its tests in it (the old interface) is refused: the program could forge them.
    with pytest.raises(TypeError, match="old_style returned str; return a CodeTask.* AssertTask"):
        load_reward("sandbox:my_code_reward:old_style")(["add"], ["def add(a, b):\n    return a + b"])


def test_limits_are_checked():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        SandboxLimits(timeout=0)
    with pytest.raises(ValueError, match="leaves the working directory"):
        run_python("pass", FAST, files={"../escape.py": "x"})
    assert not os.path.exists(Path(tempfile.gettempdir()) / "escape.py")
