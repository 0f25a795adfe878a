"""Typed reads from a parsed YAML document, each failing with the file, key path and line."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

from nas.core.yamlio import Document, join_key


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    names[int] = "an integer"
    return names.get(type(value), f"a {type(value).__name__}")


class Reader:
    """Reads values out of ``doc`` and raises ``doc.error(key, ...)`` on anything unexpected."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc

    def fail(self, key: str, message: str) -> None:
        raise self.doc.error(key, message)

    def mapping(
        self,
        value: Any,
        key: str,
        *,
        required: Iterable[str] = (),
        optional: Iterable[str] = (),
        open_keys: bool = False,
    ) -> dict[str, Any]:
        """A mapping with the ``required`` keys and otherwise only ``optional`` ones."""
        what = f"expected a mapping, got {_type_name(value)}"
        if not isinstance(value, dict):
            self.fail(
                key, what if key else f"the document must be a mapping, got {_type_name(value)}"
            )
        required, optional = list(required), list(optional)
        for name in value:
            if not isinstance(name, str):
                self.fail(key, f"keys must be strings, got {name!r}")
        if not open_keys:
            allowed = required + optional
            for name in value:
                if name not in allowed:
                    self.fail(
                        join_key(key, name),
                        f"unknown key; expected one of: {', '.join(allowed)}",
                    )
        for name in required:
            if name not in value:
                self.fail(key, f"missing required key '{name}'")
        return value

    def integer(
        self, value: Any, key: str, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        # YAML 1.1 reads 6.4e5 as a string and 640000.0 as a float: accept integral values
        # written in those notations, but not quoted numbers such as "4".
        if isinstance(value, str) and "e" in value.lower():
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"expected an integer, got {_type_name(value)} ({value!r})")
        if minimum is not None and value < minimum:
            if minimum == 0:
                self.fail(key, f"{value} is negative; expected an integer >= 0")
            self.fail(key, f"{value} is too small; expected an integer >= {minimum}")
        if maximum is not None and value > maximum:
            self.fail(key, f"{value} is too large; expected an integer <= {maximum}")
        return value

    def number(
        self, value: Any, key: str, *, minimum: float | None = None, finite: bool = True
    ) -> float:
        """A number (``finite=False`` lets ``.inf`` through, never ``.nan``)."""
        if isinstance(value, str) and "e" in value.lower():
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"expected a number, got {_type_name(value)} ({value!r})")
        if math.isnan(value) or (finite and math.isinf(value)):
            self.fail(key, f"{value!r} is not a finite number")
        if minimum is not None and value < minimum:
            if minimum == 0:
                self.fail(key, f"{value} is negative; expected a number >= 0")
            self.fail(key, f"{value} is too small; expected a number >= {minimum}")
        return float(value)

    def string(self, value: Any, key: str, *, choices: Iterable[str] | None = None) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, f"expected a non-empty string, got {_type_name(value)} ({value!r})")
        if choices is not None:
            choices = list(choices)
            if value not in choices:
                self.fail(key, f"{value!r} is not one of: {', '.join(choices)}")
        return value

    def int_choices(
        self, value: Any, key: str, *, minimum: int = 0, maximum: int | None = None
    ) -> tuple[int, ...]:
        """A non-empty list of distinct integers >= minimum, returned sorted."""
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value:
            self.fail(key, f"expected a non-empty list of integers, got {_type_name(value)}")
        items = [
            self.integer(v, join_key(key, i), minimum=minimum, maximum=maximum)
            for i, v in enumerate(value)
        ]
        seen: dict[int, int] = {}
        for i, v in enumerate(items):
            if v in seen:
                self.fail(join_key(key, i), f"{v} is listed twice (also at [{seen[v]}])")
            seen[v] = i
        return tuple(sorted(items))
