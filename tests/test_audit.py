"""The audit log: every command that changes hosts or runs appends one line
to audit.jsonl (who, when, command, flags, per-host changes, run, version,
outcome), `flctl audit` prints it, a torn line costs only itself, and no
private key ever appears in it.

One local workspace goes through a day's work through the CLI (init,
deploy, deploy again, a run, a run that cannot start, a run interrupted
with Ctrl-C and resumed, pki rotate, pki revoke, teardown); the tests read
what that left in its audit log.
"""

from __future__ import annotations

import base64
import datetime
import getpass
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import pytest

import flctl
from flctl import audit
from flctl.cli.auditing import given_flags
from flctl.cli.common import LimitOpt, WorkspaceOpt
from flctl.errors import WorkspaceError
from flctl.workspace import WorkspacePaths

from helpers import flctl_command, run_cli, use_ports

HOSTS = ("local1", "local2")


def entries(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()]


def key_material(root: Path) -> set[bytes]:
    """Every private key under the workspace (pki/ and the local hosts' state):
    the file's bytes, each base64 line of its PEM, and its DER as one base64 run."""
    found: set[bytes] = set()
    for path in [*root.joinpath("pki").rglob("*"), *root.joinpath(".flctl").rglob("*")]:
        if not path.is_file():
            continue
        data = path.read_bytes()
        if not (path.suffix == ".key" or b"PRIVATE KEY" in data or "private" in path.name):
            continue
        found.add(data.strip())
        body = [line.strip() for line in data.splitlines()
                if line.strip() and not line.startswith(b"-----")]
        found.update(line for line in body if len(line) >= 16)
        if body:
            der = base64.b64decode(b"".join(body))
            found.update({base64.b64encode(der), der.hex().encode()})
    return found


class Day:
    """What the workspace's day left: the log, step by step, and the keys it held."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.keys: set[bytes] = set()
        self.steps: dict[str, list[dict[str, Any]]] = {}
        self.outputs: dict[str, Any] = {}

    def step(self, name: str, *args: str, code: int = 0, timeout: float = 600) -> Any:
        before = len(entries(self.root)) if (self.root / "audit.jsonl").exists() else 0
        result = run_cli(*args, timeout=timeout)
        assert result.returncode == code, (name, result.returncode, result.stderr)
        self.keys |= key_material(self.root)
        self.steps[name] = entries(self.root)[before:]
        self.outputs[name] = result
        return result


def interrupt_a_run(day: Day, run_id: str) -> None:
    """`flctl train` stopped by Ctrl-C (SIGINT) once its first round is on disk."""
    before = len(entries(day.root))
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    process = subprocess.Popen([*flctl_command(), "train", "-w", str(day.root), "--rounds", "500",
                                "--run-id", run_id], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                               # a background job (CI) inherits SIGINT ignored, and Python
                               # keeps it so: give the run the default, as a terminal would
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = day.root / "runs" / run_id / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130, process.stderr.read()
    day.steps["interrupted"] = entries(day.root)[before:]


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("audit") / "ws"
    day = Day(root)
    day.step("init", "init", str(root), "--local", str(len(HOSTS)))
    use_ports(root, len(HOSTS))
    try:
        day.step("deploy", "deploy", "-w", str(root))
        day.step("deploy again", "deploy", "-w", str(root), "--forks", "3", "--json")
        day.step("train", "train", "-w", str(root), "--rounds", "2", "--run-id", "run-ok",
                 "--json")
        day.step("cannot start", "train", "-w", str(root), "--rounds", "2",
                 "--min-hosts-to-start", "3", "--run-id", "run-short", code=6)
        interrupt_a_run(day, "run-cut")
        done = json.loads((root / "runs" / "run-cut" / "state.json").read_text())["round"]
        day.outputs["cut at"] = done
        day.step("resume", "train", "-w", str(root), "--resume", "--rounds", str(done + 1))
        day.step("rotate", "pki", "rotate", "-w", str(root))
        day.step("revoke", "pki", "revoke", "local2", "-w", str(root))
        day.step("teardown", "teardown", "-w", str(root), "--limit", "local2")
    finally:
        day.step("teardown all", "teardown", "-w", str(root))
    return day


def only(lines: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(lines) == 1, lines
    return lines[0]


def test_every_line_says_who_when_and_which_flctl(day: Day) -> None:
    lines = entries(day.root)
    assert len(lines) == sum(len(v) for v in day.steps.values())
    now = datetime.datetime.now(datetime.timezone.utc)
    for line in lines:
        assert line["user"] == getpass.getuser() and line["host"] == os.uname().nodename
        assert line["version"] == flctl.__version__
        when = datetime.datetime.fromisoformat(line["time"])
        assert when.tzinfo is not None and abs((now - when).total_seconds()) < 3600
    assert (day.root / "audit.jsonl").stat().st_mode & 0o777 == 0o600


def test_init_and_deploy(day: Day) -> None:
    init = only(day.steps["init"])
    assert init["command"] == "init" and init["outcome"] == "ok"
    assert init["flags"] == {"directory": str(day.root), "--local": len(HOSTS)}
    deploy = only(day.steps["deploy"])
    assert deploy["command"] == "deploy" and deploy["outcome"] == "ok"
    assert deploy["exit_code"] == 0 and deploy["error"] is None
    assert deploy["flags"] == {"--workspace": str(day.root)}
    assert set(deploy["hosts"]) == set(HOSTS)
    for name in HOSTS:
        host = deploy["hosts"][name]
        assert host["status"] == "changed" and host["error"] is None
        assert any(change.startswith("agent") for change in host["changes"]), host
    again = only(day.steps["deploy again"])
    assert again["flags"] == {"--workspace": str(day.root), "--forks": 3, "--json": True}
    assert again["hosts"] == {name: {"status": "ok", "changes": [], "error": None}
                              for name in HOSTS}


def test_a_run_has_a_start_and_an_end_line(day: Day) -> None:
    start, end = day.steps["train"]
    summary = day.outputs["train"].json()
    assert start["command"] == end["command"] == "train"
    assert start["run"] == {"run_id": "run-ok", "event": "start"} and "outcome" not in start
    assert end["run"] == {"run_id": "run-ok", "event": "end", "state": "finished", "rounds": 2,
                          "accuracy": summary["accuracy"]}
    assert end["outcome"] == "ok"
    assert end["flags"] == {"--workspace": str(day.root), "--rounds": 2, "--run-id": "run-ok",
                            "--json": True}


def test_a_run_that_fails_ends_with_its_error(day: Day) -> None:
    start, end = day.steps["cannot start"]
    assert start["run"]["event"] == "start" and end["run"]["run_id"] == "run-short"
    assert end["outcome"] == "failed" and end["exit_code"] == 6
    assert "min_hosts_to_start" in end["error"]
    assert end["run"]["rounds"] == 0


def test_an_interrupted_run_and_its_resume(day: Day) -> None:
    start, end = day.steps["interrupted"]
    assert start["run"] == {"run_id": "run-cut", "event": "start"}
    assert end["outcome"] == "interrupted" and end["exit_code"] == 130
    assert end["run"]["state"] == "interrupted" and end["run"]["rounds"] >= 1
    resumed_start, resumed_end = day.steps["resume"]
    assert resumed_start["command"] == resumed_end["command"] == "train --resume"
    assert resumed_start["run"] == {"run_id": "run-cut", "event": "start"}
    assert resumed_end["run"]["state"] == "finished"
    assert resumed_end["run"]["rounds"] == day.outputs["cut at"] + 1
    assert resumed_end["flags"] == {"--resume": True, "--workspace": str(day.root),
                                    "--rounds": day.outputs["cut at"] + 1}


def test_pki_changes_and_teardown(day: Day) -> None:
    rotate = only(day.steps["rotate"])
    assert rotate["command"] == "pki rotate" and rotate["outcome"] == "ok"
    for name in HOSTS:
        assert any("certificate" in change for change in rotate["hosts"][name]["changes"])
    revoke = only(day.steps["revoke"])
    assert revoke["command"] == "pki revoke" and revoke["flags"]["host"] == "local2"
    assert set(revoke["hosts"]) == {"local1"} and len(revoke["revoked_serials"]) >= 1
    teardown = only(day.steps["teardown"])
    assert teardown["command"] == "teardown" and teardown["flags"]["--limit"] == ["local2"]
    assert teardown["hosts"]["local2"]["status"] == "changed"
    assert set(only(day.steps["teardown all"])["hosts"]) == set(HOSTS)


def test_no_private_key_reaches_the_log(day: Day) -> None:
    text = (day.root / "audit.jsonl").read_bytes()
    # the CA's, the coordinator's before and after rotation, every host's
    assert len(day.keys) >= 3 * (2 + 2 * len(HOSTS))
    leaked = [key[:24] for key in day.keys if key in text]
    assert not leaked, leaked


def test_flctl_audit_prints_the_log(day: Day) -> None:
    result = run_cli("audit", "-w", str(day.root), "--json")
    assert result.returncode == 0, result.stderr
    assert result.json() == {"entries": entries(day.root)}   # as stored, line for line
    last = run_cli("audit", "-w", str(day.root), "--json", "--last", "2")
    assert last.json()["entries"] == entries(day.root)[-2:]
    since = entries(day.root)[-1]["time"]
    recent = run_cli("audit", "-w", str(day.root), "--json", "--since", since).json()["entries"]
    assert recent and recent == [e for e in entries(day.root) if e["time"] >= since]
    future = run_cli("audit", "-w", str(day.root), "--json", "--since", "2999-01-01")
    assert future.returncode == 0 and future.json() == {"entries": []}
    table = run_cli("audit", "-w", str(day.root))
    assert table.returncode == 0
    for word in ("init", "deploy", "train --resume", "pki rotate", "pki revoke", "teardown",
                 "interrupted", "run-cut"):
        assert word in table.stdout, word
    bad = run_cli("audit", "-w", str(day.root), "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_flctl_audit_skips_a_torn_line_with_a_warning(day: Day, tmp_path: Path) -> None:
    copy = tmp_path / "ws"
    assert run_cli("init", str(copy), "--local", "2").returncode == 0
    (copy / "audit.jsonl").write_bytes((day.root / "audit.jsonl").read_bytes())
    with (copy / "audit.jsonl").open("ab") as handle:
        handle.write(b'{"command": "deploy", "fla')
    result = run_cli("audit", "-w", str(copy), "--json")
    assert result.returncode == 0, result.stderr
    assert result.json()["entries"] == entries(day.root)
    torn = len(entries(day.root)) + 1
    assert f"audit.jsonl:{torn}: skipped an unreadable line" in " ".join(result.stderr.split())


def test_demo_writes_its_steps_into_its_workspace(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    result = run_cli("demo", "--dir", str(root), "--hosts", "2", "--rounds", "1", "--json",
                     timeout=300)
    assert result.returncode == 0, result.stderr
    lines = entries(root)
    assert [(line["command"], (line.get("run") or {}).get("event")) for line in lines] == [
        ("demo deploy", None), ("demo train", "start"), ("demo train", "end"),
        ("demo teardown", None)]
    assert all(line["flags"] == {"--hosts": 2, "--rounds": 1, "--dir": str(root),
                                 "--json": True} for line in lines)
    assert set(lines[0]["hosts"]) == set(lines[3]["hosts"]) == {"local1", "local2"}
    assert lines[2]["run"]["run_id"] == result.json()["run_id"]
    assert lines[2]["run"]["rounds"] == 1 and lines[2]["outcome"] == "ok"


# ---------------------------------------------------------------- the file itself

def test_a_torn_last_line_costs_only_itself(tmp_path: Path) -> None:
    paths = WorkspacePaths(tmp_path)
    audit.append(paths, audit.new_entry("deploy", {}, outcome="ok"))
    with paths.audit.open("ab") as handle:
        handle.write(b'{"command": "teardown", "ti')         # a crash mid-write
    audit.append(paths, audit.new_entry("train", {"--rounds": 3}, outcome="ok"))
    log = audit.read(paths)
    assert [e["command"] for e in log.entries] == ["deploy", "train"]
    assert len(log.warnings) == 1 and f"{paths.audit}:2:" in log.warnings[0]
    assert paths.audit.stat().st_mode & 0o777 == 0o600


def test_a_looser_file_is_narrowed_and_an_unwritable_one_is_one_error(tmp_path: Path) -> None:
    paths = WorkspacePaths(tmp_path)
    paths.audit.write_text("")
    paths.audit.chmod(0o666)
    audit.append(paths, audit.new_entry("deploy", {}))
    assert paths.audit.stat().st_mode & 0o777 == 0o600
    missing = WorkspacePaths(tmp_path / "gone")
    with pytest.raises(WorkspaceError, match="cannot write the audit log"):
        audit.append(missing, audit.new_entry("deploy", {}))


def test_flags_are_those_given_and_secret_ones_are_not_kept() -> None:
    import inspect

    import typer

    def command(run: str = typer.Argument(None), rounds: int = typer.Option(None, "--rounds"),
                check: bool = typer.Option(False, "--check"),
                limit: Optional[list[str]] = LimitOpt,
                secure: bool = typer.Option(None, "--secure/--no-secure"),
                wg_private_key: str = typer.Option(None, "--wg-private-key"),
                workspace_dir: Path = WorkspaceOpt) -> None:
        pass

    flags = given_flags(inspect.signature(command), {
        "run": None, "rounds": 3, "check": False, "limit": ["h1"], "secure": False,
        "wg_private_key": "aGVsbG8=", "workspace_dir": Path("/w")})
    assert flags == {"--rounds": 3, "--limit": ["h1"], "--secure": False,
                     "--wg-private-key": "aGVsbG8=", "--workspace": "/w"}
    entry = audit.new_entry("deploy", flags)
    assert entry["flags"]["--wg-private-key"] == audit.REDACTED
    assert "aGVsbG8=" not in json.dumps(entry)
    assert entry["flags"]["--secure"] is False and entry["flags"]["--rounds"] == 3
