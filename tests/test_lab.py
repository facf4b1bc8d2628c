"""The multi-host lab itself: hosts answer SSH with strict host keys, have
their own names, addresses and private directories, reach each other and
the hub only, go down and come back, and `down` leaves nothing behind."""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from flctl.agent.proc import is_alive
from flctl.core.data import make_federated_shards
from flctl.workspace import load_workspace

from lab import LAB_SCRIPT, Lab, LabError, _script, lab_available, lab_lock, lab_up

_REASON = lab_available()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

DATA_PATH = "/var/lib/flctl-data/data.npz"
HUB = "198.18.0.1"
STRANGER = "labx"
STRANGER_IP = "198.18.0.250"


def _lab_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines()
            if line.split() and re.fullmatch(r"flctl-lab(\d+|x)", line.split()[0])]


def _host_file(lab: Lab, host: str, path: str) -> bytes:
    done = subprocess.run(["bash", str(LAB_SCRIPT), "exec", host, "cat", path],
                          capture_output=True, timeout=30, check=True)
    return done.stdout


def _fingerprint(known_hosts_line: str) -> str:
    blob = base64.b64decode(known_hosts_line.split()[2])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class TestLabHosts:
    """One 3-host lab (with a workspace) shared by the tests of this class."""

    @pytest.fixture(scope="class")
    @classmethod
    def lab(cls, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
        workspace = tmp_path_factory.mktemp("lab-workspace")
        started = time.monotonic()
        lab = lab_up(3, workspace)
        print(f"lab of 3 hosts up in {time.monotonic() - started:.2f} s")
        try:
            yield lab
        finally:
            lab.down()

    def test_hosts_answer_ssh_with_the_lab_key_and_strict_host_keys(self, lab: Lab) -> None:
        assert lab.hosts == ["lab1", "lab2", "lab3"]
        for index, host in enumerate(lab.hosts, start=1):
            address = f"198.18.0.{10 + index}"
            assert lab.addresses[host] == address
            done = lab.ssh(host, "hostname; cat /etc/hostname; ip -4 -o addr show dev eth0")
            assert done.returncode == 0, done.stderr
            name, etc_name, addr_line = done.stdout.splitlines()
            assert (name, etc_name) == (host, host)
            assert f"inet {address}/24" in addr_line

    def test_host_keys_are_checked_and_passwords_refused(self, lab: Lab, tmp_path: Path) -> None:
        lines = lab.known_hosts.read_text().splitlines()
        assert [line.split()[0] for line in lines] == [lab.addresses[h] for h in lab.hosts]
        assert all(line.split()[1] == "ssh-ed25519" for line in lines)
        fingerprints = {h["name"]: h["fingerprint"] for h in lab.status()["hosts"]}
        assert [_fingerprint(line) for line in lines] == [fingerprints[h] for h in lab.hosts]
        assert len(set(fingerprints.values()) - {None}) == 3

        wrong = tmp_path / "known_hosts"    # lab2's key claimed for lab1's address
        wrong.write_text(f"{lab.addresses['lab1']} {' '.join(lines[1].split()[1:])}\n")
        command = lab.ssh_command("lab1", "true")
        command[command.index(f"UserKnownHostsFile={lab.known_hosts}")] = \
            f"UserKnownHostsFile={wrong}"
        refused = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert refused.returncode == 255
        assert "host key" in refused.stderr.lower() or "HOST IDENTIFICATION" in refused.stderr

        no_key = subprocess.run(
            ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "PubkeyAuthentication=no",
             "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={lab.known_hosts}",
             "-o", "ConnectTimeout=5", f"root@{lab.addresses['lab1']}", "true"],
            capture_output=True, text=True, timeout=30)
        assert no_key.returncode == 255
        assert "Permission denied (publickey)" in no_key.stderr

    def test_each_host_has_private_system_directories(self, lab: Lab) -> None:
        probe = f"flctl-lab-probe-{uuid.uuid4().hex[:8]}"
        paths = [f"/{top}/{probe}" for top in ("opt", "var/lib", "run", "tmp", "etc", "root")]
        written = lab.ssh("lab1", " && ".join(f"echo lab1 > {p}" for p in paths))
        assert written.returncode == 0, written.stderr
        try:
            for path in paths:
                # `exec` shows what the SSH session wrote: the same namespaces.
                assert lab.exec("lab1", "cat", path).stdout == "lab1\n"
                assert lab.exec("lab2", "test", "-e", path, check=False).returncode == 1
                assert not Path(path).exists(), f"{path} leaked onto the real machine"
        finally:
            lab.ssh("lab1", "rm -f " + " ".join(paths))
        mounts = lab.exec("lab1", "findmnt", "-rn", "-o", "TARGET,FSTYPE").stdout.split("\n")
        for top in ("/etc", "/opt", "/var/lib", "/root"):
            assert f"{top} overlay" in mounts
        assert "/run tmpfs" in mounts

    def test_data_shards_are_on_each_host_and_differ(self, lab: Lab) -> None:
        shards, _ = make_federated_shards(len(lab.hosts), alpha=0.5, seed=0)
        histograms = []
        for host, expected in zip(lab.hosts, shards):
            with np.load(io.BytesIO(_host_file(lab, host, DATA_PATH)), allow_pickle=False) as npz:
                assert npz["x_train"].shape[1] == 64
                assert np.array_equal(npz["y_train"], expected.y_train)
                histograms.append(np.bincount(npz["y_train"], minlength=10) / len(npz["y_train"]))
        assert not Path(DATA_PATH).exists(), "data landed on the real /var/lib"
        # Non-IID: the class mixes differ clearly between hosts.
        distances = [0.5 * np.abs(a - b).sum() for i, a in enumerate(histograms)
                     for b in histograms[i + 1:]]
        assert min(distances) > 0.1, distances

    def test_hosts_reach_each_other_and_the_hub_and_nothing_else(self, lab: Lab) -> None:
        for target in (lab.addresses["lab2"], lab.addresses["lab3"], HUB, STRANGER_IP):
            ping = lab.exec("lab1", "ping", "-c", "1", "-W", "2", target, check=False)
            assert ping.returncode == 0, f"lab1 cannot reach {target}: {ping.stdout}"
        routes = lab.exec("lab1", "ip", "-4", "route", "show").stdout.splitlines()
        assert len(routes) == 1 and routes[0].startswith("198.18.0.0/24 dev eth0"), routes
        # A route lookup only (no packet leaves): the outside world is unreachable.
        outside = lab.exec("lab1", "ip", "route", "get", "203.0.113.1", check=False)
        assert outside.returncode != 0 and "unreachable" in outside.stderr
        links = lab.exec("lab1", "ip", "-o", "link", "show").stdout.splitlines()
        assert sorted(line.split(":")[1].strip().split("@")[0] for line in links) == ["eth0", "lo"]
        hub_ping = subprocess.run(["ping", "-c", "1", "-W", "2", lab.addresses["lab3"]],
                                  capture_output=True, text=True, timeout=10)
        assert hub_ping.returncode == 0
        # No DNS in the lab, and asking fails at once instead of hanging.
        started = time.monotonic()
        lookup = lab.exec("lab1", "getent", "hosts", "nowhere.invalid", check=False)
        assert lookup.returncode != 0 and time.monotonic() - started < 3
        assert lab.exec("lab1", "getent", "hosts", "lab1").stdout.split()[0] == "198.18.0.11"

    def test_stop_host_makes_it_unreachable_and_start_host_brings_it_back(self, lab: Lab) -> None:
        keep = f"/opt/flctl-lab-keep-{uuid.uuid4().hex[:8]}"
        lab.exec("lab2", "sh", "-c", f"echo kept > {keep}")
        lab.stop_host("lab2")
        try:
            started = time.monotonic()
            failed = lab.ssh("lab2", "true", connect_timeout=5)
            elapsed = time.monotonic() - started
            assert failed.returncode == 255 and elapsed < 6, (elapsed, failed.stderr)
            for host in ("lab1", "lab3"):
                assert lab.ssh(host, "hostname").stdout.strip() == host
            states = {h["name"]: h for h in lab.status()["hosts"]}
            assert (states["lab2"]["up"], states["lab2"]["sshd"], states["lab2"]["link"]) == (
                False, False, False)
            assert states["lab1"]["up"] and states["lab3"]["up"]
        finally:
            lab.start_host("lab2")
        back = lab.ssh("lab2", f"hostname; cat {keep}; rm {keep}")
        assert back.returncode == 0, back.stderr
        assert back.stdout.splitlines() == ["lab2", "kept"]   # files survive the outage

    def test_stranger_has_no_sshd_and_is_in_no_inventory(self, lab: Lab) -> None:
        assert lab.exec(STRANGER, "hostname").stdout.strip() == STRANGER
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((STRANGER_IP, 22), timeout=5).close()
        assert STRANGER not in lab.hosts
        assert _script("stop-host", STRANGER).returncode != 0
        assert lab.workspace is not None
        assert STRANGER_IP not in (lab.workspace / "inventory.yaml").read_text()

    def test_workspace_lists_the_lab_hosts(self, lab: Lab) -> None:
        assert lab.workspace is not None
        workspace = load_workspace(lab.workspace)
        assert workspace.settings.overlay.subnet == ipaddress.IPv4Network("198.19.0.0/24")
        hosts = workspace.inventory.hosts
        assert [h.name for h in hosts] == lab.hosts
        for host in hosts:
            assert (host.connection, host.ssh_host, host.ssh_user, host.ssh_port) == (
                "ssh", lab.addresses[host.name], "root", 22)
            assert host.ssh_key == str(lab.key) and host.data_path == DATA_PATH
            assert "lab" in host.groups
            assert ipaddress.IPv4Address(host.overlay_ip) in workspace.settings.overlay.subnet
        assert (lab.workspace / "known_hosts").read_text() == lab.known_hosts.read_text()
        assert (lab.workspace / "pki" / "ca.crt").exists()

    def test_lab_folder_is_private_and_a_second_lab_is_refused(self, lab: Lab) -> None:
        assert os.stat(lab.dir).st_mode & 0o777 == 0o700
        second = _script("up", "2")
        assert second.returncode == 3 and "already up" in second.stderr
        assert [h["up"] for h in lab.status()["hosts"]] == [True] * 4

    def test_exec_rejects_unknown_hosts(self, lab: Lab) -> None:
        done = _script("exec", "lab9", "true")
        assert done.returncode != 0 and "unknown lab host" in done.stderr


@lab_lock()
def test_down_leaves_nothing_behind(tmp_path: Path) -> None:
    started = time.monotonic()
    lab = lab_up(2)
    up_s = time.monotonic() - started
    try:
        # Processes a test might leave: a daemon started over SSH, a command run
        # through exec, and a host that is stopped at the time of down.
        daemon = lab.ssh("lab1", "setsid -f sleep 600 </dev/null >/dev/null 2>&1; echo ok")
        assert daemon.stdout.strip() == "ok", daemon.stderr
        via_exec = subprocess.Popen(["bash", str(LAB_SCRIPT), "exec", "lab2", "sleep", "600"],
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        lab.stop_host("lab2")
        pids = set()
        for netns in _lab_netns():
            out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
            pids.update(int(p) for p in out.stdout.split())
        # 3 holders (lab1, lab2, labx), the sshd of lab1, 2 strays
        assert via_exec.pid in pids and len(pids) >= 3 + 1 + 2
    except BaseException:
        lab.down()
        raise
    started = time.monotonic()
    lab.down()
    down_s = time.monotonic() - started
    print(f"lab of 2 hosts: up {up_s:.2f} s, down {down_s:.2f} s")

    assert via_exec.wait(timeout=10) < 0            # killed by a signal
    assert [pid for pid in pids if is_alive(pid)] == []
    assert _lab_netns() == []
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert not re.search(r"flctl-(br0|vlab)", links)  # the lab's bridge and veths
    mounts = Path("/proc/mounts").read_text()
    assert str(lab.dir) not in mounts and "flctl-" not in mounts
    assert not lab.dir.exists()

    again = _script("down")
    assert again.returncode == 0, again.stderr
    assert _script("status").returncode == 1
    with pytest.raises(LabError):
        lab.status()


@lab_lock()    # the raw lab.sh calls below must not meet another test run's lab
def test_lab_up_clears_a_dead_runs_lab_but_not_a_hand_made_one() -> None:
    env = dict(os.environ, FLCTL_LAB_OWNER="999999999:1",   # a test run that died
               FLCTL_PYTHON=sys.executable)
    left = subprocess.run(["bash", str(LAB_SCRIPT), "up", "1"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert left.returncode == 0, left.stderr
    lab = lab_up(2)
    try:
        assert lab.hosts == ["lab1", "lab2"]
    finally:
        lab.down()

    by_hand = subprocess.run(["bash", str(LAB_SCRIPT), "up", "1"], capture_output=True,
                             text=True, env=dict(os.environ, FLCTL_LAB_OWNER="",
                                                        FLCTL_PYTHON=sys.executable),
                             timeout=120)
    assert by_hand.returncode == 0, by_hand.stderr
    try:
        with pytest.raises(LabError, match="by hand"):
            lab_up(1)
        assert _script("status").returncode == 0     # left alone
    finally:
        assert _script("down").returncode == 0
