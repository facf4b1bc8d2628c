"""A real federation on this machine: agents are separate processes behind
mutual TLS, driven through the CLI exactly as a user would."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import time
from pathlib import Path

import numpy as np
import pytest

from flctl.agent.proc import is_alive
from flctl.core import pki
from flctl.core.layout import Endpoint
from flctl.net.agent_client import AgentClient
from flctl.net.client import TransportError
from flctl.net.tls import client_context

from helpers import run_cli, use_ports

HOSTS = 4


def wait_for(predicate, timeout: float = 20.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("federation")
    assert run_cli("init", str(root), "--local", str(HOSTS)).returncode == 0
    base = use_ports(root, HOSTS)
    deployed = run_cli("deploy", "-w", str(root), "--json")
    assert deployed.returncode == 0, deployed.stderr
    first = deployed.json()["hosts"]
    assert [h["status"] for h in first] == ["changed"] * HOSTS
    yield root, base
    run_cli("teardown", "-w", str(root))


def host_dir(root: Path, name: str) -> Path:
    return root / ".flctl" / "hosts" / name


def client_for(root: Path, base: int, index: int, timeout: float = 10.0) -> AgentClient:
    context = client_context(root / "pki" / "ca.crt", root / "pki" / "coordinator.crt",
                             root / "pki" / "coordinator.key")
    endpoint = Endpoint(f"local{index + 1}", "127.0.0.1", "127.0.0.1", base + index,
                        f"local{index + 1}")
    return AgentClient(endpoint, context, timeout=timeout)


def test_agent_keys_are_made_on_the_host_and_private(workspace) -> None:
    root, _ = workspace
    for index in range(HOSTS):
        directory = host_dir(root, f"local{index + 1}")
        assert (directory / "agent.key").stat().st_mode & 0o777 == 0o600
        cert = (directory / "agent.crt").read_bytes()
        assert pki.verify_issued_by(cert, (root / "pki" / "ca.crt").read_bytes())
        info = pki.certificate_info(cert)
        assert info["dns_names"] == [f"local{index + 1}"]
        assert "127.0.0.1" in info["ip_addresses"]


def test_redeploy_changes_nothing(workspace) -> None:
    root, _ = workspace
    pids = [(host_dir(root, f"local{i + 1}") / "run" / "supervisor.pid").read_text() for i in range(HOSTS)]
    again = run_cli("deploy", "-w", str(root), "--json")
    assert again.returncode == 0, again.stderr
    hosts = again.json()["hosts"]
    assert [(h["status"], h["changed"]) for h in hosts] == [("ok", 0)] * HOSTS
    after = [(host_dir(root, f"local{i + 1}") / "run" / "supervisor.pid").read_text() for i in range(HOSTS)]
    assert after == pids


def test_check_mode_reports_and_changes_nothing(workspace) -> None:
    root, _ = workspace
    directory = host_dir(root, "local2")
    config_before = (directory / "agent.json").read_text()
    (directory / "agent.json").write_text(config_before.replace('"project"', '"project" '))
    checked = run_cli("deploy", "-w", str(root), "--check", "--json", "--limit", "local2")
    assert checked.returncode == 0, checked.stderr
    [host] = checked.json()["hosts"]
    assert host["status"] == "changed"
    changed = {s["name"]: s["detail"] for s in host["steps"] if s["changed"]}
    assert set(changed) == {"agent config", "agent"}
    assert "would" in changed["agent"]
    assert (directory / "agent.json").read_text() != config_before  # untouched by --check
    fixed = run_cli("deploy", "-w", str(root), "--json", "--limit", "local2")
    [host] = fixed.json()["hosts"]
    assert {s["name"] for s in host["steps"] if s["changed"]} == {"agent config", "agent"}
    assert (directory / "agent.json").read_text() == config_before


def test_status_reports_every_agent(workspace) -> None:
    root, _ = workspace
    result = run_cli("status", "-w", str(root), "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["host"]: row for row in result.json()["hosts"]}
    assert set(rows) == {f"local{i + 1}" for i in range(HOSTS)}
    total = 0
    for row in rows.values():
        assert row["agent"] == "idle" and row["reachable"]
        assert row["n_train"] > 0 and row["agent_uptime_s"] >= 0
        total += row["n_train"] + row["n_test"]
    assert total == 1797  # the whole digits data set, split across hosts


def test_stats_over_the_local_hosts(workspace) -> None:
    """`flctl stats` through deployed agents: the digits' counts and labels
    add up to the pooled shards', and the table names the constant pixels."""
    from flctl.core.data import load_dataset

    root, _ = workspace
    result = run_cli("stats", "-w", str(root), "--json")
    assert result.returncode == 0, result.stderr
    document = result.json()
    shards = [load_dataset(root / "data" / f"local{i + 1}.npz") for i in range(HOSTS)]
    x = np.vstack([s.x_train for s in shards])
    assert document["rows"] == len(x) and len(document["features"]) == 64
    assert [f["mean"] for f in document["features"]] == pytest.approx(
        x.astype(np.float64).mean(axis=0).tolist(), abs=1e-6)
    totals: dict[str, int] = {}
    for counts in document["labels"].values():
        for label, n in counts.items():
            totals[label] = totals.get(label, 0) + n
    assert sum(totals.values()) == len(x)
    assert document["constant"] == ["x0", "x32", "x39"]
    assert "constant on every host" in result.stderr
    table = run_cli("stats", "-w", str(root))
    assert table.returncode == 0 and "skew" in table.stdout and "median" in table.stdout


def test_secure_stats_over_the_local_hosts(workspace) -> None:
    """`flctl stats --secure`: the same counts, means, stds and label totals as
    the plain statistics; min, max and per-host labels absent, and said so."""
    root, _ = workspace
    plain = run_cli("stats", "-w", str(root), "--json").json()
    result = run_cli("stats", "-w", str(root), "--secure", "--json")
    assert result.returncode == 0, result.stderr
    secure = result.json()
    assert secure["secure_aggregation"] is True and secure["rows"] == plain["rows"]
    for mine, theirs in zip(secure["features"], plain["features"]):
        assert (mine["count"], mine["missing"]) == (theirs["count"], theirs["missing"])
        assert mine["mean"] == pytest.approx(theirs["mean"], rel=1e-9, abs=1e-12)
        assert mine["std"] == pytest.approx(theirs["std"], rel=1e-9, abs=1e-12)
        assert mine["min"] is None and mine["max"] is None
    assert secure["label_totals"] == plain["label_totals"] and secure["labels"] == {}
    assert secure["constant"] == plain["constant"]
    assert "not computed under secure aggregation" in result.stderr
    table = run_cli("stats", "-w", str(root), "--secure")
    assert table.returncode == 0 and f"all {HOSTS} hosts" in table.stdout


def test_train_saves_weights_manifest_and_metrics(workspace) -> None:
    root, _ = workspace
    result = run_cli("train", "-w", str(root), "--rounds", "3", "--json")
    assert result.returncode == 0, result.stderr
    summary = result.json()
    run_dir = Path(summary["run_dir"])
    final = Path(summary["final_weights"])
    assert final == run_dir / "final.npz" and final.exists()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["weights_sha256"] == hashlib.sha256(final.read_bytes()).hexdigest()
    assert manifest["rounds"] == 3 and len(manifest["hosts"]) == HOSTS
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(len(r["participants"]) == HOSTS for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[0]["bytes_sent"] > 0 and records[0]["bytes_received"] > 0
    state = json.loads((run_dir / "state.json").read_text())
    assert state["round"] == 3
    assert state["checkpoint"] == "checkpoint-000003.npz"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*.npz")) == [state["checkpoint"]]
    with np.load(run_dir / state["checkpoint"]) as ckpt, np.load(final) as fin:
        for name in fin.files:
            np.testing.assert_array_equal(ckpt[name], fin[name])
    assert summary["accuracy"] > 0.5
    status = run_cli("status", "-w", str(root), "--json").json()
    assert {row["last_round"] for row in status["hosts"]} == {3}
    # the weights as other tools read them
    exported = run_cli("runs", "export", summary["run_id"], "-w", str(root), "--json").json()
    assert exported["path"] == str(run_dir / "export" / "final.safetensors")
    from safetensors.numpy import load_file
    with np.load(final) as fin:
        assert {k: v.tobytes() for k, v in load_file(exported["path"]).items()} == {
            k: fin[k].tobytes() for k in fin.files}
    wrong = run_cli("runs", "export", summary["run_id"], "-w", str(root), "--format", "onnx")
    assert wrong.returncode != 0 and "unknown format 'onnx'" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1


def test_killed_agent_is_restarted_by_its_supervisor(workspace) -> None:
    root, base = workspace
    pidfile = host_dir(root, "local3") / "run" / "agent.pid"
    old = int(pidfile.read_text())
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: (int(pidfile.read_text()) if pidfile.exists() else 0) not in (0, old)
                   and int(pidfile.read_text()))
    assert is_alive(new) and not is_alive(old)

    def answers():
        try:
            with client_for(root, base, 2) as client:
                return client.info()
        except TransportError:
            return None

    info = wait_for(answers)
    assert info["pid"] == new and info["name"] == "local3"


def test_garbage_closes_one_connection_not_the_agent(workspace) -> None:
    root, base = workspace
    rng = np.random.default_rng(7)
    context = client_context(root / "pki" / "ca.crt", root / "pki" / "coordinator.crt",
                             root / "pki" / "coordinator.key")
    with client_for(root, base, 0) as steady:
        assert steady.info()["name"] == "local1"
        for case in range(20):
            raw = socket.create_connection(("127.0.0.1", base), timeout=5)
            if case % 2:  # plain TCP garbage at a TLS port
                raw.sendall(rng.bytes(64))
                raw.close()
                continue
            tls = context.wrap_socket(raw, server_hostname="local1")
            tls.sendall(b"FLCT" + rng.bytes(int(rng.integers(1, 200))))
            tls.settimeout(5)
            try:
                while tls.recv(4096):
                    pass
            except (OSError, ssl.SSLError):
                pass
            tls.close()
        assert steady.info()["name"] == "local1"  # the open connection still works
    with client_for(root, base, 0) as fresh:
        assert fresh.info()["name"] == "local1"


def test_a_foreign_ca_is_refused(workspace, tmp_path: Path) -> None:
    root, base = workspace
    ca_key, ca_cert = pki.make_ca("intruder")
    key, cert = pki.issue_certificate(ca_key, ca_cert, "coordinator", ["coordinator"])
    for name, data in (("ca.crt", ca_cert), ("c.crt", cert), ("c.key", key)):
        (tmp_path / name).write_bytes(data)
    # the intruder trusts our agent's CA so that only the agent's check can refuse
    context = client_context(root / "pki" / "ca.crt", tmp_path / "c.crt", tmp_path / "c.key")
    endpoint = Endpoint("local1", "127.0.0.1", "127.0.0.1", base, "local1")
    with pytest.raises(TransportError):
        with AgentClient(endpoint, context, timeout=5) as client:
            client.info()


def test_missing_data_fails_that_host_only(tmp_path: Path) -> None:
    assert run_cli("init", str(tmp_path), "--local", "2").returncode == 0
    use_ports(tmp_path, 2)
    try:
        (tmp_path / "data" / "local2.npz").write_bytes(b"not an npz")
        result = run_cli("deploy", "-w", str(tmp_path), "--json")
        assert result.returncode == 5
        hosts = {h["host"]: h for h in result.json()["hosts"]}
        assert hosts["local1"]["status"] == "changed"
        assert hosts["local2"]["status"] == "failed"
        assert "local2.npz" in hosts["local2"]["error"]
        assert "Traceback" not in result.stderr
    finally:
        run_cli("teardown", "-w", str(tmp_path))


def test_teardown_removes_everything_and_is_repeatable(tmp_path: Path) -> None:
    assert run_cli("init", str(tmp_path), "--local", "2").returncode == 0
    use_ports(tmp_path, 2)
    assert run_cli("deploy", "-w", str(tmp_path)).returncode == 0
    pids = []
    for name in ("local1", "local2"):
        for pidfile in ("supervisor.pid", "agent.pid"):
            pids.append(int((host_dir(tmp_path, name) / "run" / pidfile).read_text()))
    first = run_cli("teardown", "-w", str(tmp_path), "--json")
    assert first.returncode == 0, first.stderr
    assert [h["status"] for h in first.json()["hosts"]] == ["changed", "changed"]
    wait_for(lambda: not any(is_alive(pid) for pid in pids), timeout=10)
    assert not any(host_dir(tmp_path, name).exists() for name in ("local1", "local2"))
    second = run_cli("teardown", "-w", str(tmp_path), "--json")
    assert second.returncode == 0
    assert [h["status"] for h in second.json()["hosts"]] == ["ok", "ok"]
    assert (tmp_path / "data" / "local1.npz").exists()  # the user's data is not ours to delete
