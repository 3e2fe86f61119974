"""Errors that point at the offending input, so a user can fix their data, not our code."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data: names the file, the line (1-based, when known) and the field.

    The CLIs print ``str(err)`` as one line and exit non-zero; no traceback, because the
    fix is in the data, not in cliptd.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
            where += ": "
        what = f"field {self.field!r}: " if self.field else ""
        return f"{where}{what}{self.message}"


class SweepError(RuntimeError):
    """A sweep cannot go on (every trial of a search failed, ...): reported, exit 2."""
