"""What several commands check of their arguments: argparse types, and the files and folders
they will write."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nas.core.errors import NasError


def check_writable_file(path, option: str) -> None:
    """A file this command will write: its folder must exist and it must not be a folder."""
    if path.is_dir():
        raise NasError(f"{option} {path} is a folder; give a file path")
    if not path.parent.is_dir():
        raise NasError(f"{option} {path}: folder {path.parent} does not exist")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise NasError(f"{option} {path}: not writable by this user")


def at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {value:g}")
    return value


def folder_out(path, option: str = "--out") -> None:
    """A folder this command writes into: not a file, nor below one."""

    path = Path(path)
    first = next(p for p in (path, *path.parents) if p.exists())
    if not first.is_dir():
        raise NasError(f"{option} {path}: {first} is a file, not a folder")
    if not os.access(first, os.W_OK | os.X_OK):
        raise NasError(f"{option} {path}: {first} is not writable by this user")
