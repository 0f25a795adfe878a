"""A kind's module hyper-parameters as a frozen dataclass (``Options``), as PEFT's configs are:
what a space's YAML sets under ``options:``, what a module and its space hold, and (as a plain
mapping) what spaces' hashes and ``subnet.yaml`` record."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Self

from nas.core.validate import Reader
from nas.core.yamlio import join_key


@dataclasses.dataclass(frozen=True)
class Options:
    """A kind's module hyper-parameters, settable in a space's YAML (``options:``): each kind
    that has any subclasses this as a frozen dataclass whose fields carry their defaults (as
    PEFT's configs do). A float field is a number >= 0 (``metadata={"below": x}``: and < x);
    a str field a non-empty string. An instance is what a module and its space hold; as data
    (``to_data``) it is the plain mapping that spaces, hashes and ``subnet.yaml`` record."""

    @classmethod
    def parse(cls, value: Any, reader: Reader, key: str) -> Self:
        """The options a space's ``options:`` mapping gives (the others at their defaults)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        given = reader.mapping(value, key, optional=list(fields))
        out: dict[str, Any] = {}
        for name, v in given.items():
            where = join_key(key, name)
            if isinstance(fields[name].default, str):
                out[name] = reader.string(v, where)
                continue
            out[name] = reader.number(v, where, minimum=0.0)
            below = fields[name].metadata.get("below")
            if below is not None and out[name] >= below:
                reader.fail(where, f"{v} must be below {below:g}")
        return cls(**out)

    @classmethod
    def of(cls, value: Options | Mapping[str, Any] | None) -> Self:
        """An instance from itself, from a recorded mapping (``subnet.yaml``, a space's data)
        or from None (the defaults). ValueError names a key this kind does not have."""
        if isinstance(value, cls):
            return value
        data = dict(value.to_data() if isinstance(value, Options) else value or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; expected {', '.join(names) or 'none'}")
        return cls(**{k: type(getattr(cls(), k))(v) for k, v in data.items()})

    def to_data(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
