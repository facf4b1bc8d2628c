"""inventory.yaml: the hosts flctl deploys to, in an Ansible-like shape.

Top-level keys are groups; `all` is the root that holds every host. A group
has `hosts`, `vars` and `children` (nested groups). Variables apply from the
shallowest group to the deepest, then the host's own; `labels` are merged key
by key instead of replaced. A host may be listed (`alpha:` with no value) in
many groups but defined (given a mapping of vars) in one place only, so
there is never a question of which definition wins.

Every host gets an overlay address: an explicit `overlay_ip`, or one derived
from a hash of its name so that adding or removing other hosts does not
renumber it (renumbering would force a WireGuard change on every host).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from flctl.core.host_vars import CHECKS, DEFAULTS, HOST_ONLY_VARS, HOST_VARS
from flctl.core.overlay_addresses import (
    assign_or_explain,
    check_explicit_overlay,
    check_ssh_outside_overlay,
)
from flctl.core.sites import Site, find_sites
from flctl.core.yamlsrc import (
    LineDict,
    Spot,
    check_keys,
    describe,
    did_you_mean,
    expect_mapping,
    load_yaml,
    read_config_text,
    yaml_scalar,
)
from flctl.errors import ConfigError

ALL = "all"
LOCAL_GROUP = "local"
GROUP_KEYS = ("hosts", "vars", "children", "aggregator")
HOST_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
# Names a host may not take: a certificate named "coordinator" would be the
# coordinator's, and deploy's recap reports this machine's tunnel as "hub".
RESERVED_NAMES = {"coordinator": "the coordinator's certificate name",
                  "hub": "the WireGuard hub on this machine"}
# What ~/.ssh/config may also say about a host (flctl.core.sshconf).
SSH_VARS = ("ssh_user", "ssh_port", "ssh_key")
GROUP_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}\Z")


@dataclass(frozen=True)
class Host:
    name: str
    connection: str              # "ssh" | "local"
    ssh_host: str | None      # None for local hosts
    ssh_port: int
    ssh_user: str
    ssh_key: str | None       # ~ expanded, relative paths made absolute
    host_key: str | None      # "SHA256:<base64>" without padding
    become: bool
    overlay_ip: ipaddress.IPv4Address
    data_path: str               # absolute (a file or a folder); local hosts: resolved, existing
    labels: Mapping[str, str]
    groups: tuple[str, ...]      # every group containing the host, shallow first, no "all"
    agent_port: int | None
    python: str
    line: int                    # where the host is defined (or first listed)
    # for the task's own loader (load_data(path, params)); plain JSON values
    data_params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # `python` is set for this host: the agent is layered on that interpreter's packages
    python_layered: bool = False
    # "all", "none" or indices ("0,2"): the GPUs the agent may use, where it has any
    gpus: str = "all"
    # the task's frozen part, placed on the host by the user (None: the
    # workspace's frozen/, shipped by deploy, when there is one)
    frozen_path: str | None = None
    # the SSH settings the inventory sets (at any level): ssh_config cannot override them
    explicit: frozenset[str] = frozenset()
    # resource limits (flctl.core.limits), None: flctl.yaml's agent.* applies
    agent_cpu_quota: str | None = None
    agent_memory_max: str | None = None
    agent_nice: int | None = None

    @property
    def is_local(self) -> bool:
        return self.connection == "local"

    def __hash__(self) -> int:  # labels is a mapping; equal hosts share these
        return hash((self.name, self.ssh_host, self.overlay_ip, self.line))


@dataclass(frozen=True)
class Inventory:
    source: str
    hosts: tuple[Host, ...]                  # in file order
    groups: Mapping[str, tuple[str, ...]]    # group -> host names, transitive; has "all"
    # groups naming an `aggregator` (flctl.core.sites), by group name
    sites: Mapping[str, Site] = field(default_factory=lambda: MappingProxyType({}))
    _by_name: Mapping[str, Host] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", MappingProxyType({h.name: h for h in self.hosts}))

    def __hash__(self) -> int:
        return hash((self.source, self.hosts))

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def site_of(self, name: str) -> Site | None:
        """The site whose aggregator `name` reports to, if any."""
        return next((s for s in self.sites.values() if name in s.members), None)

    def host(self, name: str) -> Host:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigError(f"unknown host {name!r}{did_you_mean(name, self._by_name)}",
                              file=self.source) from None

    def select(self, names_or_groups: Sequence[str]) -> list[Host]:
        """Hosts matching any host name, group name or glob, in file order.

        Items may be comma-separated ("alpha,edge") as typed after --limit.
        An empty selection means every host.
        """
        patterns = [p.strip() for item in names_or_groups for p in item.split(",") if p.strip()]
        if not patterns:
            return list(self.hosts)
        wanted: set[str] = set()
        for pattern in patterns:
            matched = self._match(pattern)
            if not matched:
                choices = set(self._by_name) | set(self.groups)
                hint = did_you_mean(pattern, choices)
                raise ConfigError(f"unknown host or group {pattern!r}{hint}", file=self.source)
            wanted.update(matched)
        return [h for h in self.hosts if h.name in wanted]

    def _match(self, pattern: str) -> set[str]:
        if pattern in self._by_name:
            return {pattern}
        if pattern in self.groups:
            return set(self.groups[pattern])
        if not any(ch in pattern for ch in "*?["):
            return set()
        found = {n for n in self._by_name if fnmatchcase(n, pattern)}
        for group, members in self.groups.items():
            if fnmatchcase(group, pattern):
                found.update(members)
        return found


# ---------------------------------------------------------------- parse model


@dataclass
class _Var:
    """A validated value and where it was written, for errors found later."""

    value: Any
    line: int
    field: str


@dataclass
class _Group:
    name: str
    line: int
    order: int
    define_line: int | None = None
    vars: dict[str, _Var] = field(default_factory=dict)
    children: list[tuple[str, int]] = field(default_factory=list)   # (name, line)
    parents: list[str] = field(default_factory=list)
    aggregator: tuple[str, int] | None = None   # (host name, line)


@dataclass
class _HostEntry:
    name: str
    line: int
    define_line: int | None = None
    vars: dict[str, _Var] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)   # groups listing it directly


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.groups: dict[str, _Group] = {ALL: _Group(ALL, 1, 0)}
        self.hosts: dict[str, _HostEntry] = {}

    def spot(self, line: int | None, name: str | None = None) -> Spot:
        return Spot(self.source, line, name)

    def walk_top(self, data: Any) -> None:
        if data is None:
            raise self.spot(1).error("inventory defines no hosts")
        if not isinstance(data, LineDict):
            line = getattr(data, "line", 1)
            raise self.spot(line).error(
                f"expected a mapping of group names (such as 'all:'), got {describe(data)}")
        self.groups[ALL].line = data.line
        for name, value in data.items():
            line = data.line_of(name)
            if name in GROUP_KEYS:
                raise self.spot(line, name).error(
                    f"top-level keys are group names: put {name!r} under a group such as 'all:'")
            self.walk_group(name, value, line, parent=None if name == ALL else ALL)

    def walk_group(self, name: Any, value: Any, line: int, parent: str | None) -> None:
        where = f"groups.{parent}.children" if parent and parent != ALL else None
        if not isinstance(name, str):
            raise self.spot(line, where).error(
                f"group names must be strings, got {describe(name)} (quote it)")
        gspot = self.spot(line, f"groups.{name}")
        if not GROUP_NAME_RE.match(name) or name in GROUP_KEYS:
            raise gspot.error("bad group name: use letters, digits, '_', '.' or '-' "
                              "(at most 63), not hosts, vars, children or aggregator")
        if name == ALL and parent is not None:
            raise gspot.error("'all' is the root group and cannot be a child of another group")
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = _Group(name, line, len(self.groups))
        if parent is not None:
            if parent not in group.parents:
                group.parents.append(parent)
                self.groups[parent].children.append((name, line))
        if value is None:
            return
        if not isinstance(value, LineDict):
            raise gspot.error("expected a mapping with hosts, vars or children, "
                              f"got {describe(value)}")
        if group.define_line is not None:
            raise gspot.error(f"group {name!r} is already defined at line {group.define_line}")
        group.define_line = line
        check_keys(value, GROUP_KEYS, gspot)
        for key in value:       # in file order, so hosts keep the order they are written
            key_spot = gspot.key(value, key)
            if key == "aggregator":
                group.aggregator = self.parse_aggregator(name, value[key], key_spot)
                continue
            section = expect_mapping(value[key], key_spot)
            if key == "vars":
                group.vars = self.parse_vars(section, key_spot, in_group=True)
            elif key == "hosts":
                for host, host_value in section.items():
                    self.walk_host(host, host_value, section.line_of(host), name, key_spot)
            else:
                for child, child_value in section.items():
                    self.walk_group(child, child_value, section.line_of(child), parent=name)

    def walk_host(self, name: Any, value: Any, line: int, group: str, hosts_spot: Spot) -> None:
        if not isinstance(name, str):
            raise hosts_spot.at(line=line).error(
                f"host names must be strings, got {describe(name)} (quote it)")
        hspot = self.spot(line, f"hosts.{name}")
        if not HOST_NAME_RE.match(name):
            raise hspot.error("bad host name: use letters, digits, '_', '.' or '-', "
                              "starting with a letter or digit (at most 63)")
        if name in RESERVED_NAMES:
            raise hspot.error(f"{name!r} is reserved ({RESERVED_NAMES[name]}); rename the host")
        entry = self.hosts.get(name)
        if entry is None:
            entry = self.hosts[name] = _HostEntry(name, line)
        if group not in entry.groups:
            entry.groups.append(group)
        if value is None:
            return
        if not isinstance(value, LineDict):
            raise hspot.error(f"expected a mapping of host vars (or nothing), got {describe(value)}")
        if entry.define_line is not None:
            raise hspot.error(f"host {name!r} is already defined at line {entry.define_line}")
        entry.define_line = line
        entry.vars = self.parse_vars(value, hspot, in_group=False)

    @staticmethod
    def parse_aggregator(group: str, value: Any, spot: Spot) -> tuple[str, int]:
        if group == ALL:
            raise spot.error("the root group cannot be a site: name an aggregator in a group "
                             "of hosts")
        if not isinstance(value, str) or not HOST_NAME_RE.match(value):
            raise spot.error(f"expected one host name (the site's aggregator), got "
                             f"{describe(value)}")
        return value, spot.line or 1

    def parse_vars(self, mapping: LineDict, spot: Spot, in_group: bool) -> dict[str, _Var]:
        check_keys(mapping, HOST_VARS, spot)
        parsed: dict[str, _Var] = {}
        for key, value in mapping.items():
            var_spot = spot.key(mapping, key)
            if in_group and key in HOST_ONLY_VARS:
                raise var_spot.error("set it on each host, not in group vars")
            parsed[key] = _Var(CHECKS[key](value, var_spot), var_spot.line or 1,
                               var_spot.field or key)
        return parsed

    # ------------------------------------------------------------ group graph

    def check_graph(self) -> dict[str, int]:
        """Refuse cycles; return each group's depth (longest path from all)."""
        state: dict[str, int] = {}

        def visit(name: str, path: list[str]) -> None:
            state[name] = 1
            for child, line in self.groups[name].children:
                if state.get(child) == 1:
                    cycle = " -> ".join(path[path.index(child):] + [child])
                    raise self.spot(line, f"groups.{name}.children.{child}").error(
                        f"group cycle: {cycle}")
                if child not in state:
                    visit(child, path + [child])
            state[name] = 2

        visit(ALL, [ALL])
        depth: dict[str, int] = {ALL: 0}

        def depth_of(name: str) -> int:
            if name not in depth:
                depth[name] = 1 + max(depth_of(p) for p in self.groups[name].parents)
            return depth[name]

        for name in self.groups:
            depth_of(name)
        return depth

    def ancestors(self, name: str, memo: dict[str, frozenset]) -> frozenset:
        if name not in memo:
            found = {name}
            for parent in self.groups[name].parents:
                found |= self.ancestors(parent, memo)
            memo[name] = frozenset(found)
        return memo[name]


# ---------------------------------------------------------------- public API


def load_inventory(path: Path, overlay_subnet: ipaddress.IPv4Network,
                   base_dir: Path | None = None, *,
                   previous_overlay: Mapping[str, ipaddress.IPv4Address] | None = None,
                   ) -> Inventory:
    """Read and validate inventory.yaml; local data paths resolve beside it."""
    path = Path(path)
    text = read_config_text(path)
    return parse_inventory(text, str(path), overlay_subnet,
                           base_dir if base_dir is not None else path.parent,
                           previous_overlay=previous_overlay)


def parse_inventory(text: str, source: str, overlay_subnet: ipaddress.IPv4Network,
                    base_dir: Path | None = None, *,
                    previous_overlay: Mapping[str, ipaddress.IPv4Address] | None = None,
                    ) -> Inventory:
    """Validate an inventory document into Hosts with every value resolved.

    `base_dir` (default: the directory of `source`) anchors relative local
    data paths and ssh_key paths. `previous_overlay` maps host names to the
    addresses they had before (e.g. from the last deploy); such a host keeps
    its address if it is still free, which makes assignment fully sticky.
    """
    return inventory_from_data(load_yaml(text, source), source, overlay_subnet, base_dir,
                               previous_overlay=previous_overlay)


def inventory_from_data(data: Any, source: str, overlay_subnet: ipaddress.IPv4Network,
                        base_dir: Path | None = None, *,
                        previous_overlay: Mapping[str, ipaddress.IPv4Address] | None = None,
                        ) -> Inventory:
    """parse_inventory on an already loaded document (LineDicts keep the lines:
    an Ansible inventory is translated into one, flctl.core.ansible_inventory)."""
    base = Path(os.path.abspath(base_dir if base_dir is not None else Path(source).parent))
    parser = _Parser(source)
    parser.walk_top(data)
    if not parser.hosts:
        raise parser.spot(parser.groups[ALL].line).error("inventory defines no hosts")
    for name, entry in parser.hosts.items():
        if name in parser.groups:
            raise parser.spot(entry.line, f"hosts.{name}").error(
                f"{name!r} is both a host and a group (group at line "
                f"{parser.groups[name].line}); rename one")
    depth = parser.check_graph()
    memo: dict[str, frozenset] = {}

    resolved: list[tuple[_HostEntry, dict[str, _Var], tuple[str, ...]]] = []
    for entry in parser.hosts.values():
        member_of: set[str] = set()
        for group in entry.groups:
            member_of |= parser.ancestors(group, memo)
        member_of.add(ALL)
        ordered = sorted(member_of, key=lambda g: (depth[g], parser.groups[g].order))
        merged = _merge_vars([parser.groups[g].vars for g in ordered] + [entry.vars])
        resolved.append((entry, merged, tuple(g for g in ordered if g != ALL)))

    _check_local_agent_ports(source, resolved)
    explicit = check_explicit_overlay(source, overlay_subnet, resolved)
    auto_names = [entry.name for entry, merged, _ in resolved if "overlay_ip" not in merged]
    assigned = assign_or_explain(source, overlay_subnet, auto_names, explicit,
                                  previous_overlay, parser.groups[ALL].line)

    hosts = tuple(_build_host(source, base, entry, merged, groups,
                              explicit.get(entry.name) or assigned[entry.name])
                  for entry, merged, groups in resolved)
    check_ssh_outside_overlay(source, overlay_subnet, resolved)
    members: dict[str, tuple[str, ...]] = {}
    for group in parser.groups:
        members[group] = tuple(h.name for h in hosts if group == ALL or group in h.groups)
    sites = find_sites(source, {g.name: g.aggregator for g in parser.groups.values()
                                if g.aggregator is not None},
                       members, frozenset(h.name for h in hosts if h.is_local))
    return Inventory(source, hosts, MappingProxyType(members), MappingProxyType(sites))


def _merge_vars(layers: Sequence[Mapping[str, _Var]]) -> dict[str, _Var]:
    """Later layers win; labels merge key by key (a host adds to its groups')."""
    merged: dict[str, _Var] = {}
    for layer in layers:
        for key, var in layer.items():
            if key == "labels" and "labels" in merged:
                labels = {**merged["labels"].value, **var.value}
                merged[key] = dataclasses.replace(var, value=labels)
            else:
                merged[key] = var
    return merged


def _build_host(source: str, base: Path, entry: _HostEntry, merged: Mapping[str, _Var],
                groups: tuple[str, ...], overlay_ip: ipaddress.IPv4Address) -> Host:
    values = {key: merged[key].value if key in merged else default
              for key, default in DEFAULTS.items()}
    line = entry.define_line or entry.line

    def spot(var: str) -> Spot:
        return Spot(source, merged[var].line if var in merged else line, f"hosts.{entry.name}.{var}")

    local = values["connection"] == "local"
    if local:
        values["ssh_host"] = None
    elif values["ssh_host"] is None:
        raise spot("ssh_host").error("required for ssh hosts (or set connection: local)")
    if "data_path" not in merged:
        raise spot("data_path").error("required: where the host's data is (a file or folder)")
    data_path = _host_path(merged["data_path"].value, local, base, spot("data_path"))
    if values["frozen_path"] is not None:
        values["frozen_path"] = _host_path(values["frozen_path"], local, base,
                                           spot("frozen_path"))
    if values["ssh_key"] is not None:
        values["ssh_key"] = _absolute(values["ssh_key"], base)
    labels = merged["labels"].value if "labels" in merged else {}
    data_params = merged["data_params"].value if "data_params" in merged else {}
    return Host(name=entry.name, data_path=data_path, overlay_ip=overlay_ip,
                labels=MappingProxyType(dict(labels)), groups=groups, line=line,
                data_params=MappingProxyType(dict(data_params)),
                python_layered="python" in merged,
                explicit=frozenset(k for k in SSH_VARS if k in merged), **values)


def _host_path(path: str, local: bool, base: Path, spot: Spot) -> str:
    """A path on the host: a local host's resolved against the inventory's
    folder and checked to exist; an SSH host's must be absolute."""
    if local:
        resolved = _absolute(path, base)
        if not os.path.exists(resolved):
            raise spot.error(f"{resolved} does not exist")
        return resolved
    if not PurePosixPath(path).is_absolute():
        raise spot.error(f"must be an absolute path on the host, got {path!r}")
    return path


def _absolute(path: str, base: Path) -> str:
    expanded = Path(os.path.expanduser(path))
    return os.path.normpath(expanded if expanded.is_absolute() else base / expanded)


def _check_local_agent_ports(source: str,
                             resolved: Sequence[tuple[_HostEntry, dict[str, _Var], Any]]) -> None:
    """Local hosts all bind 127.0.0.1, so two explicit equal ports would clash."""
    owners: dict[int, tuple[str, int]] = {}
    for entry, merged, _ in resolved:
        connection = merged["connection"].value if "connection" in merged else "ssh"
        port_var = merged.get("agent_port")
        if connection != "local" or port_var is None or port_var.value is None:
            continue
        if port_var.value in owners:
            other, line = owners[port_var.value]
            raise Spot(source, port_var.line, f"hosts.{entry.name}.agent_port").error(
                f"port {port_var.value} is already used by local host {other!r} (line {line})")
        owners[port_var.value] = (entry.name, port_var.line)


# ---------------------------------------------------------------- overlay


# ---------------------------------------------------------------- render


def render_local_inventory(names_and_data: Sequence[tuple[str, str]]) -> str:
    """inventory.yaml for `flctl init --local N`: one `local` group on this machine."""
    lines = [
        "# inventory.yaml: hosts flctl deploys to and trains on.",
        "# These hosts all run on this machine (connection: local), each with its own",
        "# data file. See inventory.example.yaml for SSH hosts and every host variable.",
        f"{ALL}:",
        "  children:",
        f"    {LOCAL_GROUP}:",
        "      vars:",
        "        connection: local",
        "      hosts:",
    ]
    if not names_and_data:
        raise ConfigError("need at least one local host")
    seen: set[str] = set()
    for name, data_path in names_and_data:
        if not HOST_NAME_RE.match(name) or name in seen:
            raise ConfigError(f"bad or repeated host name {name!r}", field=f"hosts.{name}")
        seen.add(name)
        lines.append(f"        {name}:")
        lines.append(f"          data_path: {yaml_scalar(str(data_path))}")
    return "\n".join(lines) + "\n"
