"""A throwaway OpenSSH server on 127.0.0.1 for tests of the SSH connector.

A real sshd (not a paramiko test server) so that what passes here is what
hosts do: OpenSSH's SFTP server, its exit-status/EOF ordering, sudo.

sshd insists on its privilege-separation directory /run/sshd. Rather than
create it on this machine, the server runs in a private mount namespace
with its own tmpfs on /run, so nothing is left behind outside its temp dir.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flctl.core.inventory import Host

SSHD = "/usr/sbin/sshd"
LOOPBACK = "127.0.0.1"


def why_no_sshd() -> str | None:
    """Why a test sshd cannot run here, or None when it can."""
    if not Path(SSHD).exists():
        return f"{SSHD} is not installed (Debian package openssh-server)"
    for tool in ("ssh-keygen", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "the test sshd needs root (to switch users and own /run/sshd)"
    return None


def why_no_become() -> str | None:
    """Why become (a non-root user with passwordless sudo) cannot be tested here."""
    reason = why_no_sshd()
    if reason:
        return reason
    for tool in ("sudo", "useradd", "userdel", "visudo"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "flctl-test", "-f",
                    str(path)], check=True, stdin=subprocess.DEVNULL)
    return path


def keygen_fingerprint(public_key: Path) -> str:
    """The fingerprint as OpenSSH itself computes it ("SHA256:...")."""
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(public_key)],
                         check=True, capture_output=True, text=True).stdout
    return out.split()[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@dataclass
class SSHServer:
    directory: Path
    port: int
    host_key: Path           # private; the .pub beside it
    client_key: Path         # private key authorized for every user listed
    process: subprocess.Popen[bytes]

    @property
    def host_key_public(self) -> str:
        """ "ssh-ed25519 AAAA..." without the comment."""
        kind, blob = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"{kind} {blob}"

    @property
    def host_fingerprint(self) -> str:
        return keygen_fingerprint(self.host_key.with_suffix(".pub"))

    @property
    def known_hosts_line(self) -> str:
        return f"[{LOOPBACK}]:{self.port} {self.host_key_public}\n"

    def host(self, **changes: object) -> Host:
        """An inventory host for this server; `changes` override fields."""
        base = Host(
            name="lab1", connection="ssh", ssh_host=LOOPBACK, ssh_port=self.port,
            ssh_user="root", ssh_key=str(self.client_key), host_key=None, become=False,
            overlay_ip=ipaddress.IPv4Address("198.19.0.11"), data_path="/tmp", labels={},
            groups=(), agent_port=None, python="python3", line=1,
        )
        return dataclasses.replace(base, **changes)  # type: ignore[arg-type]

    def authorize(self, user: str) -> None:
        shutil.copy(self.client_key.with_suffix(".pub"),
                    self.directory / f"authorized_keys_{user}")
        os.chmod(self.directory / f"authorized_keys_{user}", 0o644)

    def log(self) -> str:
        path = self.directory / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _config(directory: Path, port: int, host_key: Path, extra: Sequence[str] = (),
            log_level: str = "ERROR") -> str:
    return "\n".join([
        *extra,  # sshd takes the first value it reads for a keyword
        f"ListenAddress {LOOPBACK}:{port}",
        f"HostKey {host_key}",
        f"PidFile {directory / 'sshd.pid'}",
        f"AuthorizedKeysFile {directory}/authorized_keys_%u",
        "StrictModes no",
        "UsePAM no",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "Subsystem sftp internal-sftp",
        "MaxStartups 64",
        "MaxSessions 64",
        f"LogLevel {log_level}",
        "",
    ])


def _wait_listening(server: SSHServer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"sshd exited with {server.process.returncode}:\n{server.log()}")
        try:
            with socket.create_connection((LOOPBACK, server.port), timeout=0.5) as conn:
                conn.settimeout(2.0)
                if conn.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"sshd did not listen within {timeout} s:\n{server.log()}")


def start_sshd(directory: Path | None = None, extra: Sequence[str] = (),
               log_level: str = "ERROR") -> SSHServer:
    """Start sshd on a free loopback port, authorizing a fresh client key for root.

    `extra` sshd_config lines come first (so they win); log_level DEBUG1
    makes sshd log each forwarding it does (a jump host's, say)."""
    directory = Path(directory or tempfile.mkdtemp(prefix="flctl-sshd-"))
    directory.chmod(0o755)  # users other than root read their authorized_keys here
    host_key = keygen(directory / "host_ed25519")
    client_key = keygen(directory / "client_ed25519")
    last_error: Exception | None = None
    for _ in range(3):  # the port can be taken between probing and binding
        port = free_port()
        config = directory / "sshd_config"
        config.write_text(_config(directory, port, host_key, extra, log_level))
        launch = (f"mount -t tmpfs -o mode=0755 flctl-test-run /run && mkdir -m 0755 /run/sshd "
                  f"&& exec {SSHD} -D -e -f {config}")
        with open(directory / "sshd.log", "ab") as log:
            process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", launch],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        server = SSHServer(directory, port, host_key, client_key, process)
        server.authorize("root")
        try:
            _wait_listening(server)
            return server
        except RuntimeError as exc:
            server.stop()
            last_error = exc
    raise RuntimeError(f"could not start sshd: {last_error}")


@contextmanager
def running_sshd(extra: Sequence[str] = (), log_level: str = "ERROR") -> Iterator[SSHServer]:
    server = start_sshd(extra=extra, log_level=log_level)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@contextmanager
def become_user(server: SSHServer) -> Iterator[str]:
    """A throwaway non-root user with passwordless sudo, removed afterwards.

    The password field is '*' rather than useradd's '!': with UsePAM no,
    sshd treats '!' as a locked account and refuses even key logins.
    """
    name = f"flt{secrets.token_hex(4)}"
    home = server.directory / f"home-{name}"
    sudoers = Path("/etc/sudoers.d") / f"flctl-test-{name}"
    subprocess.run(["useradd", "--no-user-group", "--gid", "nogroup", "-d", str(home), "-m",
                    "-s", "/bin/sh", "-p", "*", name],
                   check=True, capture_output=True)
    try:
        staged = sudoers.with_name(f".{sudoers.name}")  # sudo ignores names with a '.'
        staged.write_text(f"{name} ALL=(root) NOPASSWD: ALL\n")
        staged.chmod(0o440)
        subprocess.run(["visudo", "-cqf", str(staged)], check=True, capture_output=True)
        staged.rename(sudoers)
        server.authorize(name)
        yield name
    finally:
        sudoers.unlink(missing_ok=True)
        sudoers.with_name(f".{sudoers.name}").unlink(missing_ok=True)
        for _ in range(50):  # the user's last sshd session may still be closing
            done = subprocess.run(["userdel", "-r", "-f", name], capture_output=True)
            if done.returncode in (0, 6):  # 6: no such user
                break
            time.sleep(0.1)
