"""Errors about input data that name the file, the row and the field, and suggest a fix."""

from __future__ import annotations


class DataError(ValueError):
    def __init__(self, source: str, row: int | None, field: str | None, problem: str, hint: str = ""):
        self.source, self.row, self.field, self.problem, self.hint = source, row, field, problem, hint
        where = source
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}" + (f" ({hint})" if hint else ""))
