"""The workspace's wheel lock: exactly which wheels deploy ships to hosts.

`wheels.lock` (JSON, in the workspace) lists, per target (CPython version
and CPU architecture), the requirements that were resolved and every wheel
that resolution chose, each with its sha256; flctl's own wheel is recorded
the same way. Deploy installs exactly these: a later release on the package
index never reaches a host unnoticed, every host of a target gets the same
bytes, and a wheel fetched again on another machine must hash to the
recorded value or it is refused. Remove a target (or the file) to resolve
it afresh; deploy records flctl's own wheel anew when flctl changes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flctl.core.fsutil import sha256_hex
from flctl.errors import ConfigError

LOCK_FILE = "wheels.lock"
LOCK_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
# name-version(-build)?-python-abi-platform.whl (PEP 427); names never hold '-'.
_WHEEL_NAME = re.compile(r"(?P<name>[A-Za-z0-9_.]+)-(?P<version>[A-Za-z0-9_.!+]+)"
                         r"(-\d[A-Za-z0-9_]*)?-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+\.whl\Z")


def normalize_project(name: str) -> str:
    """PEP 503 form: "PyYAML" -> "pyyaml", "typing_extensions" -> "typing-extensions"."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class LockedWheel:
    name: str       # the wheel's file name
    sha256: str

    @property
    def project(self) -> str:
        return normalize_project(_parse_wheel_name(self.name)[0])

    @property
    def version(self) -> str:
        return _parse_wheel_name(self.name)[1]


def _parse_wheel_name(name: str) -> tuple[str, str]:
    match = _WHEEL_NAME.match(name)
    if not match:
        raise ValueError(f"not a wheel file name: {name!r}")
    return match.group("name"), match.group("version")


def is_wheel_name(name: str) -> bool:
    return bool(_WHEEL_NAME.match(name)) and "/" not in name


@dataclass(frozen=True)
class LockTarget:
    """One target's resolution: what was asked for and what was chosen."""

    requirements: tuple[str, ...]
    wheels: tuple[LockedWheel, ...]
    # what the host's own interpreter supplies (name, version), for an agent
    # layered on it: resolved around, never shipped
    provided: tuple[tuple[str, str], ...] = ()

    def without(self, project: str) -> tuple[LockedWheel, ...]:
        wanted = normalize_project(project)
        return tuple(w for w in self.wheels if w.project != wanted)


def target_key(python_tag: str, arch: str,
               provided: tuple[tuple[str, str], ...] | None = None) -> str:
    """"cp311", "x86_64" -> "cp311-x86_64"; an agent layered on a host's own
    interpreter gets a key of its own per set of packages found there
    ("cp311-x86_64-on-1a2b3c4d5e6f")."""
    base = f"{python_tag}-{arch}"
    if provided is None:
        return base
    listing = "".join(f"{name}=={version}\n" for name, version in sorted(provided))
    return f"{base}-on-{sha256_hex(listing)[:12]}"


@dataclass
class WheelLock:
    targets: dict[str, LockTarget] = field(default_factory=dict)

    def render(self) -> str:
        document: dict[str, Any] = {
            "comment": "Wheels `flctl deploy` ships to hosts, per CPython version and "
                       "architecture, with their sha256. Written by flctl deploy; remove a "
                       "target to resolve it again.",
            "lock_version": LOCK_VERSION,
            "targets": {
                key: {"requirements": list(target.requirements),
                      **({"provided": dict(sorted(target.provided))} if target.provided
                         else {}),
                      "wheels": {w.name: w.sha256 for w in sorted(target.wheels,
                                                                    key=lambda w: w.name)}}
                for key, target in sorted(self.targets.items())
            },
        }
        return json.dumps(document, indent=2) + "\n"


def parse_lock(text: str, source: str) -> WheelLock:
    """Read a lock file; anything malformed is a ConfigError naming the field."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc.msg}", file=source, line=exc.lineno) from None
    if not isinstance(document, dict):
        raise ConfigError("expected a JSON object", file=source)
    if document.get("lock_version") != LOCK_VERSION:
        raise ConfigError(f"unsupported lock_version (this flctl reads {LOCK_VERSION})",
                          file=source, field="lock_version")
    targets = document.get("targets")
    if not isinstance(targets, dict):
        raise ConfigError("expected an object", file=source, field="targets")
    lock = WheelLock()
    for key, entry in targets.items():
        where = f"targets.{key}"
        if not isinstance(entry, dict):
            raise ConfigError("expected an object", file=source, field=where)
        requirements = entry.get("requirements")
        if not isinstance(requirements, list) or not all(isinstance(r, str)
                                                         for r in requirements):
            raise ConfigError("expected a list of strings", file=source,
                              field=f"{where}.requirements")
        wheels = entry.get("wheels")
        if not isinstance(wheels, dict):
            raise ConfigError("expected an object of wheel names to sha256",
                              file=source, field=f"{where}.wheels")
        locked = []
        for name, sha in wheels.items():
            if not is_wheel_name(name):
                raise ConfigError("not a wheel file name", file=source,
                                  field=f"{where}.wheels.{name}")
            if not isinstance(sha, str) or not _SHA256.match(sha):
                raise ConfigError("expected a sha256 in hex", file=source,
                                  field=f"{where}.wheels.{name}")
            locked.append(LockedWheel(name, sha))
        provided = entry.get("provided", {})
        if not isinstance(provided, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in provided.items()):
            raise ConfigError("expected an object of names to versions", file=source,
                              field=f"{where}.provided")
        lock.targets[str(key)] = LockTarget(tuple(requirements), tuple(locked),
                                            tuple(sorted(provided.items())))
    return lock


def merged(lock: WheelLock, updates: Iterable[tuple[str, LockTarget]]) -> WheelLock:
    """A copy of `lock` with `updates` applied (deploy's threads each resolve one target)."""
    out = WheelLock(dict(lock.targets))
    for key, target in updates:
        out.targets[key] = target
    return out
