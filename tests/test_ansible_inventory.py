"""Ansible inventories (INI and YAML) read as they are: flctl.core.ansible_inventory,
`flctl init --from-ansible` and the `inventory:` setting."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest

from flctl.core.ansible_inventory import load_ansible_inventory, read_ansible, translate_file
from flctl.core.inventory import load_inventory
from flctl.errors import ConfigError
from flctl.workspace import load_workspace

from helpers import run_cli

SUBNET = ipaddress.IPv4Network("10.213.0.0/24")

INI = """\
# the web tier
web[01:03] ansible_user=deploy

[db]
db1 ansible_host=198.18.0.21 ansible_port=2222 ansible_become=yes flctl_data_path=/srv/db.npz
db2.example.com:2200 ansible_ssh_private_key_file=keys/db2 ansible_python_interpreter=/usr/bin/python3

[db:vars]
ansible_user = "dbadmin"
flctl_labels={"tier": "db"}

[web]
web01 ansible_host=198.18.0.11
web02
web03

[web:vars]
flctl_data_path=/srv/web.npz

[prod:children]
db
web

[all:vars]
ansible_become=false
flctl_data_path=/srv/default.npz
"""

YAML = """\
all:
  vars:
    flctl_data_path: /srv/default.npz
  children:
    db:
      hosts:
        db1:
          ansible_host: 198.18.0.21
          ansible_port: 2222
          ansible_become: true
          flctl_data_path: /srv/db.npz
        db2.example.com:
          ansible_port: 2200
          ansible_ssh_private_key_file: keys/db2
          ansible_python_interpreter: /usr/bin/python3
      vars:
        ansible_user: dbadmin
        flctl_labels: {tier: db}
    web:
      hosts:
        web[01:03]:
          ansible_user: deploy
        web01:
          ansible_host: 198.18.0.11
      vars:
        flctl_data_path: /srv/web.npz
    prod:
      children:
        db:
        web:
"""


def load(tmp_path: Path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return load_ansible_inventory(path, SUBNET)


@pytest.mark.parametrize("name,text", [("hosts.ini", INI), ("hosts", INI), ("hosts.yml", YAML),
                                       ("hosts-yaml", YAML)])
def test_both_formats_give_the_same_hosts(tmp_path: Path, name: str, text: str) -> None:
    inventory = load(tmp_path, name, text)
    rows = {h.name: (h.ssh_host, h.ssh_port, h.ssh_user, h.become, h.data_path, dict(h.labels))
            for h in inventory.hosts}
    assert rows == {
        "web01": ("198.18.0.11", 22, "deploy", False, "/srv/web.npz", {}),
        "web02": ("web02", 22, "deploy", False, "/srv/web.npz", {}),
        "web03": ("web03", 22, "deploy", False, "/srv/web.npz", {}),
        "db1": ("198.18.0.21", 2222, "dbadmin", True, "/srv/db.npz", {"tier": "db"}),
        "db2.example.com": ("db2.example.com", 2200, "dbadmin", False, "/srv/default.npz",
                            {"tier": "db"}),
    }
    db2 = inventory.host("db2.example.com")
    assert db2.ssh_key == str(tmp_path / "keys" / "db2")   # beside the Ansible file
    assert db2.explicit == {"ssh_user", "ssh_port", "ssh_key"}
    assert set(inventory.groups["prod"]) == {"web01", "web02", "web03", "db1",
                                             "db2.example.com"}
    assert inventory.groups["db"] == ("db1", "db2.example.com")
    assert inventory.groups.get("ungrouped", ()) == ()   # the web hosts have a group
    assert [h.name for h in inventory.select(["web"])] == ["web01", "web02", "web03"]


def test_unknown_ansible_vars_are_ignored_with_a_note() -> None:
    found = read_ansible(INI, "hosts.ini")
    assert found.notes == ["ignored ansible_python_interpreter (flctl has no use for it; "
                           "set on db2.example.com)"]


@pytest.mark.parametrize("name,text,line,message", [
    ("bad.ini", "[web\nweb1\n", 1, "section header not closed: '[web'"),
    ("bad.ini", "[web]\nweb1 ansible_host\n", 2,
     "expected key=value after the host name, got 'ansible_host'"),
    ("bad.ini", "[web:bogus]\n", 1, "unknown section type 'bogus' (expected :vars or :children)"),
    ("bad.ini", "[web]\nweb1 ansible_user='unclosed\n", 2, "cannot read this line (No closing "
                                                         "quotation)"),
    ("bad.ini", "[web:vars]\njust words\n", 2, "expected key=value in [web:vars], "
                                                "got 'just words'"),
    ("bad.yml", "all:\n  hosts:\n    web1: [oops\n", 4, None),
    ("bad.yml", "all:\n  hostz:\n    web1:\n", 2, "unknown key 'hostz' in group 'all' "
                                                   "(expected hosts, vars or children)"),
])
def test_syntax_errors_name_file_and_line(tmp_path: Path, name: str, text: str, line: int,
                                          message: str | None) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, name, text)
    assert caught.value.file == str(tmp_path / name)
    assert caught.value.line == line
    assert "\n" not in str(caught.value)
    if message is not None:
        assert caught.value.reason == message


def test_bad_values_name_the_ansible_variable_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "h.ini", "[web]\nweb1 flctl_data_path=/d\nweb2 ansible_port=99999 "
                                "flctl_data_path=/d\n")
    assert str(caught.value) == (f"{tmp_path / 'h.ini'}:3: hosts.web2.ansible_port: must be "
                                 "between 1 and 65535, got 99999")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "h.ini", "[web]\nweb1 flctl_data_path=/d flctl_lables=x\n")
    assert str(caught.value) == (f"{tmp_path / 'h.ini'}:2: hosts.web1.flctl_lables: unknown "
                                 "flctl variable (did you mean 'flctl_labels'?)")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "h.ini", "[web]\nweb1\n")
    assert str(caught.value).startswith(f"{tmp_path / 'h.ini'}:2: hosts.web1.flctl_data_path: "
                                        "required")


def test_init_from_ansible_writes_an_inventory_that_loads_the_same(tmp_path: Path) -> None:
    source = tmp_path / "hosts.ini"
    source.write_text(INI)
    workspace = tmp_path / "ws"
    done = run_cli("init", str(workspace), "--from-ansible", str(source), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["notes"] == [
        "ignored ansible_python_interpreter (flctl has no use for it; set on db2.example.com)"]
    written = load_inventory(workspace / "inventory.yaml", SUBNET)
    direct = load_ansible_inventory(source, SUBNET)
    assert [(h.name, h.ssh_host, h.ssh_port, h.ssh_user, h.ssh_key, h.become, h.data_path,
             h.groups, h.explicit) for h in written.hosts] == \
        [(h.name, h.ssh_host, h.ssh_port, h.ssh_user, h.ssh_key, h.become, h.data_path,
          h.groups, h.explicit) for h in direct.hosts]
    assert load_workspace(workspace).inventory.names == direct.names


def test_init_from_ansible_without_data_paths_says_what_to_add(tmp_path: Path) -> None:
    source = tmp_path / "hosts.ini"
    source.write_text("[web]\nweb1 ansible_host=198.18.0.11\n")
    text, notes = translate_file(source, SUBNET)
    assert notes == ["no data_path for some hosts (e.g. web1): add data_path to "
                     "inventory.yaml before deploying"]
    assert "ssh_host: 198.18.0.11" in text


def test_init_from_ansible_with_a_syntax_error_is_one_line(tmp_path: Path) -> None:
    source = tmp_path / "hosts.ini"
    source.write_text("[web]\nweb1\n[db\n")
    done = run_cli("init", str(tmp_path / "ws"), "--from-ansible", str(source))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {source}:3: section header not closed: '[db'"]
    assert not (tmp_path / "ws" / "flctl.yaml").exists()


def test_the_inventory_setting_reads_an_ansible_file(tmp_path: Path) -> None:
    done = run_cli("init", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (tmp_path / "ansible").mkdir()
    (tmp_path / "ansible" / "hosts.yml").write_text(YAML)
    settings = tmp_path / "flctl.yaml"
    settings.write_text(settings.read_text() + "inventory: ansible/hosts.yml\n")
    workspace = load_workspace(tmp_path)
    assert workspace.inventory.source == str(tmp_path / "ansible" / "hosts.yml")
    assert workspace.inventory.host("db1").ssh_port == 2222


def test_the_settings_name_a_missing_file_with_line_and_field(tmp_path: Path) -> None:
    assert run_cli("init", str(tmp_path)).returncode == 0
    settings = tmp_path / "flctl.yaml"
    lines = settings.read_text().splitlines()
    settings.write_text("\n".join([*lines, "ssh_config: nowhere/config"]) + "\n")
    done = run_cli("status", "-w", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {settings}:{len(lines) + 1}: ssh_config: {tmp_path / 'nowhere/config'} does "
        "not exist (or is not a file)"]


def test_workspace_ssh_config_default_and_none(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_cli("init", str(tmp_path / "ws"), "--local", "1").returncode == 0
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    assert load_workspace(tmp_path / "ws").ssh_config is None      # no ~/.ssh/config
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host x\n")
    assert load_workspace(tmp_path / "ws").ssh_config == home / ".ssh" / "config"
    settings = tmp_path / "ws" / "flctl.yaml"
    settings.write_text(settings.read_text() + "ssh_config: none\n")
    assert load_workspace(tmp_path / "ws").ssh_config is None
    settings.write_text(settings.read_text().replace("ssh_config: none",
                                                     "ssh_config: ~/.ssh/config"))
    assert os.fspath(load_workspace(tmp_path / "ws").ssh_config) == \
        str(home / ".ssh" / "config")
