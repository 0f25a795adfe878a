"""User-facing errors: one clear message naming the file, the key path (and line) and what was
expected. The `nas` command prints these without a traceback and exits with status 2."""

from __future__ import annotations

from pathlib import Path


class NasError(Exception):
    """An error caused by the user's input (a file, a spec, a checkpoint), not by a bug."""


class ConfigError(NasError):
    """A bad value in a YAML/JSON document.

    Args:
        message: what is wrong and what was expected.
        file: the document's path, when it came from a file.
        key: the key path inside the document, e.g. ``modules.lora.dims[2]``.
        line: the 1-based line of that key, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.key = key
        self.line = line
        super().__init__(self.format())

    def format(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        elif self.line:
            where = f"line {self.line}: "
        if self.key:
            where += f"{self.key}: "
        return where + self.message
