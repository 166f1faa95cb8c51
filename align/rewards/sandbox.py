"""Run untrusted code (a generated program and its unit tests) in a contained subprocess, and a
reward built on it: ``reward: sandbox:my_module:build`` in a config.

Each program runs in its own subprocess, started with ``python -I`` in a fresh temporary working
directory that is deleted afterwards. What is enforced:

* **time**: a wall-clock limit (then the process group is killed) and a CPU-time limit
  (``RLIMIT_CPU``);
* **memory**: ``RLIMIT_AS`` (address space of each process);
* **processes**: ``RLIMIT_NPROC``, counted per user, which is why the program must not run as root
  (root ignores it): see *user* below;
* **files**: ``RLIMIT_FSIZE`` (largest file, stdout and stderr included: they go to files and are
  read back capped) and ``RLIMIT_NOFILE``; no core dumps;
* **network**: a new network namespace (``unshare --net``: only a loopback that is down) when the
  system allows one; in every case the interpreter refuses to create internet sockets (a program
  that goes around the ``socket`` module still meets the namespace, where there is one);
* **clean-up**: a new PID namespace (``unshare --pid --kill-child``) when allowed: when the program
  ends or is killed, every process it started dies with it (a fork bomb leaves nothing behind);
* **user**: started as root, the program runs as ``nobody``: it cannot delete or change other
  users' files, and ``RLIMIT_NPROC`` holds. Started as another user, it runs as that user (in a user
  namespace when allowed), so the file system is only protected by that user's permissions: train
  as a dedicated user, or in a container;
* **environment**: only ``PATH``, ``HOME``/``TMPDIR`` (the working directory) and ``LANG``: no
  proxies, tokens or ``PYTHON*`` variables.

``isolation()`` tells which of the namespaces and the user switch are in effect on this machine.
The interpreter is this one, or the system's ``python3`` when the sandbox user cannot run this one
(``default_python()``); pass ``python=`` to choose.
"""

from __future__ import annotations

import functools
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
from typing import Callable

logger = logging.getLogger(__name__)

NOBODY = 65534

# Runs first in the sandboxed interpreter (trusted code): limits, then the user switch, then the
# socket guard, then the program. Limits are set here rather than in a preexec_fn, which is unsafe
# in a multi-threaded parent such as a trainer.
GUARD = r"""
import os, resource, runpy, socket, sys
uid, cpu, memory, nproc, fsize, nofile = map(int, sys.argv[1:7])
for limit, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (memory, memory)),
                     (resource.RLIMIT_FSIZE, (fsize, fsize)), (resource.RLIMIT_NOFILE, (nofile, nofile)),
                     (resource.RLIMIT_CORE, (0, 0)), (resource.RLIMIT_NPROC, (nproc, nproc))):
    resource.setrlimit(limit, value)
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)

class Socket(socket.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None and family in (-1, socket.AF_INET, socket.AF_INET6):
            raise PermissionError("network access is disabled in the sandbox")
        super().__init__(family, type, proto, fileno)

socket.socket = Socket
sys.argv = sys.argv[7:]
runpy.run_path(sys.argv[0], run_name="__main__")
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

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@functools.cache
def _namespace_prefix() -> tuple[str, ...]:
    """``unshare`` with new network and PID namespaces, if this system allows them (probed once)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    flags = ("--net", "--pid", "--fork", "--kill-child")
    if os.geteuid() != 0:
        flags = ("--user", "--map-root-user") + flags
    try:
        ok = subprocess.run([unshare, *flags, "--", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        logger.warning("sandbox: no network or PID namespace here; network is only blocked inside the interpreter")
        return ()
    return (unshare, *flags, "--")


def isolation() -> dict[str, bool]:
    """Which protections beyond the resource limits are in effect on this machine."""
    namespaces = bool(_namespace_prefix())
    return {"network_namespace": namespaces, "pid_namespace": namespaces, "runs_as_nobody": os.geteuid() == 0}


@functools.cache
def default_python() -> str:
    """The interpreter for sandboxed programs: this one, or the system's ``python3`` if the sandbox
    user cannot run this one (e.g. it lives in root's private home directory)."""
    candidates = dict.fromkeys([sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")])
    for python in filter(None, candidates):
        if run_python("import json, unittest", SandboxLimits(timeout=60), python=python).passed:
            return python
    raise RuntimeError(f"no Python interpreter that the sandbox user can run among {list(filter(None, candidates))}; "
                       "install one outside private directories and pass python=...")


def run_python(source: str, limits: SandboxLimits = SandboxLimits(), files: dict[str, str] | None = None,
               python: str | None = None) -> SandboxResult:
    """Run ``source`` as ``main.py`` (with ``files``, name -> text, beside it) in the sandbox, with
    ``python`` (default: ``default_python()``)."""
    python = python or default_python()
    workdir = Path(tempfile.mkdtemp(prefix="align-sandbox-"))
    try:
        uid = NOBODY if os.geteuid() == 0 else -1
        for name, text in {"main.py": source, **(files or {})}.items():
            path = workdir / name
            if not path.resolve().is_relative_to(workdir.resolve()):
                raise ValueError(f"sandbox file name {name!r} leaves the working directory")
            path.write_text(text, encoding="utf-8")
        if uid >= 0:
            os.chown(workdir, uid, uid)  # the program's own directory: the only one it may write to
        mb = 1 << 20
        cmd = [*_namespace_prefix(), python, "-I", "-c", GUARD, str(uid), str(math.ceil(limits.timeout)),
               str(limits.memory_mb * mb), str(limits.processes), str(limits.file_mb * mb), str(limits.open_files),
               "main.py"]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
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
            out.seek(0)
            err.seek(0)
            stdout = out.read(limits.output_chars).decode("utf-8", errors="replace")
            stderr = err.read(limits.output_chars).decode("utf-8", errors="replace")
        return SandboxResult(returncode=returncode, timed_out=timed_out, stdout=stdout, stderr=stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class SandboxReward:
    """Reward = the fraction of the programs ``build(prompt, completion)`` returns (one string or a
    list) that run to their end in the sandbox: e.g. the completion followed by the prompt's unit
    tests, one program per test for partial credit. ``build`` runs in the trainer (it is the user's
    own code); only the programs it returns run sandboxed.

    A program passes when it exits with status 0 *and* prints, last, a random token appended to it
    for this call: a completion that exits early with success (``sys.exit(0)`` before the tests) does
    not pass. A completion that loops, crashes or breaks a limit scores 0: that is the completion's
    failure, not the reward's.
    """

    def __init__(self, build: Callable[[str, str], str | list[str]], limits: SandboxLimits = SandboxLimits(),
                 workers: int | None = None, python: str | None = None):
        self.build, self.limits, self.workers, self.python = build, limits, workers or os.cpu_count() or 1, python

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        programs = []
        for prompt, completion in zip(prompts, completions):
            built = self.build(prompt, completion)
            programs.append([built] if isinstance(built, str) else list(built))
        token = secrets.token_hex(16)
        flat = [f"{source}\nprint({token!r})\n" for group in programs for source in group]
        with ThreadPoolExecutor(self.workers) as pool:
            results = pool.map(lambda s: run_python(s, self.limits, python=self.python), flat)
            passed = iter([r.passed and r.stdout.rstrip().endswith(token) for r in results])
        return [sum(next(passed) for _ in group) / len(group) if group else 0.0 for group in programs]
