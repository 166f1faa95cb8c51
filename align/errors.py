"""The one base class of the errors a user can fix (bad config, data, model, reward, checkpoint).

The CLI catches ``AlignError`` and prints ``align: error: <message>`` (exit code 2) instead of a traceback;
every message names the file, row or key at fault and, where it can, the fix. This module imports nothing
from align, so every package can use it.
"""

from __future__ import annotations

# The exit status of a run that stopped on SIGTERM/SIGINT after saving a checkpoint: EX_TEMPFAIL of
# sysexits.h ("a temporary failure; the user is invited to retry"). It tells a job script "run the same
# command again with --resume" apart from success (0), a crash (1), a problem in the input (2) and a process
# killed before it could save (128 + the signal: 137 for SIGKILL, 143 for an unhandled SIGTERM).
PREEMPTED_EXIT_CODE = 75


class AlignError(Exception):
    """A problem in what the user gave align; the message says where and how to fix it."""


class ConfigError(AlignError, ValueError):
    """A config problem; the message names the file (or the command line) and the key."""


class ModelLoadError(AlignError, RuntimeError):
    """A model or tokenizer could not be loaded; the message names the path and suggests a fix."""


class RewardError(AlignError, RuntimeError):
    """A reward failed; the message names the prompt (index and text) and what went wrong."""


class CheckpointError(AlignError, RuntimeError):
    """A checkpoint is missing, partial, altered or from another run; the message says which and why."""


class NonFiniteError(AlignError, FloatingPointError):
    """A NaN/inf loss or gradient with ``on_nonfinite: stop``; the message says what to do."""


class OutputLockedError(AlignError, RuntimeError):
    """Another run writes to the same output directory; the message names it (pid, host, start time)."""


class Preempted(Exception):
    """Training stopped on a signal (SIGTERM, SIGINT) after its current optimizer step and saved a checkpoint:
    not a fault, an interruption that ``--resume`` continues. The CLI exits with ``PREEMPTED_EXIT_CODE``."""

    def __init__(self, message: str, checkpoint: str, step: int):
        super().__init__(message)
        self.checkpoint, self.step = checkpoint, step


class DataError(AlignError, ValueError):
    """Bad input data: the message names the file, the row and the field, and suggests a fix."""

    def __init__(self, source: str, row: int | None, field: str | None, problem: str, hint: str = ""):
        self.source, self.row, self.field, self.problem, self.hint = source, row, field, problem, hint
        where = source
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}" + (f" ({hint})" if hint else ""))
