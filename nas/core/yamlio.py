"""YAML documents with the line of every key, so that errors can point at it.

Loading uses PyYAML's SafeLoader only (the same constructor as ``yaml.safe_load``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nas.core.errors import ConfigError


def join_key(prefix: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


@dataclass
class Document:
    """A parsed YAML mapping plus where each key path sits in its file."""

    data: Any
    file: str | None = None
    lines: dict[str, int] = field(default_factory=dict)

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError at ``key`` (its line, or the nearest enclosing key's)."""
        line = None
        probe = key
        while probe:
            if probe in self.lines:
                line = self.lines[probe]
                break
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        return ConfigError(message, file=self.file, key=key or None, line=line)


def _record_lines(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = join_key(prefix, str(key_node.value))
            lines.setdefault(key, key_node.start_mark.line + 1)
            _record_lines(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = join_key(prefix, i)
            lines.setdefault(key, item.start_mark.line + 1)
            _record_lines(item, key, lines)


def _check_duplicate_keys(node: yaml.Node, prefix: str, file: str | None) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value)
            key = join_key(prefix, name)
            if name in seen:
                raise ConfigError(
                    f"duplicate key (first given on line {seen[name]})",
                    file=file,
                    key=key,
                    line=key_node.start_mark.line + 1,
                )
            seen[name] = key_node.start_mark.line + 1
            _check_duplicate_keys(value_node, key, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, join_key(prefix, i), file)


#: The most nodes a document may expand to once its aliases are followed: a few nested
#: aliases of a few lines can otherwise expand to billions (a "billion laughs" document).
MAX_NODES = 100_000


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in the document once every alias is expanded (each shared node counted once per
    use), in time linear in the distinct nodes."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once, instead of looping
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, memo) for item in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_NODES + 1)
    return memo[id(node)]


def parse_yaml(text: str, file: str | None = None) -> Document:
    """Parse YAML text safely; syntax errors become one ConfigError with the line."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return Document(None, file, {})
        if _expanded_size(node, {}) > MAX_NODES:
            raise ConfigError(
                f"the document expands to more than {MAX_NODES:,} values once its aliases "
                "(*name) are followed; a spec or space needs far fewer: nested aliases?",
                file=file,
            )
        _check_duplicate_keys(node, "", file)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"YAML syntax error: {what}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", file=file) from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    _record_lines(node, "", lines)
    return Document(data, file, lines)


def load_yaml(path: str | Path) -> Document:
    """Read and parse a YAML file; a missing or unreadable file is a ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read file: {exc}", file=path) from None
    return parse_yaml(text, str(path))


def to_plain(value: Any) -> Any:
    """Tuples to lists, mappings to dicts: a value yaml.safe_dump and json can write."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [to_plain(v) for v in value]
    return value
