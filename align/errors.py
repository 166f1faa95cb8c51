"""The one base class of the errors a user can fix (bad config, data, model, reward, checkpoint).

The CLI catches ``AlignError`` and prints ``align: error: <message>`` (exit code 2) instead of a traceback;
every message names the file, row or key at fault and, where it can, the fix. This module imports nothing
from align, so every package can use it.
"""

from __future__ import annotations


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
