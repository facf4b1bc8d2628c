"""Where the firewall's rollback timer lives.

Where systemd runs, the timer is a transient systemd unit (systemd-run), so
it outlives the SSH session that armed it: logind kills a session's
processes when the session ends, which is exactly what happens when a bad
change cuts SSH. There is no systemd here (PID 1 is not systemd), so the
systemd side is checked on the commands it would run; the plain path (a
detached `sh`) runs for real in tests/test_host_network.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flctl.agent import firewall


class FakeSystemd:
    """Records systemctl/systemd-run calls; systemd-run's unit gets MainPID 4242."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def run(self, argv, **kwargs):  # noqa: ANN001 - subprocess.run's signature
        self.calls.append(list(argv))
        stdout = "4242\n" if argv[:2] == ["systemctl", "show"] else ""
        return subprocess.CompletedProcess(argv, 0, stdout, "")


def test_the_timer_is_a_transient_systemd_unit_where_systemd_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSystemd()
    monkeypatch.setattr(firewall, "init_system", lambda: "systemd")
    monkeypatch.setattr(firewall.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(firewall.subprocess, "run", fake.run)
    pid = firewall._arm(tmp_path, 60.0)
    assert pid == 4242 and (tmp_path / firewall.PIDFILE).read_text() == "4242\n"
    started = next(c for c in fake.calls if c[0] == "systemd-run")
    unit = started[1].removeprefix("--unit=")
    assert unit.startswith("flctl-rollback-") and "--collect" in started
    timer = started[started.index("--") + 1:]
    assert timer == firewall.timer_command(tmp_path, 60.0, "/usr/bin/nft")
    assert timer[3] == firewall.TIMER_TAG          # how _timer_pid recognises it
    assert (tmp_path / firewall.UNIT_FILE).read_text().strip() == unit
    firewall._disarm(4242, firewall._unit_of(tmp_path))
    assert ["systemctl", "stop", unit] in fake.calls


def test_without_systemd_the_timer_is_a_detached_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(firewall, "init_system", lambda: "none")
    pid = firewall._arm(tmp_path, 3600.0)
    try:
        assert firewall._timer_pid(tmp_path) == pid
        assert not (tmp_path / firewall.UNIT_FILE).exists()
    finally:
        firewall._disarm(pid, None)
    assert firewall._timer_pid(tmp_path) is None


def test_the_timer_undoes_a_new_tunnel_too() -> None:
    script = firewall._TIMER_SCRIPT
    restore = script.index('-f "$2/rollback.nft"')
    undo = script.index("tunnel-undo")
    assert restore < undo and 'ip link delete dev' in script
