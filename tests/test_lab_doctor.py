"""`flctl doctor` against real lab hosts, each broken on purpose: a full disk
where deploy writes, a clock two hours behind (libfaketime in the sessions of
that host's sshd), the agent's port taken by another program. Doctor must
name each on its host, pass the healthy one, and exit 5."""

from __future__ import annotations

import glob
import time

import pytest

from flctl.workspace import load_workspace

from helpers import run_cli
from lab import Lab, lab_available, lab_up

pytestmark = [pytest.mark.lab, pytest.mark.skipif(lab_available() is not None,
                                                  reason=str(lab_available()))]

FAKETIME_LIBS = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
SKEWED_PORT = 2222
LISTENER = ("import socket, sys, time\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(); time.sleep(3600)\n")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    workspace = tmp_path_factory.mktemp("doctorws")
    lab = lab_up(4, workspace)
    try:
        yield lab
    finally:
        lab.down()


def skew_the_clock(lab: Lab, host: str) -> None:
    """A second sshd on SKEWED_PORT whose sessions run two hours behind; the
    inventory points the host at it (same host key, so known_hosts gains the
    [address]:port name)."""
    assert FAKETIME_LIBS, "libfaketime is missing: apt install faketime (scripts/test.sh does)"
    lab.exec(host, "sh", "-c",
             f"sed 's/:22$/:{SKEWED_PORT}/' /run/flctl-lab/sshd_config > /run/flctl-lab/skewed && "
             f"echo 'SetEnv LD_PRELOAD={FAKETIME_LIBS[0]} FAKETIME=-2h' >> /run/flctl-lab/skewed && "
             "setsid -f /usr/sbin/sshd -f /run/flctl-lab/skewed -E /run/flctl-lab/skewed.log "
             "</dev/null >/dev/null 2>&1")
    address = lab.addresses[host]
    known = load_workspace(lab.workspace).paths.known_hosts
    key = next(line.split(None, 1)[1] for line in known.read_text().splitlines()
               if line.split(None, 1)[0] == address)
    known.write_text(known.read_text() + f"[{address}]:{SKEWED_PORT} {key}\n")
    inventory = lab.workspace / "inventory.yaml"
    text = inventory.read_text()
    [line] = [line for line in text.splitlines() if line.strip() == f"ssh_host: {address}"]
    indent = line[:len(line) - len(line.lstrip())]
    inventory.write_text(text.replace(line, f"{line}\n{indent}ssh_port: {SKEWED_PORT}", 1))
    deadline = time.monotonic() + 15
    while lab.probe(host, address, SKEWED_PORT) != "open" and time.monotonic() < deadline:
        time.sleep(0.1)


def test_doctor_names_each_broken_host_and_passes_the_healthy_one(lab: Lab) -> None:
    root = lab.workspace
    healthy = run_cli("doctor", "-w", str(root), "--json", timeout=120)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert all(h["ok"] for h in healthy.json()["hosts"])

    full, skewed, busy, fine = lab.hosts
    lab.exec(full, "sh", "-c", "mkdir -p /var/lib/flctl && mount -t tmpfs -o size=8m tmpfs "
                               "/var/lib/flctl && dd if=/dev/zero of=/var/lib/flctl/fill "
                               "bs=1M count=8 2>/dev/null; true")
    skew_the_clock(lab, skewed)
    port = load_workspace(root).settings.agent.port
    lab.exec(busy, "sh", "-c", f"setsid -f python3 -c \"{LISTENER}\" {port} "
                               "</dev/null >/dev/null 2>&1")
    deadline = time.monotonic() + 15
    while lab.probe(busy, lab.addresses[busy], port) != "open" and time.monotonic() < deadline:
        time.sleep(0.1)

    result = run_cli("doctor", "-w", str(root), "--json", timeout=120)
    assert result.returncode == 5, result.stderr
    hosts = {h["host"]: {c["check"]: c for c in h["checks"]} for h in result.json()["hosts"]}
    problems = {name: sorted(k for k, c in checks.items() if c["ok"] is False)
                for name, checks in hosts.items()}
    assert problems == {full: ["disk"], skewed: ["clock"], busy: ["ports"], fine: []}
    assert "/var/lib/flctl" in hosts[full]["disk"]["detail"]
    skew = float(hosts[skewed]["clock"]["detail"].split()[0])
    assert -7300 < skew < -7100, hosts[skewed]["clock"]
    assert f"TCP {port}" in hosts[busy]["ports"]["detail"]
    for checks in hosts.values():
        assert all(c["fix"] for c in checks.values() if c["ok"] is False)
        assert checks["mtu"]["ok"] is True    # the lab bridge carries full-size packets

    table = run_cli("doctor", "-w", str(root), timeout=120)
    assert table.returncode == 5 and "Traceback" not in table.stderr
    for name in (full, skewed, busy):
        assert name in table.stderr
