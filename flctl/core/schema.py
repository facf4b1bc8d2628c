"""Checking what a host sends before anything uses it.

A host's answers (JSON from the host-side helper, an agent's info and reply
headers) are untrusted: a missing key, a list where an object belongs, a
string where a count belongs, or a count of two billion must fail that one
host with a line naming the field, never crash deploy, status or training
for every host. Specs are plain values: a type, a Field with bounds, a
dict of key -> spec (an object with at least those keys; extra keys are
ignored), a one-element list (a list of that spec), MapOf(spec) (an
object of any string keys), or Maybe(spec). Strings are kept as sent
(the CLI cleans what it shows); an overlong one is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flctl.errors import FlctlError

MAX_TEXT = 1 << 16       # longer strings are refused (a certificate is ~1 KB)
MAX_ITEMS = 100_000      # longer lists and objects are refused


class SchemaError(FlctlError):
    """A host's answer does not have the expected shape; the message names the field."""


@dataclass(frozen=True)
class Field:
    """A scalar with bounds: kind is int, float, str or bool."""

    kind: type
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class Maybe:
    """`spec` or null."""

    spec: Any


@dataclass(frozen=True)
class MapOf:
    """An object whose keys are any strings and whose values match `spec`."""

    spec: Any


def count(high: float = 2**53) -> Field:
    """A non-negative integer up to `high`."""
    return Field(int, 0, high)


def check(value: Any, spec: Any, where: str = "answer") -> Any:
    """`value` if it matches `spec` (objects copied, checked fields replaced);
    else SchemaError naming the first field that does not."""
    if isinstance(spec, Maybe):
        return None if value is None else check(value, spec.spec, where)
    if isinstance(spec, MapOf):
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected an object, got {_kind(value)}")
        if len(value) > MAX_ITEMS:
            raise SchemaError(f"{where}: more than {MAX_ITEMS} entries")
        return {str(k): check(v, spec.spec, f"{where}.{k}") for k, v in value.items()}
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected an object, got {_kind(value)}")
        out = dict(value)
        for key, inner in spec.items():
            if key not in value and not isinstance(inner, Maybe):
                raise SchemaError(f"{where}.{key}: missing")
            out[key] = check(value.get(key), inner, f"{where}.{key}")
        return out
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise SchemaError(f"{where}: expected a list, got {_kind(value)}")
        if len(value) > MAX_ITEMS:
            raise SchemaError(f"{where}: more than {MAX_ITEMS} items")
        return [check(item, spec[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if spec is Any:   # before the type test: typing.Any is a class from Python 3.11
        return value
    if isinstance(spec, type):
        spec = Field(spec)
    if isinstance(spec, Field):
        return _scalar(value, spec, where)
    raise TypeError(f"not a spec: {spec!r}")


def _scalar(value: Any, spec: Field, where: str) -> Any:
    if spec.kind is bool:
        ok = isinstance(value, bool)
    elif spec.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif spec.kind is float:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
    else:
        ok = isinstance(value, spec.kind)
    if not ok:
        raise SchemaError(f"{where}: expected {_name(spec.kind)}, got {_kind(value)}")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise SchemaError(f"{where}: a string of {len(value)} characters is too long")
    if spec.low is not None and value < spec.low:
        raise SchemaError(f"{where}: {value!r} is below {spec.low:g}")
    if spec.high is not None and value > spec.high:
        raise SchemaError(f"{where}: {value!r} is above {spec.high:g}")
    if spec.choices is not None and value not in spec.choices:
        raise SchemaError(f"{where}: {value!r} is not one of {', '.join(map(str, spec.choices))}")
    return value


def _name(kind: type) -> str:
    return {int: "an integer", float: "a finite number", str: "a string",
            bool: "true or false"}.get(kind, kind.__name__)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number" if not isinstance(value, float) or math.isfinite(value) else "NaN/inf"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
