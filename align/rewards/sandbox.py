"""Run untrusted code (generated programs) in a contained subprocess, and a code reward built on it:
``reward: sandbox:my_module:build`` in a config.

The reward
==========

``build(prompt, completion)`` (the user's own code; it runs in the trainer) returns a ``CodeTask``:
the program and its test cases. The default judge keeps the verdict out of the untrusted process:
only the *inputs* of the cases enter the sandbox, the program's *outputs* come back, and the trainer
compares them with the expected outputs, which never enter the sandbox. Whatever the program does
(print anything, exit early, patch builtins, read its own code, files or memory) it can only change
its own outputs; to score, they must equal values it never saw::

    from align.rewards.sandbox import CodeTask

    def build(prompt, completion):                      # a function task: "write def add(a, b)"
        return CodeTask(completion, cases=[((2, 3), 5), ((-1, 1), 0)], function="add")

    def build_io(prompt, completion):                   # a stdin/stdout task: "print the sum of two ints"
        return CodeTask(completion, cases=[("2 3\\n", "5\\n"), ("-1 1\\n", "0\\n")])

* ``function=None`` (stdin/stdout): each case runs the program once, with the case's input (a
  string) on stdin; it passes when the program exits with status 0 within the limits and its stdout
  equals the expected string, trailing whitespace of each line and trailing blank lines aside
  (``same_output``).
* ``function="add"``: one run loads the program (as module ``solution``, so an
  ``if __name__ == "__main__":`` block does not run) and a trusted harness calls ``add(*arguments)``
  for each case, in order, sending each returned value back as JSON on a descriptor of its own (an
  exception fails that case only). A case passes when its value equals the expected one as JSON
  values (``same_json``: a tuple is a list; ``True`` is not ``1``). Values that arrived count even if
  the program then hangs or crashes; the time limit is for all the cases together. Arguments,
  returned values and default-compared expected values must be JSON values.
* ``compare(expected, got) -> bool`` replaces the default comparison (it runs in the trainer), e.g. a
  float tolerance.
* Reward = the fraction of cases passed (``partial_credit=True``, the default: a denser signal for
  RL), or 1.0 only if all pass (``partial_credit=False``).

``AssertTask(programs)`` is the opt-in **self-checking** mode: each program (e.g. the completion
followed by ``assert`` tests) passes if it runs to its end, which a random token printed after it
checks. It is *forgeable*: the program and its tests share one process, so the program can read the
tests and the token (``sys._getframe().f_code.co_consts``, its own file), print the token and exit
before the tests run, or neuter the asserts. Use it for trusted code or evaluation of honest models,
never as an RL reward. ``build`` returning a bare string (the old interface) is an error that says so.

The sandbox
===========

Each program runs with ``python -I`` in a fresh temporary working directory, deleted afterwards:

* **time**: a wall-clock limit (then the process group is killed) and a CPU-time limit (``RLIMIT_CPU``);
* **memory**: ``RLIMIT_AS``; **files**: ``RLIMIT_FSIZE`` (stdout, stderr and the results included:
  they go to files and are read back capped) and ``RLIMIT_NOFILE``; no core dumps;
* **processes**: ``RLIMIT_NPROC``, counted per user (hence *user* below); and, when the system allows
  namespaces (``unshare``), a new PID namespace: every process the program started dies with it, and
  it sees no process outside it;
* **network**: a new network namespace (only a loopback that is down); in every case the interpreter
  refuses internet sockets. A new IPC namespace: no System V channels between sandboxes;
* **file system**: with namespaces, a root of its own, built from read-only binds of the system
  directories (``/usr``, ``/etc``, ...), the interpreter's prefixes, a few devices (``/dev/null``...)
  and the working directory (the only writable place); the trainer's files, datasets, other
  sandboxes' directories and ``/proc`` are not there. Without namespaces it sees every file the
  sandbox user may read;
* **user**: started as root, the program runs as ``nobody``: it cannot change other users' files or
  read the trainer's memory. Started as another user, it runs as that user, inside a user namespace
  when allowed (then the PID namespace hides the trainer, and the private root its files);
  otherwise nothing separates it from that user's files and processes: train as a dedicated user, or
  in a container. ``PR_SET_NO_NEW_PRIVS``: setuid programs gain nothing;
* **environment**: only ``PATH``, ``HOME``/``TMPDIR`` (the working directory) and ``LANG``.

``isolation()`` tells which of these are in effect on this machine; the reward logs a warning when a
program could read expected outputs (no private file system, or no separate user). The interpreter
is this one, or the system's ``python3`` when the sandbox cannot run this one (``default_python()``);
pass ``python=`` to choose.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

NOBODY = 65534
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")  # read-only in the view
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")

# Runs first in the sandboxed interpreter (trusted code): the private root, limits, the user switch,
# the socket guard, then the program, or for a function task the harness around it. Limits are set
# here rather than in a preexec_fn, which is unsafe in a multi-threaded parent such as a trainer.
GUARD = r"""
import ctypes, json, os, resource, runpy, socket, sys

config = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
NOATIME, NODIRATIME, RELATIME, STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}  # syscall numbers


def check(status, what):
    if status != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"sandbox: {what}: {os.strerror(error)}")


def mount(source, target, flags, fstype=None, data=None):
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                     data and data.encode()), f"mount {source} on {target}")


def kept_flags(path):
    # A read-only remount must keep the flags the kernel locked on the original mount (in a user namespace).
    flags = os.statvfs(path).f_flag
    atime = NOATIME if flags & os.ST_NOATIME else 0 if flags & os.ST_RELATIME else STRICTATIME
    return atime | (NODIRATIME if flags & os.ST_NODIRATIME else 0) | (NOEXEC if flags & os.ST_NOEXEC else 0)


def enter_view(root, plan):
    # A root of its own: a tmpfs with what the plan binds; the old root is detached, so nothing else
    # (the trainer's files, other sandboxes, /proc) can be reached, even by a process with capabilities.
    os.umask(0o022)
    mount(None, "/", REC | PRIVATE)
    mount("tmpfs", root, NOSUID | NODEV, "tmpfs", "mode=755,size=1m")
    for kind, source, target in plan:
        inside = root + target
        os.makedirs(os.path.dirname(inside), exist_ok=True)
        if kind == "link":
            os.symlink(source, inside)
            continue
        if os.path.isdir(source):
            os.makedirs(inside, exist_ok=True)
        else:
            open(inside, "a").close()
        mount(source, inside, BIND | REC)
        if kind == "ro":
            mount(None, inside, REMOUNT | BIND | RDONLY | NOSUID | NODEV | kept_flags(source))
    os.chdir(root)
    check(libc.syscall(ctypes.c_long(PIVOT_ROOT[os.uname().machine]), b".", b"."), "pivot_root")
    check(libc.umount2(b".", 2), "detach the old root")  # MNT_DETACH
    mount(None, "/", REMOUNT | BIND | RDONLY | NOSUID | NODEV)


if config["root"]:
    enter_view(config["root"], config["plan"])
os.chdir(config["workdir"])
for limit, value in ((resource.RLIMIT_CPU, (config["cpu"], config["cpu"] + 1)),
                     (resource.RLIMIT_AS, (config["memory"],) * 2), (resource.RLIMIT_FSIZE, (config["fsize"],) * 2),
                     (resource.RLIMIT_NOFILE, (config["nofile"],) * 2), (resource.RLIMIT_CORE, (0, 0)),
                     (resource.RLIMIT_NPROC, (config["nproc"],) * 2)):
    resource.setrlimit(limit, value)
check(libc.prctl(38, *map(ctypes.c_ulong, (1, 0, 0, 0))), "no new privileges")  # PR_SET_NO_NEW_PRIVS
if config["uid"] >= 0:
    os.setgroups([])
    os.setgid(config["uid"])
    os.setuid(config["uid"])


class Socket(socket.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None and family in (-1, socket.AF_INET, socket.AF_INET6):
            raise PermissionError("network access is disabled in the sandbox")
        super().__init__(family, type, proto, fileno)


socket.socket = Socket
sys.argv = ["main.py"]
if config["function"] is None:
    runpy.run_path("main.py", run_name="__main__")
else:
    # The harness: the arguments of each call come on stdin (the expected values never do); each value
    # returned goes back as one JSON line on the report descriptor, and the trainer compares.
    calls = json.loads(sys.stdin.buffer.read())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    name, report = config["function"], config["report_fd"]
    function = runpy.run_path("main.py", run_name="solution").get(name)
    for case, arguments in enumerate(calls):
        try:
            if not callable(function):
                raise NameError(f"the program defines no function {name!r}")
            line = json.dumps({"case": case, "value": function(*arguments)}, allow_nan=False)
        except BaseException as error:  # this case failed (SystemExit included); the next ones still run
            line = json.dumps({"case": case, "error": f"{type(error).__name__}: {error}"[:500]})
        os.write(report, line.encode() + b"\n")
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 10.0  # wall-clock seconds (CPU seconds: the same, rounded up)
    memory_mb: int = 1024
    processes: int = 16  # of the sandbox user, all sandboxes together
    file_mb: int = 16
    open_files: int = 64
    output_chars: int = 65536  # of stdout and of stderr kept in the result

    def __post_init__(self):
        for name in ("timeout", "memory_mb", "processes", "file_mb", "open_files", "output_chars"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class SandboxResult:
    returncode: int  # negative: killed by that signal
    timed_out: bool
    stdout: str
    stderr: str
    stdout_truncated: bool = False  # longer than output_chars: ``stdout`` is its beginning
    reported: str = ""  # what the harness of a function task wrote on its report descriptor (untrusted)

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass(frozen=True)
class Call:
    """What one call of a function task gave, as reported from the sandbox: a JSON value, or an error
    (the exception it raised, or why no usable report came back)."""
    value: Any = None
    error: str | None = None


@functools.cache
def _namespace_prefix() -> tuple[str, ...]:
    """``unshare`` with new network, PID, IPC and mount namespaces, if this system allows them (probed once)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    flags = ("--net", "--pid", "--ipc", "--mount", "--fork", "--kill-child")
    if os.geteuid() != 0:
        flags = ("--user", "--map-root-user") + flags
    try:
        ok = subprocess.run([unshare, *flags, "--", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        logger.warning("sandbox: no namespaces here; network is only blocked inside the interpreter, and the "
                       "program sees the whole file system")
        return ()
    return (unshare, *flags, "--")


@functools.cache
def _interpreter_prefixes(python: str) -> tuple[str, ...]:
    """Where ``python`` keeps its standard library and packages (it must be visible in the view)."""
    code = "import sys; print('\\n'.join({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}))"
    out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    return tuple(sorted(filter(None, out.splitlines())))


def _view_plan(python: str, workdir: Path) -> list[tuple[str, str, str]]:
    """(kind, source, target) of the private root: ``ro`` and ``rw`` binds, and ``link`` (a symbolic
    link, source = its text, whose target is bound too). A path already inside a bound one is skipped."""
    plan, bound = [], []

    def add(path: str, kind: str):
        location = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        if not os.path.lexists(path) or any(Path(location).is_relative_to(b) for b in bound):
            return
        if os.path.islink(path):
            plan.append(("link", os.readlink(path), location))
            add(os.path.realpath(path), kind)
        else:
            plan.append((kind, path, location))
            bound.append(location)

    for path in (*SYSTEM_PATHS, *_interpreter_prefixes(python)):
        add(path, "ro")
    for device in DEVICES:
        add(device, "rw")
    return plan + [("rw", str(workdir), str(workdir))]  # bound last, even inside a read-only bind


@functools.cache
def _private_filesystem(python: str) -> bool:
    """Whether programs run by ``python`` get a private root on this machine (probed once)."""
    if not _namespace_prefix():
        return False
    try:
        result = _execute("import json", SandboxLimits(timeout=60), None, python, view=True)
    except (OSError, subprocess.SubprocessError) as err:
        result = SandboxResult(-1, False, "", str(err))
    if not result.passed:
        why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        logger.warning("sandbox: no private file system for %s (%s); programs see every file the sandbox user "
                       "may read", python, why)
    return result.passed


def isolation() -> dict[str, bool]:
    """Which protections beyond the resource limits are in effect on this machine."""
    namespaces = bool(_namespace_prefix())
    return {"network_namespace": namespaces, "pid_namespace": namespaces,
            "private_filesystem": _private_filesystem(default_python()), "runs_as_nobody": os.geteuid() == 0}


@functools.cache
def default_python() -> str:
    """The interpreter for sandboxed programs: this one, or the system's ``python3`` if the sandbox
    cannot run this one (e.g. it lives in root's private home directory and there is no private root)."""
    candidates = dict.fromkeys([sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")])
    for python in filter(None, candidates):
        if run_python("import json, unittest", SandboxLimits(timeout=60), python=python).passed:
            return python
    raise RuntimeError(f"no Python interpreter that the sandbox user can run among {list(filter(None, candidates))}; "
                       "install one outside private directories and pass python=...")


def _execute(source: str, limits: SandboxLimits, files: dict[str, str] | None, python: str, *, view: bool,
             stdin: bytes = b"", function: str | None = None) -> SandboxResult:
    """Run ``source`` as ``main.py`` in the sandbox (in a private root if ``view``), with ``stdin``;
    with ``function``, the harness calls it on the arguments ``stdin`` holds (JSON) and reports."""
    workdir = Path(tempfile.mkdtemp(prefix="align-sandbox-")).resolve()
    root = tempfile.mkdtemp(prefix="align-sandbox-root-") if view else None  # a mount point, in its namespace only
    try:
        uid = NOBODY if os.geteuid() == 0 else -1
        for name, text in {"main.py": source, **(files or {})}.items():
            path = workdir / name
            if not path.resolve().is_relative_to(workdir):
                raise ValueError(f"sandbox file name {name!r} leaves the working directory")
            path.write_text(text, encoding="utf-8")
        if uid >= 0:
            os.chown(workdir, uid, uid)  # the program's own directory: the only one it may write to
        mb = 1 << 20
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
        with tempfile.TemporaryFile() as given, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                tempfile.TemporaryFile() as report:
            given.write(stdin)
            given.seek(0)
            config = {"uid": uid, "cpu": math.ceil(limits.timeout), "memory": limits.memory_mb * mb,
                      "nproc": limits.processes, "fsize": limits.file_mb * mb, "nofile": limits.open_files,
                      "workdir": str(workdir), "root": root, "plan": _view_plan(python, workdir) if view else [],
                      "function": function, "report_fd": report.fileno()}
            cmd = [*_namespace_prefix(), python, "-I", "-c", GUARD, json.dumps(config)]
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=given, stdout=out, stderr=err,
                                    pass_fds=(report.fileno(),) if function else (), start_new_session=True)
            try:
                returncode, timed_out = proc.wait(timeout=limits.timeout), False
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            finally:
                try:  # whatever it left running in its session dies with it
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                returncode = proc.wait() if returncode is None else returncode
            texts = []
            for file, cap in ((out, limits.output_chars), (err, limits.output_chars), (report, limits.file_mb * mb)):
                file.seek(0)
                texts.append(file.read(cap).decode("utf-8", errors="replace"))
            truncated = out.seek(0, os.SEEK_END) > limits.output_chars
        return SandboxResult(returncode, timed_out, texts[0], texts[1], stdout_truncated=truncated, reported=texts[2])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if root:
            shutil.rmtree(root, ignore_errors=True)


def run_python(source: str, limits: SandboxLimits = SandboxLimits(), files: dict[str, str] | None = None,
               python: str | None = None, *, stdin: str = "") -> SandboxResult:
    """Run ``source`` as ``main.py`` (with ``files``, name -> text, beside it) in the sandbox, with
    ``stdin`` as its standard input and ``python`` (default: ``default_python()``)."""
    python = python or default_python()
    return _execute(source, limits, files, python, view=_private_filesystem(python), stdin=stdin.encode())


def _read_reports(reported: str, count: int) -> list[Call]:
    """One ``Call`` per case from the harness's JSON lines. Nothing here is trusted: a line that is not
    a report is ignored, and a case reported twice or never fails."""
    calls: dict[int, Call] = {}
    for line in reported.splitlines():
        try:
            entry = json.loads(line)
            case = entry["case"]
            call = Call(error=str(entry["error"])) if "error" in entry else Call(value=entry["value"])
        except (ValueError, TypeError, KeyError, RecursionError):  # RecursionError: nested past the parser's depth
            continue
        if type(case) is int and 0 <= case < count:
            calls[case] = Call(error="reported more than once") if case in calls else call
    missing = Call(error="no result: the program exited, crashed or ran out of time first")
    return [calls.get(case, missing) for case in range(count)]


def call_python(source: str, function: str, arguments: Sequence[Sequence], limits: SandboxLimits = SandboxLimits(),
                python: str | None = None) -> tuple[SandboxResult, list[Call]]:
    """Load ``source`` in the sandbox and call ``function(*args)`` for each ``args`` in ``arguments``
    (JSON values), in order, in one run: the run and what each call gave."""
    python = python or default_python()
    result = _execute(source, limits, None, python, view=_private_filesystem(python), function=function,
                      stdin=json.dumps([list(args) for args in arguments]).encode())
    return result, _read_reports(result.reported, len(arguments))


def _json_equal(expected: Any, got: Any) -> bool:
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(expected) is type(got) and expected == got
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        return expected == got
    if isinstance(expected, list) and isinstance(got, list):
        return len(expected) == len(got) and all(map(_json_equal, expected, got))
    if isinstance(expected, dict) and isinstance(got, dict):
        return expected.keys() == got.keys() and all(_json_equal(v, got[k]) for k, v in expected.items())
    return type(expected) is type(got) and expected == got  # strings, None


def same_json(expected: Any, got: Any) -> bool:
    """``got`` (parsed from JSON) equals ``expected`` as JSON values: numbers by value, but a bool is
    not a number; a tuple in ``expected`` is a list."""
    return _json_equal(json.loads(json.dumps(expected)), got)


def same_output(expected: str, got: str) -> bool:
    """The same lines, trailing whitespace of each line and trailing blank lines aside."""
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip().splitlines()]

    return lines(expected) == lines(got)


def _agrees(compare: Callable[[Any, Any], bool], expected: Any, got: Any) -> bool:
    """``compare(expected, got)``; ``got`` comes from the program, so a comparison it makes raise fails."""
    try:
        return bool(compare(expected, got))
    except Exception:
        return False


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class CodeTask:
    """A program and its test cases, judged outside the sandbox (see the module docstring).

    ``cases``: ``(input, expected)`` pairs. With ``function=None`` the input is the program's stdin
    and ``expected`` its stdout (strings); with ``function="name"`` the input is a list or tuple of
    positional arguments and ``expected`` the value returned (JSON values). ``compare(expected, got)``
    replaces the default comparison; ``partial_credit``: reward the fraction of cases passed (else 1.0
    only when all pass).
    """
    program: str
    cases: Sequence[tuple[Any, Any]]
    function: str | None = None
    compare: Callable[[Any, Any], bool] | None = None
    partial_credit: bool = True

    def __post_init__(self):
        if not isinstance(self.program, str):
            raise TypeError(f"CodeTask.program must be a string, got {type(self.program).__name__}")
        if not self.cases:
            raise ValueError("CodeTask has no cases: nothing to judge")
        for i, case in enumerate(self.cases):
            if not (isinstance(case, (list, tuple)) and len(case) == 2):
                raise ValueError(f"CodeTask case {i}: expected an (input, expected output) pair, got {case!r}")
            given, expected = case
            if self.function is None:
                if not isinstance(given, str) or (self.compare is None and not isinstance(expected, str)):
                    raise ValueError(f"CodeTask case {i}: a stdin/stdout case takes strings (stdin, expected stdout), "
                                     f"got ({type(given).__name__}, {type(expected).__name__})")
            elif not isinstance(given, (list, tuple)) or not _is_json(given):
                raise ValueError(f"CodeTask case {i}: the input of a call is a list or tuple of JSON arguments, "
                                 f"got {given!r}")
            elif self.compare is None and not _is_json(expected):
                raise ValueError(f"CodeTask case {i}: the expected value {expected!r} is not a JSON value; "
                                 "convert it (e.g. a set to a sorted list) or pass compare=")


@dataclass(frozen=True)
class AssertTask:
    """Opt-in and FORGEABLE: self-checking programs (e.g. the completion followed by ``assert`` tests),
    each passing if it runs to its end. The program and its tests share one process, so a program can
    read the tests and the success token and fake a pass; see the module docstring. Reward = the
    fraction of the programs that pass."""
    programs: str | Sequence[str]


class SandboxReward:
    """Reward = what ``build(prompt, completion)`` scores in the sandbox: a ``CodeTask`` (judged
    outside the sandbox: the fraction of its cases passed, by default) or an ``AssertTask`` (opt-in,
    forgeable). ``build`` runs in the trainer (it is the user's own code); only the programs run
    sandboxed, up to ``workers`` at a time. A program that loops, crashes or breaks a limit scores 0 on
    the cases it did not answer: that is the completion's failure, not the reward's.
    """

    def __init__(self, build: Callable[[str, str], CodeTask | AssertTask], limits: SandboxLimits = SandboxLimits(),
                 workers: int | None = None, python: str | None = None):
        self.build, self.limits, self.workers, self.python = build, limits, workers or os.cpu_count() or 1, python
        self._warned = False

    def _task(self, prompt: str, completion: str) -> CodeTask | AssertTask:
        task = self.build(prompt, completion)
        if not isinstance(task, (CodeTask, AssertTask)):
            name = getattr(self.build, "__name__", repr(self.build))
            raise TypeError(f"sandbox reward: {name} returned {type(task).__name__}; return a CodeTask(program, "
                            "cases=[(input, expected), ...]) so that the trainer judges the outputs, or, for "
                            "self-checking programs that a program can forge, AssertTask(programs)")
        return task

    def _warn_once(self, tasks: list, python: str):
        if self._warned:
            return
        self._warned = True
        if any(isinstance(t, AssertTask) for t in tasks):
            logger.warning("sandbox reward: AssertTask programs check themselves and can fake a pass (print the "
                           "success token, exit before the tests); use CodeTask for RL")
        if not _private_filesystem(python):
            logger.warning("sandbox reward: programs can read every file the sandbox user may read: keep expected "
                           "outputs (datasets, the build module) unreadable to it")
        if os.geteuid() != 0 and not _namespace_prefix():
            logger.warning("sandbox reward: programs run as this user without namespaces: they can read this "
                           "process's memory, expected outputs included")

    def _jobs(self, task: CodeTask | AssertTask, python: str, token: str) -> list[Callable[[], list[bool]]]:
        """The sandbox runs that judge ``task``, each giving the verdicts of some of its cases."""
        limits = self.limits
        if isinstance(task, AssertTask):
            programs = [task.programs] if isinstance(task.programs, str) else list(task.programs)

            def runs_to_its_end(program: str) -> list[bool]:
                result = run_python(f"{program}\nprint({token!r})\n", limits, python=python)
                return [result.passed and result.stdout.rstrip().endswith(token)]

            return [functools.partial(runs_to_its_end, program) for program in programs]
        if task.function is None:
            def prints_expected(given: str, expected: str) -> list[bool]:
                result = run_python(task.program, limits, python=python, stdin=given)
                return [result.passed and not result.stdout_truncated
                        and _agrees(task.compare or same_output, expected, result.stdout)]

            return [functools.partial(prints_expected, *case) for case in task.cases]

        def returns_expected() -> list[bool]:
            _, calls = call_python(task.program, task.function, [given for given, _ in task.cases], limits, python)
            return [call.error is None and _agrees(task.compare or same_json, expected, call.value)
                    for call, (_, expected) in zip(calls, task.cases)]

        return [returns_expected]

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        tasks = [self._task(prompt, completion) for prompt, completion in zip(prompts, completions)]
        python = self.python or default_python()
        self._warn_once(tasks, python)
        token = secrets.token_hex(16)
        jobs = [(t, job) for t, task in enumerate(tasks) for job in self._jobs(task, python, token)]
        verdicts: list[list[bool]] = [[] for _ in tasks]
        with ThreadPoolExecutor(self.workers) as pool:
            for (t, _), passed in zip(jobs, pool.map(lambda job: job[1](), jobs)):
                verdicts[t] += passed
        scores = []
        for task, passed in zip(tasks, verdicts):
            partial = isinstance(task, AssertTask) or task.partial_credit
            scores.append(sum(passed) / len(passed) if partial and passed else float(bool(passed) and all(passed)))
        return scores
