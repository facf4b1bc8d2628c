"""ssh_config aliases, ProxyJump through a real jump sshd, and keys held by ssh-agent.

Two real OpenSSH servers on 127.0.0.1: a target and a bastion logging at
DEBUG1, so its log shows each direct-tcpip forwarding it made; that log is
the proof a connection went through it (on loopback the target cannot tell).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flctl.deploy.connector import HostUnreachable
from flctl.deploy.ssh import HostKeyRejected, SSHConnector
from flctl.deploy.ssh_jump import load_ssh_config
from flctl.errors import ConfigError

from sshd import LOOPBACK, SSHServer, free_port, keygen, running_sshd, why_no_sshd

pytestmark = pytest.mark.skipif(why_no_sshd() is not None, reason=str(why_no_sshd()))


@pytest.fixture(scope="module")
def target() -> Iterator[SSHServer]:
    with running_sshd() as srv:
        yield srv


@pytest.fixture(scope="module")
def bastion() -> Iterator[SSHServer]:
    with running_sshd(log_level="DEBUG1") as srv:
        yield srv


@pytest.fixture(autouse=True)
def no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return path


def jump_config(tmp_path: Path, target: SSHServer, bastion: SSHServer,
                jump: str = "bastion") -> Path:
    return write_config(tmp_path, f"""\
Host bastion bastion-again
  HostName {LOOPBACK}
  Port {bastion.port}
  User root
  IdentityFile {bastion.client_key}

Host target
  HostName {LOOPBACK}
  Port {target.port}
  IdentityFile {target.client_key}
  ProxyJump {jump}
""")


def known(tmp_path: Path, *servers: SSHServer) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text("".join(s.known_hosts_line for s in servers))
    return path


def forwarded_to(bastion: SSHServer, port: int) -> int:
    """How many direct-tcpip forwardings to 127.0.0.1:port the bastion logged."""
    return bastion.log().count(f"target {LOOPBACK} port {port}")


def connector(target: SSHServer, tmp_path: Path, config: Path, kh: Path,
              **options: object) -> SSHConnector:
    host = target.host(ssh_host="target", ssh_port=22, ssh_key=None)  # all from the config
    return SSHConnector(host, kh, ssh_config=load_ssh_config(config), **options)  # type: ignore


def test_an_alias_resolves_through_ssh_config(target: SSHServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, f"Host target\n  HostName {LOOPBACK}\n  Port {target.port}\n"
                                    f"  IdentityFile {target.client_key}\n")
    with connector(target, tmp_path, config, known(tmp_path, target)) as conn:
        assert conn.run(["echo", "hi"]).stdout == "hi\n"
        assert (conn.address, conn.port) == (LOOPBACK, target.port)


def test_the_inventory_s_explicit_port_wins_over_ssh_config(target: SSHServer,
                                                            tmp_path: Path) -> None:
    closed = free_port()
    config = write_config(tmp_path, f"Host target\n  HostName {LOOPBACK}\n  Port {target.port}\n")
    host = target.host(ssh_host="target", ssh_port=closed, explicit=frozenset({"ssh_port"}))
    conn = SSHConnector(host, known(tmp_path, target), ssh_config=load_ssh_config(config))
    with pytest.raises(HostUnreachable, match=f":{closed}\\): connection refused"):
        conn.run(["true"])


def test_proxyjump_goes_through_the_bastion(target: SSHServer, bastion: SSHServer,
                                            tmp_path: Path) -> None:
    config = jump_config(tmp_path, target, bastion)
    before = forwarded_to(bastion, target.port)
    with connector(target, tmp_path, config, known(tmp_path, target, bastion)) as conn:
        assert conn.run(["echo", "through"]).stdout == "through\n"
        conn.put("/tmp/flctl-jump-test", b"x" * 300_000)
        assert len(conn.get("/tmp/flctl-jump-test")) == 300_000
        conn.run(["rm", "-f", "/tmp/flctl-jump-test"])
        assert conn.local_address() == LOOPBACK
    assert forwarded_to(bastion, target.port) == before + 1


def test_two_hops(target: SSHServer, bastion: SSHServer, tmp_path: Path) -> None:
    config = jump_config(tmp_path, target, bastion, jump="bastion,bastion-again")
    before = (forwarded_to(bastion, bastion.port), forwarded_to(bastion, target.port))
    with connector(target, tmp_path, config, known(tmp_path, target, bastion)) as conn:
        assert conn.run(["echo", "twice"]).stdout == "twice\n"
    # the first hop forwarded to the second (itself again), which forwarded to the target
    assert (forwarded_to(bastion, bastion.port), forwarded_to(bastion, target.port)) == \
        (before[0] + 1, before[1] + 1)


def test_a_bastion_s_unknown_host_key_is_refused_like_a_target_s(
        target: SSHServer, bastion: SSHServer, tmp_path: Path) -> None:
    config = jump_config(tmp_path, target, bastion)
    kh = known(tmp_path, target)
    with pytest.raises(HostKeyRejected) as caught:
        connector(target, tmp_path, config, kh).run(["true"])
    assert str(caught.value).startswith(
        f"lab1 ({LOOPBACK}:{target.port}): jump host bastion ({LOOPBACK}:{bastion.port}): "
        "unknown host key ssh-ed25519 SHA256:")
    assert "--accept-new-host-keys" in str(caught.value)
    with connector(target, tmp_path, config, kh, accept_new=True) as conn:
        conn.run(["true"])
    assert f"[{LOOPBACK}]:{bastion.port} ssh-ed25519 " in kh.read_text()


def test_a_bastion_that_refuses_to_forward_is_one_line(target: SSHServer,
                                                       tmp_path: Path) -> None:
    with running_sshd(extra=["AllowTcpForwarding no"]) as strict:
        config = jump_config(tmp_path, target, strict)
        with pytest.raises(HostUnreachable) as caught:
            connector(target, tmp_path, config, known(tmp_path, target, strict)).run(["true"])
    message = str(caught.value)
    assert "\n" not in message
    assert message == (f"lab1 ({LOOPBACK}:{target.port}): jump host bastion "
                       f"({LOOPBACK}:{strict.port}) refused to forward to target "
                       f"({LOOPBACK}:{target.port}) (Administratively prohibited)")


def test_a_bastion_that_is_down_is_one_line(target: SSHServer, bastion: SSHServer,
                                            tmp_path: Path) -> None:
    config = jump_config(tmp_path, target, bastion)
    text = config.read_text().replace(f"Port {bastion.port}", f"Port {free_port()}")
    config.write_text(text)
    with pytest.raises(HostUnreachable) as caught:
        connector(target, tmp_path, config, known(tmp_path, target)).run(["true"])
    assert str(caught.value).startswith(f"lab1 ({LOOPBACK}:{target.port}): jump host bastion (")
    assert str(caught.value).endswith("): connection refused")


def test_a_bastion_that_refuses_the_login_is_one_line(target: SSHServer, bastion: SSHServer,
                                                      tmp_path: Path) -> None:
    config = jump_config(tmp_path, target, bastion)
    stranger = keygen(tmp_path / "stranger")
    config.write_text(config.read_text().replace(str(bastion.client_key), str(stranger), 1))
    with pytest.raises(HostUnreachable) as caught:
        connector(target, tmp_path, config, known(tmp_path, target, bastion)).run(["true"])
    assert str(caught.value) == (
        f"lab1 ({LOOPBACK}:{target.port}): jump host bastion ({LOOPBACK}:{bastion.port}): "
        f"authentication failed for user root with key {stranger}")


def test_an_unknown_jump_alias_is_one_line(target: SSHServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, f"Host target\n  HostName {LOOPBACK}\n  Port {target.port}\n"
                                    "  ProxyJump nosuchbastion.invalid\n")
    with pytest.raises(HostUnreachable) as caught:
        connector(target, tmp_path, config, known(tmp_path, target)).run(["true"])
    assert str(caught.value) == (
        f"lab1 ({LOOPBACK}:{target.port}): jump host nosuchbastion.invalid:22: cannot resolve "
        f"host name 'nosuchbastion.invalid' (and it is not a Host in {config})")


def test_a_proxyjump_loop_is_refused_before_connecting(target: SSHServer,
                                                       tmp_path: Path) -> None:
    config = write_config(tmp_path, "Host target\n  ProxyJump hop\nHost hop\n  ProxyJump target\n")
    with pytest.raises(ConfigError) as caught:
        connector(target, tmp_path, config, known(tmp_path, target))
    assert str(caught.value) == f"{config}:4: ProxyJump: ProxyJump loop: target -> hop -> target"


# ------------------------------------------------------------------ ssh-agent


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[str]:
    """A real ssh-agent on a socket of its own; yields SSH_AUTH_SOCK."""
    sock = str(tmp_path / "agent.sock")
    process = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.path.exists(sock), "ssh-agent did not start"
        yield sock
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)


def ssh_add(key: Path, passphrase: str, sock: str, tmp_path: Path) -> None:
    """Add a passphrase-protected key, the passphrase typed by an askpass program."""
    askpass = tmp_path / "askpass.sh"
    askpass.write_text(f"#!/bin/sh\necho '{passphrase}'\n")
    askpass.chmod(0o700)
    env = {**os.environ, "SSH_AUTH_SOCK": sock, "SSH_ASKPASS": str(askpass),
           "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": os.environ.get("DISPLAY", ":0")}
    subprocess.run(["ssh-add", str(key)], env=env, check=True, stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=30)


def test_a_passphrase_protected_key_held_by_ssh_agent(agent: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "locked_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret pass", "-f", str(key)],
                   check=True, stdin=subprocess.DEVNULL)
    with running_sshd() as server:
        (server.directory / "authorized_keys_root").write_text(
            key.with_suffix(".pub").read_text())
        kh = known(tmp_path, server)
        # the key file alone is useless without its passphrase
        with pytest.raises(HostUnreachable, match="authentication failed"):
            SSHConnector(server.host(ssh_key=str(key)), kh).run(["true"])
        monkeypatch.setenv("SSH_AUTH_SOCK", agent)
        with pytest.raises(HostUnreachable):  # the agent holds nothing yet
            SSHConnector(server.host(ssh_key=None), kh).run(["true"])
        ssh_add(key, "s3cret pass", agent, tmp_path)
        with SSHConnector(server.host(ssh_key=None), kh) as conn:
            assert conn.run(["echo", "agent"]).stdout == "agent\n"
