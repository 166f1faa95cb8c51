"""Where align keeps what it can rebuild: the demo's base model, converted models, reference log-probs.

``$ALIGN_CACHE`` (default ``~/.cache/align``). Everything in it is written atomically (a temporary sibling,
then one rename), so a crash never leaves a half-written entry that a later run would trust. This module
imports nothing from align, so every package can use it.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cache_dir() -> Path:
    """The cache root: ``$ALIGN_CACHE``, or ``~/.cache/align``."""
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))
