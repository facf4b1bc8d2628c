"""Ansible inventories as they are, INI or YAML, read into flctl's inventory.

An operator who already has an Ansible inventory should not write the same
hosts twice. The file is read here (groups, `[group:vars]`,
`[group:children]`, inline `key=value` host vars, `web[01:03]` ranges, or
YAML's `all: hosts/vars/children`) and translated into the document
inventory.yaml would be, with every key keeping its line in the Ansible
file, so the usual validation names that file and line.

Translated variables: ansible_host, ansible_user, ansible_port,
ansible_ssh_private_key_file, ansible_become and ansible_connection (plus
their old ansible_ssh_* spellings). flctl's own host variables, which
Ansible has no name for, are given as `flctl_<name>` (flctl_data_path,
flctl_labels, ...). Other ansible_* variables are ignored with a note;
plain variables are the playbooks' business and are ignored silently. A
host without ansible_host is reached at its inventory name, as Ansible does.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flctl.core.host_vars import CHECKS, HOST_VARS
from flctl.core.inventory import ALL, Inventory, inventory_from_data
from flctl.core.yamlsrc import (
    LineDict,
    Spot,
    describe,
    did_you_mean,
    load_yaml,
    read_config_text,
)
from flctl.errors import ConfigError

ANSIBLE_VARS = {
    "ansible_host": "ssh_host", "ansible_ssh_host": "ssh_host",
    "ansible_user": "ssh_user", "ansible_ssh_user": "ssh_user",
    "ansible_port": "ssh_port", "ansible_ssh_port": "ssh_port",
    "ansible_ssh_private_key_file": "ssh_key", "ansible_private_key_file": "ssh_key",
    "ansible_become": "become",
    "ansible_connection": "connection",
}
FLCTL_PREFIX = "flctl_"
# ansible_connection values that mean "over SSH"
SSH_CONNECTIONS = ("ssh", "smart", "paramiko", "paramiko_ssh")
YAML_SUFFIXES = (".yml", ".yaml", ".json")
_RANGE_RE = re.compile(r"\[([0-9a-zA-Z]+):([0-9a-zA-Z]+)(?::([0-9]+))?\]")
_YAML_FIRST_LINE_RE = re.compile(r"(---|[A-Za-z0-9_.-]+:\s*(#.*)?)\Z")
_TRUE = ("yes", "on", "true", "1", "y", "t")
_FALSE = ("no", "off", "false", "0", "n", "f")
MAX_RANGE = 10_000


@dataclass
class _Value:
    raw: Any
    line: int
    text: bool = False  # written in INI: a string still to be read as YAML scalar


@dataclass
class _Group:
    name: str
    line: int
    hosts: dict[str, int] = field(default_factory=dict)      # host -> line listed
    children: dict[str, int] = field(default_factory=dict)   # group -> line listed
    vars: dict[str, _Value] = field(default_factory=dict)


@dataclass
class _Host:
    name: str
    line: int
    vars: dict[str, _Value] = field(default_factory=dict)


@dataclass
class AnsibleInventory:
    """An Ansible inventory as flctl's inventory document, and what was left out."""

    source: str
    document: LineDict
    notes: list[str]


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.groups: dict[str, _Group] = {ALL: _Group(ALL, 1)}
        self.hosts: dict[str, _Host] = {}

    def error(self, line: int | None, message: str, name: str | None = None) -> ConfigError:
        return ConfigError(message, file=self.source, line=line, field=name)

    def group(self, name: str, line: int) -> _Group:
        if not re.match(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}\Z", name):
            raise self.error(line, f"bad group name {name!r}: use letters, digits, '_', '.' "
                                   "or '-'")
        if name not in self.groups:
            self.groups[name] = _Group(name, line)
        return self.groups[name]

    def add_hosts(self, pattern: str, line: int, group: str,
                  host_vars: Mapping[str, _Value]) -> None:
        name, port = pattern, None
        if pattern.count(":") == 1 and not pattern.endswith("]"):  # host:port
            name, port = pattern.split(":")
        for host in self.expand(name, line):
            entry = self.hosts.setdefault(host, _Host(host, line))
            entry.vars.update(host_vars)
            if port is not None:
                entry.vars["ansible_port"] = _Value(port, line, text=True)
            self.groups[group].hosts.setdefault(host, line)

    def expand(self, pattern: str, line: int) -> list[str]:
        """web[01:03] -> web01, web02, web03 (letters and a stride too)."""
        match = _RANGE_RE.search(pattern)
        if not match:
            return [pattern]
        start, end, stride = match.group(1), match.group(2), int(match.group(3) or 1)
        head, tail = pattern[:match.start()], pattern[match.end():]
        if start.isdigit() and end.isdigit():
            width = len(start) if start.startswith("0") else 0
            items = [str(i).zfill(width) for i in range(int(start), int(end) + 1, stride)]
        elif len(start) == len(end) == 1 and start.isalpha() and end.isalpha():
            items = [chr(c) for c in range(ord(start), ord(end) + 1, stride)]
        else:
            raise self.error(line, f"cannot expand host range {match.group(0)!r} "
                                   "(use [01:20] or [a:f])")
        if not items or len(items) > MAX_RANGE or stride < 1:
            raise self.error(line, f"empty or oversized host range {match.group(0)!r}")
        return [host for item in items for host in self.expand(head + item + tail, line)]

    # ------------------------------------------------------------------ INI

    def read_ini(self, text: str) -> None:
        kind, current = "hosts", self.group("ungrouped", 1)
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                if not line.endswith("]"):
                    raise self.error(number, f"section header not closed: {line!r}")
                name, _, kind = line[1:-1].strip().partition(":")
                kind = kind or "hosts"
                if kind not in ("hosts", "vars", "children"):
                    raise self.error(number, f"unknown section type {kind!r} "
                                             "(expected :vars or :children)")
                current = self.group(name.strip(), number)
                continue
            try:
                words = shlex.split(line, comments=True)
            except ValueError as exc:
                raise self.error(number, f"cannot read this line ({exc})") from None
            if kind == "hosts":
                host_vars = {}
                for word in words[1:]:
                    key, eq, value = word.partition("=")
                    if not eq or not key:
                        raise self.error(number, f"expected key=value after the host name, "
                                                 f"got {word!r}")
                    host_vars[key] = _Value(value, number, text=True)
                self.add_hosts(words[0], number, current.name, host_vars)
            elif kind == "vars":
                key, eq, value = line.partition("=")
                if not eq or not key.strip():
                    raise self.error(number, f"expected key=value in [{current.name}:vars], "
                                             f"got {line!r}")
                current.vars[key.strip()] = _Value(_unquote(value.strip()), number, text=True)
            else:
                if len(words) != 1:
                    raise self.error(number, f"expected one group name in "
                                             f"[{current.name}:children], got {line!r}")
                child = self.group(words[0], number)
                if child.name == ALL:
                    raise self.error(number, "'all' cannot be a child group")
                current.children.setdefault(child.name, number)

    # ------------------------------------------------------------------ YAML

    def read_yaml(self, text: str) -> None:
        data = load_yaml(text, self.source)
        if data is None:
            return
        if not isinstance(data, LineDict):
            raise self.error(getattr(data, "line", 1), "expected a mapping of groups "
                             f"(such as 'all:'), got {describe(data)}")
        for name, value in data.items():
            self.yaml_group(name, value, data.line_of(name))

    def yaml_group(self, name: Any, value: Any, line: int) -> _Group:
        if not isinstance(name, str):
            raise self.error(line, f"group names must be strings, got {describe(name)}")
        group = self.group(name, line)
        if value is None:
            return group
        if not isinstance(value, LineDict):
            raise self.error(line, f"expected hosts, vars or children, got {describe(value)}",
                             name)
        for key, section in value.items():
            key_line = value.line_of(key)
            if key not in ("hosts", "vars", "children"):
                raise self.error(key_line, f"unknown key {key!r} in group {name!r} "
                                           "(expected hosts, vars or children)")
            if section is None:
                continue
            if not isinstance(section, LineDict):
                raise self.error(key_line, f"expected a mapping, got {describe(section)}",
                                 f"{name}.{key}")
            if key == "vars":
                group.vars.update(self.yaml_vars(section))
            elif key == "hosts":
                for host, host_vars in section.items():
                    host_line = section.line_of(host)
                    if not isinstance(host, str):
                        host = str(host)  # an IP-like key YAML read as a number
                    if host_vars is not None and not isinstance(host_vars, LineDict):
                        raise self.error(host_line, f"expected host vars, got "
                                                    f"{describe(host_vars)}", host)
                    self.add_hosts(host, host_line, name,
                                   self.yaml_vars(host_vars) if host_vars else {})
            else:
                for child, child_value in section.items():
                    child_group = self.yaml_group(child, child_value, section.line_of(child))
                    if child_group.name == ALL:
                        raise self.error(section.line_of(child), "'all' cannot be a child group")
                    group.children.setdefault(child_group.name, section.line_of(child))
        return group

    @staticmethod
    def yaml_vars(mapping: LineDict) -> dict[str, _Value]:
        return {str(key): _Value(value, mapping.line_of(key)) for key, value in mapping.items()}


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


# ---------------------------------------------------------------- translate


class _Translator:
    """Ansible variables to flctl's, each checked where it was written."""

    def __init__(self, reader: _Reader, base: Path) -> None:
        self.reader = reader
        self.base = base
        self.ignored: dict[str, set[str]] = {}

    def vars(self, values: Mapping[str, _Value], owner: str, where: str) -> LineDict:
        out = LineDict(line=min((v.line for v in values.values()), default=1))
        for key, value in values.items():
            name = self.flctl_name(key, value.line, where)
            if name is None:
                if key.startswith("ansible_"):
                    self.ignored.setdefault(key, set()).add(owner)
                continue
            spot = Spot(self.reader.source, value.line, f"{where}.{key}")
            out.put(name, self.convert(name, value, spot), value.line)
        return out

    def flctl_name(self, key: str, line: int, where: str) -> str | None:
        if key in ANSIBLE_VARS:
            return ANSIBLE_VARS[key]
        if key.startswith(FLCTL_PREFIX):
            name = key[len(FLCTL_PREFIX):]
            if name not in HOST_VARS:
                known = [FLCTL_PREFIX + v for v in HOST_VARS]
                raise self.reader.error(line, f"unknown flctl variable{did_you_mean(key, known)}",
                                        f"{where}.{key}")
            return name
        return None

    def convert(self, name: str, value: _Value, spot: Spot) -> Any:
        raw = value.raw
        if name == "connection":
            raw = str(raw)
            if raw in SSH_CONNECTIONS:
                return "ssh"
            if raw != "local":
                raise spot.error(f"flctl reaches hosts over SSH or runs them locally, "
                                 f"not with {raw!r}")
            return "local"
        if value.text:
            raw = _ansible_bool(raw) if name == "become" else _scalar(raw, name)
        elif name == "become" and isinstance(raw, str):
            raw = _ansible_bool(raw)
        if name in ("ssh_host", "ssh_user") and isinstance(raw, (int, float)):
            raw = str(raw)
        if name in ("ssh_port", "agent_port") and isinstance(raw, str) and raw.isdigit():
            raw = int(raw)  # Ansible takes ansible_port: "2222" too
        checked = CHECKS[name](raw, spot)
        if name == "ssh_key" and checked is not None:
            expanded = os.path.expanduser(checked)  # relative: beside the Ansible file
            checked = expanded if os.path.isabs(expanded) else str(self.base / expanded)
        return checked


def _ansible_bool(raw: Any) -> Any:
    if isinstance(raw, str) and raw.lower() in _TRUE + _FALSE:
        return raw.lower() in _TRUE
    return raw


def _scalar(text: str, name: str) -> Any:
    """An INI value as the YAML scalar it spells (ports are numbers, labels mappings)."""
    if name in ("ssh_host", "ssh_user", "ssh_key", "data_path", "frozen_path", "python",
                "overlay_ip", "host_key"):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# ---------------------------------------------------------------- public API


def read_ansible(text: str, source: str, *, yaml_format: bool | None = None) -> AnsibleInventory:
    """Translate an Ansible inventory into flctl's inventory document."""
    reader = _Reader(source)
    if yaml_format is None:
        yaml_format = _looks_like_yaml(text, source)
    if yaml_format:
        reader.read_yaml(text)
    else:
        reader.read_ini(text)
    if not reader.hosts:
        raise reader.error(None, "the Ansible inventory lists no hosts")
    base = Path(os.path.abspath(Path(source).parent))
    translator = _Translator(reader, base)
    document = _document(reader, translator)
    notes = [f"ignored {var} (flctl has no use for it; set on {', '.join(sorted(owners))})"
             for var, owners in sorted(translator.ignored.items())]
    return AnsibleInventory(source, document, notes)


def _looks_like_yaml(text: str, source: str) -> bool:
    if source.endswith(YAML_SUFFIXES):
        return True
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";")):
            return bool(_YAML_FIRST_LINE_RE.match(line))
    return False


def _document(reader: _Reader, translator: _Translator) -> LineDict:
    """{all: {hosts: every host with its vars, vars}, group: {hosts, children, vars}, ...}"""
    groups = reader.groups
    parents: dict[str, list[str]] = {}
    for group in groups.values():
        for child in group.children:
            parents.setdefault(child, []).append(group.name)
    located = {g.name for g in groups.values()
               if {"ansible_host", "ansible_ssh_host", "ansible_connection"} & set(g.vars)}

    def reaches_located(group: str, seen: frozenset = frozenset()) -> bool:
        if group in located:
            return True
        return any(reaches_located(p, seen | {group}) for p in parents.get(group, ())
                   if p not in seen)

    ungrouped = groups.get("ungrouped")
    if ungrouped is not None:  # as in Ansible: only hosts no other group lists
        listed = {h for g in groups.values() if g is not ungrouped for h in g.hosts}
        ungrouped.hosts = {h: line for h, line in ungrouped.hosts.items() if h not in listed}
    document = LineDict(line=1)
    top = LineDict(line=groups[ALL].line)
    hosts = LineDict(line=groups[ALL].line)
    for host in reader.hosts.values():
        host_vars = translator.vars(host.vars, host.name, f"hosts.{host.name}")
        in_groups = [g.name for g in groups.values() if host.name in g.hosts]
        if "ssh_host" not in host_vars and "connection" not in host_vars and \
                not any(reaches_located(g) for g in [*in_groups, ALL]):
            host_vars.put("ssh_host", CHECKS["ssh_host"](
                host.name, Spot(reader.source, host.line, f"hosts.{host.name}")), host.line)
        hosts.put(host.name, host_vars, host.line)
    top.put("hosts", hosts, groups[ALL].line)
    if groups[ALL].vars:
        top.put("vars", translator.vars(groups[ALL].vars, ALL, "groups.all.vars"),
                groups[ALL].line)
    document.put(ALL, top, groups[ALL].line)
    for group in groups.values():
        if group.name == ALL or (group.name == "ungrouped" and not group.hosts):
            continue
        body = LineDict(line=group.line)
        if group.hosts:
            members = LineDict(line=group.line)
            for host, line in group.hosts.items():
                members.put(host, None, line)
            body.put("hosts", members, group.line)
        if group.children:
            children = LineDict(line=group.line)
            for child, line in group.children.items():
                children.put(child, None, line)
            body.put("children", children, group.line)
        if group.vars:
            body.put("vars", translator.vars(group.vars, group.name,
                                             f"groups.{group.name}.vars"), group.line)
        document.put(group.name, body or None, group.line)
    return document


# Field names back to the Ansible spelling, for errors found after translation.
_ANSIBLE_NAME = {"ssh_host": "ansible_host", "ssh_user": "ansible_user",
                 "ssh_port": "ansible_port", "ssh_key": "ansible_ssh_private_key_file",
                 "become": "ansible_become", "connection": "ansible_connection"}


def _in_ansible_terms(exc: ConfigError) -> ConfigError:
    if not exc.field:
        return exc
    head, _, last = exc.field.rpartition(".")
    if last not in HOST_VARS:
        return exc
    name = _ANSIBLE_NAME.get(last, FLCTL_PREFIX + last)
    return ConfigError(exc.reason, file=exc.file, line=exc.line,
                       field=f"{head}.{name}" if head else name)


def ansible_to_inventory(found: AnsibleInventory, overlay_subnet: ipaddress.IPv4Network,
                         base_dir: Path | None = None, *,
                         previous_overlay: Mapping[str, ipaddress.IPv4Address] | None = None,
                         ) -> Inventory:
    try:
        return inventory_from_data(found.document, found.source, overlay_subnet, base_dir,
                                   previous_overlay=previous_overlay)
    except ConfigError as exc:
        raise _in_ansible_terms(exc) from None


def load_ansible_inventory(path: Path, overlay_subnet: ipaddress.IPv4Network,
                           base_dir: Path | None = None, *,
                           previous_overlay: Mapping[str, ipaddress.IPv4Address] | None = None,
                           ) -> Inventory:
    """An Ansible inventory file as flctl's Inventory (the `inventory:` setting)."""
    return ansible_to_inventory(read_ansible(read_config_text(path), str(path)), overlay_subnet,
                                base_dir, previous_overlay=previous_overlay)


def render_inventory(found: AnsibleInventory) -> str:
    """inventory.yaml text for `flctl init --from-ansible`."""
    header = (f"# inventory.yaml: translated by `flctl init --from-ansible` from {found.source}.\n"
              "# Every host needs a data_path (set it per host or in a group's vars).\n")
    for note in found.notes:
        header += f"# {note}\n"
    return header + yaml.safe_dump(_plain(found.document), sort_keys=False,
                                   default_flow_style=False, width=100)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def translate_file(path: Path, overlay_subnet: ipaddress.IPv4Network) -> tuple[str, list[str]]:
    """inventory.yaml text from an Ansible inventory file, and notes for the user.

    The translation is validated now, so a bad port is reported against the
    Ansible file's line; only a missing data_path is let through (Ansible
    has none, the user adds it), as a note.
    """
    found = read_ansible(read_config_text(path), str(path))
    notes = list(found.notes)
    try:
        ansible_to_inventory(found, overlay_subnet, Path(path).parent)
    except ConfigError as exc:
        if not (exc.field or "").endswith(".flctl_data_path"):
            raise
        notes.append("no data_path for some hosts (e.g. "
                     f"{exc.field.split('.')[1]}): add data_path to inventory.yaml "
                     "before deploying")
    return render_inventory(found), notes
