"""inventory.yaml: fixture-driven errors, precedence, overlay addresses, select."""

from __future__ import annotations

import ipaddress
import random
import re
import shutil
from pathlib import Path

import pytest

from flctl.core.inventory import (
    load_inventory,
    parse_inventory,
    render_local_inventory,
)
from flctl.core.overlay_addresses import assign_overlay_addresses, overlay_home_slot
from flctl.core.yamlsrc import LineDict, load_yaml
from flctl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "inventory"
SUBNET = ipaddress.IPv4Network("10.213.0.0/24")
DOC_NETS = [ipaddress.IPv4Network("203.0.113.0/24"), ipaddress.IPv4Network("198.51.100.0/24")]

# Every error kind the inventory must report, and the fixture that shows it.
REQUIRED_FIXTURES = {
    "bad YAML syntax": "bad_yaml_syntax.yaml",
    "top level not a mapping": "bad_top_level_not_mapping.yaml",
    "unknown group key": "bad_unknown_group_key.yaml",
    "unknown host var with suggestion": "bad_unknown_host_var.yaml",
    "duplicate mapping key": "bad_duplicate_key.yaml",
    "host defined twice": "bad_host_defined_twice.yaml",
    "duplicate overlay address": "bad_overlay_duplicate.yaml",
    "overlay outside subnet": "bad_overlay_outside_subnet.yaml",
    "overlay network address": "bad_overlay_network_address.yaml",
    "overlay broadcast address": "bad_overlay_broadcast_address.yaml",
    "overlay hub address": "bad_overlay_hub_address.yaml",
    "port 0": "bad_port_zero.yaml",
    "port 70000": "bad_port_too_high.yaml",
    "port 'abc'": "bad_port_string.yaml",
    "port true": "bad_port_bool.yaml",
    "bad connection": "bad_connection.yaml",
    "ssh host without ssh_host": "bad_ssh_without_ssh_host.yaml",
    "missing data_path": "bad_missing_data_path.yaml",
    "local data_path does not exist": "bad_local_data_missing.yaml",
    "bad host name": "bad_host_name.yaml",
    "bad host_key": "bad_host_key.yaml",
    "labels not str->str": "bad_labels_value.yaml",
    "labels not a mapping": "bad_labels_not_mapping.yaml",
    "empty inventory": "bad_empty_inventory.yaml",
}


def _expectation(path: Path) -> tuple[int, str | None, str]:
    """(line, field, message) from the fixture's '# expect:' header and markers.

    '# <-- here' marks the line the error must name; '# <-- first' marks the
    earlier line a duplicate-style message refers to as {first}.
    """
    lines = path.read_text().splitlines()
    header = re.match(r"# expect: (\S+) \| (.+)", lines[0])
    assert header, f"{path.name}: first line must be '# expect: FIELD | MESSAGE'"
    here = [i + 1 for i, text in enumerate(lines) if "# <-- here" in text]
    first = [i + 1 for i, text in enumerate(lines) if "# <-- first" in text]
    assert len(here) == 1, f"{path.name}: needs exactly one '# <-- here' marker"
    field = None if header.group(1) == "-" else header.group(1)
    message = header.group(2)
    if "{first}" in message:
        message = message.replace("{first}", str(first[0]))
    return here[0], field, message


BAD_FIXTURES = sorted(FIXTURES.glob("bad_*.yaml"))


def test_every_required_error_kind_has_a_fixture() -> None:
    names = {p.name for p in BAD_FIXTURES}
    missing = {kind: f for kind, f in REQUIRED_FIXTURES.items() if f not in names}
    assert not missing


@pytest.mark.parametrize("path", BAD_FIXTURES, ids=lambda p: p.stem)
def test_bad_fixture_reports_file_line_field(path: Path) -> None:
    line, field, message = _expectation(path)
    with pytest.raises(ConfigError) as info:
        load_inventory(path, SUBNET)
    err = info.value
    assert err.file == str(path)
    assert err.line == line, str(err)
    assert err.field == field, str(err)
    assert message in err.reason, str(err)
    where = f"{path}:{line}: " + (f"{field}: " if field else "")
    assert str(err).startswith(where)


# ---------------------------------------------------------------- valid files

BRIEF_EXAMPLE = """\
all:
  vars:
    ssh_user: root
  children:
    hospitals:
      vars: {ssh_port: 22}
      hosts:
        alpha: {ssh_host: 203.0.113.10, overlay_ip: 10.213.0.11, data_path: /srv/flctl/alpha.npz, labels: {site: north}}
        beta:  {ssh_host: 203.0.113.11, data_path: /srv/flctl/beta.npz}
    edge:
      hosts:
        local1: {connection: local, data_path: data/local1.npz}
"""


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    for name in ("local1", "laptop"):
        (tmp_path / "data" / f"{name}.npz").write_bytes(b"x")
    return tmp_path


def test_brief_example_values(workspace: Path) -> None:
    path = workspace / "inventory.yaml"
    path.write_text(BRIEF_EXAMPLE)
    inv = load_inventory(path, SUBNET)      # base_dir defaults to the file's directory
    assert [h.name for h in inv.hosts] == ["alpha", "beta", "local1"]
    alpha, beta, local1 = inv.hosts
    assert (alpha.ssh_host, alpha.ssh_port, alpha.ssh_user) == ("203.0.113.10", 22, "root")
    assert alpha.overlay_ip == ipaddress.IPv4Address("10.213.0.11")
    assert dict(alpha.labels) == {"site": "north"}
    assert alpha.line == 8 and local1.line == 12
    assert beta.connection == "ssh" and beta.become is False and beta.python == "python3"
    assert beta.ssh_key is None and beta.host_key is None and beta.agent_port is None
    assert local1.connection == "local" and local1.ssh_host is None
    assert local1.data_path == str(workspace / "data" / "local1.npz")
    assert alpha.groups == ("hospitals",) and local1.groups == ("edge",)
    assert dict(inv.groups) == {"all": ("alpha", "beta", "local1"),
                                "hospitals": ("alpha", "beta"), "edge": ("local1",)}


def test_example_file_at_repo_root_loads(workspace: Path) -> None:
    inv = load_inventory(REPO / "inventory.example.yaml", SUBNET, base_dir=workspace)
    by_name = {h.name: h for h in inv.hosts}
    assert set(by_name) == {"alpha", "beta", "gamma", "laptop"}
    for host in inv.hosts:
        if host.connection == "ssh":
            address = ipaddress.IPv4Address(host.ssh_host)
            assert any(address in net for net in DOC_NETS), host.ssh_host
    assert by_name["alpha"].host_key is not None and by_name["alpha"].become is True
    assert by_name["beta"].ssh_port == 2222               # host var beats group var
    assert by_name["gamma"].become is False and by_name["gamma"].ssh_user == "root"
    assert by_name["gamma"].groups == ("hospitals", "research")
    assert dict(by_name["alpha"].labels) == {"kind": "hospital", "site": "north"}
    assert by_name["laptop"].data_path == str(workspace / "data" / "laptop.npz")
    assert set(inv.groups["gpu"]) == {"alpha"}
    assert by_name["alpha"].gpus == "0,1" and by_name["alpha"].python_layered  # gpu's vars
    assert by_name["gamma"].gpus == "all" and not by_name["gamma"].python_layered
    # Every host var appears in the example, so it documents all of them.
    text = (REPO / "inventory.example.yaml").read_text()
    from flctl.core.host_vars import HOST_VARS
    for var in HOST_VARS:
        assert re.search(rf"^\s+{var}:", text, re.M), var


def test_local_data_error_names_the_resolved_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_inventory(REPO / "inventory.example.yaml", SUBNET, base_dir=tmp_path)
    assert str(tmp_path / "data" / "laptop.npz") in info.value.reason
    assert info.value.field == "hosts.laptop.data_path"


def test_precedence_all_then_parent_then_group_then_host(workspace: Path) -> None:
    text = """\
all:
  vars: {ssh_user: a, ssh_port: 1001, python: p0, become: true, data_path: /d/all}
  children:
    outer:
      vars: {ssh_port: 1002, python: p1, labels: {tier: outer, zone: z1}}
      children:
        inner:
          vars: {python: p2, labels: {tier: inner}}
          hosts:
            h1: {ssh_host: 198.51.100.1, labels: {own: "yes"}}
            h2: {ssh_host: 198.51.100.2, python: p3, become: false}
      hosts:
        h3: {ssh_host: 198.51.100.3}
"""
    inv = parse_inventory(text, "inv.yaml", SUBNET, workspace)
    h1, h2, h3 = (inv.host(n) for n in ("h1", "h2", "h3"))
    assert (h1.ssh_user, h1.ssh_port, h1.python, h1.become) == ("a", 1002, "p2", True)
    assert dict(h1.labels) == {"tier": "inner", "zone": "z1", "own": "yes"}
    assert (h2.python, h2.become) == ("p3", False)
    assert (h3.ssh_port, h3.python, dict(h3.labels)) == (1002, "p1", {"tier": "outer", "zone": "z1"})
    assert h1.data_path == "/d/all"
    assert h1.groups == ("outer", "inner") and h3.groups == ("outer",)
    assert inv.groups["outer"] == ("h1", "h2", "h3")


def test_host_listed_in_many_groups_takes_vars_of_each(workspace: Path) -> None:
    text = """\
gpu:
  vars: {agent_port: 7600}
  hosts:
    alpha:
hospitals:
  vars: {ssh_user: med}
  hosts:
    alpha: {ssh_host: 203.0.113.10, data_path: /srv/a.npz}
    beta: {ssh_host: 203.0.113.11, data_path: /srv/b.npz}
"""
    inv = parse_inventory(text, "inv.yaml", SUBNET, workspace)
    alpha = inv.host("alpha")
    assert (alpha.agent_port, alpha.ssh_user) == (7600, "med")
    assert alpha.groups == ("gpu", "hospitals")
    assert alpha.line == 8                                  # defined there, listed at 4
    assert inv.host("beta").agent_port is None
    assert inv.groups["gpu"] == ("alpha",)


def test_sibling_groups_apply_in_file_order(workspace: Path) -> None:
    text = """\
first:
  vars: {ssh_user: one}
  hosts: {alpha: }
second:
  vars: {ssh_user: two}
  hosts:
    alpha: {ssh_host: 203.0.113.10, data_path: /srv/a.npz}
"""
    assert parse_inventory(text, "i.yaml", SUBNET, workspace).host("alpha").ssh_user == "two"
    swapped = text.replace("one", "tmp").replace("two", "one").replace("tmp", "two")
    assert parse_inventory(swapped, "i.yaml", SUBNET, workspace).host("alpha").ssh_user == "one"


def test_group_listed_under_two_parents_is_deeper_than_both(workspace: Path) -> None:
    text = """\
all:
  children:
    a:
      vars: {ssh_user: from_a}
      children:
        shared:
          vars: {ssh_user: from_shared}
          hosts:
            alpha: {ssh_host: 203.0.113.10, data_path: /srv/a.npz}
    b:
      vars: {ssh_user: from_b}
      children:
        shared:
"""
    inv = parse_inventory(text, "i.yaml", SUBNET, workspace)
    assert inv.host("alpha").ssh_user == "from_shared"
    assert set(inv.host("alpha").groups) == {"a", "b", "shared"}
    assert inv.groups["b"] == ("alpha",)


def test_host_key_normalised_and_ssh_key_resolved(workspace: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/op")
    fp = "R/UhP5JImYEwQkxnhqguGZTCpRzLM2vEM8dUGVN4X/U"
    text = f"""\
all:
  hosts:
    a: {{ssh_host: h.example, data_path: /d, host_key: "SHA256:{fp}=", ssh_key: keys/id}}
    b: {{ssh_host: h.example, data_path: /d, ssh_key: ~/.ssh/id_ed25519}}
"""
    inv = parse_inventory(text, "i.yaml", SUBNET, workspace)
    assert inv.host("a").host_key == f"SHA256:{fp}"
    assert inv.host("a").ssh_key == str(workspace / "keys" / "id")
    assert inv.host("b").ssh_key == "/home/op/.ssh/id_ed25519"


def test_empty_file_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no hosts") as info:
        parse_inventory("# nothing yet\n", "inventory.yaml", SUBNET, tmp_path)
    assert info.value.line == 1
    with pytest.raises(ConfigError) as info:
        load_inventory(tmp_path / "nope.yaml", SUBNET)
    assert info.value.file == str(tmp_path / "nope.yaml")
    assert "not found" in info.value.reason


# ---------------------------------------------------------------- overlay addresses


def _inventory_text(names: list[str]) -> str:
    rows = "\n".join(f"    {n}: {{ssh_host: 198.51.100.7, data_path: /d}}" for n in names)
    return f"all:\n  hosts:\n{rows}\n"


def _addresses(names: list[str], subnet: ipaddress.IPv4Network = SUBNET,
               ) -> dict[str, ipaddress.IPv4Address]:
    inv = parse_inventory(_inventory_text(names), "i.yaml", subnet, Path("/"))
    return {h.name: h.overlay_ip for h in inv.hosts}


def test_assigned_addresses_are_valid_and_unique() -> None:
    names = [f"node{i:03d}" for i in range(253)]             # fills the /24 exactly
    addresses = _addresses(names)
    assert len(set(addresses.values())) == 253
    reserved = {SUBNET.network_address, SUBNET.network_address + 1, SUBNET.broadcast_address}
    assert all(a in SUBNET and a not in reserved for a in addresses.values())
    with pytest.raises(ConfigError, match="room for 253 hosts, the inventory has 254"):
        _addresses(names + ["one-too-many"])


def test_assignment_ignores_file_order() -> None:
    names = [f"site-{i}" for i in range(60)]
    shuffled = names[:]
    random.Random(7).shuffle(shuffled)
    assert _addresses(names) == _addresses(shuffled)


def test_assignment_is_stable_when_hosts_come_and_go() -> None:
    # In a /16 collisions are improbable, so no host may move at all.
    big = ipaddress.IPv4Network("10.213.0.0/16")
    base = [f"host{i}" for i in range(100)]
    before = _addresses(base, big)
    grown = _addresses(["aaa-new"] + base + [f"extra{i}" for i in range(50)], big)
    shrunk = _addresses(base[::2], big)
    assert all(grown[n] == before[n] for n in base)
    assert all(shrunk[n] == before[n] for n in base[::2])


def test_crowded_subnet_only_earlier_sorting_names_can_displace() -> None:
    # Names are placed in sorted order, so hosts sorting after every existing
    # name can never move an existing host, however full the subnet is.
    base = [f"host{i:03d}" for i in range(150)]
    before = _addresses(base)
    grown = _addresses(base + [f"zz-new{i}" for i in range(80)])
    assert all(grown[n] == before[n] for n in base)
    shrunk = _addresses(base[:100])                  # drop the last-sorting 50
    assert all(shrunk[n] == before[n] for n in base[:100])
    # The home slot depends on the name only; collisions probe forward.
    home = {n: SUBNET.network_address + 2 + overlay_home_slot(n, 253) for n in base}
    at_home = sum(before[n] == home[n] for n in base)
    assert 0 < at_home < len(base)                   # 150 names in 253 slots must collide


def test_explicit_addresses_are_skipped_and_previous_is_sticky() -> None:
    names = ["alpha", "beta", "gamma"]
    first = assign_overlay_addresses(names, SUBNET)
    taken = [first["beta"]]
    again = assign_overlay_addresses(["alpha", "gamma", "delta"], SUBNET, taken=taken)
    assert first["beta"] not in again.values()
    # A remembered address wins over the hash, as long as it is free and valid.
    wanted = ipaddress.IPv4Address("10.213.0.200")
    kept = assign_overlay_addresses(names, SUBNET, previous={"alpha": wanted,
                                                             "beta": SUBNET.network_address + 1})
    assert kept["alpha"] == wanted
    assert kept["beta"] == first["beta"]                     # the hub is never reused


def test_tiny_subnet_capacity() -> None:
    subnet = ipaddress.IPv4Network("10.0.0.0/29")             # 8 - network - hub - broadcast
    assert len(set(_addresses([f"n{i}" for i in range(5)], subnet).values())) == 5
    with pytest.raises(ConfigError, match="room for 5 hosts"):
        _addresses([f"n{i}" for i in range(6)], subnet)


# ---------------------------------------------------------------- select / host


@pytest.fixture()
def brief_inventory(workspace: Path):
    return parse_inventory(BRIEF_EXAMPLE, "inventory.yaml", SUBNET, workspace)


def test_select_by_names_groups_globs_and_commas(brief_inventory) -> None:
    inv = brief_inventory
    names = lambda sel: [h.name for h in inv.select(sel)]  # noqa: E731
    assert names([]) == ["alpha", "beta", "local1"]
    assert names(["edge"]) == ["local1"]
    assert names(["local1", "alpha"]) == ["alpha", "local1"]      # file order
    assert names(["hospitals,alpha"]) == ["alpha", "beta"]        # no duplicates
    assert names(["b*"]) == ["beta"]
    assert names(["hosp*"]) == ["alpha", "beta"]
    assert names(["all"]) == ["alpha", "beta", "local1"]
    with pytest.raises(ConfigError, match=r"unknown host or group 'alpah' \(did you mean 'alpha'\?\)"):
        inv.select(["alpah"])
    with pytest.raises(ConfigError, match="unknown host or group 'z\\*'"):
        inv.select(["z*"])


def test_host_lookup(brief_inventory) -> None:
    assert brief_inventory.host("beta").ssh_host == "203.0.113.11"
    with pytest.raises(ConfigError, match="unknown host 'bet' \\(did you mean 'beta'\\?\\)"):
        brief_inventory.host("bet")


def test_hosts_are_hashable_and_immutable(brief_inventory) -> None:
    alpha = brief_inventory.host("alpha")
    assert len({alpha, brief_inventory.host("beta"), alpha}) == 2
    with pytest.raises(TypeError):
        alpha.labels["x"] = "y"  # type: ignore[index]
    with pytest.raises(AttributeError):
        alpha.ssh_port = 2  # type: ignore[misc]


# ---------------------------------------------------------------- render


def test_render_local_inventory_roundtrip(tmp_path: Path) -> None:
    pairs = [(f"local{i}", f"data/local{i}.npz") for i in range(1, 4)]
    (tmp_path / "data").mkdir()
    for _, data in pairs:
        (tmp_path / data).write_bytes(b"x")
    text = render_local_inventory(pairs)
    inv = parse_inventory(text, "inventory.yaml", SUBNET, tmp_path)
    assert [h.name for h in inv.hosts] == ["local1", "local2", "local3"]
    assert all(h.connection == "local" and h.groups == ("local",) for h in inv.hosts)
    assert [h.data_path for h in inv.hosts] == [str(tmp_path / d) for _, d in pairs]
    with pytest.raises(ConfigError):
        render_local_inventory([("bad name", "x.npz")])


def test_render_quotes_awkward_paths(tmp_path: Path) -> None:
    odd = "data/yes: #1.npz"
    (tmp_path / "data").mkdir()
    (tmp_path / odd).write_bytes(b"x")
    inv = parse_inventory(render_local_inventory([("n1", odd)]), "i.yaml", SUBNET, tmp_path)
    assert inv.host("n1").data_path == str(tmp_path / odd)


# ---------------------------------------------------------------- yamlsrc


def test_yaml_lines_are_kept() -> None:
    data = load_yaml("a: 1\nb:\n  c: {d: 2}\n  e:\n    - x\n    - y\n", "f.yaml")
    assert isinstance(data, LineDict)
    assert (data.line_of("a"), data.line_of("b"), data["b"].line_of("e")) == (1, 2, 4)
    assert data["b"]["c"].line_of("d") == 3
    assert data["b"]["e"].line_of(1) == 6


def test_yaml_duplicates_refused_but_merge_override_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        load_yaml("top:\n  inner: {x: 1, y: 2, x: 3}\n", "f.yaml")
    assert (info.value.line, info.value.reason) == (2, "duplicate key 'x' (first at line 2)")
    merged = load_yaml("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n", "f.yaml")
    assert merged["other"] == {"x": 3, "y": 2}


def test_fixture_dir_is_copyable(tmp_path: Path) -> None:
    # Error lines must not depend on where the fixture lives.
    src = FIXTURES / "bad_unknown_host_var.yaml"
    dst = tmp_path / "inventory.yaml"
    shutil.copy(src, dst)
    with pytest.raises(ConfigError) as info:
        load_inventory(dst, SUBNET)
    assert str(info.value) == (f"{dst}:6: hosts.alpha.ssh_prot: unknown key "
                               "(did you mean 'ssh_port'?)")


def test_an_ssh_address_inside_the_overlay_is_refused() -> None:
    """The tunnel would capture SSH to that host (and deploy's confirmation with it)."""
    text = ("all:\n  hosts:\n    alpha:\n      ssh_host: 10.213.0.40\n"
            "      data_path: /d.npz\n")
    with pytest.raises(ConfigError) as refused:
        parse_inventory(text, "inventory.yaml", SUBNET)
    message = refused.value.message
    assert message.startswith("inventory.yaml:4: hosts.alpha.ssh_host: 10.213.0.40 is inside")
    assert "overlay.subnet" in message
    parse_inventory(text.replace("10.213.0.40", "10.214.0.40"), "inventory.yaml", SUBNET)


@pytest.mark.parametrize("name", ["coordinator", "hub"])
def test_reserved_host_names(name: str) -> None:
    text = f"all:\n  hosts:\n    {name}:\n      ssh_host: h\n      data_path: /d.npz\n"
    with pytest.raises(ConfigError, match=f"hosts.{name}: '{name}' is reserved"):
        parse_inventory(text, "inventory.yaml", SUBNET)


def test_adding_a_host_never_moves_a_deployed_one(tmp_path: Path) -> None:
    """A new host whose home slot is taken by a deployed host probes on; with the
    deploy's record, even a name that sorts first cannot take a deployed address."""
    crowded = ipaddress.IPv4Network("10.213.0.0/29")        # 5 addresses
    deployed = _addresses(["n1", "n2", "n3", "n4"], crowded)
    newcomer = next(f"a{i}" for i in range(1000)
                    if overlay_home_slot(f"a{i}", 5) == int(deployed["n1"]) - 2 - int(
                        crowded.network_address))
    without_record = _addresses(["n1", "n2", "n3", "n4", newcomer], crowded)
    assert without_record["n1"] != deployed["n1"]             # what the issue saw
    text = _inventory_text(["n1", "n2", "n3", "n4", newcomer])
    kept = {h.name: h.overlay_ip for h in parse_inventory(
        text, "inventory.yaml", crowded, tmp_path, previous_overlay=deployed).hosts}
    assert all(kept[name] == address for name, address in deployed.items())
    assert kept[newcomer] not in deployed.values()


def test_the_workspace_remembers_deployed_addresses(tmp_path: Path) -> None:
    """Deploy records each host's overlay address; loading the workspace honours
    them, so a host added later cannot take a deployed host's address."""
    from flctl.workspace import (
        WorkspacePaths,
        init_workspace,
        load_workspace,
        record_overlay_addresses,
    )

    root = tmp_path / "ws"
    init_workspace(root)
    paths = WorkspacePaths(root.resolve())
    (root / "inventory.yaml").write_text(_inventory_text(["n1", "n2"]))
    record_overlay_addresses(paths, {"n1": "10.213.0.77"})
    assert str(load_workspace(root).inventory.host("n1").overlay_ip) == "10.213.0.77"
    record_overlay_addresses(paths, {"n2": "10.213.0.78"})   # merged, not replaced
    loaded = load_workspace(root).inventory
    assert [str(loaded.host(n).overlay_ip) for n in ("n1", "n2")] == ["10.213.0.77",
                                                                    "10.213.0.78"]
