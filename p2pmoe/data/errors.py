"""Errors raised by the data loaders.

Both carry enough context for a user to fix the problem without reading our code: the file
and line that is wrong and what was expected there, or how to install a missing data set.
"""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A data file exists but does not hold what its format promises."""

    def __init__(self, path: str | Path, line: int | None, expected: str, got: str = "") -> None:
        self.path = str(path)
        self.line = line
        self.expected = expected
        self.got = got
        where = f"{self.path}:{line}" if line is not None else self.path
        detail = f"; got {got!r}" if got else ""
        super().__init__(f"{where}: expected {expected}{detail}")


class DataNotFoundError(FileNotFoundError):
    """A data set is not on this machine; the message says how to get it."""

    def __init__(self, name: str, looked_in: str | Path, how_to_install: str) -> None:
        self.name = name
        self.looked_in = str(looked_in)
        self.how_to_install = how_to_install
        super().__init__(f"data set {name!r} not found in {self.looked_in}. {how_to_install}")
