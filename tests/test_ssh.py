"""The SSH connector against a real OpenSSH sshd on 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from flctl.agent.proc import is_alive
from flctl.deploy import ssh as ssh_module
from flctl.deploy.connector import HostUnreachable
from flctl.deploy.ssh import (
    CommandTimeout,
    HostKeyRejected,
    KnownHosts,
    SSHConnector,
    fingerprint,
)

from sshd import (
    LOOPBACK,
    SSHServer,
    become_user,
    free_port,
    keygen,
    running_sshd,
    why_no_become,
    why_no_sshd,
)

pytestmark = pytest.mark.skipif(why_no_sshd() is not None, reason=str(why_no_sshd()))


@pytest.fixture(scope="module")
def server() -> Iterator[SSHServer]:
    with running_sshd() as srv:
        yield srv


@pytest.fixture(autouse=True)
def no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys from a developer's ssh-agent must not decide an authentication test."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture
def known_hosts(server: SSHServer, tmp_path: Path) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text(server.known_hosts_line)
    return path


@pytest.fixture
def conn(server: SSHServer, known_hosts: Path) -> Iterator[SSHConnector]:
    connector = SSHConnector(server.host(), known_hosts)
    yield connector
    connector.close()


def gone(pid: int, within: float) -> bool:
    """Whether process `pid` ended (or is a zombie) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(0.05)
    return False


def other_key(tmp_path: Path, kind: str = "ed25519") -> paramiko.PKey:
    path = keygen(tmp_path / f"other_{kind}", kind)
    loader = {"ed25519": paramiko.Ed25519Key, "ecdsa": paramiko.ECDSAKey}[kind]
    return loader.from_private_key_file(str(path))


# ------------------------------------------------------------------ commands


def test_run_passes_arguments_verbatim(conn: SSHConnector) -> None:
    result = conn.run(["printf", "%s|", "a b", "it's", "$HOME", "*", "", "x;y"])
    assert result.returncode == 0
    assert result.stdout == "a b|it's|$HOME|*||x;y|"
    assert result.stderr == ""


def test_run_reports_exit_code_and_stderr(conn: SSHConnector) -> None:
    result = conn.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    missing = conn.run(["flctl-no-such-command"])
    assert missing.returncode == 127
    assert "flctl-no-such-command" in missing.stderr


def test_run_shell_runs_posix_sh(conn: SSHConnector) -> None:
    result = conn.run_shell('x=$(printf "%s" abc | tr a-c A-C); echo "$x"; exit 5')
    assert (result.returncode, result.stdout) == (5, "ABC\n")


def test_output_is_decoded_with_replacement(conn: SSHConnector) -> None:
    result = conn.run(["printf", "ok\\377\\n"])
    assert result.stdout == "ok\ufffd\n"


def test_large_output_on_both_streams_does_not_deadlock(conn: SSHConnector) -> None:
    script = "head -c 3000000 /dev/zero | tr '\\0' e >&2; head -c 3000000 /dev/zero | tr '\\0' o"
    result = conn.run_shell(script, timeout=30)
    assert result.returncode == 0
    assert len(result.stdout) == 3_000_000 and set(result.stdout) == {"o"}
    assert len(result.stderr) == 3_000_000 and set(result.stderr) == {"e"}


def test_one_connection_is_reused(conn: SSHConnector, tmp_path: Path) -> None:
    conn.run(["true"])
    assert conn._client is not None
    transport = conn._client.get_transport()
    for _ in range(3):
        conn.run(["true"])
    conn.put(str(tmp_path / "file"), b"x")  # SFTP rides the same connection
    assert conn._client.get_transport() is transport
    conn.close()
    assert conn.run(["echo", "again"]).stdout == "again\n"  # a closed connector reconnects



def test_uploads_ride_aes_gcm_where_paramiko_has_it(conn: SSHConnector) -> None:
    """GCM costs the operator less CPU per uploaded byte than paramiko's first choice."""
    conn.run(["true"])
    assert conn._client is not None
    transport = conn._client.get_transport()
    assert transport is not None
    if not ssh_module._CONNECT_OPTIONS:
        pytest.skip(f"paramiko {paramiko.__version__} has no GCM or no transport_factory")
    assert transport.local_cipher in ssh_module.GCM_CIPHERS
    assert transport.remote_cipher in ssh_module.GCM_CIPHERS

def test_timeout_raises_and_kills_the_command(conn: SSHConnector, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match=r"timed out after 1 s"):
        conn.run(["sh", "-c", f'echo $$ > {pidfile}; exec sleep 30'], timeout=1)
    assert time.monotonic() - started < 2.5
    assert gone(int(pidfile.read_text()), within=6), "the command outlived its timeout"
    assert conn.run(["echo", "still usable"]).stdout == "still usable\n"


def test_lost_connection_is_unreachable_then_reconnects(conn: SSHConnector) -> None:
    kill_my_sshd = ("p=$$; while [ \"$p\" -gt 1 ]; do "
                    "if [ \"$(cat /proc/$p/comm)\" = sshd ]; then kill -9 $p; break; fi; "
                    "p=$(cut -d' ' -f4 /proc/$p/stat); done; sleep 5")
    with pytest.raises(HostUnreachable, match="connection lost"):
        conn.run_shell(kill_my_sshd, timeout=10)
    assert conn.run(["echo", "back"]).stdout == "back\n"


# --------------------------------------------------------------------- files


def test_put_get_round_trip_with_secret_mode(conn: SSHConnector, tmp_path: Path) -> None:
    target = tmp_path / "new" / "dirs" / "agent.key"
    payload = bytes(range(256)) * 3
    conn.put(str(target), payload, 0o600)
    assert target.read_bytes() == payload
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert conn.get(str(target)) == payload
    assert os.listdir(target.parent) == ["agent.key"]  # no temp file left behind


def test_put_replaces_a_file_and_its_mode(conn: SSHConnector, tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    target.write_text("old")
    target.chmod(0o644)
    conn.put(str(target), b"new", 0o640)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    conn.put(str(target), b"public", 0o644)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_put_file_streams_a_large_file(conn: SSHConnector, tmp_path: Path) -> None:
    local = tmp_path / "wheel.whl"
    local.write_bytes(os.urandom(5_000_000))
    remote = tmp_path / "remote" / "wheel.whl"
    sent: list[int] = []
    conn.put_file(local, str(remote), 0o644, on_bytes=sent.append)
    # progress as the blocks go out, ending at the file's size
    assert len(sent) >= 5 and sent == sorted(sent) and sent[-1] == 5_000_000
    assert hashlib.sha256(remote.read_bytes()).digest() == hashlib.sha256(
        local.read_bytes()).digest()
    assert stat.S_IMODE(remote.stat().st_mode) == 0o644
    assert conn.get(str(remote)) == local.read_bytes()



def test_put_file_that_cannot_be_written_names_the_host_and_leaves_nothing(
        conn: SSHConnector, tmp_path: Path) -> None:
    local = tmp_path / "wheel.whl"
    local.write_bytes(b"w" * 600_000)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=f"{conn.host_name}: cannot write {blocker}/x.whl"):
        conn.put_file(local, str(blocker / "x.whl"))
    folder = tmp_path / "secret"
    conn.put_file(local, str(folder / "key.bin"), 0o600)
    assert stat.S_IMODE((folder / "key.bin").stat().st_mode) == 0o600
    assert os.listdir(folder) == ["key.bin"]   # the temporary name renamed away

def test_get_missing_file(conn: SSHConnector, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        conn.get(str(tmp_path / "absent"))


def test_put_needs_an_absolute_path(conn: SSHConnector) -> None:
    with pytest.raises(ValueError, match="absolute"):
        conn.put("relative/file", b"x")


# -------------------------------------------------------------------- stream


def test_stream_yields_lines_and_stops(conn: SSHConnector, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    lines: list[str] = []
    stop = threading.Event()

    def on_line(line: str) -> None:
        lines.append(line)
        if len(lines) == 3:
            stop.set()

    script = f"echo $$ > {pidfile}; for i in 1 2 3; do echo line$i; done; exec sleep 30"
    started = time.monotonic()
    code = conn.stream(["sh", "-c", script], on_line, stop)
    assert code == -1
    assert lines[:3] == ["line1", "line2", "line3"]
    assert time.monotonic() - started < 5
    assert gone(int(pidfile.read_text()), within=5), "stopping left the command running"


def test_stream_returns_exit_code_and_merges_stderr(conn: SSHConnector) -> None:
    lines: list[str] = []
    code = conn.stream(["sh", "-c", "echo out; echo err >&2; exit 7"], lines.append)
    assert code == 7
    assert sorted(lines) == ["err", "out"]  # two pipes: their relative order is not fixed
    lines.clear()
    assert conn.stream(["printf", "a\\nb"], lines.append) == 0
    assert lines == ["a", "b"]  # a last line without a newline still arrives


# ----------------------------------------------------------------- host keys


def test_fingerprint_matches_ssh_keygen(server: SSHServer) -> None:
    key = paramiko.Ed25519Key.from_private_key_file(str(server.host_key))
    assert fingerprint(key) == server.host_fingerprint


def test_unknown_host_key_is_refused_with_its_fingerprint(server: SSHServer,
                                                          tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    with pytest.raises(HostKeyRejected) as caught:
        SSHConnector(server.host(), known_hosts).run(["true"])
    message = caught.value.message
    assert message.startswith(f"lab1 ({LOOPBACK}:{server.port}): unknown host key")
    assert server.host_fingerprint in message
    assert "--accept-new-host-keys" in message and f"host_key: {server.host_fingerprint}" in message
    assert not known_hosts.exists()


def test_accept_new_records_the_key_for_next_time(server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "ws" / "known_hosts"
    with SSHConnector(server.host(), known_hosts, accept_new=True) as first:
        assert first.run(["echo", "hi"]).stdout == "hi\n"
    assert known_hosts.read_text() == server.known_hosts_line
    with SSHConnector(server.host(), known_hosts) as second:  # no flag needed any more
        assert second.run(["true"]).returncode == 0
    assert known_hosts.read_text() == server.known_hosts_line


def test_pinned_fingerprint_is_accepted_and_recorded(server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    host = server.host(host_key=server.host_fingerprint)
    with SSHConnector(host, known_hosts) as conn:
        assert conn.run(["true"]).returncode == 0
    assert known_hosts.read_text() == server.known_hosts_line


def test_wrong_pin_is_refused_even_with_accept_new(server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    wrong = fingerprint(other_key(tmp_path))
    with pytest.raises(HostKeyRejected) as caught:
        SSHConnector(server.host(host_key=wrong), known_hosts, accept_new=True).run(["true"])
    assert wrong in caught.value.message and server.host_fingerprint in caught.value.message
    assert "does not match" in caught.value.message
    assert not known_hosts.exists()


@pytest.mark.parametrize("accept_new,pin", [(False, False), (True, False), (True, True)])
def test_changed_key_is_always_refused(server: SSHServer, tmp_path: Path, accept_new: bool,
                                       pin: bool) -> None:
    impostor = other_key(tmp_path)
    known_hosts = tmp_path / "known_hosts"
    recorded = f"[{LOOPBACK}]:{server.port} {impostor.get_name()} {impostor.get_base64()}\n"
    known_hosts.write_text(recorded)
    host = server.host(host_key=server.host_fingerprint if pin else None)
    with pytest.raises(HostKeyRejected) as caught:
        SSHConnector(host, known_hosts, accept_new=accept_new).run(["true"])
    message = caught.value.message
    assert "CHANGED" in message
    assert fingerprint(impostor) in message and server.host_fingerprint in message
    assert known_hosts.read_text() == recorded


def test_known_key_of_another_type_counts_as_changed(server: SSHServer, tmp_path: Path) -> None:
    ecdsa = other_key(tmp_path, "ecdsa")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{LOOPBACK}]:{server.port} {ecdsa.get_name()} {ecdsa.get_base64()}\n")
    with pytest.raises(HostKeyRejected, match="CHANGED"):
        SSHConnector(server.host(), known_hosts, accept_new=True).run(["true"])


def test_hashed_known_hosts_entries_are_honoured(server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(server.known_hosts_line)
    subprocess.run(["ssh-keygen", "-H", "-f", str(known_hosts)], check=True,
                   capture_output=True)
    assert str(server.port) not in known_hosts.read_text()  # really hashed
    with known_hosts.open("a") as extra:  # lines paramiko cannot use must not hide the rest
        extra.write("# comment\n@cert-authority *.example ssh-ed25519 AAAA\njunk line\n"
                    "other.example sk-ssh-ed25519@openssh.com AAAAGnNr\n")
    with SSHConnector(server.host(), known_hosts) as conn:
        assert conn.run(["true"]).returncode == 0


def test_parallel_accepts_write_whole_lines_once(tmp_path: Path) -> None:
    key = other_key(tmp_path)
    store = KnownHosts(tmp_path / "known_hosts")
    names = [f"[198.18.0.{i}]:22" for i in range(1, 9)]
    threads = [threading.Thread(target=store.add, args=(name, key))
               for name in names + names]  # every host twice, at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = (tmp_path / "known_hosts").read_text().splitlines()
    assert sorted(lines) == sorted(f"{n} {key.get_name()} {key.get_base64()}" for n in names)
    assert store.add(names[0], other_key(tmp_path, "ecdsa")) is not None  # a different key


# -------------------------------------------------------------- unreachable


def test_connection_refused_is_quick_and_one_line(server: SSHServer, tmp_path: Path) -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(HostUnreachable) as caught:
        SSHConnector(server.host(ssh_port=port), tmp_path / "kh").run(["true"])
    assert time.monotonic() - started < 2
    assert caught.value.message == f"lab1 ({LOOPBACK}:{port}): connection refused"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_silent_server_times_out(server: SSHServer, tmp_path: Path,
                                 capfd: pytest.CaptureFixture[str]) -> None:
    # What an operator would see: anything reaching the root logger's handlers
    # (pytest's caplog also collects from non-propagating loggers, so it cannot tell).
    root = logging.getLogger()
    collect, old_level = _Collect(), root.level
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    try:
        _time_out_against_a_silent_listener(server, tmp_path)
    finally:
        root.removeHandler(collect)
        root.setLevel(old_level)
    assert capfd.readouterr().err == ""
    assert not [r for r in collect.records if r.name.startswith("paramiko")]


def _time_out_against_a_silent_listener(server: SSHServer, tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(HostUnreachable, match=r"within 0.5 s"):
            SSHConnector(server.host(ssh_port=port), tmp_path / "kh",
                         connect_timeout=0.5).run(["true"])
        assert time.monotonic() - started < 3
    time.sleep(0.2)  # paramiko's transport thread logs as it dies


def test_name_resolution_failure(server: SSHServer, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(HostUnreachable) as caught:
        SSHConnector(server.host(ssh_host="lab9.invalid"), tmp_path / "kh").run(["true"])
    assert caught.value.message == f"lab1 (lab9.invalid:{server.port}): cannot resolve host name"


def test_wrong_key_fails_authentication(server: SSHServer, known_hosts: Path,
                                        tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger")
    with pytest.raises(HostUnreachable, match="authentication failed for user root") as caught:
        SSHConnector(server.host(ssh_key=str(stranger)), known_hosts).run(["true"])
    assert not isinstance(caught.value, HostKeyRejected)


def test_missing_key_file(server: SSHServer, known_hosts: Path, tmp_path: Path) -> None:
    with pytest.raises(HostUnreachable, match="cannot read SSH key"):
        SSHConnector(server.host(ssh_key=str(tmp_path / "nope")), known_hosts).run(["true"])


def test_hosts_in_parallel_threads(server: SSHServer, known_hosts: Path) -> None:
    results: dict[int, str] = {}

    def one(index: int) -> None:
        with SSHConnector(server.host(name=f"lab{index}"), known_hosts) as conn:
            results[index] = conn.run(["echo", str(index)]).stdout.strip()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: str(i) for i in range(4)}


# -------------------------------------------------------------------- become


def test_become_command_lines(server: SSHServer, tmp_path: Path) -> None:
    user = SSHConnector(server.host(ssh_user="deploy", become=True), tmp_path / "kh")
    assert user.command_line(["python3", "-m", "flctl x"]) == "sudo -n -- python3 -m 'flctl x'"
    assert user.shell_line("echo $HOME") == "sudo -n -- sh -c 'echo $HOME'"
    assert user.command_line(["true"], timeout=10) == "sudo -n -- timeout -k 2 11 true"
    root = SSHConnector(server.host(become=True), tmp_path / "kh")
    assert root.command_line(["id", "-u"]) == "id -u"  # root needs no sudo
    plain = SSHConnector(server.host(ssh_user="deploy"), tmp_path / "kh")
    assert plain.shell_line("id") == "sh -c id"


@pytest.fixture(scope="module")
def sudoer(server: SSHServer) -> Iterator[str]:
    reason = why_no_become()
    if reason:
        pytest.skip(reason)
    with become_user(server) as name:
        yield name


def test_become_runs_commands_as_root(server: SSHServer, known_hosts: Path,
                                      sudoer: str) -> None:
    with SSHConnector(server.host(ssh_user=sudoer), known_hosts) as plain:
        assert plain.run(["id", "-u"]).stdout.strip() != "0"
    with SSHConnector(server.host(ssh_user=sudoer, become=True), known_hosts) as conn:
        assert conn.run(["id", "-u"]).stdout == "0\n"
        assert conn.run_shell("id -un; echo $((1 + 2))").stdout == "root\n3\n"


def test_become_put_and_get_root_only_files(server: SSHServer, known_hosts: Path,
                                            sudoer: str, tmp_path: Path) -> None:
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    target = private / "etc" / "agent.key"
    staged_before = {p for p in os.listdir("/tmp") if p.startswith(".flctl-put-")}
    with SSHConnector(server.host(ssh_user=sudoer, become=True), known_hosts) as conn:
        conn.put(str(target), b"secret", 0o600)
        info = target.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o600)
        assert target.read_bytes() == b"secret"
        assert conn.get(str(target)) == b"secret"
        with pytest.raises(FileNotFoundError):
            conn.get(str(private / "absent"))
    assert os.listdir(target.parent) == ["agent.key"]
    staged_after = {p for p in os.listdir("/tmp") if p.startswith(".flctl-put-")}
    assert staged_after <= staged_before  # the user's staging copy is gone
    # And the same user without become cannot even see the file.
    with SSHConnector(server.host(ssh_user=sudoer), known_hosts) as plain:
        with pytest.raises(OSError):
            plain.get(str(target))
