"""A subnet: plain data saying, per prompt module kind, how it is set.

For the layered kinds (VPT, LoRA, Adapter) that is the per-layer dims of layers 0..depth-1.
A subnet has one canonical form (no trailing zero dims, absent modules omitted, kinds in
registry order), used for equality, hashing, de-duplication, counting and caching. It
round-trips through YAML and JSON and prints on one line, e.g.
``vpt=[10,5,1] lora=8x12 adapter=-``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from nas.core.validate import Reader
from nas.core.yamlio import Document, load_yaml, parse_yaml
from nas.modules import REGISTRY, kind_class


class Subnet(Mapping[str, Any]):
    """An immutable mapping ``kind -> canonical choice`` of the modules that are present."""

    __slots__ = ("_choices", "_key")

    def __init__(self, choices: Mapping[str, Any] | None = None) -> None:
        canonical = {}
        for kind, choice in (choices or {}).items():
            cls = kind_class(kind)
            choice = cls.canonical(choice)
            if choice != cls.empty_choice():
                canonical[kind] = choice
        order = list(REGISTRY)
        self._choices = dict(sorted(canonical.items(), key=lambda kv: order.index(kv[0])))
        self._key = json.dumps(self.to_data(), sort_keys=True, separators=(",", ":"))

    # Mapping protocol: absent kinds read as their empty choice.
    def __getitem__(self, kind: str) -> Any:
        if kind in self._choices:
            return self._choices[kind]
        return kind_class(kind).empty_choice()

    def __iter__(self) -> Iterator[str]:
        return iter(self._choices)

    def __len__(self) -> int:
        return len(self._choices)

    def __contains__(self, kind: object) -> bool:
        return kind in self._choices

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Subnet) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def key(self) -> str:
        """A stable string identifying this subnet (canonical JSON)."""
        return self._key

    def __str__(self) -> str:
        if not self._choices:
            return "(no modules)"
        return " ".join(
            f"{kind}={kind_class(kind).choice_str(choice)}"
            for kind, choice in self._choices.items()
        )

    def __repr__(self) -> str:
        return f"Subnet({self})"

    def to_data(self) -> dict[str, Any]:
        return {
            kind: kind_class(kind).choice_to_data(choice) for kind, choice in self._choices.items()
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_data(), sort_keys=False, default_flow_style=None)

    def to_json(self) -> str:
        return json.dumps(self.to_data())

    @classmethod
    def from_data(cls, data: Any, doc: Document | None = None, key: str = "") -> Subnet:
        """Parse the YAML/JSON form; errors name the key path (and file/line with ``doc``)."""
        doc = doc or Document(data)
        reader = Reader(doc)
        if data is None:
            return cls()
        data = reader.mapping(data, key, optional=list(REGISTRY))
        choices = {}
        for kind, value in data.items():
            sub_key = f"{key}.{kind}" if key else kind
            choices[kind] = kind_class(kind).parse_choice(value, reader, sub_key)
        return cls(choices)

    @classmethod
    def from_yaml(cls, text: str) -> Subnet:
        doc = parse_yaml(text)
        return cls.from_data(doc.data, doc)

    @classmethod
    def from_json(cls, text: str) -> Subnet:
        return cls.from_data(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> Subnet:
        doc = load_yaml(path)
        return cls.from_data(doc.data, doc)


def too_deep(subnet: Subnet, depth: int) -> str | None:
    """What of ``subnet`` spans more blocks than a backbone of ``depth`` blocks has (layered
    kinds: their per-layer dims), said in words; None when it fits."""
    deep = {k: len(c) for k, c in subnet.items() if isinstance(c, tuple) and len(c) > depth}
    if not deep:
        return None
    spans = ", ".join(f"{k} {n}" for k, n in deep.items())
    return f"its modules span more blocks ({spans}) than the space's backbone has ({depth})"
