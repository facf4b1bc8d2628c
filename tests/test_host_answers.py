"""A host's answers are never trusted: deploy and status survive any of them.

The engine runs in-process against local hosts whose helper really runs,
except that some hosts' answers are replaced by what a broken or hostile
host might print. Each such host fails alone, with a line naming what was
wrong; the others are deployed as usual and nothing raises.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from flctl.core import pki
from flctl.deploy import engine, host_deploy
from flctl.deploy.connector import CommandResult
from flctl.deploy.local import LocalConnector
from flctl.workspace import load_workspace

from helpers import local_workspace, run_cli


class Liar(LocalConnector):
    """A local host whose helper answers `command` with `answer` instead."""

    def __init__(self, name: str, command: str, answer: str) -> None:
        super().__init__(name)
        self.command, self.answer = command, answer

    def run(self, argv: Sequence[str], timeout: float = 120.0) -> CommandResult:
        if "flctl.agent.host_helper" in argv and self.command in argv:
            return CommandResult(0, self.answer + "\n", "")
        return super().run(argv, timeout)


@pytest.fixture
def workspace(tmp_path: Path):
    yield from local_workspace(tmp_path / "ws", 4)


def deploy_with(root: Path, liars: dict[str, tuple[str, str]],
                monkeypatch: pytest.MonkeyPatch) -> dict[str, engine.HostResult]:
    real = host_deploy.connect

    def connect(host, options):
        if host.name in liars:
            return Liar(host.name, *liars[host.name])
        return real(host, options)

    monkeypatch.setattr(host_deploy, "connect", connect)
    workspace = load_workspace(root)
    results = engine.deploy(workspace, list(workspace.inventory.hosts))
    return {r.host: r for r in results}


BAD_FACTS = [
    ('["x"]', "not a JSON object"),
    ('{"data": null}', "facts.flctl_version: missing"),
    ('"just a string"', "not a JSON object"),
    ("not json at all", "not a JSON object"),
]


def test_each_bad_answer_fails_only_its_host(workspace: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    liars = {f"local{i + 2}": ("facts", answer) for i, (answer, _) in enumerate(BAD_FACTS[:3])}
    results = deploy_with(workspace, liars, monkeypatch)
    assert results["local1"].status == "changed"
    for i, (_, complaint) in enumerate(BAD_FACTS[:3]):
        result = results[f"local{i + 2}"]
        assert result.status == "failed" and complaint in (result.error or ""), result.error


def test_wrong_types_and_torn_json_fail_their_host(workspace: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    good = json.loads(LocalConnector("probe").run(
        [LocalConnector("probe").python, "-m", "flctl.agent.host_helper", "facts", "--root",
         str(workspace / ".flctl" / "hosts" / "local1")]).stdout)
    wrong = dict(good, listening_ports="all of them")
    huge = dict(good, task_check={"data": {"n_train": "1e99"}})
    results = deploy_with(workspace, {
        "local2": ("facts", json.dumps(wrong)),
        "local3": ("facts", json.dumps(huge)),
        "local4": ("facts", BAD_FACTS[3][0]),
    }, monkeypatch)
    assert results["local1"].status == "changed"
    assert "facts.listening_ports: expected a list" in (results["local2"].error or "")
    assert "facts.task_check.data.n_train: expected an integer" in (results["local3"].error or "")
    assert "not a JSON object" in (results["local4"].error or "")


def test_a_csr_for_another_name_is_refused_naming_the_host(
        workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forged = pki.make_csr(pki.make_private_key(), "coordinator", ["coordinator"]).decode()
    wildcard = pki.make_csr(pki.make_private_key(), "local3",
                            ["local3", "*.example.org"], ["127.0.0.1"]).decode()
    results = deploy_with(workspace, {"local2": ("csr", json.dumps({"csr_pem": forged})),
                                      "local3": ("csr", json.dumps({"csr_pem": wildcard}))},
                          monkeypatch)
    assert results["local1"].status == "changed"
    assert results["local2"].status == "failed"
    assert results["local2"].error.startswith("local2: its CSR asks for the name 'coordinator'")
    assert "*.example.org" in results["local3"].error
    issued = json.loads((workspace / "pki" / "issued.json").read_text())["certificates"]
    assert {c["cn"] for c in issued} == {"coordinator", "local1", "local4"}


def test_status_survives_a_host_that_answers_nonsense(workspace: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_cli("deploy", "-w", str(workspace)).returncode == 0
    from flctl.coordinator.session import info_probe
    from flctl.deploy import status

    real = status.connect

    def connect(host, options):
        if host.name == "local2":
            return Liar(host.name, "status", '{"load": ["high"], "service": "x"}')
        return real(host, options)

    monkeypatch.setattr(status, "connect", connect)
    workspace_ = load_workspace(workspace)
    heard: list[tuple[str, str]] = []
    rows = {r["host"]: r for r in status.gather_status(
        workspace_, list(workspace_.inventory.hosts), info_probe(workspace_, 5.0), forks=1,
        progress=lambda host, line: heard.append((host, line)))}
    assert rows["local1"]["agent"] == "idle"
    assert rows["local2"]["reachable"] is False and "status" in rows["local2"]["error"]
    # each host is heard starting and ending, one at a time with forks=1
    assert heard[:4] == [("local1", "probing"), ("local1", "done (agent idle)"),
                         ("local2", "probing"), ("local2", "done (agent down)")]
    assert len(heard) == 2 * len(rows)


# The other helper commands a local host's deploy parses an answer from. (The
# SSH-only ones, ensure-user, install-boot, wg-key, fw-arm, wg-up, fw-apply and
# fw-confirm, are below, step by step.)
HELPER_ANSWERS = {
    "task-check": [('["x"]', "task-check: the host's answer is not a JSON object"),
                   ('{"data": null}', "task-check.check: missing"),
                   ("not json", "task-check: the host's answer is not a JSON object")],
    # the agent's start answer is not read, only its shape
    "start": [('["x"]', "start: the host's answer is not a JSON object"),
              ('"started"', "start: the host's answer is not a JSON object"),
              ("not json", "start: the host's answer is not a JSON object")],
}


@pytest.mark.parametrize("command", sorted(HELPER_ANSWERS))
def test_a_bad_answer_to_any_helper_fails_only_its_host(
        workspace: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    cases = HELPER_ANSWERS[command]
    liars = {f"local{i + 2}": (command, answer) for i, (answer, _) in enumerate(cases)}
    results = deploy_with(workspace, liars, monkeypatch)
    assert results["local1"].status == "changed", results["local1"].error
    for i, (_, complaint) in enumerate(cases):
        result = results[f"local{i + 2}"]
        assert result.status == "failed" and complaint in (result.error or ""), result.error
        assert "unexpected error" not in result.error and "\n" not in result.error


GOOD_ANSWERS = {
    "ensure-user": {"changed": True, "uid": 990},
    "install-boot": {"result": "changed", "service": "systemd"},
    "wg-key": {"public_key": "cHVibGljIGtleSBvZiB0aGUgaG9zdA=="},
    "fw-arm": {"armed": 1},
    "wg-up": {"result": "changed", "implementation": None},
    "fw-apply": {"changed": True, "armed": 1},
    "fw-confirm": {"disarmed": True, "rolled_back": False},
}


class Scripted:
    """An SSH host's helper, answering each command from a script (nothing
    runs here: these commands change users, boot units, tunnels, firewalls)."""

    python = "python3"

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    def run(self, argv: Sequence[str], timeout: float = 120.0) -> CommandResult:
        return CommandResult(0, self.answers[argv[3]] + "\n", "")

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        pass

    def local_address(self) -> str:
        return "127.0.0.1"

    def close(self) -> None:
        pass


class FakeHub:
    interface, overlay_ip = "flctl-demo", "10.213.0.1"

    def known_peers(self) -> dict:
        return {}

    def preshared_key(self, host: str) -> bytes:
        return b"psk"

    def host_config(self, *args: str) -> str:
        return "[Interface]\n"


def ssh_steps(root: Path, answers: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """The SSH-only steps of one host's deploy against `answers`; its result."""
    from types import SimpleNamespace

    from flctl.deploy.network_steps import NetworkSteps
    from flctl.deploy.results import run_guarded

    connector = Scripted(answers)
    monkeypatch.setattr(engine, "connect", lambda host, options: connector)
    workspace = load_workspace(root)
    ctx = SimpleNamespace(workspace=workspace, check=False, hub=FakeHub(), options=None,
                          rollback_after_s=60.0,
                          confirm_new_connection=engine.confirm_with_new_connection)
    job = host_deploy.HostDeploy(ctx, workspace.inventory.hosts[0], 0, lambda *a: None)
    facts = {"boot_current": False, "wg_files": {}, "net_interfaces": [], "files": {},
             "firewall": None}

    def action() -> None:
        job._agent_user(connector, {})
        NetworkSteps(job).apply(connector, facts)
        job._boot(connector, facts, True)

    return run_guarded(job.result, action)


@pytest.fixture(scope="module")
def bare_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace that is never deployed (nothing to tear down)."""
    root = tmp_path_factory.mktemp("bare") / "ws"
    assert run_cli("init", str(root), "--local", "1").returncode == 0
    return root


@pytest.mark.parametrize("command", sorted(GOOD_ANSWERS))
@pytest.mark.parametrize("answer", ['["x"]', '{"data": null}', "not json"])
def test_a_bad_answer_to_an_ssh_only_helper_fails_that_host_in_one_line(
        bare_workspace: Path, monkeypatch: pytest.MonkeyPatch, command: str, answer: str) -> None:
    good = {k: json.dumps(v) for k, v in GOOD_ANSWERS.items()}
    assert ssh_steps(bare_workspace, good, monkeypatch).status == "changed"
    result = ssh_steps(bare_workspace, {**good, command: answer}, monkeypatch)
    assert result.status == "failed", result
    if command == "fw-confirm":   # not confirmed: the host rolls the change back itself
        assert result.error.startswith("network: no new SSH connection"), result.error
    else:
        assert command in result.error, result.error
    assert "unexpected error" not in result.error and "\n" not in result.error
