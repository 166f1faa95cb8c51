"""Crash-safe checkpoints and output paths.

A checkpoint directory ``checkpoint-N`` only ever appears complete. The trainer writes it inside
``.tmp-checkpoint-N``, records every file's size and SHA-256 in ``align_checkpoint.json`` (with the
state align itself needs to resume exactly), fsyncs, and renames it into place: one ``rename``,
atomic on POSIX file systems. A crash at any moment leaves the earlier checkpoints as they were; the
next save removes the leftover ``.tmp-*`` directory. Rotation (``save_total_limit``) runs only after
a new checkpoint is in place and never deletes it. Before resuming, the manifest is checked, so a
truncated or altered file is reported by name instead of failing inside ``torch.load``; ``--resume``
without a directory takes the newest checkpoint that passes the check, or starts afresh when there is none.

What a checkpoint holds (transformers writes all but the manifest): the adapter (safetensors); the
optimizer, LR scheduler and RNG states (``torch.save``: transformers reads them back with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers); the
trainer state (step, log history); the arguments as JSON (``training_args.json``: align drops the
pickled ``training_args.bin``); the manifest. The data order needs no file: it is a function of the
seed and the epoch (accelerate's seedable sampler), and so are the on-policy sampling seeds
(``AlignTrainer.online_batch``). Online training keeps no buffer between steps: every batch is
sampled afresh from the current policy. The manifest records the seeds and a fingerprint of the
training data, so that resuming with other data or another seed is refused instead of diverging.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

from align.cache import fsync
from align.errors import CheckpointError, OutputLockedError

logger = logging.getLogger(__name__)

MANIFEST = "align_checkpoint.json"
TMP_PREFIX = ".tmp-"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LOCK = "align.lock"
DERIVED_FIELDS = ("ref_logps",)  # computed from the data and the base model (precompute_ref_logps): not data


def output_path(output_dir: str | Path, *parts: str) -> Path:
    """``output_dir/parts...``, refused if it resolves (``..``, symlinks) outside ``output_dir``."""
    root = Path(output_dir).resolve()
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root):
        raise CheckpointError(f"{path} resolves to {path.resolve()}, outside the output directory {root}; "
                              "remove the link or choose another output_dir")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write a text file under a temporary name, fsync it and rename it over ``path``."""
    tmp = path.with_name(TMP_PREFIX + path.name)
    tmp.write_text(text, encoding="utf-8")
    fsync(tmp)
    os.replace(tmp, path)


def data_fingerprint(dataset, samples: int = 1024) -> str:
    """SHA-256 of the size and of up to ``samples`` evenly spaced examples: cheap, and enough to tell
    another dataset (or another tokenizer) from the one a checkpoint was trained on."""
    n = len(dataset)
    digest = hashlib.sha256(str(n).encode())
    for i in sorted({k * n // samples for k in range(min(n, samples))}):
        example = {k: v for k, v in dataset[i].items() if k not in DERIVED_FIELDS}
        digest.update(json.dumps(example, sort_keys=True).encode())
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, state: dict) -> None:
    """Fsync every file of ``directory`` and record its size and SHA-256, with ``state``."""
    files = {}
    for path in _files(directory):
        fsync(path)
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    write_atomic(directory / MANIFEST, json.dumps({"files": files, "state": state}, indent=1))


def commit(staged: Path, final: Path) -> None:
    """Move the complete checkpoint ``staged`` to ``final`` (replacing an older one of that name)."""
    old = final.with_name(TMP_PREFIX + final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def publish(staged: Path, final: Path) -> None:
    """Move every file of the complete directory ``staged`` into ``final``, each by one atomic rename: after a
    crash, every file there is whole, the earlier run's or this one's. Then remove ``staged``."""
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        fsync(path)
        target = final / path.relative_to(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    fsync(final)
    shutil.rmtree(staged, ignore_errors=True)


def verify(checkpoint: str | Path) -> dict:
    """Check a checkpoint against its manifest; return the saved align state."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files, state = manifest["files"], manifest["state"]
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST}: not a complete align checkpoint "
                              "(resume from another checkpoint-N)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / MANIFEST} is unreadable ({err}); the checkpoint is damaged, "
                              "resume from another checkpoint-N") from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing; the checkpoint is incomplete, resume from another checkpoint-N")
        if file.stat().st_size != expected["size"] or _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file} does not match the checkpoint manifest (truncated or altered); "
                                  "resume from another checkpoint-N")
    return state


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` directories of ``output_dir``, oldest step first."""
    root = Path(output_dir)
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def newest_good_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that passes ``verify`` (damaged newer ones are reported and passed over), or
    None when ``output_dir`` has no checkpoint at all. Checkpoints that all fail are an error: a crash never
    damages one (see above), so something else did, and starting afresh would hide it."""
    problems = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify(path)
        except CheckpointError as err:
            logger.warning("skipping %s: %s", path.name, err)
            problems.append(str(err))
            continue
        return path
    if problems:
        raise CheckpointError(f"no usable checkpoint in {output_dir}: " + "; ".join(problems) +
                              " (resume from a checkpoint directory you trust: --resume DIR, or use a new output_dir)")
    return None


def remove_stale(output_dir: str | Path) -> None:
    """Delete what a crashed save left behind (``.tmp-*``)."""
    for path in Path(output_dir).glob(TMP_PREFIX + "*"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def rotate(output_dir: str | Path, limit: int | None, protect: set[Path]) -> None:
    """Keep at most ``limit`` checkpoints, deleting the oldest; never those in ``protect`` (the one just
    written, the best one). A deletion is a rename first, so a crash never leaves half a checkpoint."""
    if not limit or limit <= 0:
        return
    protect = {p.resolve() for p in protect}
    found = list_checkpoints(output_dir)
    excess = len(found) - max(limit, len(protect))
    for path in found:
        if excess <= 0:
            break
        if path.resolve() in protect:
            continue
        doomed = path.with_name(TMP_PREFIX + path.name + ".old")
        os.replace(path, doomed)
        shutil.rmtree(doomed)
        excess -= 1


def _holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a run that is starting"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


class OutputLock:
    """One writer per output directory: ``OUTPUT_DIR/align.lock`` names the run that holds it (pid, host,
    start time, as JSON) and carries an exclusive ``flock`` for as long as that run lives. The kernel drops a
    flock when its process ends, however it ends (SIGKILL included), so a lock file without one is stale: the
    lock of a dead run on this host is taken over, with a warning. A second run refuses with
    ``OutputLockedError`` naming the holder. A lock written on another host is refused too: whether that run
    lives cannot be told from here (a flock does not reach across every network file system), so the message
    says to delete the file once it has ended. Released (the file removed) when the ``with`` block exits; a
    directory that the lock alone created is removed with it, so a run refused before it wrote anything
    leaves no trace."""

    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK
        self._fd: int | None = None
        self._made_dir = False

    def __enter__(self) -> OutputLock:  # noqa: PYI034 (no subclasses)
        self._made_dir = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = self._open_locked()
            holder = _holder(os.read(fd, 1 << 16).decode(errors="replace"))
            if holder and holder.get("host") != socket.gethostname():
                os.close(fd)
                raise OutputLockedError(f"{self.dir} is locked by an align run on another host ({_describe(holder)}); "
                                        f"this host cannot tell whether it still runs: if it has ended, delete "
                                        f"{self.path}; otherwise choose another output_dir")
        except BaseException:
            self._remove_made_dir()
            raise
        if holder:
            logger.warning("%s: taking over the stale lock of %s: that process has ended without releasing it",
                           self.dir, _describe(holder))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _open_locked(self) -> int:
        """An open descriptor of the lock file, flocked by this process."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(self.path.read_text(errors="replace")) if self.path.exists() else {}
                os.close(fd)
                raise OutputLockedError(f"{self.dir} is in use by another align run ({_describe(holder)}): wait for "
                                        "it to end or stop it, or choose another output_dir") from None
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder released the lock (removed the file) between our open and flock: again

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before the flock goes: a run waiting on this file then retries
            os.close(self._fd)
            self._fd = None
        self._remove_made_dir()

    def _remove_made_dir(self) -> None:
        if self._made_dir:
            try:
                self.dir.rmdir()  # only if empty
            except OSError:
                pass
