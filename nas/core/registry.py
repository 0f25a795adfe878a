"""One registry mechanism for every extension point (module kinds, backbone families, dataset
formats, search algorithms, stages): entries by name, each an object or a ``"module:attr"``
string imported on first use. A registry never imports what registers in it; the shipped
entries are named as strings, a user's are registered as objects (``register``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


def resolve(ref: Any) -> Any:
    """``"package.module:attr"`` imported; anything else returned as it is."""
    if not isinstance(ref, str):
        return ref
    module, sep, attr = ref.partition(":")
    if not sep:
        raise ValueError(f"{ref!r}: a registry reference is 'package.module:attr'")
    return getattr(importlib.import_module(module), attr)


class Registry(MutableMapping[str, T], Generic[T]):
    """A mapping of names to entries that resolves a ``"module:attr"`` entry on first access
    (and keeps what it resolved). Iterating gives the names without importing anything."""

    def __init__(self, what: str, entries: dict[str, T | str] | None = None) -> None:
        self.what = what  # e.g. "module kind", for messages
        self._entries: dict[str, T | str] = dict(entries or {})

    def __getitem__(self, name: str) -> T:
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = self._entries[name] = resolve(entry)
        return entry  # type: ignore[return-value]

    def entry(self, name: str) -> T | str:
        """The entry as registered or resolved so far (a ``"module:attr"`` string is not
        imported); KeyError if none."""
        return self._entries[name]

    def __setitem__(self, name: str, entry: T | str) -> None:
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {sorted(self._entries)})"

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, entry: T) -> T: ...
    def register(self, name: str, entry: Any = None) -> Any:
        """``registry.register(name, entry)``, or ``@registry.register(name)`` on a class."""
        if entry is None:

            def decorate(obj: T) -> T:
                self._entries[name] = obj
                return obj

            return decorate
        self._entries[name] = entry
        return entry
