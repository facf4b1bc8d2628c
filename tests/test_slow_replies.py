"""A host that trickles its reply cannot hold the coordinator's memory.

The coordinator reserves a slot (memory for one update) when a reply's head
arrives; a host that then sends its body a byte a second would keep that
slot until the round's deadline, and with two such hosts every slot is
theirs and the honest hosts wait. `flctl train` (flctl.coordinator.session)
sets a minimum body rate, so the tricklers are cut after the grace period,
their slots come back and the round goes on with the others.

The agents here are in-test servers (the real request handler behind
mutual TLS with the workspace's CA) at the workspace's endpoints; two of
them send their fit reply's head at once and then trickle its body.
"""

from __future__ import annotations

import time
from pathlib import Path

from flctl.agent.requests import RequestHandler
from flctl.coordinator.session import endpoints_for, train_workspace
from flctl.core import pki
from flctl.core.agentconfig import AgentConfig
from flctl.core.messages import Message, body_views, encode_head
from flctl.net.server import FrameServer
from flctl.net.tls import server_context
from flctl.workspace import init_workspace, load_workspace

from helpers import use_ports

TRICKLE_EVERY_S = 1.0
DEADLINE_S = 60.0


class Trickler(FrameServer):
    """Sends a fit reply's head at once, then its body a byte a second."""

    def _handle_with_heartbeats(self, tls, request, peer):
        reply = self._handle(request, peer)
        if reply.kind != "fit_result":
            return reply
        try:
            tls.sendall(encode_head(reply))
            for view in body_views(reply):
                for byte in bytes(view):
                    if self._stopping.wait(TRICKLE_EVERY_S):
                        break
                    tls.sendall(bytes([byte]))
        except OSError:
            pass   # cut by the coordinator: what this test wants
        return Message("error", {"error": "trickled"})   # goes nowhere once cut


class Slow(FrameServer):
    """An honest agent that answers a fit a second late (the tricklers' heads go first)."""

    def _handle(self, request, peer):
        if request.kind == "fit":
            time.sleep(1.0)
        return super()._handle(request, peer)


def agents(root: Path, tricklers: set[str]) -> list[FrameServer]:
    workspace = load_workspace(root)
    pki_dir = root / "pki"
    ca_key, ca_cert = (pki_dir / "ca.key").read_bytes(), (pki_dir / "ca.crt").read_bytes()
    servers = []
    for endpoint in endpoints_for(workspace, workspace.inventory.hosts):
        name = endpoint.host
        key, cert = pki.issue_certificate(ca_key, ca_cert, name, [name], ["127.0.0.1"])
        (root / f"{name}.key").write_bytes(key)
        (root / f"{name}.crt").write_bytes(cert)
        config = AgentConfig(name=name, project="demo", bind_address="127.0.0.1",
                             port=endpoint.port, ca_cert=str(pki_dir / "ca.crt"),
                             cert=str(root / f"{name}.crt"), key=str(root / f"{name}.key"),
                             data_path=str(root / "data" / f"{name}.npz"),
                             state_file=str(root / f"{name}.state"), task="logreg",
                             tasks_dir=str(root / "tasks"))
        service = RequestHandler(config)
        kind = Trickler if name in tricklers else Slow
        server = kind("127.0.0.1", endpoint.port,
                      server_context(pki_dir / "ca.crt", root / f"{name}.crt",
                                     root / f"{name}.key"),
                      service.handle, receiver=service.transfers.receiver)
        server.start()
        servers.append(server)
    return servers


def test_hosts_that_trickle_their_reply_are_cut_and_give_their_slots_back(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    init_workspace(root, local_hosts=4)
    use_ports(root, 4)
    servers = agents(root, {"local2", "local3"})
    workspace = load_workspace(root)
    training = workspace.settings.with_training(
        rounds=1, epochs=1, min_hosts=2, deadline_s=DEADLINE_S, standardize="off").training
    messages: list[str] = []
    started = time.monotonic()
    try:
        summary = train_workspace(workspace, training, list(workspace.inventory.hosts),
                                  on_message=messages.append)
    finally:
        for server in servers:
            server.stop()
    took = time.monotonic() - started
    [record] = summary.history
    # the honest hosts got the slots the tricklers held, long before the deadline
    assert record.participants == ["local1", "local4"], (record, messages)
    assert took < DEADLINE_S / 2, took
    for name in ("local2", "local3"):
        assert "too slowly" in record.dropped[name], record.dropped
