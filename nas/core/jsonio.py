"""JSON files the project writes and reads back: written atomically (a reader never sees half
a file, a kill never leaves one); a damaged one is one error naming it and the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nas.core.errors import NasError


def write_json(path: Path, data: Any) -> None:
    """Atomically: a reader never sees half a file, a kill never leaves one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """A JSON file this project wrote; damaged, it is one error naming it and the fix."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NasError(
            f"{path}: damaged ({exc}); it records a finished step of this run: remove it to "
            "redo that step, or restore it from a backup"
        ) from None
