"""Sites in the inventory: a group's `aggregator`, validated where it is written."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from flctl.core.inventory import parse_inventory
from flctl.errors import ConfigError

SUBNET = ipaddress.IPv4Network("198.19.0.0/24")

SITES = """\
all:
  vars:
    data_path: /srv/data.npz
  children:
    berlin:
      aggregator: b2
      hosts:
        b1: {ssh_host: 198.18.0.11}
        b2: {ssh_host: 198.18.0.12}
        b3: {ssh_host: 198.18.0.13}
    paris:
      aggregator: p1
      hosts:
        p1: {ssh_host: 198.18.0.21}
        p2: {ssh_host: 198.18.0.22}
    loose:
      hosts:
        solo: {ssh_host: 198.18.0.31}
"""


def parse(text: str, tmp_path: Path):
    return parse_inventory(text, "inv.yaml", SUBNET, tmp_path)


def test_sites_name_their_aggregator_and_members(tmp_path: Path) -> None:
    inv = parse(SITES, tmp_path)
    assert sorted(inv.sites) == ["berlin", "paris"]
    berlin = inv.sites["berlin"]
    assert (berlin.aggregator, berlin.members, berlin.line) == ("b2", ("b1", "b2", "b3"), 6)
    assert inv.site_of("p2") is inv.sites["paris"]
    assert inv.site_of("solo") is None


def expect_error(text: str, tmp_path: Path, line: int, field: str, *words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, tmp_path)
    error = caught.value
    assert (error.line, error.field) == (line, field), str(error)
    for word in words:
        assert word in error.message, error.message
    assert "\n" not in str(error)


def test_aggregator_not_a_member(tmp_path: Path) -> None:
    expect_error(SITES.replace("aggregator: b2", "aggregator: p2"), tmp_path, 6,
                 "groups.berlin.aggregator", "'p2' is not one of group 'berlin'")


def test_aggregator_typo_gets_a_hint(tmp_path: Path) -> None:
    expect_error(SITES.replace("aggregator: b2", "aggregator: b22"), tmp_path, 6,
                 "groups.berlin.aggregator", "did you mean", "b2")


def test_two_aggregators_for_one_host(tmp_path: Path) -> None:
    nested = SITES.replace("""        b3: {ssh_host: 198.18.0.13}
""", """        b3: {ssh_host: 198.18.0.13}
      children:
        lab:
          aggregator: b4
          hosts:
            b4: {ssh_host: 198.18.0.14}
""")
    # berlin now holds b4 too; b4's own group names it aggregator as well
    expect_error(nested, tmp_path, 13, "groups.lab.aggregator", "two aggregators",
                 "'b4'", "'berlin'")


def test_aggregator_must_be_one_name(tmp_path: Path) -> None:
    expect_error(SITES.replace("aggregator: b2", "aggregator: [b1, b2]"), tmp_path, 6,
                 "groups.berlin.aggregator", "one host name")


def test_root_group_is_not_a_site(tmp_path: Path) -> None:
    expect_error(SITES.replace("all:\n", "all:\n  aggregator: b1\n", 1), tmp_path, 2,
                 "groups.all.aggregator", "root group")


def test_site_with_a_member_on_the_wrong_side_of_the_overlay(tmp_path: Path) -> None:
    data = tmp_path / "d.npz"
    data.write_bytes(b"")
    mixed = SITES.replace("b3: {ssh_host: 198.18.0.13}",
                          f"b3: {{connection: local, data_path: {data}}}")
    expect_error(mixed, tmp_path, 6, "groups.berlin.aggregator", "mixes sides of the overlay",
                 "'b3' is a local host")
