"""Framing, TLS server/client and hostile peers, all on 127.0.0.1 only."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flctl.core import pki
from flctl.core.messages import MAGIC, PROTOCOL_VERSION, Limits, Message, encode_head
from flctl.errors import ProtocolError
from flctl.net.client import FrameClient, RemoteError, TransportError
from flctl.net.framing import ConnectionClosed, recv_message, send_message
from flctl.net.server import FrameServer, PeerInfo
from flctl.net.tls import client_context, peer_common_name, server_context

LOOPBACK = "127.0.0.1"
PRELUDE = struct.Struct("!4sB3xIQ")


# -- certificates -------------------------------------------------------------
class Certs:
    def __init__(self, root: Path) -> None:
        self.root = root
        ca_key, self.ca = pki.make_ca("flctl test CA")
        self._write("ca.crt", self.ca)
        self._pair("agent", *pki.issue_certificate(ca_key, self.ca, "agent-1",
                                                   ["localhost"], [LOOPBACK]))
        self._pair("coord", *pki.coordinator_certificate(ca_key, self.ca))
        self._pair("host2", *pki.issue_certificate(ca_key, self.ca, "agent-2", ["agent-2"]))
        self._pair("revoked", *pki.coordinator_certificate(ca_key, self.ca))
        revoked = pki.certificate_info(self.path("revoked.crt").read_bytes())["serial"]
        self._write("ca.crl", pki.make_crl(ca_key, self.ca, [revoked]))
        # Same CN as the real CA: only the signature tells them apart.
        foreign_key, foreign_ca = pki.make_ca("flctl test CA")
        self._write("foreign-ca.crt", foreign_ca)
        self._pair("foreign", *pki.issue_certificate(foreign_key, foreign_ca, "coordinator",
                                                     ["localhost"], [LOOPBACK],
                                                     role=pki.ROLE_COORDINATOR))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def _pair(self, name: str, key: bytes, cert: bytes) -> None:
        self._write(f"{name}.key", key)
        self._write(f"{name}.crt", cert)

    def path(self, name: str) -> Path:
        return self.root / name

    def server_ctx(self, crl: bool = False) -> ssl.SSLContext:
        return server_context(self.path("ca.crt"), self.path("agent.crt"), self.path("agent.key"),
                              self.path("ca.crl") if crl else None)

    def client_ctx(self, who: str = "coord", trust: str = "ca.crt") -> ssl.SSLContext:
        return client_context(self.path(trust), self.path(f"{who}.crt"), self.path(f"{who}.key"))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("pki"))


class Recorder:
    """Echo handler that remembers every call (to prove rejected peers never reach it)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, PeerInfo]] = []
        self.lock = threading.Lock()

    def __call__(self, msg: Message, peer: PeerInfo) -> Message:
        with self.lock:
            self.calls.append((msg.kind, peer))
        if msg.kind == "boom":
            raise ValueError("handler exploded")
        if msg.kind == "bad-reply":
            return Message("ok", {}, [np.array(["str"])])
        if msg.kind == "ack":
            return Message("ack", {"n": len(msg.arrays), "nbytes": msg.body_bytes})
        return Message("echo", {**msg.meta, "peer": peer.common_name}, msg.arrays)


@pytest.fixture()
def server(certs: Certs):
    handler = Recorder()
    srv = FrameServer(LOOPBACK, 0, certs.server_ctx(), handler, handshake_timeout=5.0)
    srv.handler_recorder = handler  # type: ignore[attr-defined]
    srv.start()
    yield srv
    srv.stop()


def client_for(srv: FrameServer, certs: Certs, **kw) -> FrameClient:
    host, port = srv.address
    return FrameClient(host, port, certs.client_ctx(**kw), server_hostname=LOOPBACK, timeout=10)


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(2.5),
    np.zeros((0, 3), dtype=np.int32),
    np.array([True, False]),
    np.arange(-3, 3, dtype=np.int8),
    np.array([2**63 + 1], dtype=np.uint64),
    np.ones((2, 2, 2), dtype=np.float16),
]


# -- framing on a socketpair ---------------------------------------------------
def test_framing_roundtrip_socketpair() -> None:
    a, b = socket.socketpair()
    with a, b:
        sent = send_message(a, Message("m", {"x": "ü"}, ARRAYS))
        got, received = recv_message(b)
        assert sent == received == len(encode_head(Message("m", {"x": "ü"}, ARRAYS))) + sum(
            x.nbytes for x in ARRAYS)
        assert got.meta == {"x": "ü"}
        for g, w in zip(got.arrays, ARRAYS):
            assert g.dtype == w.dtype and g.shape == w.shape
            assert g.flags.c_contiguous and g.flags.writeable
            np.testing.assert_array_equal(g, w)


def test_send_does_not_concatenate_or_copy() -> None:
    class CaptureSocket:
        def __init__(self) -> None:
            self.chunks: list[object] = []

        def sendall(self, data: object) -> None:
            self.chunks.append(data)

    arrays = [np.random.default_rng(1).random(1000, dtype=np.float32), np.arange(50)]
    sock = CaptureSocket()
    send_message(sock, Message("m", {}, arrays))  # type: ignore[arg-type]
    assert len(sock.chunks) == 1 + len(arrays)
    for chunk, arr in zip(sock.chunks[1:], arrays):
        assert isinstance(chunk, memoryview)
        assert np.shares_memory(np.frombuffer(chunk, np.uint8), arr)


def test_recv_fills_caller_buffers_in_place() -> None:
    buffers = [np.zeros((256, 64), dtype=np.float32), np.zeros(7, dtype=np.int16)]
    payload = [np.random.default_rng(2).random((256, 64), dtype=np.float32),
               np.arange(7, dtype=np.int16)]
    a, b = socket.socketpair()
    with a, b:
        threading.Thread(target=send_message, args=(a, Message("m", {}, payload))).start()
        got, _ = recv_message(b, receive=lambda specs: buffers)
    for g, buf, want in zip(got.arrays, buffers, payload):
        assert g is buf
        np.testing.assert_array_equal(buf, want)


def test_allocate_returning_wrong_buffers_is_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_message(a, Message("m", {}, [np.zeros(4, dtype=np.float32)]))
        with pytest.raises(ValueError):
            recv_message(b, receive=lambda specs: [np.zeros(4, dtype=np.float64)])


def test_a_trickled_body_cannot_hold_its_buffer() -> None:
    """Once buffers are reserved for a body, it must keep up a minimum rate: a peer
    sending a byte now and then (never silent for a whole timeout) is cut off."""
    a, b = socket.socketpair()
    with a, b:
        msg = Message("m", {}, [np.zeros(1 << 16, dtype=np.uint8)])
        a.sendall(encode_head(msg))
        b.settimeout(5)
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.05):
                try:
                    a.send(b"\0")
                except OSError:
                    return

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        limits = Limits(min_body_rate=1 << 20, body_grace_s=0.3)
        started = time.monotonic()
        try:
            with pytest.raises(ProtocolError, match="too slowly"):
                recv_message(b, limits)
        finally:
            stop.set()
            thread.join()
        assert time.monotonic() - started < 3
        # an honest body at full speed is unaffected by the floor
        c, d = socket.socketpair()
        with c, d:
            send_message(c, msg)
            assert recv_message(d, limits)[0].arrays[0].nbytes == 1 << 16


def test_clean_and_dirty_eof() -> None:
    a, b = socket.socketpair()
    a.close()
    with b, pytest.raises(ConnectionClosed) as info:
        recv_message(b)
    assert info.value.clean is True
    a, b = socket.socketpair()
    data = encode_head(Message("m", {}, [np.zeros(10)]))
    a.sendall(data + b"\0" * 5)
    a.close()
    with b, pytest.raises(ConnectionClosed) as info:
        recv_message(b)
    assert info.value.clean is False
    assert isinstance(info.value, ProtocolError)


# -- TLS request/response -------------------------------------------------------
def test_tls_roundtrip_and_counters(server: FrameServer, certs: Certs) -> None:
    meta = {"round": 1, "text": "δ模型"}
    with client_for(server, certs) as client:
        reply = client.request(Message("update", meta, ARRAYS))
        assert reply.kind == "echo"
        assert reply.meta == {**meta, "peer": "coordinator"}
        for g, w in zip(reply.arrays, ARRAYS):
            assert g.dtype == w.dtype and g.shape == w.shape and g.flags.writeable
            np.testing.assert_array_equal(g, w)
        ack = client.request(Message("ack"))
        assert ack.meta == {"n": 0, "nbytes": 0}
    recorder = server.handler_recorder  # type: ignore[attr-defined]
    assert [k for k, _ in recorder.calls] == ["update", "ack"]
    assert recorder.calls[0][1].common_name == "coordinator"
    assert recorder.calls[0][1].address[0] == LOOPBACK
    assert server.connections_total == 1
    assert server.protocol_errors_total == server.handshake_failures_total == 0


def test_the_server_holds_no_request_while_it_waits_for_the_next(certs: Certs) -> None:
    """Once a reply is sent, the server keeps nothing of the request: the
    agent receives the next model into the last one's buffers only when
    nothing holds them (agent.transfers)."""
    import weakref

    seen: list[weakref.ref] = []

    def handler(msg: Message, peer: PeerInfo) -> Message:
        seen.append(weakref.ref(msg.arrays[0]))
        return Message("ack")

    srv = FrameServer(LOOPBACK, 0, certs.server_ctx(), handler, handshake_timeout=5.0)
    srv.start()
    try:
        with client_for(srv, certs) as client:
            client.request(Message("fit", {}, [np.ones(1000, np.float32)]))
            # the connection stays open, its thread waiting for the next request
            assert wait_for(lambda: seen[0]() is None), "the request is still held"
    finally:
        srv.stop()


def test_byte_counters_match_frames(server: FrameServer, certs: Certs) -> None:
    msg = Message("ack", {}, [np.zeros(1000, dtype=np.float32)])
    with client_for(server, certs) as client:
        client.request(msg)
        expected_sent = len(encode_head(msg)) + 4000
        assert client.bytes_sent == expected_sent
        assert client.bytes_received == len(encode_head(Message("ack", {"n": 1, "nbytes": 4000})))


def test_handler_error_keeps_connection(server: FrameServer, certs: Certs) -> None:
    with client_for(server, certs) as client:
        with pytest.raises(RemoteError, match="handler exploded"):
            client.request(Message("boom"))
        with pytest.raises(RemoteError, match="invalid"):
            client.request(Message("bad-reply"))
        assert client.request(Message("ack")).kind == "ack"
    assert server.connections_total == 1
    assert server.protocol_errors_total == 0


def test_large_model_roundtrip(server: FrameServer, certs: Certs) -> None:
    model = np.random.default_rng(3).random(2_000_000, dtype=np.float32)  # 8 MB
    with client_for(server, certs) as client:
        reply = client.request(Message("update", {}, [model]))
    np.testing.assert_array_equal(reply.arrays[0], model)


def test_server_stop_closes_connections(certs: Certs) -> None:
    srv = FrameServer(LOOPBACK, 0, certs.server_ctx(), Recorder())
    srv.start()
    client = client_for(srv, certs)
    client.request(Message("ack"))
    assert wait_for(lambda: srv.active_connections == 1)
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 3
    assert srv.active_connections == 0
    with pytest.raises(TransportError):
        client.request(Message("ack"))
    client.close()
    with pytest.raises(TransportError):
        client_for(srv, certs).connect()


def test_peer_common_name_on_client_side(server: FrameServer, certs: Certs) -> None:
    raw = socket.create_connection(server.address, timeout=5)
    with certs.client_ctx().wrap_socket(raw, server_hostname=LOOPBACK) as tls:
        assert peer_common_name(tls) == "agent-1"
        assert tls.version() == "TLSv1.3"


# -- handshake refusals ---------------------------------------------------------
def test_foreign_ca_client_is_refused(server: FrameServer, certs: Certs) -> None:
    client = client_for(server, certs, who="foreign")
    with pytest.raises(TransportError) as info:
        client.connect()
        client.request(Message("ack"))
    assert isinstance(info.value, OSError)
    assert "certificate" in str(info.value)
    assert isinstance(info.value.__cause__, (ssl.SSLError, ConnectionError, ConnectionClosed))
    assert wait_for(lambda: server.handshake_failures_total == 1)
    assert server.handler_recorder.calls == []  # type: ignore[attr-defined]


def test_a_host_certificate_cannot_be_a_client(server: FrameServer, certs: Certs) -> None:
    """Another host's certificate (server auth only) fails the handshake with an agent."""
    client = client_for(server, certs, who="host2")
    with pytest.raises(TransportError):
        client.connect()
        client.request(Message("ack"))
    assert wait_for(lambda: server.handshake_failures_total == 1)
    assert server.handler_recorder.calls == []  # type: ignore[attr-defined]


def test_the_agent_serves_only_the_coordinator_role(certs: Certs) -> None:
    """Even a peer OpenSSL lets through (here: a client-only certificate under a
    host's name) is refused before a request is read, and logged."""
    ca_key, ca = pki.make_ca("role test CA")
    root = certs.root / "roles"
    root.mkdir(exist_ok=True)
    for name, (key, cert) in {
            "agent": pki.issue_certificate(ca_key, ca, "agent-1", ["localhost"], [LOOPBACK]),
            "coord": pki.coordinator_certificate(ca_key, ca),
            "impostor": pki.issue_certificate(ca_key, ca, "agent-2", role=pki.ROLE_COORDINATOR),
    }.items():
        (root / f"{name}.key").write_bytes(key)
        (root / f"{name}.crt").write_bytes(cert)
    (root / "ca.crt").write_bytes(ca)
    from flctl.agent import trust
    from flctl.core.agentconfig import AgentConfig

    config = AgentConfig(name="agent-1", project="p", bind_address=LOOPBACK, port=0,
                         ca_cert="", cert="", key="", data_path="", state_file="")
    handler = Recorder()
    srv = FrameServer(LOOPBACK, 0, server_context(root / "ca.crt", root / "agent.crt",
                                                  root / "agent.key"),
                      handler, handshake_timeout=5.0, authorize=trust.authorizer(config))
    srv.start()
    try:
        def client(who: str) -> FrameClient:
            ctx = client_context(root / "ca.crt", root / f"{who}.crt", root / f"{who}.key")
            return FrameClient(*srv.address, ctx, server_hostname=LOOPBACK, timeout=10)

        with pytest.raises(RemoteError, match="only the coordinator may send requests"):
            client("impostor").request(Message("ack"))
        assert srv.unauthorized_total == 1 and handler.calls == []
        with client("coord") as ok:
            assert ok.request(Message("ack")).kind == "ack"
    finally:
        srv.stop()


def test_a_request_kind_the_peer_may_not_send_is_refused_before_its_body(certs: Certs) -> None:
    """admit: asked at the head of each request (and for requests without
    arrays); a refused one is answered and its connection closed, unhandled."""
    handler = Recorder()
    srv = FrameServer(LOOPBACK, 0, certs.server_ctx(), handler, handshake_timeout=5.0,
                      admit=lambda kind, peer: None if kind == "ack" else f"not {kind}")
    srv.start()
    try:
        with client_for(srv, certs) as ok:
            assert ok.request(Message("ack", {}, [np.zeros(4, np.float32)])).kind == "ack"
        for message in (Message("evaluate", {}, [np.zeros(4, np.float32)]), Message("info")):
            with client_for(srv, certs) as refused:
                with pytest.raises(RemoteError, match=f"refused: not {message.kind}"):
                    refused.request(message)
        assert srv.unauthorized_total == 2
        assert [kind for kind, _ in handler.calls] == ["ack"]
    finally:
        srv.stop()


def test_a_revoked_certificate_is_refused(certs: Certs) -> None:
    srv = FrameServer(LOOPBACK, 0, certs.server_ctx(crl=True), Recorder(), handshake_timeout=5.0)
    srv.start()
    try:
        revoked = client_for(srv, certs, who="revoked")
        with pytest.raises(TransportError):
            revoked.connect()
            revoked.request(Message("ack"))
        assert wait_for(lambda: srv.handshake_failures_total == 1)
        with client_for(srv, certs) as fine:   # the CRL does not stop the others
            assert fine.request(Message("ack")).kind == "ack"
    finally:
        srv.stop()


def test_client_without_certificate_is_refused(server: FrameServer, certs: Certs) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs.path("ca.crt"))
    host, port = server.address
    client = FrameClient(host, port, ctx, server_hostname=LOOPBACK, timeout=10)
    with pytest.raises(TransportError):
        client.connect()
        client.request(Message("ack"))
    assert wait_for(lambda: server.handshake_failures_total == 1)
    assert server.handler_recorder.calls == []  # type: ignore[attr-defined]


def test_client_refuses_server_from_foreign_ca(server: FrameServer, certs: Certs) -> None:
    client = client_for(server, certs, trust="foreign-ca.crt", who="foreign")
    with pytest.raises(TransportError) as info:
        client.connect()
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert server.handler_recorder.calls == []  # type: ignore[attr-defined]


def test_client_checks_server_hostname(server: FrameServer, certs: Certs) -> None:
    host, port = server.address
    client = FrameClient(host, port, certs.client_ctx(), server_hostname="agent-2.lab")
    with pytest.raises(TransportError) as info:
        client.connect()
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.0\r\n\r\n",
    b"\x16\x03\x01\x00\x05hello",  # looks like a TLS record, is not
    bytes(range(256)) * 4,
], ids=["http", "fake-tls-record", "binary"])
def test_plain_tcp_garbage_is_dropped(server: FrameServer, certs: Certs, garbage: bytes) -> None:
    with socket.create_connection(server.address, timeout=5) as raw:
        try:
            raw.sendall(garbage)
            raw.shutdown(socket.SHUT_WR)
            while raw.recv(4096):
                pass
        except OSError:  # the server may already have reset the connection
            pass
    assert wait_for(lambda: server.handshake_failures_total == 1)
    with client_for(server, certs) as client:
        assert client.request(Message("ack")).kind == "ack"


def test_silent_client_does_not_block_others(certs: Certs) -> None:
    srv = FrameServer(LOOPBACK, 0, certs.server_ctx(), Recorder(), handshake_timeout=1.5)
    srv.start()
    try:
        silent = [socket.create_connection(srv.address, timeout=5) for _ in range(3)]
        started = time.monotonic()
        with client_for(srv, certs) as client:
            assert client.request(Message("ack")).kind == "ack"
        assert time.monotonic() - started < 1.0  # served while the silent ones wait
        for sock in silent:  # the server hangs up on them after the handshake timeout
            sock.settimeout(5)
            assert sock.recv(1) == b""
            sock.close()
        assert wait_for(lambda: srv.handshake_failures_total == 3)
    finally:
        srv.stop()


def test_idle_timeout_closes_connection(certs: Certs) -> None:
    srv = FrameServer(LOOPBACK, 0, certs.server_ctx(), Recorder(), idle_timeout=0.3)
    srv.start()
    try:
        client = client_for(srv, certs)
        client.request(Message("ack"))
        assert wait_for(lambda: srv.active_connections == 0, timeout=3)
        with pytest.raises(TransportError):
            client.request(Message("ack"))
        assert client.request(Message("ack")).kind == "ack"  # caller reconnects
        client.close()
    finally:
        srv.stop()


# -- hostile frames after a good handshake --------------------------------------
def _header(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _raw(header: bytes, body_len: int, *, magic: bytes = MAGIC,
         version: int = PROTOCOL_VERSION, header_len: int | None = None) -> bytes:
    return PRELUDE.pack(magic, version, len(header) if header_len is None else header_len,
                        body_len) + header


def _valid_frame(rng: np.random.Generator) -> bytes:
    arr = rng.random(int(rng.integers(0, 64)), dtype=np.float32)
    msg = Message("ack", {"i": int(rng.integers(0, 1000))}, [arr])
    return encode_head(msg) + arr.tobytes()


def fuzz_cases(rng: np.random.Generator, n: int) -> list[tuple[str, bytes]]:
    """(label, bytes) pairs that must each cost the sender its connection."""
    makers = {
        "random": lambda: rng.bytes(int(rng.integers(1, 400))),
        "magic": lambda: _raw(_header({"kind": "x"}), 0, magic=rng.bytes(4).replace(b"F", b"G")),
        "version": lambda: _raw(_header({"kind": "x"}), 0,
                                version=int(rng.choice([0, 2, 3, 255]))),
        "huge-header": lambda: _raw(b"", 0, header_len=int(rng.integers(1 << 17, 1 << 32))),
        "huge-body": lambda: _raw(_header({"kind": "x", "arrays": [
            {"dtype": "|u1", "shape": [1 << 30]}]}), 1 << 30),
        "huge-body-u64": lambda: _raw(_header({"kind": "x"}), int(rng.integers(1 << 62, 1 << 63))),
        "zero-header": lambda: _raw(b"", 0),
        "bad-json": lambda: _raw(b"{" + rng.bytes(int(rng.integers(1, 50))), 0),
        "not-object": lambda: _raw(_header([1, 2, 3]), 0),
        "no-kind": lambda: _raw(_header({"meta": {}}), 0),
        "bad-dtype": lambda: _raw(_header({"kind": "x", "arrays": [{"dtype": str(rng.choice(
            ["|O", ">f4", "<U8", "|V4", "<c8", "<M8[s]", "f4", ""])), "shape": [1]}]}), 8),
        "mismatch": lambda: _raw(_header({"kind": "x", "arrays": [
            {"dtype": "<f4", "shape": [int(rng.integers(1, 100))]}]}), int(rng.integers(0, 4))),
        "negative-dim": lambda: _raw(_header({"kind": "x", "arrays": [
            {"dtype": "<f4", "shape": [-int(rng.integers(1, 9))]}]}), 0),
        "too-many-dims": lambda: _raw(_header({"kind": "x", "arrays": [
            {"dtype": "<f4", "shape": [1] * 9}]}), 4),
        "truncated": lambda: (lambda f: f[: int(rng.integers(1, len(f)))])(_valid_frame(rng)),
        "valid-then-garbage": lambda: _valid_frame(rng) + b"XXXX" + rng.bytes(30),
        "flipped-byte": lambda: (lambda f: f[:4] + bytes([f[4] ^ 0xFF]) + f[5:])(_valid_frame(rng)),
    }
    labels = sorted(makers)
    return [(label, makers[label]()) for label in (labels * (n // len(labels) + 1))[:n]]


def _send_and_expect_hangup(ctx: ssl.SSLContext, address: tuple[str, int],
                            data: bytes) -> bytes:
    """Send hostile bytes over a good TLS session; return what came back before EOF."""
    raw = socket.create_connection(address, timeout=5)
    with ctx.wrap_socket(raw, server_hostname=LOOPBACK) as tls:
        tls.sendall(data)
        socket.socket.shutdown(tls, socket.SHUT_WR)  # EOF below TLS: truncation is final
        received = bytearray()
        try:
            while chunk := tls.recv(65536):
                received += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
        return bytes(received)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_fuzzed_frames_close_only_that_connection(certs: Certs) -> None:
    allocations: list[int] = []

    def counting_allocate(specs):
        allocations.append(sum(s.nbytes for s in specs))
        return [np.empty(s.shape, s.dtype) for s in specs]

    handler = Recorder()
    limits = Limits(max_header_bytes=1 << 16, max_body_bytes=64 << 20)
    srv = FrameServer(LOOPBACK, 0, certs.server_ctx(), handler, limits=limits,
                      handshake_timeout=5.0, allocate=counting_allocate)
    srv.start()
    ctx = certs.client_ctx()
    rng = np.random.default_rng(20240601)
    cases = fuzz_cases(rng, 340)
    rss_before = _rss_bytes()
    started = time.monotonic()
    try:
        with client_for(srv, certs) as good:  # one long-lived, well-behaved peer
            for i, (label, data) in enumerate(cases):
                before_alloc = len(allocations)
                reply = _send_and_expect_hangup(ctx, srv.address, data)
                # The server may alert the client before it has counted: wait, bounded.
                assert wait_for(lambda n=i + 1: srv.protocol_errors_total >= n), label
                assert srv.protocol_errors_total == i + 1, label
                if label.startswith("huge") or label in ("mismatch", "bad-dtype"):
                    assert len(allocations) == before_alloc, label  # refused before allocating
                if label == "version":
                    # The peer is told why before the hang-up, naming both versions.
                    assert b"version" in reply and str(PROTOCOL_VERSION).encode() in reply
                if i % 20 == 0:
                    arr = rng.random(100, dtype=np.float32)
                    echoed = good.request(Message("echo", {"i": i}, [arr]))
                    np.testing.assert_array_equal(echoed.arrays[0], arr)
            assert good.request(Message("ack")).kind == "ack"
        assert time.monotonic() - started < 60
        assert _rss_bytes() - rss_before < 200 << 20
        assert max(allocations) < 1 << 20
        assert srv.handshake_failures_total == 0
        assert {k for k, _ in handler.calls} <= {"ack", "echo"}
        assert wait_for(lambda: srv.active_connections == 0)
    finally:
        srv.stop()


def test_oversize_body_refused_before_reading(certs: Certs) -> None:
    """Declaring 1 GiB must be refused at once, without the server waiting for the bytes."""
    srv = FrameServer(LOOPBACK, 0, certs.server_ctx(), Recorder(),
                      limits=Limits(max_body_bytes=16 << 20))
    srv.start()
    try:
        raw = socket.create_connection(srv.address, timeout=5)
        with certs.client_ctx().wrap_socket(raw, server_hostname=LOOPBACK) as tls:
            header = _header({"kind": "x", "arrays": [{"dtype": "<f4", "shape": [1 << 28]}]})
            tls.sendall(_raw(header, 1 << 30))  # no body follows; we do not close either
            got, _ = recv_message(tls)
            assert got.kind == "error" and "exceeds limit" in got.meta["error"]
            with pytest.raises(ConnectionClosed):
                recv_message(tls)
        assert srv.protocol_errors_total == 1
    finally:
        srv.stop()


def test_allocate_may_refuse_frames(certs: Certs) -> None:
    def refuse_big(specs):
        if sum(s.nbytes for s in specs) > 1000:
            raise ProtocolError("model too large for this round")
        return [np.empty(s.shape, s.dtype) for s in specs]

    srv = FrameServer(LOOPBACK, 0, certs.server_ctx(), Recorder(), allocate=refuse_big)
    srv.start()
    try:
        with client_for(srv, certs) as client:
            assert client.request(Message("ack", {}, [np.zeros(10)])).kind == "ack"
            with pytest.raises((RemoteError, TransportError)):
                client.request(Message("ack", {}, [np.zeros(100_000)]))
            assert not client.connected
        assert wait_for(lambda: srv.protocol_errors_total == 1)
    finally:
        srv.stop()


def test_abort_wakes_a_blocked_request(certs: Certs) -> None:
    release = threading.Event()

    def slow(msg: Message, peer: PeerInfo) -> Message:
        release.wait(10)
        return Message("late")

    srv = FrameServer(LOOPBACK, 0, certs.server_ctx(), slow)
    srv.start()
    try:
        client = client_for(srv, certs)
        client.connect()
        threading.Timer(0.2, client.abort).start()
        started = time.monotonic()
        with pytest.raises(TransportError):
            client.request(Message("wait"))
        assert time.monotonic() - started < 5
        assert not client.connected
    finally:
        release.set()
        srv.stop()


def test_set_timeout_applies_to_open_connection(certs: Certs) -> None:
    release = threading.Event()

    def slow(msg: Message, peer: PeerInfo) -> Message:
        release.wait(10)
        return Message("late")

    srv = FrameServer(LOOPBACK, 0, certs.server_ctx(), slow)
    srv.start()
    try:
        client = client_for(srv, certs)
        client.connect()
        client.set_timeout(0.3)
        started = time.monotonic()
        with pytest.raises(TransportError, match="in time") as info:
            client.request(Message("wait"))
        assert isinstance(info.value, TimeoutError)
        assert time.monotonic() - started < 5
    finally:
        release.set()
        srv.stop()


def test_connection_cap_refuses_extra_peers(certs: Certs) -> None:
    srv = FrameServer(LOOPBACK, 0, certs.server_ctx(), Recorder(), handshake_timeout=0.5,
                      max_connections=2)
    srv.start()
    try:
        silent = [socket.create_connection(srv.address, timeout=5) for _ in range(2)]
        assert wait_for(lambda: srv.active_connections == 2)
        with pytest.raises(TransportError):
            client_for(srv, certs).request(Message("ack"))
        assert srv.refused_total == 1
        for sock in silent:
            sock.settimeout(5)
            assert sock.recv(1) == b""  # handshake timeout frees the slots
            sock.close()
        assert wait_for(lambda: srv.active_connections == 0)
        with client_for(srv, certs) as client:
            assert client.request(Message("ack")).kind == "ack"
    finally:
        srv.stop()


@pytest.mark.parametrize("version, side", [(PROTOCOL_VERSION - 1, "run `flctl deploy`"),
                                           (PROTOCOL_VERSION + 1, "upgrade flctl on this")])
def test_an_agent_of_another_protocol_version_says_which_side_to_upgrade(
        certs: Certs, version: int, side: str) -> None:
    """An agent older or newer than this flctl answers in its own version; the
    coordinator's one line says which of the two to upgrade."""
    listener = socket.create_server((LOOPBACK, 0))
    context = certs.server_ctx()

    def agent() -> None:
        raw, _ = listener.accept()
        with context.wrap_socket(raw, server_side=True) as tls:
            tls.recv(1 << 16)
            tls.sendall(_raw(_header({"kind": "error", "meta": {"error": "?"}}), 0,
                             version=version))

    thread = threading.Thread(target=agent, daemon=True)
    thread.start()
    client = FrameClient(LOOPBACK, listener.getsockname()[1], certs.client_ctx(),
                         server_hostname=LOOPBACK, timeout=10)
    try:
        with pytest.raises(ProtocolError) as caught:
            client.request(Message("info"))
    finally:
        client.close()
        thread.join(10)
        listener.close()
    line = caught.value.message
    assert f"its agent speaks protocol {version}, this flctl {PROTOCOL_VERSION}" in line
    assert side in line and "\n" not in line
