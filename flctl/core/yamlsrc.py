"""YAML loading that remembers where every key came from.

Workspace files are written by hand, so a validation error is only useful if
it points at the line to fix. PyYAML's SafeLoader throws positions away and
silently lets a later duplicate key win; this loader keeps the 1-based line of
every mapping key and refuses duplicates. The `expect_*` helpers give every
validator the same wording for the same mistake.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from flctl.errors import ConfigError


def read_config_text(path: Path) -> str:
    """A configuration file's text; a missing, unreadable or non-UTF-8 file is
    one ConfigError naming it (flctl.yaml, inventory.yaml, an Ansible file)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 text file", file=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(path)) from None

_MERGE_TAG = "tag:yaml.org,2002:merge"


class LineDict(dict):
    """A mapping from YAML that knows its own line and the line of each key."""

    line: int

    def __init__(self, *args: Any, line: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.line = line
        self._key_lines: dict[Any, int] = {}

    def line_of(self, key: Any) -> int:
        """Line of `key`, or of the mapping itself for keys added in code."""
        return self._key_lines.get(key, self.line)

    def put(self, key: Any, value: Any, line: int) -> None:
        """Set `key` as if read from `line` (documents built from another format)."""
        self[key] = value
        self._key_lines[key] = line


class LineList(list):
    """A sequence from YAML that knows its own line and the line of each item."""

    line: int

    def __init__(self, *args: Any, line: int = 1) -> None:
        super().__init__(*args)
        self.line = line
        self._item_lines: list[int] = []

    def line_of(self, index: int) -> int:
        if 0 <= index < len(self._item_lines):
            return self._item_lines[index]
        return self.line


class _LineLoader(yaml.SafeLoader):
    """SafeLoader building LineDict/LineList and rejecting duplicate keys."""

    source = "<string>"

    def construct_line_mapping(self, node: yaml.Node) -> Any:
        data = LineDict(line=node.start_mark.line + 1)
        yield data
        if not isinstance(node, yaml.MappingNode):
            raise ConstructorError(None, None, f"expected a mapping node, but found {node.id}",
                                   node.start_mark)
        # Check the keys written in this mapping before merge keys (<<) are
        # flattened in: an explicit key overriding a merged one is legitimate.
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self._hashable_key(node, key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise ConfigError(f"duplicate key {key!r} (first at line {first_line[key]})",
                                  file=self.source, line=line)
            first_line[key] = line
        self.flatten_mapping(node)
        for key_node, value_node in node.value:
            key = self._hashable_key(node, key_node)
            data[key] = self.construct_object(value_node, deep=False)
            data._key_lines[key] = key_node.start_mark.line + 1

    def _hashable_key(self, node: yaml.Node, key_node: yaml.Node) -> Any:
        key = self.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise ConstructorError("while constructing a mapping", node.start_mark,
                                   "found unhashable key", key_node.start_mark)
        return key

    def construct_line_sequence(self, node: yaml.Node) -> Any:
        data = LineList(line=node.start_mark.line + 1)
        yield data
        if not isinstance(node, yaml.SequenceNode):
            raise ConstructorError(None, None, f"expected a sequence node, but found {node.id}",
                                   node.start_mark)
        for item in node.value:
            data.append(self.construct_object(item, deep=False))
            data._item_lines.append(item.start_mark.line + 1)


_LineLoader.add_constructor("tag:yaml.org,2002:map", _LineLoader.construct_line_mapping)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _LineLoader.construct_line_sequence)


def load_yaml(text: str, source: str) -> Any:
    """Parse one YAML document; mappings come back as LineDict.

    Raises ConfigError naming `source` and the line for syntax errors and
    duplicate keys. An empty document gives None.
    """
    loader = _LineLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_describe_yaml_error(exc), file=source, line=_error_line(exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=source) from None
    finally:
        loader.dispose()


def _error_line(exc: yaml.MarkedYAMLError) -> int | None:
    mark = exc.problem_mark or exc.context_mark
    return mark.line + 1 if mark is not None else None


def _describe_yaml_error(exc: yaml.MarkedYAMLError) -> str:
    problem, context = exc.problem, exc.context
    if not (problem and context):
        return f"invalid YAML: {problem or context or 'syntax error'}"
    where = f" at line {exc.context_mark.line + 1}" if exc.context_mark is not None else ""
    if problem.startswith("but "):  # PyYAML splits "expected X, but found Y" in two
        return f"invalid YAML: {context}{where}, {problem}"
    return f"invalid YAML: {problem} ({context}{where})"


# ---------------------------------------------------------------- validation


@dataclass(frozen=True)
class Spot:
    """Where a value sits: file, line and dotted field name, for error messages."""

    source: str | None
    line: int | None = None
    field: str | None = None

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, file=self.source, line=self.line, field=self.field)

    def key(self, mapping: Mapping[Any, Any], key: Any) -> Spot:
        """The spot of `mapping[key]`."""
        line = mapping.line_of(key) if isinstance(mapping, LineDict) else self.line
        return Spot(self.source, line, join_field(self.field, str(key)))

    def item(self, sequence: list[Any], index: int) -> Spot:
        line = sequence.line_of(index) if isinstance(sequence, LineList) else self.line
        return Spot(self.source, line, f"{self.field or ''}[{index}]")

    def at(self, field: str | None = None, line: int | None = None) -> Spot:
        """A copy with another field and/or line."""
        return Spot(self.source, self.line if line is None else line,
                    self.field if field is None else field)


def join_field(prefix: str | None, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def did_you_mean(word: str, choices: Collection[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' if none is close."""
    matches = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def describe(value: Any) -> str:
    """A short human description of a YAML value, for 'got ...' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def check_keys(mapping: Mapping[Any, Any], allowed: Collection[str], spot: Spot) -> None:
    """Reject keys outside `allowed`, suggesting the closest allowed one."""
    for key in mapping:
        key_spot = spot.key(mapping, key)
        if not isinstance(key, str):
            raise key_spot.error(f"keys must be strings, got {describe(key)}")
        if key not in allowed:
            raise key_spot.error(f"unknown key{did_you_mean(key, allowed)}")


def expect_mapping(value: Any, spot: Spot, *, allow_null: bool = True) -> LineDict:
    """The value as a LineDict; null becomes an empty one (an empty section)."""
    if value is None and allow_null:
        return LineDict(line=spot.line or 1)
    if isinstance(value, LineDict):
        return value
    if isinstance(value, Mapping):
        return LineDict(value, line=spot.line or 1)
    raise spot.error(f"expected a mapping, got {describe(value)}")


def expect_str(value: Any, spot: Spot, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        hint = " (quote it)" if isinstance(value, (bool, int, float)) else ""
        raise spot.error(f"expected a string, got {describe(value)}{hint}")
    if not value and not allow_empty:
        raise spot.error("must not be empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise spot.error("must not contain control characters")
    return value


def expect_int(value: Any, spot: Spot, *, minimum: int | None = None,
               maximum: int | None = None) -> int:
    """An integer; booleans are refused even though Python calls them ints."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise spot.error(f"expected an integer, got {describe(value)}")
    _check_range(value, spot, minimum, maximum)
    return value


def expect_float(value: Any, spot: Spot, *, minimum: float | None = None,
                 maximum: float | None = None, above: float | None = None) -> float:
    """A finite number (ints accepted); `above` is an exclusive lower bound."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise spot.error(f"expected a number, got {describe(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise spot.error(f"must be a finite number, got {value!r}")
    if above is not None and not number > above:
        raise spot.error(f"must be > {above:g}, got {value!r}")
    _check_range(number, spot, minimum, maximum)
    return number


def _check_range(value: float, spot: Spot, minimum: float | None,
                 maximum: float | None) -> None:
    low, high = _bound(minimum), _bound(maximum)
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise spot.error(f"must be between {low} and {high}, got {value!r}")
    if minimum is not None and value < minimum:
        raise spot.error(f"must be >= {low}, got {value!r}")
    if maximum is not None and value > maximum:
        raise spot.error(f"must be <= {high}, got {value!r}")


def _bound(bound: float | None) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def expect_bool(value: Any, spot: Spot) -> bool:
    if not isinstance(value, bool):
        raise spot.error(f"expected true or false, got {describe(value)}")
    return value


def expect_choice(value: Any, spot: Spot, choices: Collection[str]) -> str:
    listed = " or ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise spot.error(f"expected {listed}, got {describe(value)}")
    if value not in choices:
        raise spot.error(f"expected {listed}, got {value!r}{did_you_mean(value, choices)}")
    return value


def to_plain(value: Any, spot: Spot, max_items: int = 100_000) -> Any:
    """Deep-copy a loaded value into plain JSON-like data (str keys only).

    Parameters passed on to tasks and strategies travel to the agents as
    JSON, so anything JSON cannot carry (dates, non-string keys) is refused
    here, where the line is still known. YAML aliases can make a small file
    expand enormously when copied, hence the item budget.
    """
    budget = [max_items]
    return _plain(value, spot, budget)


def _plain(value: Any, spot: Spot, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise spot.error("too many values (YAML aliases expanding?)")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise spot.error(f"must be a finite number, got {value!r}")
        return value
    if isinstance(value, Mapping):
        plain: dict[str, Any] = {}
        for key, item in value.items():
            key_spot = spot.key(value, key)
            if not isinstance(key, str):
                raise key_spot.error(f"keys must be strings, got {describe(key)}")
            plain[key] = _plain(item, key_spot, budget)
        return plain
    if isinstance(value, (list, tuple)):
        items = value if isinstance(value, list) else list(value)
        return [_plain(item, spot.item(items, i), budget) for i, item in enumerate(items)]
    raise spot.error(f"unsupported value {describe(value)} (use strings, numbers, "
                     "booleans, lists and mappings)")


def yaml_scalar(value: Any) -> str:
    """One value as inline YAML that reads back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 30)
    if text.endswith("\n...\n"):
        text = text[: -len("\n...\n")]
    return text.strip()
