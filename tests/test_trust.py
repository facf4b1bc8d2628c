"""Who may command whom, and how trust is kept current, through real agents.

A local federation (agent processes behind mutual TLS, driven through the
CLI): a host's own certificate cannot command another agent, a task the
agent was not deployed with is refused (the reported attack asked an agent
to run `subprocess:Popen`), certificates that are about to expire are
renewed by deploy, `flctl pki rotate` reissues every leaf in one deploy,
`flctl pki revoke` makes the coordinator and the agents refuse a
certificate, and text a host sends reaches the terminal literally.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from flctl.core import pki
from flctl.core.layout import Endpoint
from flctl.core.messages import Message
from flctl.net.agent_client import AgentClient
from flctl.net.client import FrameClient, RemoteError, TransportError
from flctl.net.tls import client_context

from helpers import deployed_local_workspace, run_cli, set_training

HOSTS = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    yield from deployed_local_workspace(tmp_path_factory.mktemp("trust"), HOSTS)


def host_dir(root: Path, name: str) -> Path:
    return root / ".flctl" / "hosts" / name


def endpoint(root: Path, name: str) -> Endpoint:
    port = int(run_cli("status", "-w", str(root), "--json", "--limit", name)
               .json()["hosts"][0]["address"].rsplit(":", 1)[1])
    return Endpoint(name, "127.0.0.1", "127.0.0.1", port, name)


def context_of(root: Path, cert: Path, key: Path):
    return client_context(root / "pki" / "ca.crt", cert, key)


def coordinator(root: Path, name: str) -> AgentClient:
    pki_dir = root / "pki"
    return AgentClient(endpoint(root, name),
                       context_of(root, pki_dir / "coordinator.crt", pki_dir / "coordinator.key"),
                       timeout=10)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_host_certificate_cannot_command_another_agent(workspace: Path, tmp_path: Path) -> None:
    """local1's own key and certificate, against local2's agent: refused at the
    handshake (server-auth-only certificate), logged, nothing run."""
    target = endpoint(workspace, "local2")
    ours = host_dir(workspace, "local1")
    client = FrameClient(target.connect_address, target.port,
                         context_of(workspace, ours / "agent.crt", ours / "agent.key"),
                         server_hostname="local2", timeout=10)
    marker = tmp_path / "MARKER"
    with pytest.raises(TransportError):
        client.request(Message("fit", {"task": "subprocess:Popen",
                                       "task_params": {"args": ["touch", str(marker)]}}))
    client.close()
    assert not marker.exists()
    log = host_dir(workspace, "local2") / "run" / "agent.log"
    deadline = time.monotonic() + 10   # the agent logs from its connection thread
    while "unsuitable certificate purpose" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "TLS handshake" in log.read_text()
    assert "unsuitable certificate purpose" in log.read_text()


def test_a_client_certificate_that_is_not_the_coordinators_is_refused_by_role(
        workspace: Path, tmp_path: Path) -> None:
    """Behind the handshake, the agent's own role check: a certificate from the
    project CA that TLS accepts as a client (client-auth usage) but that is
    not the coordinator's (its name is a host's) is refused and logged."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pki_dir = workspace / "pki"
    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki._leaf((pki_dir / "ca.key").read_bytes(), (pki_dir / "ca.crt").read_bytes(),
                     key.public_key(), "local1", ["local1"], [], pki.ROLE_COORDINATOR, 1)
    assert pki.certificate_role(cert) != pki.ROLE_COORDINATOR
    (tmp_path / "impostor.crt").write_bytes(cert)
    (tmp_path / "impostor.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    target = endpoint(workspace, "local2")
    marker = tmp_path / "MARKER"
    with FrameClient(target.connect_address, target.port,
                     context_of(workspace, tmp_path / "impostor.crt", tmp_path / "impostor.key"),
                     server_hostname="local2", timeout=10) as client:
        with pytest.raises(RemoteError, match="only the coordinator may send requests"):
            client.request(Message("fit", {"task": "subprocess:Popen",
                                           "task_params": {"args": ["touch", str(marker)]}}))
    assert not marker.exists()
    log = host_dir(workspace, "local2") / "run" / "agent.log"
    deadline = time.monotonic() + 10
    while "refused" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "certificate 'local1'" in log.read_text()
    assert "only the coordinator may send requests" in log.read_text()


def test_the_coordinator_cannot_name_another_task(workspace: Path, tmp_path: Path) -> None:
    """Even the coordinator's requests cannot pick what runs: the task is fixed at deploy."""
    marker = tmp_path / "MARKER"
    with coordinator(workspace, "local2") as client:
        with pytest.raises(RemoteError, match="'subprocess:Popen' is not deployed"):
            client.fit([], "subprocess:Popen", {"args": ["touch", str(marker)]}, {})
        assert client.info()["task"] == "logreg"
    assert not marker.exists()


def test_train_with_a_task_that_is_not_deployed_says_to_redeploy(workspace: Path) -> None:
    result = run_cli("train", "-w", str(workspace), "--task", "mlp", "--rounds", "1")
    assert result.returncode == 6
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "task 'mlp' is not deployed on local1, local2, local3" in lines[0]
    assert "flctl deploy" in lines[0]


def short_lived(root: Path, name: str, days: float) -> None:
    """Replace a host's certificate with one for the same key and names that
    expires in `days` (as if it had been issued long ago)."""
    directory = host_dir(root, name)
    current = pki.certificate_info((directory / "agent.crt").read_bytes())
    csr = pki.make_csr((directory / "agent.key").read_bytes(), name, current["dns_names"],
                       current["ip_addresses"])
    cert = pki.sign_csr((root / "pki" / "ca.key").read_bytes(),
                        (root / "pki" / "ca.crt").read_bytes(), csr, host=name,
                        dns_names=current["dns_names"], ip_addresses=current["ip_addresses"],
                        days=days)
    (directory / "agent.crt").write_bytes(cert)


def steps(document: dict, host: str) -> dict[str, dict]:
    row = next(h for h in document["hosts"] if h["host"] == host)
    return {s["name"]: s for s in row["steps"]}


def test_deploy_renews_certificates_that_expire_soon(workspace: Path) -> None:
    short_lived(workspace, "local1", 10)
    ca_key = (workspace / "pki" / "ca.key").read_bytes()
    ca_cert = (workspace / "pki" / "ca.crt").read_bytes()
    key, cert = pki.coordinator_certificate(ca_key, ca_cert, days=5)
    (workspace / "pki" / "coordinator.key").write_bytes(key)
    (workspace / "pki" / "coordinator.crt").write_bytes(cert)
    status = run_cli("pki", "status", "-w", str(workspace), "--json").json()
    assert status["coordinator_renewal_due"].startswith("expires in")
    result = run_cli("deploy", "-w", str(workspace), "--json")
    assert result.returncode == 0, result.stderr
    document = result.json()
    renewed = steps(document, "local1")["certificate"]
    assert renewed["changed"] and "expires in" in renewed["detail"]
    assert not steps(document, "local2")["certificate"]["changed"]
    assert steps(document, "coordinator")["certificate"]["detail"].startswith("renewed: expires")
    for path in (host_dir(workspace, "local1") / "agent.crt", workspace / "pki" / "coordinator.crt"):
        assert pki.days_left(path.read_bytes()) > pki.RENEW_BEFORE_DAYS
    assert run_cli("train", "-w", str(workspace), "--rounds", "1").returncode == 0


def test_rotate_reissues_every_leaf_and_revokes_the_old_ones(workspace: Path) -> None:
    pki_dir = workspace / "pki"
    old_coordinator = (pki_dir / "coordinator.crt").read_bytes(), (pki_dir / "coordinator.key").read_bytes()
    keep = workspace.parent / "old-coordinator"
    keep.mkdir(exist_ok=True)
    (keep / "c.crt").write_bytes(old_coordinator[0])
    (keep / "c.key").write_bytes(old_coordinator[1])
    before = {name: (sha(host_dir(workspace, name) / "agent.key"),
                     sha(host_dir(workspace, name) / "agent.crt"))
              for name in ("local1", "local2", "local3")}
    result = run_cli("pki", "rotate", "-w", str(workspace), "--json")
    assert result.returncode == 0, result.stderr
    for name, (key, cert) in before.items():
        assert sha(host_dir(workspace, name) / "agent.key") != key     # new key, made there
        assert sha(host_dir(workspace, name) / "agent.crt") != cert
    assert (pki_dir / "coordinator.crt").read_bytes() != old_coordinator[0]
    # the old coordinator certificate is revoked: every agent refuses it now
    target = endpoint(workspace, "local3")
    stale = FrameClient(target.connect_address, target.port,
                        context_of(workspace, keep / "c.crt", keep / "c.key"),
                        server_hostname="local3", timeout=10)
    with pytest.raises(TransportError):
        stale.request(Message("info"))
    stale.close()
    listed = run_cli("pki", "status", "-w", str(workspace), "--json").json()["certificates"]
    assert sum(1 for c in listed if c.get("revocation_reason") == "rotated") >= HOSTS + 1
    assert run_cli("train", "-w", str(workspace), "--rounds", "1").returncode == 0


def test_revoke_makes_the_coordinator_and_the_agents_refuse_it(workspace: Path) -> None:
    crl = workspace / "pki" / "ca.crl"
    before = crl.read_bytes()
    revoked = run_cli("pki", "revoke", "local2", "-w", str(workspace), "--json")
    assert revoked.returncode == 0, revoked.stderr
    assert crl.read_bytes() != before
    for name in ("local1", "local3"):   # every other agent got the new list
        assert sha(host_dir(workspace, name) / "ca.crl") == sha(crl)
    trained = run_cli("train", "-w", str(workspace), "--rounds", "1", "--json")
    assert trained.returncode == 0, trained.stderr
    assert sorted(trained.json()["history"][0]["participants"]) == ["local1", "local3"]
    assert "local2: not answering" in trained.stderr and "revoked" in trained.stderr
    # a deploy gives it a new key and certificate; then it takes part again
    redeployed = run_cli("deploy", "-w", str(workspace), "--json")
    assert redeployed.returncode == 0, redeployed.stderr
    assert steps(redeployed.json(), "local2")["certificate"]["detail"] == \
        "issued: revoked, new key"
    again = run_cli("train", "-w", str(workspace), "--rounds", "1", "--json")
    assert sorted(again.json()["history"][0]["participants"]) == ["local1", "local2", "local3"]
    assert run_cli("pki", "revoke", "nosuch", "-w", str(workspace)).returncode == 2


LOUD_TASK = '''
from flctl.core.tasks import LogRegTask, TaskError


class Loud(LogRegTask):
    """Fails on one host with markup and escape sequences in its message (test-only)."""

    def __init__(self, loud_size=-1, **params):
        super().__init__(**params)
        self.loud_size = loud_size

    def fit(self, weights, data, config):
        if len(data.x_train) == self.loud_size:
            raise TaskError("[/bold] \\x1b[31mred\\x1b[0m \\x1b]0;pwned\\x07 [link=x]y[/link]")
        return super().fit(weights, data, config)
'''


def test_text_from_a_host_is_shown_literally(tmp_path: Path) -> None:
    def ship(root: Path) -> None:
        (root / "tasks" / "loud.py").write_text(LOUD_TASK)
        set_training(root, task="loud:Loud")

    for root in deployed_local_workspace(tmp_path / "loud", 2, ship):
        size = run_cli("status", "-w", str(root), "--json").json()["hosts"][0]["n_train"]
        set_training(root, task_params={"loud_size": size, "n_features": 64, "n_classes": 10},
                     min_hosts=1)
        result = run_cli("train", "-w", str(root), "--rounds", "1")
        assert result.returncode == 0, result.stderr
        shown = result.stdout + result.stderr
        assert "[/bold]" in shown and "red" in shown and "Traceback" not in shown
        assert "\x1b" not in shown and "\x07" not in shown   # no escape reaches the terminal
        # the agent's log, through `flctl logs`, is cleaned the same way
        log = host_dir(root, "local1") / "run" / "agent.log"
        log.write_text(log.read_text() + "\x1b]0;pwned\x07 [bold]x[/bold]\n")
        logs = run_cli("logs", "local1", "-w", str(root), "--lines", "5")
        assert "[bold]x[/bold]" in logs.stdout and "\x1b" not in logs.stdout


def test_pki_status_lists_roles_and_expiry(workspace: Path) -> None:
    listed = run_cli("pki", "status", "-w", str(workspace), "--json").json()["certificates"]
    current = [c for c in listed if not c["revoked_at"]]
    assert {c["role"] for c in current} == {"coordinator", "host"}
    assert all(c["days_left"] > 800 for c in current)
    table = run_cli("pki", "status", "-w", str(workspace))
    assert table.returncode == 0 and "local1" in table.stdout
