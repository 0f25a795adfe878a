"""A kind's module hyper-parameters as a frozen dataclass (``Options``), as PEFT's configs are:
what a space's YAML sets under ``options:``, what a module and its space hold, and (as a plain
mapping) what spaces' hashes and ``subnet.yaml`` record."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Self

from nas.core.validate import Reader
from nas.core.yamlio import join_key


def _checked(field: dataclasses.Field, value: Any) -> tuple[Any, str | None]:
    """``value`` for ``field`` (a float, str or bool field, by its default), or a problem."""
    default = field.default
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value, None
        return None, f"{value!r}; expected true or false"
    if isinstance(default, str):
        if isinstance(value, str) and value:
            return value, None
        return None, f"{value!r}; expected a non-empty string"
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return None, f"{value!r}; expected a number"
    if value < 0:
        return None, f"{value} is negative; expected a number >= 0"
    below = field.metadata.get("below")
    if below is not None and value >= below:
        return None, f"{value} must be below {below:g}"
    return float(value), None


@dataclasses.dataclass(frozen=True)
class Options:
    """A kind's module hyper-parameters, settable in a space's YAML (``options:``): each kind
    that has any subclasses this as a frozen dataclass whose fields carry their defaults (as
    PEFT's configs do). A float field is a number >= 0 (``metadata={"below": x}``: and < x),
    a str field a non-empty string, a bool field true or false. An instance is what a module
    and its space hold; as data (``to_data``) it is the plain mapping that spaces, hashes and
    ``subnet.yaml`` record."""

    @classmethod
    def parse(cls, value: Any, reader: Reader, key: str) -> Self:
        """The options a space's ``options:`` mapping gives (the others at their defaults)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        given = reader.mapping(value, key, optional=list(fields))
        out: dict[str, Any] = {}
        for name, v in given.items():
            if isinstance(fields[name].default, float) and isinstance(v, str):
                v = reader.number(v, join_key(key, name))  # YAML's 1e-3 is a string
            out[name], problem = _checked(fields[name], v)
            if problem:
                reader.fail(join_key(key, name), problem)
        return cls(**out)

    @classmethod
    def of(cls, value: Options | Mapping[str, Any] | None) -> Self:
        """An instance from itself, from a recorded mapping (``subnet.yaml``, a space's data)
        or from None (the defaults); ValueError names a key this kind does not have or a value
        its field does not take."""
        if isinstance(value, cls):
            return value
        data = dict(value.to_data() if isinstance(value, Options) else value or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; expected {', '.join(fields) or 'none'}")
        out: dict[str, Any] = {}
        for name, v in data.items():
            out[name], problem = _checked(fields[name], v)
            if problem:
                raise ValueError(f"option {name}: {problem}")
        return cls(**out)

    def to_data(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
